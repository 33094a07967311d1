"""Memory sizing: the auto batch fits the budget, --max-memory caps it, workers sharing a device
plan for their share, and a run encodes, frees the encoders, then loads the MMDiT (tiny model),
recording each shard's peak for `status`."""

from __future__ import annotations

import pytest
from conftest import cli, job_flags

from calibjob import device
from calibjob.config import SD3_MEDIUM, JobConfig
from calibjob.core import launch
from calibjob.errors import ConfigError

pytestmark = pytest.mark.model


def brute_force_batch(budget, fixed, per, cap):
    best = 0
    for b in range(1, cap + 1):
        if fixed + b * per <= budget + 1e-12:
            best = b
    return best


@pytest.mark.parametrize(
    "budget,fixed,per,cap",
    [(16, 5.2, 0.3, 32), (12, 5.2, 1.0, 13), (5.0, 5.2, 0.3, 8), (80, 5.2, 0.3, 13), (6, 5, 1, 1)],
)
def test_fit_batch_is_the_largest_that_fits(budget, fixed, per, cap):
    assert device.fit_batch(budget, fixed, per, cap) == brute_force_batch(budget, fixed, per, cap)


def test_auto_batch_never_plans_over_max_memory():
    kw = dict(model=SD3_MEDIUM, dtype="float16", compile="on", latent_size=(32, 32))
    per = device.trajectory_gb(SD3_MEDIUM, "float16", "on")
    fixed = device.weights_gb(SD3_MEDIUM, "float16") + device.RESERVE_GB
    for cap_gb in (7.0, 8.5, 12.0):
        b = device.resolve_batch_size(0, 13, max_memory=cap_gb, **kw)
        assert 1 <= b <= 4  # CPU cap
        assert fixed + b * per <= cap_gb
    # two workers on one device: each plans for half
    half = device.resolve_batch_size(0, 13, max_memory=14.0, share=2, **kw)
    assert fixed + half * per <= 7.0
    with pytest.raises(ConfigError, match="needs about .* GB at batch 1"):
        device.resolve_batch_size(0, 13, max_memory=4.0, **kw)
    # a batch given by the user is kept as it is
    assert device.resolve_batch_size(7, 13, max_memory=4.0, **kw) == 7


def test_flux_plans_from_its_measured_footprint():
    """FLUX.1 at 1024x1024, bfloat16: 23.8 GB of weights and 2.45 GB a trajectory (one branch,
    no CFG rows; measured 2.43 on an H200), so a 30 GB cap holds batch 2 and 24 GB none."""
    flux = "argmaxinc/mlx-FLUX.1-schnell"
    per = device.trajectory_gb(flux, "bfloat16", "on", (128, 128))
    assert 2.3 < per < 2.6
    # the same tokens and width under CFG would cost twice: FLUX's rows are half SD3's
    assert device.trajectory_gb(flux, "bfloat16", "on", (32, 32)) < per / 8
    fixed = device.weights_gb(flux, "bfloat16") + device.RESERVE_GB
    assert device.fit_batch(30.0, fixed, per, 13) == 2
    assert device.fit_batch(48.0, fixed, per, 13) == 9  # a 64 GB Mac's working set
    kw = dict(model=flux, dtype="bfloat16", compile="on", latent_size=(128, 128))
    with pytest.raises(ConfigError, match=r"FLUX.1-schnell needs about 27\.\d GB at batch 1"):
        device.resolve_batch_size(0, 13, max_memory=20.0, **kw)
    assert device.resolve_dtype("auto", flux) in ("float32", "bfloat16")  # CPU: float32


def test_max_memory_is_not_part_of_the_job_identity():
    a = JobConfig(prompts=("x",), batch_size=4)
    assert a.fingerprint() == a.replace(max_memory=12.0).fingerprint()
    with pytest.raises(ConfigError, match="--max-memory"):
        a.replace(max_memory=-1.0).validate()


def test_device_share_counts_workers_per_gpu(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert launch.device_share("local", 5) == 3
    assert launch.device_share("local", 2) == 1
    assert launch.device_share("slurm", 5) == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert launch.device_share("local", 4) == 4  # one device (a Mac, a CPU machine)


def test_launch_refuses_shares_that_cannot_fit(prompt_file, tmp_path):
    flags = job_flags(
        prompt_file, **{"model-version": "sd3-medium", "max-memory": 8, "batch-size": 0}
    )
    r = cli(
        "launch",
        "--store",
        str(tmp_path / "s.zarr"),
        "--shards",
        "3",
        *flags,
        check=False,
        env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "1/3 share of the device" in lines[0], r.stderr
    assert not (tmp_path / "s.zarr").exists()


def test_run_encodes_frees_then_loads_and_records_peak(prompt_file, tmp_path):
    from calibjob import api
    from calibjob.config import JobConfig
    from calibjob.core.shards import ALL
    from calibjob.core.status import store_status
    from calibjob.jobs import open_store
    from calibjob.jobs.run import RUN

    cfg = (
        JobConfig(
            model_version="tiny",
            num_fid_samples=3,
            num_sampling_steps=3,
            num_selected_steps=2,
            prompt_file=str(prompt_file),
            batch_size=1,
        )
    )
    res = api.run(RUN, cfg, str(tmp_path / "s.zarr"), [ALL], progress=False)
    # text encoders alone, encode, free; then the MMDiT alone
    assert list(res.phases) == ["load_text", "encode", "load_mmdit", "denoise"]
    assert all(gb > 0 for _, gb in res.phases.values())
    rows = store_status(open_store(tmp_path / "s.zarr", mode="r")).rows
    assert rows[0].peak_memory_gb is not None and rows[0].peak_memory_gb > 0
    out = cli("status", str(tmp_path / "s.zarr"), check=False).stdout
    assert "peak GB" in out
