"""`calibjob launch --executor local`: N real worker processes through submitit; one is
SIGKILLed mid-run, launching again runs only what is missing, and the merged data equal an
uninterrupted 1-shard run bit for bit."""

from __future__ import annotations

import json
import os

import pytest
from conftest import assert_same_npz, cli
from scaleout import finish, flags, kill_one_worker_mid_run, reference, start

from calibjob.jobs import open_store

pytestmark = pytest.mark.e2e


def test_local_launch_sigkill_one_worker_then_launch_again(prompt_file, tmp_path_factory, tmp_path):
    ref = reference(prompt_file, tmp_path_factory.mktemp("reference"))
    store = tmp_path / "job.zarr"
    args = ["launch", *flags(prompt_file), "--store", str(store), "--shards", "3"]
    # two "GPUs" visible: workers are pinned round robin (MLX on CPU ignores the variable)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0,1"}
    p = start(*args, env=env)
    shard, out = kill_one_worker_mid_run(p, str(store))
    assert p.returncode == 1, out  # incomplete
    assert f"shard {shard}: failed" in out, out
    assert f"shard {shard} failed (job" in out, out  # the status part, with the log's end
    done = open_store(store, mode="r").done_mask()
    assert 0 < done.sum() < len(done)

    # each worker saw its own GPU; logs and the launch record are in STORE/logs
    record = json.loads((store / "logs" / "launch.json").read_text())
    assert sorted(record["tasks"]) == ["0/3", "1/3", "2/3"]
    for name, gpu in (("0/3", "0"), ("1/3", "1"), ("2/3", "0")):
        log = open(record["tasks"][name]["stdout"]).read()
        assert f"CUDA_VISIBLE_DEVICES={gpu!r}" in log, log

    # `status` in a separate process finds the failure through the record and the log
    st = cli("status", str(store), check=False)
    assert st.returncode == 1
    assert f"shard {shard} failed" in st.stdout and "missing trajectories" in st.stdout

    p = start(*args)
    out = finish(p, 180)
    assert p.returncode == 0, out
    assert f"launched shards {shard} of 3" in out, out  # only the shard with work left
    assert "complete: ready for `calibjob merge`" in out

    again = cli("launch", *args[1:])
    assert "nothing left to do" in again.stdout

    merged = tmp_path / "launched.npz"
    cli("merge", str(store), "-o", str(merged))
    assert_same_npz(merged, ref)


def test_local_shards_are_pinned_to_distinct_gpus_while_there_are_enough(monkeypatch):
    from calibjob.core.launch import device_share, gpu_for_shard, visible_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")  # a node's last four GPUs
    gpus = visible_gpus()
    assert gpus == [4, 5, 6, 7]
    for n in (1, 2, 4):
        pins = [gpu_for_shard(i, gpus) for i in range(n)]
        assert all(len(p) == 1 for p in pins)
        assert len({p[0] for p in pins}) == n  # distinct devices, one worker each
        assert device_share("local", n) == 1
    eight = [gpu_for_shard(i, gpus)[0] for i in range(8)]  # more shards than GPUs
    assert eight == [4, 5, 6, 7, 4, 5, 6, 7] and device_share("local", 8) == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpu_for_shard(0, visible_gpus()) == []
