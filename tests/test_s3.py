"""A store on S3 (a loopback moto_server): a 2-shard launch, one worker SIGKILLed, a lock left
by a dead holder, `resume`, `status` and `merge` through the bucket give the very arrays of a
local 1-shard run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import assert_same_npz, cli, service_missing
from scaleout import flags, free_port, kill_one_worker_mid_run, reference, start, wait_for

from calibjob.core.locations import LOCK_NAME
from calibjob.jobs import open_store

pytestmark = pytest.mark.cluster

BUCKET = "calibjob-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto_server on loopback with one bucket; yields the environment clients need."""
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which(
        "moto_server"
    )
    if exe is None:
        service_missing("moto_server not found: `make test` installs it (the test extra)")
    try:
        import boto3
        import obstore  # noqa: F401
    except ImportError as e:
        service_missing(f"{e.name} is missing: `make test` installs it (the test and s3 extras)")
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    server = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log)
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # this process reads the bucket too
    try:

        def up() -> bool:
            try:
                return urllib.request.urlopen(endpoint, timeout=1).status == 200
            except OSError:
                return False

        wait_for(up, 30, f"moto_server on {endpoint}")
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        yield dict(os.environ)
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_s3_store_sigkill_stale_lock_resume_merge(s3, prompt_file, tmp_path_factory, tmp_path):
    import obstore

    from calibjob.core.objects import object_store

    ref = reference(prompt_file, tmp_path_factory.mktemp("reference"))
    url = f"s3://{BUCKET}/runs/job.zarr"
    logs = tmp_path / "logs"
    p = start(
        "launch", *flags(prompt_file), "--store", url, "--shards", "2", "--logs", str(logs),
        env=s3,
    )
    shard, out = kill_one_worker_mid_run(p, url)
    assert p.returncode == 1, out
    assert f"shard {shard}: failed" in out, out
    assert json.loads((logs / "launch.json").read_text())["store"] == url
    done = open_store(url, mode="r").done_mask()
    assert 0 < done.sum() < len(done)

    st = cli("status", url, "--logs", str(logs), check=False, env=s3)
    assert st.returncode == 1, st.stderr
    assert url in st.stdout and f"shard {shard} failed" in st.stdout

    # a lock object whose holder died: taken over once it stops changing for the TTL
    bucket = object_store(url)
    obstore.put(bucket, LOCK_NAME, b'{"owner": "a killed process"}', mode="create")
    res = cli("resume", url, env={**s3, "CALIBJOB_LOCK_TTL_S": "2"})
    assert "trajectories" in res.stdout, res.stdout
    with pytest.raises(FileNotFoundError):
        obstore.head(bucket, LOCK_NAME)  # released

    assert cli("status", url, env=s3).returncode == 0
    merged = tmp_path / "s3.npz"
    cli("merge", url, "-o", str(merged), env=s3)
    assert_same_npz(merged, ref)


def test_object_lock_excludes_a_live_holder_and_takes_over_a_dead_one(s3):
    """The lock primitive itself, on the real server: create-if-absent, heartbeat, takeover."""
    import obstore

    from calibjob.core.objects import ObjectLock, object_store

    url = f"s3://{BUCKET}/locks"
    a = ObjectLock(url, "L", ttl_s=1.0)
    a.acquire()
    b = ObjectLock(url, "L", ttl_s=1.0)
    waiter = threading.Thread(target=b.acquire, daemon=True)
    waiter.start()
    waiter.join(3.0)  # three TTLs: a's heartbeat keeps b out
    assert waiter.is_alive(), "a live holder's lock was taken"
    a.release()
    waiter.join(10.0)
    assert not waiter.is_alive(), "the lock was not handed on after release"
    b.release()

    obstore.put(object_store(url), "L", b"left by a SIGKILLed holder", mode="create")
    t0 = time.monotonic()
    with ObjectLock(url, "L", ttl_s=1.0):
        waited = time.monotonic() - t0
    assert 1.0 <= waited < 10.0
    with pytest.raises(FileNotFoundError):
        obstore.head(object_store(url), "L")


def test_a_profile_store_on_s3_equals_a_local_one(s3, prompt_file, tmp_path_factory, tmp_path):
    from calibjob.profile.stats import export, load

    ref = reference(prompt_file, tmp_path_factory.mktemp("reference"))
    url = f"s3://{BUCKET}/profiles/p.zarr"
    local = tmp_path / "local.zarr"
    cli("profile", str(ref), "--store", str(local), "--no-progress")
    for i in range(2):  # two shards, one after the other, into the bucket
        cli("profile", str(ref), "--store", url, "--shard", f"{i}/2", "--no-progress", env=s3)
    st = cli("status", url, env=s3)
    assert "complete: ready for `calibjob profile-report`" in st.stdout, st.stdout
    assert "nothing left to do" in cli("resume", url, env=s3).stdout
    export(load(url), tmp_path / "s3.npz")
    export(load(local), tmp_path / "local.npz")
    assert (tmp_path / "s3.npz").read_bytes() == (tmp_path / "local.npz").read_bytes()
