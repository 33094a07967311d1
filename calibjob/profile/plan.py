"""The profile job and its work: which points, in which batches, in which units. Pure numpy.

A calibration set's points are grouped by timestep (denoising order: largest t first), and
within a timestep by prompt (file order within a prompt). A batch is up to `batch_size` points
of one (timestep, prompt): one MMDiT call with a batch of B rows per guidance branch (2B under
CFG), as during generation.
A unit is consecutive batches of one timestep holding at most `unit_points` points: its partial
statistics are written to the store as one piece. Units depend on the set and the job alone,
never on the shard count: shard i/n takes units i, i+n, ... (calibjob.core.shards.Shard).

`num_samples` takes a seeded subset spread over the timesteps in proportion to their points
(largest remainders; ties in denoising order), so every timestep keeps its share.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calibjob.config import PROFILE_HIST_BINS, PROFILE_HIST_RANGE, PROFILE_UNIT_POINTS
from calibjob.core.spec import Spec
from calibjob.errors import ConfigError

# the four linear-layer inputs recorded per stream (see calibjob.profile.taps)
INPUTS = ("qkv_in", "o_in", "fc1_in", "fc2_in")


@dataclass(frozen=True)
class ProfileJob(Spec):
    """Everything that fixes a profile's numbers (and, last, what only says where things are)."""

    calib_hash: str  # blake2b of the calibration file's bytes
    calib_points: int
    model_version: str
    dtype: str  # the activation dtype (the set's; auto = the device's)
    num_samples: int = 0  # 0 = every point
    seed: int = 0  # the subset's
    batch_size: int = 0  # points of one (timestep, prompt) per call; 0 = auto for the device
    unit_points: int = PROFILE_UNIT_POINTS
    compile: str = "auto"  # mx.compile the profiled forward: on, off; auto = on on a GPU
    reduce_dtype: str = "auto"  # per-batch sums: float64 (CPU) or float32 (GPU); auto = so
    hist_bins: int = PROFILE_HIST_BINS
    hist_range: float = PROFILE_HIST_RANGE
    calib_file: str = ""  # where the set was read (not part of the identity)
    local_ckpt: str | None = None  # (not part of the identity)

    def validate(self) -> ProfileJob:
        if self.num_samples < 0:
            raise ConfigError(f"--num-samples must be 0 (all) or positive, got {self.num_samples}")
        if self.num_samples > self.calib_points:
            raise ConfigError(
                f"--num-samples {self.num_samples} exceeds the set's {self.calib_points} points"
            )
        if self.batch_size < 0:
            raise ConfigError(f"--batch-size must be 0 (auto) or positive, got {self.batch_size}")
        if self.unit_points < 1:
            raise ConfigError(f"--unit-points must be positive, got {self.unit_points}")
        if self.seed < 0:
            raise ConfigError(f"--seed must be non-negative, got {self.seed}")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ConfigError(
                f"--dtype must be auto, float32, float16 or bfloat16, got {self.dtype}"
            )
        if self.compile not in ("auto", "on", "off"):
            raise ConfigError(f"compile must be auto, on or off, got {self.compile!r}")
        if self.reduce_dtype not in ("auto", "float64", "float32"):
            raise ConfigError(
                f"reduce dtype must be auto, float64 or float32, got {self.reduce_dtype}"
            )
        scale = self.hist_bins / (2 * self.hist_range)
        if self.hist_bins < 2 or self.hist_bins % 2 or scale != 2.0 ** round(np.log2(scale)):
            raise ConfigError("histogram bins per unit must be an even power of two")
        return self



ProfileJob.IDENTITY = tuple(
    f.name for f in dataclasses.fields(ProfileJob) if f.name not in ("calib_file", "local_ckpt")
)
# job fields a store fixes once resolved; a later run that leaves them open adopts them
ProfileJob.AUTO = {"batch_size": 0, "compile": "auto", "reduce_dtype": "auto", "dtype": "auto"}

# the per-unit arrays of a profile store: partial statistics, every tap side by side
ARRAYS = ("sum", "sumsq", "min", "max", "hist", "rows")


@dataclass(frozen=True)
class UnitStats:
    """One unit's partial statistics, every tap side by side."""

    sum: np.ndarray  # (C,) float64
    sumsq: np.ndarray  # (C,) float64
    min: np.ndarray  # (C,) float32
    max: np.ndarray  # (C,) float32
    hist: np.ndarray  # (taps, B+3) int64: [below, B bins, above, NaN] per tap
    rows: np.ndarray  # (taps,) int64: rows (tokens x CFG rows) each tap saw


def file_hash(path: str | Path, chunk: int = 1 << 24) -> str:
    """blake2b of a file's bytes: the same set on any machine, any path, gives the same hash."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---- points, batches, units -----------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    prompt: int
    points: tuple[int, ...]  # indices into the calibration file


@dataclass(frozen=True)
class ProfileUnit:
    index: int
    timestep: int  # index into the job's timesteps (denoising order)
    batches: tuple[Batch, ...]

    @property
    def num_points(self) -> int:
        return sum(len(b.points) for b in self.batches)

    @property
    def rows(self) -> tuple[int, ...]:
        """A profile unit is one row of the store."""
        return (self.index,)


def timesteps_of(ts: np.ndarray) -> np.ndarray:
    """The distinct timesteps of a set in denoising order (largest first), as float64."""
    return np.unique(np.asarray(ts, dtype=np.float64))[::-1].copy()


def select_points(ts: np.ndarray, num_samples: int, seed: int) -> np.ndarray:
    """Indices (sorted) of the points to profile: all, or a seeded subset of num_samples
    spread over the timesteps in proportion to their points."""
    n = len(ts)
    if num_samples in (0, n):
        return np.arange(n)
    order = np.random.default_rng(seed).permutation(n)
    tvals = timesteps_of(ts)
    t64 = np.asarray(ts, dtype=np.float64)
    counts = np.array([(t64 == t).sum() for t in tvals])
    exact = num_samples * counts / n
    quota = np.floor(exact).astype(int)
    left = num_samples - quota.sum()
    # largest remainders first; a stable sort keeps denoising order among ties
    for j in np.argsort(-(exact - quota), kind="stable")[:left]:
        quota[j] += 1
    chosen = []
    for t, q in zip(tvals, quota, strict=True):
        in_t = order[t64[order] == t]
        chosen.append(in_t[:q])
    return np.sort(np.concatenate(chosen))


def plan_units(
    ts: np.ndarray, prompt_indices: np.ndarray, points: np.ndarray, batch_size: int,
    unit_points: int,
) -> tuple[np.ndarray, list[ProfileUnit]]:
    """The job's timesteps (denoising order) and its units over `points`."""
    if batch_size < 1:
        raise ValueError("batch_size must be resolved to a positive number first")
    t64 = np.asarray(ts, dtype=np.float64)
    prompts = np.asarray(prompt_indices)
    points = np.asarray(points)
    tvals = timesteps_of(t64[points])
    units: list[ProfileUnit] = []
    for ti, t in enumerate(tvals):
        here = points[t64[points] == t]
        batches = []
        for p in np.unique(prompts[here]):
            mine = here[prompts[here] == p]
            for s in range(0, len(mine), batch_size):
                batches.append(Batch(int(p), tuple(int(k) for k in mine[s : s + batch_size])))
        current: list[Batch] = []
        for b in batches:
            if current and sum(len(c.points) for c in current) + len(b.points) > unit_points:
                units.append(ProfileUnit(len(units), ti, tuple(current)))
                current = []
            current.append(b)
        if current:
            units.append(ProfileUnit(len(units), ti, tuple(current)))
    return tvals, units


def largest_group(ts: np.ndarray, prompt_indices: np.ndarray, points: np.ndarray) -> int:
    """Points of the most populous (timestep, prompt): what 'auto' batch size is sized for."""
    t64 = np.asarray(ts, dtype=np.float64)[points]
    pr = np.asarray(prompt_indices)[points]
    if len(points) == 0:
        return 1
    pairs = np.stack([t64, pr.astype(np.float64)], axis=1)
    _, counts = np.unique(pairs, axis=0, return_counts=True)
    return int(counts.max())
