"""`calibjob launch --executor slurm` on a real one-node Slurm (slurmctld + slurmd on loopback,
started by tests/slurm_up.sh): a 3-task job array on one store, merged, equals a 1-shard run."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT, assert_same_npz, cli, service_missing
from scaleout import finish, flags, free_port, reference, start

pytestmark = pytest.mark.cluster

UP = ROOT / "tests" / "slurm_up.sh"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running Slurm; yields the environment its clients need. Stopped by pid at the end."""
    d = tmp_path_factory.mktemp("slurm")
    res = subprocess.run(
        [str(UP), "start", str(d), str(free_port()), str(free_port())],
        capture_output=True, text=True, timeout=600,
    )
    env = {**os.environ, "SLURM_CONF": str(d / "slurm.conf")}
    try:
        if res.returncode != 0:
            service_missing(
                "could not start a one-node Slurm (CI must install slurm-wlm and munge and run "
                f"as root):\n{res.stdout}{res.stderr}"
            )
        yield env
    finally:
        if res.returncode == 0:  # jobs of this test cluster first, then its daemons
            subprocess.run(["scancel", "-u", "root"], env=env, capture_output=True, timeout=30)
        subprocess.run([str(UP), "stop", str(d)], capture_output=True, timeout=60)


def test_slurm_job_array_equals_one_shard(slurm, prompt_file, tmp_path_factory, tmp_path):
    ref = reference(prompt_file, tmp_path_factory.mktemp("reference"))
    store = tmp_path / "job.zarr"
    p = start(
        "launch", *flags(prompt_file), "--store", str(store), "--shards", "3",
        "--executor", "slurm", "--time", "10", env=slurm,
    )
    out = finish(p, 240)
    assert p.returncode == 0, out
    assert "job array" in out and "complete: ready for `calibjob merge`" in out, out

    record = json.loads((store / "logs" / "launch.json").read_text())
    ids = sorted(t["job_id"] for t in record["tasks"].values())
    array = ids[0].split("_")[0]
    assert ids == [f"{array}_{i}" for i in range(3)]  # one array of three tasks
    for t in record["tasks"].values():
        assert Path(t["stdout"]).parent == store / "logs"
        assert "shard" in Path(t["stdout"]).read_text()

    merged = tmp_path / "slurm.npz"
    cli("merge", str(store), "-o", str(merged))
    assert_same_npz(merged, ref)
