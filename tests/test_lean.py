"""A lean install and a quick start (issue 21): no torch, coremltools or argmaxtools in the
environment the tests run in (the `make install` of a user plus the `test` extra, which adds
none of them), DiffusionKit loaded through calibjob's stand-ins, the real packages used where
they are installed, `run`'s first line before the model loads and its start-up counted as a
phase, and the kernel cache's files copied whole."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import ROOT, job_flags

HEAVY = ("torch", "coremltools", "argmaxtools")
STAND_INS = ["argmaxtools", "argmaxtools.utils", "argmaxtools.test_utils", "diffusionkit.utils"]

# in a fresh interpreter: what is installed (before anything is imported), then what
# calibjob stands in for once DiffusionKit's MLX code is imported through it
PROBE = textwrap.dedent(
    """
    import importlib.util, json, sys
    found = {n: importlib.util.find_spec(n) is not None for n in sys.argv[1:]}
    import calibjob.diffusionkit_imports as dk
    import diffusionkit.mlx as dkm
    print(json.dumps({
        "found": found,
        "stood_in": dk.STOOD_IN,
        "get_logger": dkm.get_logger.__module__,
        "bytes2gigabytes": dkm.bytes2gigabytes.__module__,
        "argmaxtools": getattr(sys.modules["argmaxtools"], "__file__", None),
    }))
    """
)


def probe(pythonpath: Path | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)} if pythonpath is not None else None
    out = subprocess.run(
        [sys.executable, "-c", PROBE, *HEAVY], capture_output=True, text=True, cwd=ROOT, env=env,
        timeout=300, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_tiny_run_needs_no_torch_coremltools_or_argmaxtools(prompt_file, tmp_path):
    """A real run through the console entry, then in this environment none of the three can
    be found, and DiffusionKit's MLX code took calibjob's stand-ins. Its first line came
    before the model loaded, and its phases begin with the start-up."""
    store = tmp_path / "s.zarr"
    run = subprocess.run(
        [sys.executable, "-m", "calibjob", "run", *job_flags(prompt_file), "--store", str(store)],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    first = run.stderr.splitlines()[0]
    assert first == "calibjob: shard 0/1: 6 trajectories in 3 units to compute; loading tiny"
    phases = [ln for ln in run.stdout.splitlines() if ln.startswith("phases: ")]
    assert phases and phases[0].startswith("phases: startup "), run.stdout
    got = probe()
    assert got["found"] == dict.fromkeys(HEAVY, False), got
    assert got["stood_in"] == STAND_INS
    assert got["get_logger"] == got["bytes2gigabytes"] == "calibjob.diffusionkit_imports"


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")


# small packages in the real ones' place (the real ones would bring back the 1 GB this issue
# removed): what DiffusionKit's modules import from them, and nothing else
ARGMAXTOOLS = {
    "argmaxtools/__init__.py": "",
    "argmaxtools/utils.py": """
        import logging
        import torch
        def get_logger(name, level=logging.INFO):
            return logging.getLogger(name)
    """,
    "argmaxtools/test_utils.py": """
        import coremltools
        import torch
        class InferenceContextSpec: pass
        class AppleSiliconContextMixin: pass
    """,
}
TORCH_AND_COREMLTOOLS = {
    "torch/__init__.py": "from . import nn\n",
    "torch/nn.py": "class Module: ...\n",
    "coremltools/__init__.py": "",
}


def test_the_real_packages_are_used_where_installed(tmp_path):
    _write(tmp_path, {**ARGMAXTOOLS, **TORCH_AND_COREMLTOOLS})
    got = probe(tmp_path)
    assert got["found"] == dict.fromkeys(HEAVY, True)
    assert got["stood_in"] == []
    assert got["get_logger"] == "argmaxtools.utils"
    assert got["bytes2gigabytes"] == "diffusionkit.utils"  # DiffusionKit's own, with torch


def test_argmaxtools_without_torch_keeps_its_package_and_stands_in_for_its_modules(tmp_path):
    _write(tmp_path, ARGMAXTOOLS)
    got = probe(tmp_path)
    assert got["found"] == {"torch": False, "coremltools": False, "argmaxtools": True}
    assert got["stood_in"] == STAND_INS[1:]
    assert got["argmaxtools"] == str(tmp_path / "argmaxtools" / "__init__.py")


# ---- the kernel cache -----------------------------------------------------------------------


def test_the_kernel_cache_is_keyed_by_mlx_version_and_gpu(tmp_path):
    from importlib import metadata

    from calibjob import device

    got = device.kernel_cache_dir(tmp_path, ["NVIDIA H200", "NVIDIA H100 80GB HBM3"])
    assert got == tmp_path / f"mlx-{metadata.version('mlx')}" / "NVIDIA-H200+NVIDIA-H100-80GB-HBM3"


def test_compiled_kernels_are_published_whole_and_never_overwritten(tmp_path):
    from calibjob import device

    private, shared = tmp_path / "private", tmp_path / "shared"
    files = {"a.ptx": "A", "a.txt": "a\tA", "sub/b.ptx": "B", "sub/b.txt": "b\tB"}
    _write(private, files)
    (private / ".c.ptx.123.tmp").write_text("half")  # another process's unfinished copy
    _write(shared, {"a.ptx": "kept"})
    device._publish(private, shared)
    assert not private.exists()
    got = {str(p.relative_to(shared)): p.read_text() for p in shared.rglob("*") if p.is_file()}
    assert got == {**files, "a.ptx": "kept"}
    seeded = tmp_path / "seeded"
    device._copy_missing(shared, seeded)
    assert sorted(p.name for p in seeded.rglob("*") if p.is_file()) == [
        "a.ptx", "a.txt", "b.ptx", "b.txt",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "location, env, expected",
    [
        ("/data/out/paper.zarr", {}, {"CALIBJOB_KERNEL_CACHE": "/data/out/calibjob-kernel-cache"}),
        ("s3://bucket/paper.zarr", {},
         {"CALIBJOB_KERNEL_CACHE": "/work/calibjob-logs/calibjob-kernel-cache"}),
        ("/data/out/paper.zarr", {"MLX_PTX_CACHE_DIR": "/mine"}, {"MLX_PTX_CACHE_DIR": "/mine"}),
        ("/data/out/paper.zarr", {"CALIBJOB_KERNEL_CACHE": "off"},
         {"CALIBJOB_KERNEL_CACHE": "off"}),
    ],
)  # fmt: skip
def test_launched_tasks_share_one_kernel_cache(location, env, expected, monkeypatch):
    from calibjob import device

    for name in ("MLX_PTX_CACHE_DIR", "CALIBJOB_KERNEL_CACHE", "CALIBJOB_MLX_PTX_PRIVATE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    log_dir = "/work/calibjob-logs/bucket_paper.zarr"
    assert device.kernel_cache_env(location, log_dir) == expected
