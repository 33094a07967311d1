"""The job core against a small fake job, in-process: no model, no MLX, seconds.

The fake job's rows are numbers computed from their index alone, so every way of running it
(one shard, three, killed and resumed, repaired) must give the very same store. A unit log
counts what was computed; a fault hook kills the loop at a chosen unit, as a SIGKILL would
(nothing after it runs: no writer flush, no lease release)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import numpy as np
import pytest

from calibjob.core.job import ArraySpec, Job, Layout, Session
from calibjob.core.leases import Leases, read_lease
from calibjob.core.locations import open_location
from calibjob.core.runner import run_shards
from calibjob.core.shards import ALL, Shard
from calibjob.core.spec import Spec
from calibjob.core.status import store_status
from calibjob.core.store import JobStore, OtherJob
from calibjob.errors import StoreDamaged, StoreError

pytestmark = pytest.mark.core


@dataclass(frozen=True)
class FakeSpec(Spec):
    rows: int = 12
    per_unit: int = 2
    seed: int = 0
    batch: int = 0  # 'auto'

    IDENTITY = ("rows", "per_unit", "seed", "batch")
    AUTO = {"batch": 0}


@dataclass(frozen=True)
class FakeUnit:
    index: int
    rows: tuple[int, ...]


class Crash(BaseException):
    """What the fault hook raises: nothing in the loop catches it, as with a SIGKILL."""


class FakeSession(Session):
    def __init__(self, spec: FakeSpec, log: list, crash_at: int | None):
        self.spec, self.log, self.crash_at = spec, log, crash_at
        self.phases = {}

    def prepare(self, store, compute):
        if not store.prepared:
            store.write_prepared({"table": np.arange(4.0) + self.spec.seed}, row_chunked=set())

    def units(self):
        return FAKE.units(self.spec)

    def compute(self, unit, on_work):
        if unit.index == self.crash_at:
            raise Crash
        self.log.append(unit.index)
        on_work(len(unit.rows))
        return {"v": np.stack([np.full(3, k * 1.5 + self.spec.seed) for k in unit.rows])}


class FakeJob(Job):
    name = "fake"
    spec_class = FakeSpec
    row_word = "row"
    throughput = "rows/s"
    entries = frozenset({"v", "table"})
    prepared = ("table",)

    def __init__(self):
        self.log: list[int] = []
        self.crash_at: int | None = None

    def units(self, spec):
        n, b = spec.rows, spec.per_unit
        return [FakeUnit(i, tuple(range(s, min(s + b, n)))) for i, s in enumerate(range(0, n, b))]

    def layout(self, spec, meta):
        return Layout(spec.rows, {"v": ArraySpec((3,), "float64")})

    def unit_rows(self, spec, meta):
        return [u.rows for u in self.units(spec)]

    def row_work(self, spec, meta):
        return np.ones(spec.rows, dtype=np.int64)

    def describe(self, spec):
        return f"fake, {spec.rows} rows"

    def row_ok(self, arrays):
        return bool(np.isfinite(arrays["v"]).all())

    def session(self, spec, location):
        return FakeSession(spec, self.log, self.crash_at)


FAKE = FakeJob()
JOBS = {"fake": FAKE}
SPEC = FakeSpec()


@pytest.fixture(autouse=True)
def fresh_log():
    FAKE.log.clear()
    FAKE.crash_at = None


def values(path) -> np.ndarray:
    st = JobStore.open(path, JOBS, mode="r")
    assert st.done_mask().all()
    return np.stack([st.read_row("v", k) for k in range(st.layout.rows)])


EXPECTED = np.stack([np.full(3, k * 1.5) for k in range(SPEC.rows)])


def test_one_shard_and_three_shards_give_the_same_store(tmp_path):
    res = run_shards(FAKE, SPEC, str(tmp_path / "one"), [ALL])
    assert res.units_run == 6 and res.rows_run == 12 and sorted(FAKE.log) == list(range(6))
    FAKE.log.clear()
    for i in range(3):
        run_shards(FAKE, SPEC, str(tmp_path / "three"), [Shard(i, 3)])
    assert sorted(FAKE.log) == list(range(6))  # each unit once over the three shards
    assert np.array_equal(values(tmp_path / "one"), EXPECTED)
    assert np.array_equal(values(tmp_path / "three"), EXPECTED)
    again = run_shards(FAKE, SPEC, str(tmp_path / "one"), [ALL])
    assert again.units_run == 0


@pytest.mark.parametrize("crash_at", [0, 3, 5])
def test_a_crash_loses_at_most_the_unit_in_flight_and_resume_finishes_it(tmp_path, crash_at):
    FAKE.crash_at = crash_at
    with pytest.raises(Crash):
        run_shards(FAKE, SPEC, str(tmp_path / "s"), [ALL])
    st = JobStore.open(tmp_path / "s", JOBS, mode="r")
    done_units = {k // 2 for k in np.flatnonzero(st.done_mask())}
    assert done_units >= set(range(crash_at - 1))  # at most one finished unit unwritten
    FAKE.crash_at, before = None, list(FAKE.log)
    FAKE.log.clear()
    run_shards(FAKE, SPEC, str(tmp_path / "s"), [ALL])
    assert set(FAKE.log) == set(range(6)) - done_units  # nothing done is computed again
    assert len(before) + len(FAKE.log) <= 6 + 1
    assert np.array_equal(values(tmp_path / "s"), EXPECTED)


def test_a_live_lease_keeps_a_unit_from_a_second_worker_until_it_lapses(tmp_path):
    run_shards(FAKE, SPEC.replace(rows=2), str(tmp_path / "s"), [ALL])  # make the store
    loc = open_location(str(tmp_path / "s"))
    a, b = Leases(loc, ttl_s=0.6), Leases(loc, ttl_s=0.6)
    try:
        assert a.take(7) is None
        held = b.take(7)
        assert held is not None and held.owner == a.owner
        assert b.live([7]) == {7: read_lease(loc, 7)}
        # a's process lives, so only the heartbeat's age frees it: stop a's heartbeat
        a._stop.set()
        a._thread.join()
        time.sleep(0.7)
        assert b.take(7) is None  # lapsed: taken over
        assert not a.renew(7) and a.lost(7)  # a learns it lost the unit, and drops it
        a.release(7)
        assert read_lease(loc, 7).owner == b.owner  # a's release leaves b's lease alone
    finally:
        b.close()


def test_a_unit_held_by_a_live_worker_is_left_to_it(tmp_path):
    path = str(tmp_path / "s")
    run_shards(FAKE, SPEC.replace(rows=4), path, [Shard(0, 2)])  # unit 0 done
    other = Leases(open_location(path))
    other.take(1)
    try:
        res = run_shards(FAKE, SPEC.replace(rows=4), path, [ALL])
        assert res.units_run == 0 and res.units_elsewhere == [1]
        s = store_status(JobStore.open(path, JOBS, mode="r"))
        assert s.done == 2 and s.missing == [2, 3]
    finally:
        other.close()


def test_damage_is_named_then_repaired_with_only_its_unit_recomputed(tmp_path):
    path = tmp_path / "s"
    run_shards(FAKE, SPEC, str(path), [ALL])
    (path / "v" / "c" / "5" / "0").unlink()  # a lost chunk: unit 2
    chunk = path / "v" / "c" / "8" / "0"  # a flipped byte: unit 4
    raw = bytearray(chunk.read_bytes())
    raw[3] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    (path / "done" / "c" / "1").write_bytes(b"")  # an unreadable marker of a good row
    (path / "done" / "zarr.json").write_text("{")  # metadata that does not parse
    st = JobStore.open(path, JOBS, mode="r")
    with pytest.raises(StoreDamaged, match="done/zarr.json"):
        st.read_markers()
    FAKE.log.clear()
    run_shards(FAKE, SPEC, str(path), [ALL])
    assert sorted(FAKE.log) == [2, 4]
    assert np.array_equal(values(path), EXPECTED)
    s = store_status(JobStore.open(path, JOBS, mode="r"), verify=True)
    assert s.complete and not s.damaged


def test_status_finds_missing_and_flipped_chunks(tmp_path):
    path = tmp_path / "s"
    run_shards(FAKE, SPEC, str(path), [ALL])
    (path / "v" / "c" / "3" / "0").unlink()
    chunk = path / "v" / "c" / "6" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[0] ^= 0x01
    chunk.write_bytes(bytes(raw))
    st = JobStore.open(path, JOBS, mode="r")
    assert store_status(st).damaged == [3]  # the cheap check: sizes
    assert store_status(st, verify=True).damaged == [3, 6]  # checksums too
    assert not store_status(st, verify=True).complete


def test_damaged_prepared_arrays_are_made_again(tmp_path):
    path = tmp_path / "s"
    run_shards(FAKE, SPEC, str(path), [ALL])
    chunk = path / "table" / "c" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[1] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    assert store_status(JobStore.open(path, JOBS, mode="r"), verify=True).prepared_damaged
    run_shards(FAKE, SPEC, str(path), [ALL])
    st = JobStore.open(path, JOBS, mode="r")
    assert np.array_equal(st.read_prepared("table"), np.arange(4.0))


def test_a_store_whose_creation_was_killed_is_finished_by_the_next_worker(tmp_path):
    path = tmp_path / "s"
    run_shards(FAKE, SPEC, str(path), [Shard(0, 2)])
    for name in ("v", "done", "progress"):  # as if killed after the record, before the arrays
        for f in sorted((path / name).rglob("*"), reverse=True):
            f.unlink() if f.is_file() else f.rmdir()
        (path / name).rmdir()
    FAKE.log.clear()
    run_shards(FAKE, SPEC, str(path), [ALL])
    assert sorted(FAKE.log) == list(range(6))
    assert np.array_equal(values(path), EXPECTED)


def test_refusals_are_one_line(tmp_path):
    path = tmp_path / "s"
    run_shards(FAKE, SPEC, str(path), [ALL])
    with pytest.raises(StoreError, match=r"holds a different job \(seed: store has 0, asked 3"):
        run_shards(FAKE, SPEC.replace(seed=3), str(path), [ALL])
    with pytest.raises(OtherJob, match="made by `calibjob fake`"):
        JobStore.open(path, {}, mode="r")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="holding other files"):
        run_shards(FAKE, SPEC, str(mine), [ALL])
    assert sorted(os.listdir(mine)) == ["notes.txt"]  # nothing written beside them
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="regular file"):
        run_shards(FAKE, SPEC, str(tmp_path / "file"), [ALL])


def test_auto_fields_are_fixed_by_the_store(tmp_path):
    path = str(tmp_path / "s")
    run_shards(FAKE, SPEC.replace(batch=4), path, [Shard(0, 2)])
    st = JobStore.open(path, JOBS, mode="r")
    assert SPEC.with_choices_of(st.config).batch == 4  # 'auto' adopts the store's choice
    assert SPEC.replace(batch=5).differing(st.config) == ["batch"]


def test_progress_records_keep_the_last_throughput_when_nothing_is_left(tmp_path):
    path = str(tmp_path / "s")
    run_shards(FAKE, SPEC, path, [ALL])
    rec = JobStore.open(path, JOBS, mode="r").progress()["0/1"]
    assert rec["state"] == "finished" and rec["rate"] > 0
    run_shards(FAKE, SPEC, path, [ALL])  # nothing left: the record keeps its figures
    again = JobStore.open(path, JOBS, mode="r").progress()["0/1"]
    assert again["rate"] == rec["rate"] and again["state"] == "finished"
    # a damaged record is display only: it reads as damaged, and the next worker replaces it
    (tmp_path / "s" / "progress" / "0-of-1" / "zarr.json").write_text("{")
    st = JobStore.open(path, JOBS, mode="r")
    assert st.progress()["0/1"] == {"damaged": True}
    assert store_status(st).complete
    run_shards(FAKE, SPEC, path, [ALL])
    assert JobStore.open(path, JOBS, mode="r").progress()["0/1"]["state"] == "finished"


def test_the_record_holds_the_spec_and_what_was_resolved(tmp_path):
    path = tmp_path / "s"
    run_shards(FAKE, SPEC, str(path), [ALL])
    doc = json.loads((path / "job" / "zarr.json").read_text())["attributes"]["calibjob"]
    assert doc["job"] == "fake" and doc["config"] == SPEC.to_dict()
    assert doc["fingerprint"] == SPEC.fingerprint()


def test_the_interrupt_message_never_waits_on_a_held_lock(monkeypatch):
    """A signal can stop the main thread inside a library holding a lock that reading the store
    needs: the message is read in a thread with a time limit, and a line that reads nothing
    comes out instead of a hang."""
    import threading

    from calibjob.core import interrupts

    held = threading.Lock()
    held.acquire()  # held by the 'interrupted' main thread, never released

    def blocked_read(location):
        with held:
            return "never", False

    monkeypatch.setattr(interrupts, "_store", "s.zarr")
    monkeypatch.setattr(interrupts, "_safe_line", blocked_read)
    line = interrupts.bounded_message(0.2)
    assert line == "calibjob: interrupted; see `calibjob status s.zarr` for what is safe"
    monkeypatch.setattr(interrupts, "_safe_line", lambda location: ("3 of 6 are safe", False))
    assert interrupts.bounded_message(5).startswith("calibjob: interrupted: 3 of 6 are safe")
