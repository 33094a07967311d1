"""Status of a store of any job: done / total per shard, missing and damaged rows, throughput,
ETA, and each shard's state.

Reads only markers, chunk sizes and the small per-shard progress records, never the data
(unless asked to verify checksums), and imports no model code, so it answers at once even on
a paper-scale store.

A store knows which shards ran on it (each worker records its shard when it starts). In the
one-store-per-machine workflow a store holds some shards only: those are judged complete or
not, and the others are expected in other stores.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field

import numpy as np

from calibjob.core.leases import DEFAULT_TTL_S, live_leases, pid_alive
from calibjob.core.shards import ALL, Shard, parse_shard
from calibjob.core.store import JobStore

ACTIVE_WINDOW_S = 600.0  # a running shard that reported within this window may count as live


@dataclass
class ShardRow:
    shard: str
    done: int
    total: int
    rate: float | None
    last_seen_s: float | None
    state: str  # starting, running, finished, interrupted, stopped, running elsewhere, not run
    # here, unknown
    peak_memory_gb: float | None = None  # the most MLX memory the shard's worker held


@dataclass
class Status:
    done: int
    total: int
    missing: list[int]
    rows: list[ShardRow]
    rate: float
    eta_s: float | None
    prepared: bool
    damaged: list[int] = field(default_factory=list)  # marked done, chunk missing or bad
    ran_here: list[str] = field(default_factory=list)
    elsewhere: list[int] = field(default_factory=list)  # rows of shards not run here
    live_workers: int = 0
    prepared_damaged: str | None = None  # the damaged file, if a prepared array is

    @property
    def complete(self) -> bool:
        return self.done == self.total and not self.damaged and not self.prepared_damaged

    @property
    def complete_here(self) -> bool:
        """Every shard that ran on this store is complete (the rest belong to other stores)."""
        missing_here = set(self.missing) - set(self.elsewhere)
        return not missing_here and not self.damaged and not self.prepared_damaged


def shards_run_here(store: JobStore) -> list[Shard]:
    """The shards whose workers ran on this store (from their progress records); [] if none
    recorded. A record of the whole job (0/1) makes it [ALL]."""
    out = []
    for name in store.progress():
        try:
            out.append(parse_shard(name))
        except Exception:  # noqa: BLE001  (a record we cannot read names no shard)
            continue
    if any(s.count == 1 for s in out):
        return [ALL]
    return sorted(set(out), key=lambda s: (s.count, s.index))


def store_status(
    store: JobStore, shards: list[str] | tuple[str, ...] = (), verify: bool = False,
    lease_ttl_s: float = DEFAULT_TTL_S,
) -> Status:
    """`shards`: shard names to show even before they report (e.g. those `launch` started).
    `verify`: read every done chunk and check its checksum (else only its size)."""
    units = store.job.plain_units(store.config, store.meta)
    done, bad_markers = store.read_markers()
    done_ks = np.flatnonzero(done).tolist()
    bad = set(bad_markers) | set(store.bad_chunk_sizes(done_ks))
    if verify:  # the checksums of the chunks whose size was right
        bad |= {k for k in done_ks if k not in bad and not store.row_ok(k)}
    damaged = sorted(bad)
    cond = store.prepared_damage(verify) if store.prepared else None
    good = done.copy()
    good[damaged] = False
    progress = store.progress()
    ran = shards_run_here(store)
    names = set(progress) | set(shards)
    specs: list[Shard] = []
    for name in sorted(names, key=_shard_order):
        try:
            specs.append(parse_shard(name))
        except Exception:  # noqa: BLE001
            continue
    counts = {s.count for s in ran}
    if len(counts) == 1 and ran != [ALL]:  # one store per machine: show the others too
        n = counts.pop()
        specs = sorted(set(specs) | {Shard(i, n) for i in range(n)}, key=_by_count)
    if not specs:
        specs = [ALL]
    claims = live_leases(store.loc, lease_ttl_s)
    here_traj: set[int] = set()
    for sh in ran or [ALL]:
        here_traj |= {k for u in sh.units(units) for k in u.rows}
    now = time.time()
    rows, rate, live = [], 0.0, 0
    for sh in specs:
        trajs = [k for u in sh.units(units) for k in u.rows]
        info = progress.get(str(sh))
        shard_done = int(good[trajs].sum()) if trajs else 0
        if info is None:
            state = "not run here" if ran and sh not in ran and ran != [ALL] else "-"
            rows.append(ShardRow(str(sh), shard_done, len(trajs), None, None, state))
            continue
        if info.get("damaged"):
            rows.append(ShardRow(str(sh), shard_done, len(trajs), None, None, "unknown"))
            continue
        seen = now - info["updated"] if "updated" in info else None
        r = info.get("rate", info.get("traj_steps_per_s"))
        state = str(info.get("state", "running"))
        if state in ("running", "starting") and not _live(info, seen, claims, sh, units):
            # died: in its loop (stopped), or before it (the state it found stands)
            state = "stopped" if state == "running" else str(info.get("before") or "stopped")
        if shard_done == len(trajs) and state in (
            "running", "starting", "stopped", "running elsewhere", "interrupted"
        ):
            state = "finished"
        if state in ("running", "starting"):
            live += 1
            if r:
                rate += r
        rows.append(
            ShardRow(str(sh), shard_done, len(trajs), r, seen, state, info.get("peak_memory_gb"))
        )
    missing = np.flatnonzero(~good).tolist()
    elsewhere = sorted(set(missing) - here_traj) if ran and ran != [ALL] else []
    left = float(store.job.row_work(store.config, store.meta)[missing].sum())
    eta = left / rate if rate > 0 and live else None
    return Status(
        int(good.sum()), len(good), missing, rows, rate if live else 0.0, eta, store.prepared,
        damaged, [str(s) for s in ran], elsewhere, live, cond,
    )  # fmt: skip


def _live(info: dict, seen: float | None, claims: dict, sh: Shard, units) -> bool:
    """Whether a shard recorded as running still has a live worker: its process on this host,
    or a live claim on one of its units, or a report within ACTIVE_WINDOW_S from elsewhere."""
    if info.get("host") == socket.gethostname() and "pid" in info:
        return pid_alive(int(info["pid"]))
    mine = {u.index for u in sh.units(units)}
    if any(u in mine for u in claims):
        return True
    return seen is not None and seen < ACTIVE_WINDOW_S


def _by_count(s: Shard) -> tuple[int, int]:
    return (s.count, s.index)


def _shard_order(name: str) -> tuple:
    """'2/10' before '10/10': by count, then index; names that are not i/n last."""
    i, _, n = name.partition("/")
    return (0, int(n), int(i)) if i.isdigit() and n.isdigit() else (1, 0, 0, name)
