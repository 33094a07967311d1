"""Helpers of the scale-out tests (launch, Slurm, S3): one small job, its 1-shard reference,
real processes started and stopped by pid, and waits that always end."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from conftest import ROOT, cli, job_flags

from calibjob.jobs import open_store, store_exists

# 12 trajectories x 10 steps, one trajectory per unit: 4 units per shard of 3, so a worker
# killed after its first unit still has work left.
JOB = {"num-fid-samples": 12, "num-sampling-steps": 10, "num-selected-steps": 3, "batch-size": 1}

_reference: dict[str, Path] = {}


def flags(prompt_file: Path) -> list[str]:
    return job_flags(prompt_file, **JOB)


def reference(prompt_file: Path, tmp_root: Path) -> Path:
    """The job run as one uninterrupted shard and merged: computed once per test session."""
    if "npz" not in _reference:
        store = tmp_root / "reference.zarr"
        cli("run", *flags(prompt_file), "--store", str(store), "--no-progress")
        out = tmp_root / "reference.npz"
        cli("merge", str(store), "-o", str(out))
        _reference["npz"] = out
    return _reference["npz"]


def start(*args: str, env: dict | None = None) -> subprocess.Popen:
    """`calibjob ARGS` as a real process, in its own session (so a stray one can be stopped)."""
    return subprocess.Popen(
        [sys.executable, "-m", "calibjob.cli", *args],
        cwd=ROOT,
        env=env or dict(os.environ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(p: subprocess.Popen, timeout: float) -> str:
    """Wait for a started process (killing its group past `timeout`); return its output."""
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        raise AssertionError(f"calibjob {p.args[3:]} ran past {timeout} s:\n{out}") from None
    return out


def wait_for(pred: Callable[[], object], timeout: float, what: str) -> object:
    """Poll `pred` until it returns something true; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def running_worker(location: str, min_units_left: int = 1) -> tuple[str, int] | None:
    """(shard, pid) of a worker that has written a unit and still has some left, if any."""
    if not store_exists(location):
        return None
    try:
        progress = open_store(location, mode="r").progress()
    except Exception:  # noqa: BLE001  (the store is being created right now)
        return None
    for shard, info in sorted(progress.items()):
        if info.get("units_left", 0) >= min_units_left and "pid" in info:
            return shard, int(info["pid"])
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_one_worker_mid_run(p: subprocess.Popen, location: str) -> tuple[str, str]:
    """SIGKILL one of `launch`'s workers while it still has units left, let `launch` finish
    (it waits, then prints status); return the killed shard and launch's output."""
    try:
        shard, pid = wait_for(
            lambda: running_worker(location, min_units_left=2), 120, "a worker mid-run"
        )
        os.kill(pid, signal.SIGKILL)
        out = finish(p, 180)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    return shard, out
