"""Reading a profile: the store's unit records reduced to statistics per (layer, input),
with the timestep axis. Also the flat `.npz` export.

    from calibjob.profile import load
    prof = load("out/profile.zarr")
    s = prof["mm_03_img", "fc2_in"]      # TapStats
    s.timesteps                            # (T,) denoising order, largest t first
    s.mean, s.std, s.min, s.max            # (T, C)
    s.hist                                 # (T, 512) counts over prof.bin_edges; s.below, s.above

Units of one timestep are added in unit order (float64), so any sharding of a job and any
kill-and-resume give the same bits.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calibjob.errors import ConfigError
from calibjob.profile.plan import ARRAYS, UnitStats


@dataclass
class TapStats:
    """One (layer, input)'s statistics per timestep; C is its channel count."""

    layer: str
    input: str
    timesteps: np.ndarray  # (T,) float64
    count: np.ndarray  # (T,) int64: values per channel (tokens x CFG rows x points)
    sum: np.ndarray  # (T, C) float64
    sumsq: np.ndarray  # (T, C) float64
    min: np.ndarray  # (T, C) float32
    max: np.ndarray  # (T, C) float32
    hist: np.ndarray  # (T, bins) int64, all channels together
    below: np.ndarray  # (T,) int64: values under the histogram's range
    above: np.ndarray  # (T,) int64: values over it
    nan: np.ndarray  # (T,) int64

    @property
    def channels(self) -> int:
        return self.sum.shape[1]

    @property
    def mean(self) -> np.ndarray:
        return self.sum / self.count[:, None]

    @property
    def var(self) -> np.ndarray:
        """Population variance per channel (clipped at 0 against rounding)."""
        m = self.mean
        return np.maximum(self.sumsq / self.count[:, None] - m * m, 0.0)

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.var)

    @property
    def range(self) -> np.ndarray:
        """max - min per channel, (T, C)."""
        return self.max.astype(np.float64) - self.min.astype(np.float64)

    @property
    def negative_fraction(self) -> np.ndarray:
        """(T,) share of values below 0 (from the histogram: its bins split at 0)."""
        half = self.hist.shape[1] // 2
        neg = self.hist[:, :half].sum(axis=1) + self.below
        total = self.hist.sum(axis=1) + self.below + self.above
        return neg / np.maximum(total, 1)


@dataclass
class Profile:
    """A finished profile job."""

    path: Path
    job: dict
    timesteps: np.ndarray  # (T,) float64, denoising order
    bin_edges: np.ndarray  # (bins + 1,) float64
    stats: dict[tuple[str, str], TapStats]

    def __getitem__(self, key: tuple[str, str]) -> TapStats:
        return self.stats[key]

    def __iter__(self) -> Iterator[TapStats]:
        return iter(self.stats.values())

    def keys(self) -> list[tuple[str, str]]:
        return list(self.stats)

    @property
    def layers(self) -> list[str]:
        return list(dict.fromkeys(layer for layer, _ in self.stats))


def load(path: str | Path) -> Profile:
    """The statistics of a complete profile store (one line if it is not complete)."""
    from calibjob.core.store import OtherJob
    from calibjob.jobs import open_store
    from calibjob.jobs.profile import PROFILE

    store = open_store(path, mode="r")
    if store.job is not PROFILE:
        raise OtherJob(str(path), store.job.name, PROFILE.store_noun)
    done = store.done_mask()
    num_units = len(done)
    if not done.all():
        left = np.flatnonzero(~done)
        raise ConfigError(
            f"{path} is incomplete: {len(left)} of {num_units} units left; continue it with "
            f"`calibjob resume {path}`"
        )
    job = store.config
    taps = [(str(a), str(b), int(c)) for a, b, c in store.meta["taps"]]
    tvals = np.array(store.meta["timesteps"], dtype=np.float64)
    unit_t = np.array(store.meta["unit_timesteps"], dtype=np.int64)
    bins = job.hist_bins
    t_n, c_total = len(tvals), sum(c for _, _, c in taps)
    tot_sum = np.zeros((t_n, c_total))
    tot_sumsq = np.zeros((t_n, c_total))
    tot_min = np.full((t_n, c_total), np.inf, np.float32)
    tot_max = np.full((t_n, c_total), -np.inf, np.float32)
    tot_hist = np.zeros((t_n, len(taps), bins + 3), np.int64)
    tot_rows = np.zeros((t_n, len(taps)), np.int64)
    for u in range(num_units):  # fixed order: unit index
        st = UnitStats(**{name: store.read_row(name, u) for name in ARRAYS})
        ti = unit_t[u]
        tot_sum[ti] += st.sum
        tot_sumsq[ti] += st.sumsq
        np.minimum(tot_min[ti], st.min, out=tot_min[ti])
        np.maximum(tot_max[ti], st.max, out=tot_max[ti])
        tot_hist[ti] += st.hist
        tot_rows[ti] += st.rows
    stats = {}
    off = 0
    for j, (layer, inp, c) in enumerate(taps):
        sl = slice(off, off + c)
        off += c
        h = tot_hist[:, j]
        stats[(layer, inp)] = TapStats(
            layer, inp, tvals, tot_rows[:, j].copy(), tot_sum[:, sl].copy(),
            tot_sumsq[:, sl].copy(), tot_min[:, sl].copy(), tot_max[:, sl].copy(),
            h[:, 1 : bins + 1].copy(), h[:, 0].copy(), h[:, bins + 1].copy(), h[:, bins + 2].copy(),
        )
    edges = np.linspace(-job.hist_range, job.hist_range, bins + 1)
    return Profile(Path(path), job.to_dict(), tvals, edges, stats)


def export_arrays(prof: Profile) -> dict[str, np.ndarray]:
    """Flat arrays: `{layer}:{input}::t={timestep:.6f}::{count,mean,std,min,max,histogram}`
    (plus `::below` and `::above`, the values outside the histogram), `timesteps` and
    `histogram_bin_edges`. Plain numeric arrays only: loadable with allow_pickle=False."""
    out: dict[str, np.ndarray] = {
        "timesteps": prof.timesteps.copy(),
        "histogram_bin_edges": prof.bin_edges.copy(),
    }
    for s in prof:
        mean, std = s.mean, s.std
        for i, t in enumerate(s.timesteps):
            base = f"{s.layer}:{s.input}::t={t:.6f}::"
            out[base + "count"] = np.array(s.count[i], dtype=np.int64)
            out[base + "mean"] = mean[i]
            out[base + "std"] = std[i]
            out[base + "min"] = s.min[i]
            out[base + "max"] = s.max[i]
            out[base + "histogram"] = s.hist[i]
            out[base + "below"] = np.array(s.below[i], dtype=np.int64)
            out[base + "above"] = np.array(s.above[i], dtype=np.int64)
    return out


def export(prof: Profile, out: str | Path, *, force: bool = False) -> Path:
    """Write `export_arrays` to an `.npz`, whole or not at all (outputs.py's one rule)."""
    from calibjob.outputs import check_output, write_whole

    check_output(out, force, {".npz": "npz"})
    arrays = export_arrays(prof)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())

    return write_whole(out, write, force)
