"""Status of a store: done / total per shard, missing trajectories, throughput and ETA.

Reads only markers and the small per-shard progress records, never the latents, and imports
no model code, so it answers at once even on a paper-scale store.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from calibjob.shards import Shard, parse_shard, work_units
from calibjob.store import Store

ACTIVE_WINDOW_S = 600.0  # a shard that reported within this window counts toward throughput


@dataclass
class ShardRow:
    shard: str
    done: int
    total: int
    traj_steps_per_s: float | None
    last_seen_s: float | None
    peak_memory_gb: float | None = None  # the most MLX memory the shard's worker held


@dataclass
class Status:
    done: int
    total: int
    missing: list[int]
    rows: list[ShardRow]
    traj_steps_per_s: float
    eta_s: float | None
    encoded: bool

    @property
    def complete(self) -> bool:
        return self.done == self.total


def store_status(store: Store, shards: list[str] | tuple[str, ...] = ()) -> Status:
    """`shards`: shard names to show even before they report (e.g. those `launch` started)."""
    cfg = store.config
    units = work_units(cfg.num_fid_samples, len(cfg.prompts), cfg.batch_size)
    done = store.done_mask()
    progress = store.progress()
    specs: list[Shard] = []
    for name in sorted(set(progress) | set(shards), key=_shard_order):
        try:
            specs.append(parse_shard(name))
        except Exception:  # noqa: BLE001  (a record we cannot read is just not shown)
            continue
    if not specs:
        specs = [Shard(0, 1)]
    now = time.time()
    rows = []
    rate = 0.0
    for sh in specs:
        trajs = [k for u in sh.units(units) for k in u.trajectories]
        info = progress.get(str(sh), {})
        seen = now - info["updated"] if "updated" in info else None
        r = info.get("traj_steps_per_s")
        shard_done = int(done[trajs].sum()) if trajs else 0
        if r and seen is not None and seen < ACTIVE_WINDOW_S and shard_done < len(trajs):
            rate += r
        peak = info.get("peak_memory_gb")
        rows.append(ShardRow(str(sh), shard_done, len(trajs), r, seen, peak))
    missing = np.flatnonzero(~done).tolist()
    left_steps = len(missing) * cfg.num_sampling_steps
    eta = left_steps / rate if rate > 0 else None
    return Status(int(done.sum()), len(done), missing, rows, rate, eta, store.encoded)


def _shard_order(name: str) -> tuple:
    """'2/10' before '10/10': by count, then index; names that are not i/n last."""
    i, _, n = name.partition("/")
    return (0, int(n), int(i)) if i.isdigit() and n.isdigit() else (1, 0, 0, name)
