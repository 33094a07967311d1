"""The job as users run it: real worker processes on real Zarr stores, killed and resumed."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import PROMPTS, assert_same_npz, cli, job_flags, load_npz, popen

from calibjob.jobs import open_store

pytestmark = pytest.mark.e2e

N, S, K = 6, 20, 5  # trajectories, steps, selected: 3 units of 2 (batch 2, 3 prompts)


def flags(prompt_file: Path, **over) -> list[str]:
    return job_flags(prompt_file, **{"num-sampling-steps": S, "num-selected-steps": K, **over})


def tree_digest(path: Path) -> str:
    """A digest of every file's name and bytes under path (to prove 'left as it was')."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.name != ".calibjob.lock"):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def done_ids(store: Path) -> list[int]:
    d = store / "done" / "c"
    return sorted(int(f.name) for f in d.iterdir() if f.name.isdigit()) if d.is_dir() else []


def done_count(store: Path) -> int:
    return len(done_ids(store))


def merge(store: Path | list[Path], out: Path, *extra: str) -> Path:
    stores = [str(s) for s in (store if isinstance(store, list) else [store])]
    cli("merge", *stores, "-o", str(out), *extra)
    return out


def test_merged_file_matches_the_spec(baseline, prompt_file):
    store, npz = baseline
    with np.load(npz) as f:  # no allow_pickle needed: prompts is a unicode array
        d = {k: f[k] for k in f.files}
    assert set(d) == {
        "xs", "ts", "prompt_indices", "cs", "cs_pooled", "prompts", "cfg_scale",
        "trajectory_indices", "step_indices", "sigmas", "model_version", "shift", "dtype",
        "guidance", "guidance_scale",
    }  # fmt: skip
    assert str(d["guidance"]) == "cfg" and float(d["guidance_scale"]) == 0.0
    assert str(d["model_version"]) == "tiny" and d["model_version"].dtype.kind == "U"
    assert float(d["shift"]) == 3.0 and str(d["dtype"]) == "float32"
    m = N * K
    assert d["xs"].shape == (m, 32, 32, 16) and d["xs"].dtype == np.float32
    assert d["ts"].shape == (m,) and d["prompt_indices"].shape == (m,)
    assert d["cs"].shape[:2] == (3, 2) and d["cs_pooled"].shape[:2] == (3, 2)
    assert list(d["prompts"]) == PROMPTS and d["prompts"].dtype.kind == "U"
    assert d["cfg_scale"].shape == () and float(d["cfg_scale"]) == 1.5
    # every (trajectory, selected step) pair exactly once
    sel = np.linspace(0, S - 1, K, dtype=int)
    pairs = set(zip(d["trajectory_indices"].tolist(), d["step_indices"].tolist(), strict=True))
    assert pairs == {(k, s) for k in range(N) for s in sel.tolist()} and len(pairs) == m
    # ts are the schedule's model timesteps at step_indices; prompts are k % P
    st = open_store(store, mode="r")
    ts_sched = st.read_prepared("ts")
    assert np.array_equal(d["ts"], ts_sched[d["step_indices"]])
    assert np.array_equal(d["ts"], (d["sigmas"][d["step_indices"]] * 1000).astype(d["ts"].dtype))
    assert np.array_equal(d["prompt_indices"], d["trajectory_indices"] % 3)
    # each row is the store's x_t at (trajectory, step): the data really comes from the store
    for j in (0, 7, m - 1):
        k, s = d["trajectory_indices"][j], d["step_indices"][j]
        assert np.array_equal(d["xs"][j], st.read_row("xs", int(k))[s])
    # shuffled, not in trajectory order
    assert not np.array_equal(d["trajectory_indices"], np.sort(d["trajectory_indices"]))


def test_stride_selection(baseline, tmp_path):
    store, _ = baseline
    d = load_npz(merge(store, tmp_path / "stride.npz", "--step-selection", "stride"))
    assert sorted(set(d["step_indices"].tolist())) == list(range(0, S, S // K))


def test_three_shards_started_together_equal_one(baseline, prompt_file, tmp_path):
    store = tmp_path / "three.zarr"
    procs = [
        popen("run", *flags(prompt_file), "--store", str(store), "--shard", f"{i}/3")
        for i in range(3)
    ]
    for p in procs:
        _, errout = p.communicate(timeout=300)
        assert p.returncode == 0, errout
    assert_same_npz(merge(store, tmp_path / "three.npz"), baseline[1])


def test_sigkill_mid_unit_then_resume_loses_nothing(baseline, prompt_file, tmp_path):
    store = tmp_path / "killed.zarr"
    p = popen("run", *flags(prompt_file, **{"batch-size": 1}), "--store", str(store))
    deadline = time.monotonic() + 120
    while done_count(store) < 2 and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.01)
    os.kill(p.pid, signal.SIGKILL)  # the third unit (trajectory 2) is in flight
    p.wait()
    done_before = done_count(store)
    assert 2 <= done_before < N, "the kill should land mid-job"
    chunk = store / "xs" / "c"
    chunks = {k: os.stat(chunk / str(k) / "0/0/0/0").st_mtime_ns for k in done_ids(store)}
    # the job was batch 1 here: resume continues with the store's config, not the flags'
    res = cli("resume", str(store))
    assert f"{N - done_before} trajectories in {N - done_before} units" in res.stdout
    for k, mtime in chunks.items():  # finished units were not recomputed
        assert os.stat(chunk / str(k) / "0/0/0/0").st_mtime_ns == mtime
    one = tmp_path / "one_b1.zarr"
    cli("run", *flags(prompt_file, **{"batch-size": 1}), "--store", str(one))
    assert_same_npz(merge(store, tmp_path / "k.npz"), merge(one, tmp_path / "o.npz"))


def test_sigkill_right_after_start_then_resume(baseline, prompt_file, tmp_path):
    store = tmp_path / "early.zarr"
    p = popen("run", *flags(prompt_file), "--store", str(store))
    deadline = time.monotonic() + 60
    while not (store / "zarr.json").exists() and time.monotonic() < deadline:  # root, no job yet
        time.sleep(0.005)
    os.kill(p.pid, signal.SIGKILL)  # while creating or encoding: nothing may be marked done
    p.wait()
    assert done_count(store) == 0
    # the same command again picks up whatever the killed process left
    cli("run", *flags(prompt_file), "--store", str(store))
    assert_same_npz(merge(store, tmp_path / "e.npz"), baseline[1])


def test_corrupt_and_truncated_chunks_are_recomputed_never_merged(baseline, tmp_path):
    store = tmp_path / "corrupt.zarr"
    shutil.copytree(baseline[0], store)
    c3 = store / "xs/c/3/0/0/0/0"
    raw = bytearray(c3.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte
    c3.write_bytes(bytes(raw))
    c4 = store / "xs/c/4/0/0/0/0"
    c4.write_bytes(c4.read_bytes()[:1000])  # truncated
    bad = cli("merge", str(store), "-o", str(tmp_path / "bad.npz"), check=False)
    assert bad.returncode == 2 and "trajectory 3" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad.npz").exists()
    assert not list(tmp_path.glob(".bad.npz*"))  # no temporary file left behind
    res = cli("resume", str(store))
    assert "3-4" in res.stderr  # named as failing verification
    assert "4 trajectories in 2 units" in res.stdout  # units [0, 3] and [1, 4], nothing else
    assert_same_npz(merge(store, tmp_path / "fixed.npz"), baseline[1])


def test_stores_from_two_machines_merge_and_bad_sets_are_refused(baseline, prompt_file, tmp_path):
    a, b = tmp_path / "mac1.zarr", tmp_path / "mac2.zarr"
    cli("run", *flags(prompt_file), "--store", str(a), "--shard", "0/2")
    cli("run", *flags(prompt_file), "--store", str(b), "--shard", "1/2")
    assert_same_npz(merge([a, b], tmp_path / "ab.npz"), baseline[1])
    overlap = cli("merge", str(a), str(baseline[0]), "-o", str(tmp_path / "x.npz"), check=False)
    assert overlap.returncode == 2 and "more than one store" in overlap.stderr
    missing = cli("merge", str(a), "-o", str(tmp_path / "y.npz"), check=False)
    # shard 0/2 holds units 0 and 2: trajectories [0, 3] and [2, 5]
    assert missing.returncode == 2 and "missing" in missing.stderr and "1, 4" in missing.stderr
    other = tmp_path / "other.zarr"
    cli("run", *flags(prompt_file, seed=8), "--store", str(other), "--shard", "1/2")
    diff = cli("merge", str(a), str(other), "-o", str(tmp_path / "z.npz"), check=False)
    assert diff.returncode == 2 and "seed" in diff.stderr


def test_run_on_a_store_of_another_job_refuses_and_names_fields(baseline, prompt_file, tmp_path):
    store = tmp_path / "same.zarr"
    shutil.copytree(baseline[0], store)
    before = tree_digest(store)
    proc = cli(
        "run", *flags(prompt_file, seed=8, **{"cfg-scale": 2.0}), "--store", str(store), check=False
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "seed" in proc.stderr and "cfg_scale" in proc.stderr
    assert tree_digest(store) == before
    # compile is part of the job too (decided once per store: on a GPU it changes the last bits)
    proc = cli("run", *flags(prompt_file), "--compile", "--store", str(store), check=False)
    assert proc.returncode == 2 and "compile: store has \"off\", asked \"on\"" in proc.stderr
    assert tree_digest(store) == before


def test_status_reports_and_exits_by_completeness(baseline, prompt_file, tmp_path):
    done = cli("status", str(baseline[0]))
    assert "complete" in done.stdout
    part = tmp_path / "part.zarr"
    cli("run", *flags(prompt_file), "--store", str(part), "--shard", "0/3")
    # one store per machine: the shard that ran here is complete, the others are elsewhere
    st = cli("status", str(part), check=False)
    assert st.returncode == 0, st.stdout
    assert "complete here" in st.stdout and "shard 1/3, 2/3 (4 trajectories)" in st.stdout
    # asked to do everything here, it is a store with work left
    p = popen("resume", str(part), "--all", "--no-progress")
    deadline = time.monotonic() + 120
    while done_count(part) < 3 and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.01)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    st = cli("status", str(part), check=False)
    assert st.returncode == 1 and "missing trajectories" in st.stdout, st.stdout


def _bad_input_cases(prompt_file: Path, d: Path) -> dict[str, list[str]]:
    d.mkdir(exist_ok=True)
    empty = d / "empty.txt"
    empty.write_text("# only a comment\n\n")
    latin = d / "latin1.txt"
    latin.write_bytes("un caf\xe9 au lait\n".encode("latin-1"))
    dup = d / "dup.txt"
    dup.write_text("a cat\na dog\na cat\n")
    unknown = d / "unknown.toml"
    unknown.write_text("num_fid_samples = 4\nguidance = 2.0\n")
    regular = d / "regular-file"
    regular.write_text("not a store")
    return {
        "shard 3/2": ["--shard", "3/2"],
        "shard 0/0": ["--shard", "0/0"],
        "shard -1/2": ["--shard", "-1/2"],
        "shard a/b": ["--shard", "a/b"],
        "shard 1": ["--shard", "1"],
        "missing prompt file": ["--prompt-file", str(d / "nope.txt")],
        "empty prompt file": ["--prompt-file", str(empty)],
        "non-UTF-8 prompt file": ["--prompt-file", str(latin)],
        "duplicate prompts": ["--prompt-file", str(dup)],
        "unknown job field": ["--job", str(unknown)],
        "odd latent size": ["--latent-size", "31", "32"],
        "more selected than steps": ["--num-selected-steps", "30"],
        "store is a regular file": ["--store", str(regular)],
    }


@pytest.mark.parametrize(
    "case",
    [
        "shard 3/2", "shard 0/0", "shard -1/2", "shard a/b", "shard 1", "missing prompt file",
        "empty prompt file", "non-UTF-8 prompt file", "duplicate prompts", "unknown job field",
        "odd latent size", "more selected than steps", "store is a regular file",
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_leaves_the_store(case, baseline, prompt_file, tmp_path):
    store = tmp_path / "s.zarr"
    shutil.copytree(baseline[0], store)
    before = tree_digest(store)
    extra = _bad_input_cases(prompt_file, tmp_path / "inputs")[case]
    args = ["run", *flags(prompt_file), "--store", str(store), *extra]
    proc = cli(*args, check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("calibjob: error:"), proc.stderr
    assert tree_digest(store) == before


def test_merge_of_incomplete_store_and_existing_output(baseline, prompt_file, tmp_path):
    part = tmp_path / "half.zarr"
    cli("run", *flags(prompt_file), "--store", str(part), "--shard", "1/2")
    proc = cli("merge", str(part), "-o", str(tmp_path / "h.npz"), check=False)
    assert proc.returncode == 2 and "incomplete" in proc.stderr and "0, 2-3, 5" in proc.stderr
    assert not (tmp_path / "h.npz").exists()
    out = tmp_path / "exists.npz"
    out.write_bytes(b"keep me")
    proc = cli("merge", str(baseline[0]), "-o", str(out), check=False)
    assert proc.returncode == 2 and "--force" in proc.stderr and out.read_bytes() == b"keep me"
    cli("merge", str(baseline[0]), "-o", str(out), "--force")
    assert_same_npz(out, baseline[1])


@pytest.fixture()
def small_disk(tmp_path):
    """A real 4 MiB filesystem (tmpfs), enough for the conditioning and about two trajectories."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True
    )
    assert r.returncode == 0, f"cannot mount a tmpfs for the full-disk test: {r.stderr.decode()}"
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_keeps_the_store_consistent_and_resumable(
    baseline, prompt_file, small_disk, tmp_path
):
    store = small_disk / "full.zarr"
    proc = cli("run", *flags(prompt_file, **{"batch-size": 1}), "--store", str(store), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "disk full" in proc.stderr or "No space left" in proc.stderr, proc.stderr
    st = open_store(store, mode="r")
    done = np.flatnonzero(st.done_mask())
    assert 0 < len(done) < N
    ref = open_store(baseline[0], mode="r")
    for k in done:  # what is marked done is whole and right
        assert np.array_equal(st.read_row("xs", int(k)), ref.read_row("xs", int(k)))
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    cli("resume", str(store))
    one_b1 = tmp_path / "b1.zarr"
    cli("run", *flags(prompt_file, **{"batch-size": 1}), "--store", str(one_b1))
    assert_same_npz(merge(store, tmp_path / "full.npz"), merge(one_b1, tmp_path / "b1.npz"))


def test_paper_numbers_merge_to_6400_points(tmp_path):
    """A synthetic store with the paper's job numbers (latent shrunk to 2x2 to stay small)."""
    from calibjob.config import JobConfig
    from calibjob.core.store import JobStore
    from calibjob.jobs.run import RUN

    cfg = JobConfig(
        model_version="tiny", latent_size=(2, 2), batch_size=13, dtype="float32",
        prompts=tuple(f"prompt {i}" for i in range(20)),
    )  # fmt: skip
    st = JobStore.create_or_open(tmp_path / "paper.zarr", RUN, cfg)
    sig = np.linspace(1, 0, 101).astype(np.float32)
    st.write_prepared({"cs": np.zeros((20, 2, 5, 4), np.float32),
                       "cs_pooled": np.zeros((20, 2, 3), np.float32),
                       "sigmas": sig, "ts": sig[:100] * 1000},
                      row_chunked={"cs", "cs_pooled"})  # fmt: skip
    rng = np.random.default_rng(0)
    for k0 in range(0, 256, 32):
        ks = list(range(k0, k0 + 32))
        st.write_rows(ks, {"xs": rng.standard_normal((32, 100, 2, 2, 16), dtype=np.float32)},
                      300.0)
    d = load_npz(merge(tmp_path / "paper.zarr", tmp_path / "paper.npz"))
    assert d["xs"].shape == (6400, 2, 2, 16) and d["ts"].shape == (6400,)
    assert np.array_equal(np.unique(d["step_indices"]), np.linspace(0, 99, 25, dtype=int))
    assert np.bincount(d["trajectory_indices"]).tolist() == [25] * 256
    assert np.bincount(d["prompt_indices"]).tolist() == [25 * 13] * 16 + [25 * 12] * 4
