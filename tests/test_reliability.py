"""Faults that lose a user's night, each with real processes (issue: reliability).

Faults that only timing can reach are injected in-process by tests/faults.py (a slow fsync, a
model load that fails, a slow link); kills are real SIGKILLs; damaged files are written here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import ROOT, assert_same_npz, cli, popen
from test_job import done_count, flags, merge

from calibjob.jobs import open_store, store_exists

pytestmark = pytest.mark.e2e

FAULTS = str(ROOT / "tests" / "faults.py")


def faulty(*args: str, faults: tuple[str, ...] = ()) -> subprocess.Popen:
    """`calibjob ARGS` as a real process with faults injected (tests/faults.py)."""
    return subprocess.Popen(
        [sys.executable, FAULTS, *faults, "--", *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def one_line_error(proc_stderr: str) -> str:
    """The one error line, beside the progress family ('calibjob: shard ...': run's first line,
    before the model loads, and the per-unit lines)."""
    lines = [ln for ln in proc_stderr.splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith("calibjob: shard ")]
    assert "Traceback" not in proc_stderr, proc_stderr
    assert len(lines) == 1 and lines[0].startswith("calibjob: error:"), proc_stderr
    return lines[0]


@pytest.fixture(scope="module")
def b1(tmp_path_factory, prompt_file) -> tuple[Path, Path]:
    """The job at batch 1 (one trajectory a unit), run uninterrupted and merged."""
    d = tmp_path_factory.mktemp("b1")
    store = d / "b1.zarr"
    cli("run", *flags(prompt_file, **{"batch-size": 1}), "--store", str(store))
    return store, merge(store, d / "b1.npz")


# ---- 1. a shard that cannot load its model never deletes the shared store -------------------


def test_a_failing_shard_leaves_the_shared_store_and_the_healthy_shard_alone(
    baseline, prompt_file, tmp_path
):
    store = tmp_path / "shared.zarr"
    args = ["run", *flags(prompt_file), "--store", str(store), "--no-progress"]
    # the broken shard finds no store (so it creates it), and fails while the healthy shard
    # is loading its model on that store (before the fix: it removed the store it "created")
    trigger = tmp_path / "fail-now"
    broken = faulty(*args, "--shard", "1/2",
                    faults=("--load-fails", "--fail-when", str(trigger)))  # fmt: skip
    deadline = time.monotonic() + 60
    while not store_exists(store) and time.monotonic() < deadline:
        time.sleep(0.01)
    healthy = popen(*args, "--shard", "0/2")
    maps = Path(f"/proc/{healthy.pid}/maps")
    while time.monotonic() < deadline + 60 and healthy.poll() is None:
        if "/PIL/_imaging" in maps.read_text():  # importing DiffusionKit (its first use of
            break  # Pillow): the store is open, not encoded yet
        time.sleep(0.01)
    trigger.touch()
    _, berr = broken.communicate(timeout=120)
    _, herr = healthy.communicate(timeout=300)
    assert broken.returncode == 2 and "no weights here" in one_line_error(berr)
    assert healthy.returncode == 0, herr
    assert store_exists(store)
    cli("run", *flags(prompt_file), "--store", str(store), "--shard", "1/2")
    assert_same_npz(merge(store, tmp_path / "m.npz"), baseline[1])


def test_a_model_that_fails_on_a_new_store_leaves_a_clean_empty_store(prompt_file, tmp_path):
    store = tmp_path / "new.zarr"
    args = ["run", *flags(prompt_file), "--store", str(store)]
    p = faulty(*args, faults=("--load-fails",))
    _, errout = p.communicate(timeout=120)
    assert p.returncode == 2 and "no weights here" in one_line_error(errout)
    st = open_store(store, mode="r")
    assert not st.prepared and not st.done_mask().any()
    cli(*args)  # the same command on a machine with the weights continues there
    assert open_store(store, mode="r").done_mask().all()


# ---- 2. damaged markers, conditioning and metadata: one line, and resume repairs --------------


def _flip(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, len(path.read_bytes()) // 3)])


DAMAGE = {
    "truncated done marker": lambda s: _truncate(s / "done/c/5"),
    "flipped done marker": lambda s: _flip(s / "done/c/2"),
    "flipped byte in cs": lambda s: _flip(s / "cs/c/1/0/0/0"),
    "truncated done/zarr.json": lambda s: _truncate(s / "done/zarr.json"),
    "truncated encoded/zarr.json": lambda s: _truncate(s / "encoded/zarr.json"),
    "truncated cs/zarr.json": lambda s: _truncate(s / "cs/zarr.json"),
    "truncated ts/zarr.json": lambda s: _truncate(s / "ts/zarr.json"),
    "truncated xs/zarr.json": lambda s: _truncate(s / "xs/zarr.json"),
    "truncated progress/zarr.json": lambda s: _truncate(s / "progress/zarr.json"),
    "truncated progress record": lambda s: _truncate(s / "progress/0-of-1/zarr.json"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damage_is_one_line_everywhere_and_resume_repairs_it(case, baseline, tmp_path):
    store = tmp_path / "damaged.zarr"
    shutil.copytree(baseline[0], store)
    DAMAGE[case](store)
    progress_only = "progress" in case
    quick = cli("status", str(store), check=False)  # presence and sizes: may not see a flip
    assert "Traceback" not in quick.stderr + quick.stdout
    st = cli("status", "--verify", str(store), check=False)  # checksums too
    assert "Traceback" not in st.stderr
    if progress_only:  # display only: shown as unknown, and the job is still complete
        assert st.returncode == 0 and "complete" in st.stdout, st.stdout + st.stderr
    else:
        assert st.returncode != 0
        text = st.stderr + st.stdout
        assert "damaged" in text and "calibjob resume" in text, text
    out = tmp_path / "m.npz"
    m = cli("merge", str(store), "-o", str(out), check=False)
    if not progress_only:
        assert m.returncode == 2 and "damaged" in one_line_error(m.stderr)
        assert not out.exists()
    r = cli("resume", str(store), "--no-progress", check=False)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    if not progress_only:
        assert "repaired" in r.stderr or "recomputing" in r.stderr, r.stderr
    assert "Traceback" not in cli("status", str(store)).stderr
    out.unlink(missing_ok=True)
    assert_same_npz(merge(store, out), baseline[1])


def test_a_damaged_marker_of_a_whole_chunk_is_restored_without_recomputing(baseline, tmp_path):
    store = tmp_path / "marker.zarr"
    shutil.copytree(baseline[0], store)
    _truncate(store / "done/c/5")
    chunk = store / "xs/c/5/0/0/0/0"
    before = chunk.stat().st_mtime_ns
    r = cli("resume", str(store), "--no-progress")
    assert "done/c/5" in r.stderr and "nothing left to do" in r.stdout
    assert chunk.stat().st_mtime_ns == before


# ---- 3. duplicate workers: units are claimed ------------------------------------------------


def _computed(log: Path) -> list[tuple[int, str]]:
    if not log.exists():
        return []
    return [(int(p), t) for p, t in (ln.split() for ln in log.read_text().splitlines())]


def test_two_workers_of_one_shard_never_compute_a_unit_twice(b1, prompt_file, tmp_path):
    store, log = tmp_path / "twice.zarr", tmp_path / "units.log"
    args = ["run", *flags(prompt_file, **{"batch-size": 1}), "--store", str(store)]
    procs = [faulty(*args, faults=("--log-units", str(log))) for _ in range(2)]
    for p in procs:
        _, e = p.communicate(timeout=300)
        assert p.returncode == 0, e
    units = [t for _, t in _computed(log)]
    assert sorted(units) == [str(k) for k in range(6)], units  # each unit exactly once
    assert_same_npz(merge(store, tmp_path / "t.npz"), b1[1])
    st = cli("status", str(store))  # both have ended: the shard is finished, not elsewhere
    assert "finished" in st.stdout and "running elsewhere" not in st.stdout, st.stdout


def test_resume_while_a_worker_runs_leaves_its_units_to_it(b1, prompt_file, tmp_path):
    store, log = tmp_path / "busy.zarr", tmp_path / "units.log"
    args = ["run", *flags(prompt_file, **{"batch-size": 1}), "--store", str(store)]
    gate = tmp_path / "go"
    # the first worker holds its second unit (and that unit's lease) until the second worker
    # has finished: an order made by events, not by how fast the machine is today
    first = faulty(*args, faults=("--log-units", str(log), "--hold-second-unit", str(gate)))
    deadline = time.monotonic() + 120
    while done_count(store) < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    second = faulty("resume", str(store), faults=("--log-units", str(log)))
    _, e = second.communicate(timeout=300)
    assert second.returncode == 0, e
    gate.touch()
    _, e = first.communicate(timeout=300)
    assert first.returncode == 0, e
    units = [t for _, t in _computed(log)]
    assert sorted(units) == [str(k) for k in range(6)], units
    assert len({pid for pid, _ in _computed(log)}) == 2  # both did some of the work
    assert_same_npz(merge(store, tmp_path / "r.npz"), b1[1])


def test_a_killed_workers_claims_do_not_block_resume(b1, prompt_file, tmp_path):
    store = tmp_path / "claimed.zarr"
    p = popen("run", *flags(prompt_file, **{"batch-size": 1}), "--store", str(store))
    deadline = time.monotonic() + 120
    while done_count(store) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert list((store / "claims").iterdir()), "the killed worker held a claim"
    r = cli("resume", str(store), "--no-progress")
    assert "held by live workers" not in r.stdout
    assert not [f for f in (store / "claims").iterdir() if f.name.isdigit()]
    assert_same_npz(merge(store, tmp_path / "k.npz"), b1[1])


def test_a_writer_leaves_a_fresh_partial_file_of_another_writer_alone(b1, prompt_file, tmp_path):
    store = tmp_path / "partials.zarr"
    shutil.copytree(b1[0], store)
    d = store / "xs/c/4/0/0/0"
    fresh, stale = d / "0.aaaa.partial", d / "0.bbbb.partial"
    fresh.write_bytes(b"another writer, mid-write")
    stale.write_bytes(b"a writer killed long ago")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    _truncate(d / "0")  # trajectory 4 must be written again
    cli("resume", str(store), "--no-progress")
    assert fresh.exists() and not stale.exists()


def test_launch_again_does_not_start_a_second_copy_of_live_shards(prompt_file, tmp_path):
    store = tmp_path / "launched.zarr"
    common = [*flags(prompt_file, **{"batch-size": 1, "num-sampling-steps": 120}), "--store",
              str(store), "--shards", "2"]  # fmt: skip
    def launch(name: str) -> str:  # output to a file: the workers inherit no pipe to wait on
        log = tmp_path / name
        with open(log, "w") as f:
            rc = subprocess.run([sys.executable, "-m", "calibjob.cli", "launch", *common,
                                 "--no-wait"], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                timeout=120).returncode  # fmt: skip
        assert rc == 0, log.read_text()
        return log.read_text()

    assert "launched shards 0/2, 1/2" in launch("first.log")
    record = json.loads((store / "logs/launch.json").read_text())
    again = launch("again.log")
    assert "already running" in again and "launched shards" not in again, again
    after = json.loads((store / "logs/launch.json").read_text())
    assert after["tasks"] == record["tasks"]  # the first pair is not forgotten
    for e in record["tasks"].values():  # wait for them, then nothing was computed twice
        deadline = time.monotonic() + 300
        while Path(f"/proc/{e['job_id']}").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
    assert open_store(store, mode="r").done_mask().all()


# ---- 4. a kill in the first milliseconds ----------------------------------------------------


def test_a_store_killed_before_its_arrays_is_read_as_empty(prompt_file, tmp_path):
    from calibjob.config import JobConfig
    from calibjob.core.store import FORMAT

    store = tmp_path / "half.zarr"
    cfg = JobConfig(
        model_version="tiny", num_fid_samples=6, num_sampling_steps=20, num_selected_steps=5,
        batch_size=2, dtype="float32", compile="off", seed=7,
        prompts=("a red fox in snow", "a lighthouse in a storm", "a bowl of ramen"),
    )  # fmt: skip
    root = zarr.open_group(str(store), mode="a")  # what _create writes before the arrays
    root.create_group("job", attributes={"calibjob": {"format": FORMAT, "config": cfg.to_dict(),
                                                      "fingerprint": "x"}})  # fmt: skip
    st = cli("status", str(store), check=False)
    assert st.returncode == 1 and "Traceback" not in st.stderr
    assert "0-5" in st.stdout  # nothing done: all six missing
    la = cli("launch", *flags(prompt_file), "--store", str(store), "--shards", "2", check=False)
    assert "Traceback" not in la.stderr + la.stdout


# ---- 5. merges to one output ----------------------------------------------------------------


def test_two_merges_to_one_output_never_both_succeed(baseline, tmp_path):
    out = tmp_path / "one.npz"
    procs = [faulty("merge", str(baseline[0]), "-o", str(out), faults=("--slow-link", "1"))
             for _ in range(2)]  # fmt: skip
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    assert "exists" in next(e for rc, e in results if rc == 2)
    assert_same_npz(out, baseline[1])
    assert not list(tmp_path.glob(".one.npz.*"))


def test_a_killed_merge_leaves_a_partial_the_next_merge_removes(baseline, tmp_path):
    out = tmp_path / "k.npz"
    p = faulty("merge", str(baseline[0]), "-o", str(out), faults=("--slow-fsync", "30"))
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".k.npz.*.partial")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert list(tmp_path.glob(".k.npz.*.partial")) and not out.exists()
    cli("merge", str(baseline[0]), "-o", str(out))
    assert not list(tmp_path.glob(".k.npz.*.partial"))
    assert_same_npz(out, baseline[1])


# ---- 6. a kill loses at most the unit computing and the one being written ---------------------


def test_a_kill_with_a_slow_disk_loses_at_most_one_finished_unit(b1, prompt_file, tmp_path):
    store, log = tmp_path / "slow.zarr", tmp_path / "units.log"
    args = ["run", *flags(prompt_file, **{"batch-size": 1}), "--store", str(store)]
    p = faulty(*args, faults=("--slow-fsync", "0.3", "--log-units", str(log)))
    deadline = time.monotonic() + 120
    while done_count(store) < 3 and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.005)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    computed = {t for _, t in _computed(log)}
    durable = {str(k) for k in np.flatnonzero(open_store(store, mode="r").done_mask())}
    assert len(durable) >= 3
    assert len(computed - durable) <= 1, (computed, durable)
    cli("resume", str(store), "--no-progress")
    assert_same_npz(merge(store, tmp_path / "s.npz"), b1[1])


# ---- 7. full disk while encoding --------------------------------------------------------------


def test_full_disk_while_encoding_says_what_to_do(prompt_file, tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mnt)],
                       capture_output=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    try:
        store = mnt / "enc.zarr"
        proc = cli("run", *flags(prompt_file), "--store", str(store), check=False)
        line = one_line_error(proc.stderr)
        assert "disk full" in line and "prompt conditioning" in line and "resume" in line
        assert not open_store(store, mode="r").prepared
        subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)
        cli("resume", str(store), "--no-progress")
        assert open_store(store, mode="r").done_mask().all()
        assert np.isfinite(open_store(store, mode="r").read_prepared("cs")).all()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


# ---- a kill while a progress record is replaced ------------------------------------------


def test_a_kill_while_a_progress_record_is_replaced_keeps_the_record(prompt_file, tmp_path):
    """The record says which shards ran on a store; without it, status takes a store with
    missing trajectories for one whose other shards are elsewhere (exit 0, "complete here").
    Zarr replaces a group by removing its folder first: removal slowed to 30 s here, a kill
    after the first unit of `resume --all` lands between the two. Records are replaced in one
    atomic write, so the kill finds the record whole."""
    store = tmp_path / "part.zarr"
    args = [*flags(prompt_file), "--store", str(store), "--no-progress"]
    cli("run", *args, "--shard", "0/3")
    before = done_count(store)
    p = faulty("resume", str(store), "--all", "--no-progress", faults=("--slow-rmtree", "30"))
    deadline = time.monotonic() + 120
    while done_count(store) <= before and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.01)
    time.sleep(0.5)  # the unit's write returns, the record is being replaced
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert before < done_count(store) < 6
    st = cli("status", str(store), check=False)
    assert st.returncode == 1 and "missing trajectories" in st.stdout, st.stdout
    assert "complete here" not in st.stdout
    assert {"0/1", "0/3"} <= set(open_store(store, mode="r").progress())
