"""The unit loop every job runs: pending -> lease -> compute -> background write -> release.

Takes a job definition, a resolved spec, a store location and the worker's shard(s); gives a
store where those shards' units are done, and a `RunResult`. Units already done (and whose rows
verify) are skipped, so a run after a crash, `resume` and a second machine on the same store
all do only what is left. The previous unit is written by a background thread while the next
one computes; a unit starts only once at most one finished unit is unwritten, so a kill costs
the unit being computed and at most the one before. Ctrl-C or SIGTERM inside the loop stops
gracefully: the writer finishes, leases are dropped, the shard is recorded interrupted.

Never removes a store: a worker whose model fails to load leaves the store as it found it (or
new and empty), so a shard failing beside healthy ones costs them nothing.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from rich.console import Console

import calibjob
from calibjob.core import interrupts
from calibjob.core.job import Job, Session, Unit
from calibjob.core.leases import DEFAULT_TTL_S, Leases, sweep_dead
from calibjob.core.locations import open_location
from calibjob.core.progress import ShardProgress, announce_start, peak_memory_gb
from calibjob.core.shards import Shard
from calibjob.core.spec import Spec
from calibjob.core.store import DISK_FULL, JobStore
from calibjob.core.words import fmt_ranges, plural
from calibjob.errors import StoreError

err = Console(stderr=True, soft_wrap=True)  # one line stays one line, at any width


@dataclass
class RunResult:
    units_total: int
    units_run: int
    rows_run: int
    recomputed: list[int]
    seconds: float  # wall time of the whole run (from the process start under the console entry)
    rate: float  # throughput of the unit loop (the job's label)
    loop_seconds: float = 0.0
    units_elsewhere: list[int] = field(default_factory=list)  # held by other live workers
    held_by: dict[int, str] = field(default_factory=dict)
    # phase -> (seconds, peak GB of MLX memory in it)
    phases: dict[str, tuple[float, float]] = field(default_factory=dict)
    lost: list[int] = field(default_factory=list)  # units whose lease another worker took over
    work_done: int = 0  # in the throughput's units


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM inside the unit loop, after the writer finished and leases dropped."""


class _Writer:
    """Writes finished units on a background thread, so the model never waits on the disk.
    Errors surface in the main thread."""

    def __init__(self, store: JobStore, lease_ttl_s: float):
        self.store, self.lease_ttl_s = store, lease_ttl_s
        self.q: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.pending = 0
        self.cv = threading.Condition()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            unit, arrays, after = item
            if self.error is None:
                try:
                    self.store.write_rows(unit.rows, arrays, self.lease_ttl_s)
                    after(unit)
                except BaseException as e:  # noqa: BLE001  (re-raised in the main thread)
                    self.error = e
            with self.cv:
                self.pending -= 1
                self.cv.notify_all()

    def _check(self) -> None:
        if self.error is not None:
            e = self.error
            if isinstance(e, OSError) and e.errno in DISK_FULL:
                raise StoreError(
                    f"disk full while writing {self.store.path} ({e.strerror}); the store is "
                    f"consistent: free some space and run `calibjob resume {self.store.path}`"
                ) from None
            raise e

    def submit(self, unit: Unit, arrays: dict[str, np.ndarray], after) -> None:
        self._check()
        with self.cv:
            self.pending += 1
        self.q.put((unit, arrays, after))

    def settle(self, at_most: int) -> None:
        """Wait until at most `at_most` submitted units are unwritten."""
        with self.cv:
            self.cv.wait_for(lambda: self.pending <= at_most)
        self._check()

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()
        self._check()


class _Records:
    """This worker's shards' progress records: read from the store once, then kept here and
    written whole on each update (never re-read in the store-write path). An update keeps what
    a record said before (a run that finds nothing to do keeps the throughput and peak of the
    run that did the work). A worker that has not reached its unit loop yet is 'starting' and
    keeps the state before it, which `status` shows if it dies there (a Ctrl-C while the model
    loads leaves an interrupted shard interrupted)."""

    def __init__(self, store: JobStore, shards: list[Shard]):
        self.store, self.shards = store, shards
        found = store.progress()
        self.records = {
            str(sh): {k: v for k, v in found.get(str(sh), {}).items()
                      if k not in ("shard", "updated", "damaged")}
            for sh in shards
        }  # fmt: skip

    def update(self, **info) -> None:
        for sh in self.shards:
            old = self.records[str(sh)]
            new = {**old, **info}
            if info.get("state") == "starting":
                new["before"] = old.get("before") if old.get("state") == "starting" else old.get(
                    "state"
                )
            self.records[str(sh)] = new
            self.store.record_progress(str(sh), new)


def run_shards(
    job: Job,
    spec: Spec,
    location: str,
    shards: list[Shard],
    *,
    show_progress: bool | None = None,
    lease_ttl_s: float = DEFAULT_TTL_S,
    session: Session | None = None,
) -> RunResult:
    """Run the units of `shards` of the job `spec` (resolved) into the store at `location`;
    `session`: one made by the caller (a model it has loaded), else the job's."""
    t0 = calibjob.process_start or time.perf_counter()  # the console entry's: imports count
    loc = open_location(location)
    session = session or job.session(spec, loc.url)
    store = JobStore.create_or_open(loc, job, spec, session.store_meta)
    if store.note:
        err.print(f"calibjob: {store.note}", markup=False)
    with loc.lock():
        sweep_dead(loc, lease_ttl_s)
        mended = store.repair()
    store = store.reload()
    if mended:
        err.print(f"calibjob: repaired {', '.join(mended)} in {store.path}", markup=False)
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    records = _Records(store, shards)
    records.update(state="starting", **me)
    plain = job.plain_units(store.config, store.meta)
    mine = {u.index: u for sh in shards for u in sh.units(plain)}
    recomputed = store.verify_rows(sorted(k for u in mine.values() for k in u.rows))
    if recomputed:
        err.print(
            f"calibjob: {plural(len(recomputed), job.row_word)} ({fmt_ranges(recomputed)}) "
            f"failed verification; recomputing",
            markup=False,
        )
    done = store.done_mask()
    todo = [mine[i] for i in sorted(mine) if not done[list(mine[i].rows)].all()]
    leases = Leases(loc, lease_ttl_s)
    elsewhere = leases.live([u.index for u in todo])
    todo = [u for u in todo if u.index not in elsewhere]
    skipped: dict[int, str] = {u: c.describe() for u, c in elsewhere.items()}
    if not todo:
        if job.prepared and not store.prepared:  # no units here, but the store needs them
            session.prepare(store, compute=False)
        records.update(state="finished" if not elsewhere else "running elsewhere")
        session.close()
        return RunResult(
            len(plain), 0, 0, recomputed, time.perf_counter() - t0, 0.0,
            units_elsewhere=sorted(elsewhere), held_by=skipped,
        )  # fmt: skip
    name = ", ".join(str(s) for s in shards)
    announce_start(name, sum(len(u.rows) for u in todo), len(todo), job.row_word,
                   getattr(spec, "model_version", job.name), show_progress, err)  # fmt: skip
    startup = (time.perf_counter() - t0, peak_memory_gb())
    session.prepare(store, compute=True)
    store = store.reload()
    full = {u.index: u for u in session.units()}
    todo_units = [full[u.index] for u in todo]
    row_work = job.row_work(store.config, store.meta)
    work = int(sum(row_work[list(u.rows)].sum() for u in todo_units))
    prog = ShardProgress(
        name, sum(len(u.rows) for u in todo_units), work, show_progress, err,
        row_word=job.row_word, label=job.throughput,
    )  # fmt: skip
    written = 0

    def after_write(unit: Unit) -> None:
        nonlocal written
        leases.release(unit.index)
        written += 1
        records.update(
            rate=prog.rate, units_left=len(todo_units) - written, state="running",
            peak_memory_gb=round(peak_memory_gb(), 2), **me,
        )  # fmt: skip

    records.update(state="running", **me)
    writer = _Writer(store, lease_ttl_s)
    ran: list[Unit] = []
    lost: list[int] = []
    interrupted = False
    with prog:
        prog.start()
        try:
            interrupts.set_graceful(True)
            for i, unit in enumerate(todo_units):
                other = leases.take(unit.index)
                if other is not None or store.all_done(unit.rows):
                    if other is not None:  # taken by a worker that started since
                        skipped[unit.index] = other.describe()
                    else:  # finished by one that has since ended
                        leases.release(unit.index)
                    prog.skip(len(unit.rows), int(row_work[list(unit.rows)].sum()))
                    continue
                arrays = session.compute(unit, prog.step)
                if leases.lost(unit.index):  # frozen past the lease: another worker has it
                    lost.append(unit.index)
                    err.print(
                        f"calibjob: unit {unit.index}'s lease was taken over by another "
                        f"worker while this one was stalled; leaving the unit to it",
                        markup=False,
                    )
                    continue
                writer.submit(unit, arrays, after_write)
                ran.append(unit)
                prog.unit_done(len(unit.rows), last=i == len(todo_units) - 1)
                writer.settle(1)  # a kill costs this unit's write and the next unit, no more
        except KeyboardInterrupt:
            interrupted = True
        finally:
            interrupts.set_graceful(False)
            try:
                writer.close()
            finally:
                leases.close()
                session.close()
    loop_s = time.perf_counter() - prog.t0 if prog.t0 else 0.0
    phases = {**session.phases, job.loop_phase: (loop_s, peak_memory_gb())}
    if calibjob.process_start:  # under the console entry: the imports before the work
        phases = {"startup": startup, **phases}
    if interrupted:
        records.update(state="interrupted")
        raise Interrupted()
    records.update(state="finished" if not skipped else "running elsewhere")
    n_rows = sum(len(u.rows) for u in ran)
    return RunResult(
        len(plain), len(ran), n_rows, recomputed, time.perf_counter() - t0,
        prog.done_work / max(loop_s, 1e-9) if ran else 0.0, loop_s,
        sorted(skipped), skipped, phases, lost, prog.done_work,
    )  # fmt: skip
