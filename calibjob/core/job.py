"""What a job is to the core: a small definition the core runs, stores, reports and launches.

A job says what to compute; the core says where and how completion is tracked. A definition
gives:

- its spec class (fields, identity, 'auto' fields) and how to resolve a spec for a device;
- its rows and arrays (`layout`): every array of a store is per row (chunked one row per chunk,
  checksummed, with one done marker per row); a unit covers one or more rows;
- its units (`unit_rows`: the rows of each unit, a pure function of the spec and the store's
  record), the work each row costs (for throughput and ETA) and the words for both;
- `session`: a `Session` that prepares once (loads a model, encodes prompts, reads a set) and
  then computes units into per-row arrays.

Nothing here imports MLX or any one job.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from calibjob.core.spec import Spec


@dataclass(frozen=True)
class ArraySpec:
    """One per-row array: each row has `shape` (after the row axis) and `dtype`."""

    shape: tuple[int, ...]
    dtype: str

    def chunk_bytes(self) -> int:
        """Bytes of one row's chunk as Zarr writes it: raw data plus a 4-byte crc32c."""
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize + 4


@dataclass(frozen=True)
class Layout:
    rows: int
    arrays: dict[str, ArraySpec] = field(default_factory=dict)


class Unit(Protocol):
    """What the core needs of a unit: its index (shard assignment, leases) and its rows."""

    @property
    def index(self) -> int: ...

    @property
    def rows(self) -> tuple[int, ...]: ...


@dataclass(frozen=True)
class PlainUnit:
    """A unit as the core sees it when it has no job data loaded (status, pending counts)."""

    index: int
    rows: tuple[int, ...]


class Session(ABC):
    """One worker's use of a job: prepare once, then compute units.

    `phases`: name -> (seconds, peak GB) of what prepare did, for the run's summary."""

    phases: dict[str, tuple[float, float]]

    def store_meta(self) -> dict:
        """What the store's record keeps beside the spec, resolved when it is created (e.g.
        the layers a profile records). Called only for a new store."""
        return {}

    @abstractmethod
    def prepare(self, store: Any, compute: bool) -> None:
        """Make the store's prepared arrays (once per store, under its lock) and, when
        `compute`, get ready to compute units (load the model)."""

    @abstractmethod
    def units(self) -> list[Unit]:
        """Every unit of the job, with whatever the compute step needs."""

    @abstractmethod
    def compute(self, unit: Unit, on_work: Callable[[int], None]) -> dict[str, np.ndarray]:
        """The unit's rows of every per-row array (leading axis: the unit's rows in order);
        `on_work(n)` reports n units of work (throughput) as they finish."""

    def close(self) -> None:  # noqa: B027  (most sessions hold nothing to free)
        """Free what prepare loaded."""


class Job(ABC):
    """A job definition. See the module docstring."""

    name: str  # the command that runs it: "run", "profile"
    spec_class: type[Spec]
    row_word: str  # "trajectory", "unit": what a row is to the user
    throughput: str  # the one throughput label: "traj-steps/s", "points/s"
    entries: frozenset[str]  # every name a store of this job holds at its top
    prepared: tuple[str, ...] = ()  # arrays made once per store by prepare (not per row)
    loop_phase: str = "compute"  # the unit loop's name in the run's phase summary
    store_noun: str = "calibjob"  # "a ... store": what the user calls this job's stores
    another: str = "a different job"  # "holds ... (seed: store has 7, asked 8)"
    reader: str = ""  # the command that reads a finished store
    work_word: str = ""  # what a run's summary counts: its work ("point"), else its rows

    @abstractmethod
    def layout(self, spec: Spec, meta: dict) -> Layout: ...

    @abstractmethod
    def unit_rows(self, spec: Spec, meta: dict) -> list[tuple[int, ...]]:
        """The rows of each unit, by unit index (pure: no model, no data)."""

    @abstractmethod
    def row_work(self, spec: Spec, meta: dict) -> np.ndarray:
        """Work per row, in the throughput's units (ETA = work left / rate)."""

    @abstractmethod
    def describe(self, spec: Spec) -> str:
        """One line saying what the job is (status's title)."""

    @abstractmethod
    def session(self, spec: Spec, location: str) -> Session: ...

    def resolve(self, spec: Spec, existing: Spec | None, share: int = 1) -> Spec:
        """The spec with its 'auto' fields chosen: an existing store's choices, else the
        device's (`share`: workers sharing this worker's device)."""
        return spec if existing is None else spec.with_choices_of(existing)

    def check_share(self, spec: Spec, share: int) -> None:  # noqa: B027  (optional)
        """Refuse, before anything is launched, workers that cannot fit their device share."""

    def row_ok(self, arrays: dict[str, np.ndarray]) -> bool:
        """Whether one row's arrays, read back whole (checksums passed), hold valid data."""
        return True

    def plain_units(self, spec: Spec, meta: dict) -> list[PlainUnit]:
        return [PlainUnit(i, rows) for i, rows in enumerate(self.unit_rows(spec, meta))]
