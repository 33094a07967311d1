"""Shared helpers: small tiny-model jobs and the real CLI run as subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# before any test imports DiffusionKit itself: OpenBLAS before MLX, and the stand-ins for
# argmaxtools and diffusionkit.utils where torch and coremltools are not installed
import calibjob.diffusionkit_imports  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent

PROMPTS = ["a red fox in snow", "a lighthouse in a storm", "a bowl of ramen"]


@pytest.fixture(scope="session")
def prompt_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("prompts") / "three.txt"
    p.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return p


def service_missing(msg: str) -> None:
    """A cluster test whose service is not on this machine: skipped (a laptop, the inner loop),
    or failed where CALIBJOB_REQUIRE_CLUSTER=1 says it must be there (CI)."""
    if os.environ.get("CALIBJOB_REQUIRE_CLUSTER") == "1":
        pytest.fail(msg)
    pytest.skip(msg)


def job_flags(prompt_file: Path, **over) -> list[str]:
    """A small tiny-model job: 6 trajectories (2 per prompt) x 6 steps, 3 selected."""
    opts = {
        "model-version": "tiny",
        "num-fid-samples": 6,
        "num-sampling-steps": 6,
        "num-selected-steps": 3,
        "prompt-file": str(prompt_file),
        "batch-size": 2,
        "seed": 7,
    }
    opts.update(over)
    flags = []
    for k, v in opts.items():
        flags += (
            [f"--{k}", *(str(x) for x in v)] if isinstance(v, list | tuple) else [f"--{k}", str(v)]
        )
    return flags


def cli(*args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `calibjob ARGS` as a real process (the installed CLI's module entry)."""
    proc = subprocess.run(
        [sys.executable, "-m", "calibjob.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env or dict(os.environ),
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"calibjob {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}"
        )
    return proc


def popen(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "calibjob.cli", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as d:
        return {k: d[k] for k in d.files}


def assert_same_npz(a: Path, b: Path) -> None:
    da, db = load_npz(a), load_npz(b)
    assert sorted(da) == sorted(db)
    for k in da:
        assert da[k].dtype == db[k].dtype, k
        assert np.array_equal(da[k], db[k]), f"{k} differs"


@pytest.fixture(scope="session")
def dry_run(tmp_path_factory) -> tuple[Path, Path]:
    """The spec's dry-run job on the tiny model, run by the worker and merged, once per session."""
    from calibjob import api
    from calibjob.config import JobConfig, load_job_file
    from calibjob.core.shards import ALL
    from calibjob.jobs.run import RUN
    from calibjob.merge import merge

    root = tmp_path_factory.mktemp("calib-dry-run")
    store, npz = root / "dry-run.zarr", root / "dry_run_cali.npz"
    fields = load_job_file(ROOT / "jobs" / "dry-run.toml")
    cfg = JobConfig.from_dict({**fields, "model_version": "tiny"})
    api.run(RUN, cfg, str(store), [ALL], progress=False)
    merge([store], npz)
    return store, npz


@pytest.fixture(scope="session")
def baseline(tmp_path_factory, prompt_file) -> tuple[Path, Path]:
    """The job tests' job (test_job.flags) as one shard, uninterrupted, merged: the reference
    every other way of running must equal."""
    d = tmp_path_factory.mktemp("baseline")
    store, out = d / "one.zarr", d / "one.npz"
    cli("run", *job_flags(prompt_file, **{"num-sampling-steps": 20, "num-selected-steps": 5}),
        "--store", str(store))  # fmt: skip
    cli("merge", str(store), "-o", str(out))
    return store, out
