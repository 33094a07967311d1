"""The jobs calibjob runs, by name: each a small definition the job core runs (calibjob.core).

`run` (calibjob.jobs.run): denoising trajectories into the calibration set (phase 1).
`profile` (calibjob.jobs.profile): activation statistics over a calibration set (phase 2).

Every command that takes a store (`status`, `resume`, `launch`, `merge`...) opens it here and
finds its job from the store's own record.
"""

from __future__ import annotations

from pathlib import Path

from calibjob.core.job import Job
from calibjob.core.locations import Location
from calibjob.core.store import JobStore


def jobs() -> dict[str, Job]:
    """name -> definition (imported on first use: `profile` pulls in its planning code)."""
    from calibjob.jobs.profile import PROFILE
    from calibjob.jobs.run import RUN

    return {RUN.name: RUN, PROFILE.name: PROFILE}


def open_store(location: str | Path | Location, mode: str = "r+") -> JobStore:
    """The store at `location`, of whichever job it holds."""
    return JobStore.open(location, jobs(), mode)


def store_exists(location: str | Path | Location) -> bool:
    return JobStore.exists(location)
