"""Shards: which units a worker takes. Pure arithmetic, no model, no store.

Units depend on the job's spec only, never on the shard count, so any sharding of the same job
computes the very same units, hence bit-identical data. Shard i/n takes units i, i+n, ...
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TypeVar

from calibjob.errors import ConfigError

U = TypeVar("U")


@dataclass(frozen=True)
class Shard:
    """Shard i of n (0-based): takes units i, i+n, i+2n, ..."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def units(self, units: list[U]) -> list[U]:
        return units[self.index :: self.count]


ALL = Shard(0, 1)


def parse_shard(spec: str) -> Shard:
    """Parse 'i/n' (0 <= i < n), or 'auto' for a Slurm array task."""
    spec = spec.strip()
    if spec == "auto":
        try:
            tid = int(os.environ["SLURM_ARRAY_TASK_ID"])
            count = int(os.environ["SLURM_ARRAY_TASK_COUNT"])
            first = int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
        except (KeyError, ValueError):
            raise ConfigError(
                "--shard auto needs SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT "
                "(run it inside a Slurm job array)"
            ) from None
        return _checked(tid - first, count, spec)
    m = re.fullmatch(r"(-?\d+)/(-?\d+)", spec)
    if not m:
        raise ConfigError(f"--shard must look like i/n (e.g. 0/4), got {spec!r}")
    return _checked(int(m.group(1)), int(m.group(2)), spec)


def _checked(i: int, n: int, spec: str) -> Shard:
    if n < 1:
        raise ConfigError(f"--shard {spec}: the shard count must be at least 1")
    if not 0 <= i < n:
        raise ConfigError(f"--shard {spec}: the index must be between 0 and {n - 1}")
    return Shard(i, n)
