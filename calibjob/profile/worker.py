"""One profile worker: read the set, load its model, work through a shard's units into the store.

Units already done (and whose chunks verify) are skipped, so running the same command again
after a crash, or on a second machine against the same store, does only what is left.
Everything a user can get wrong fails before the store is created or a model runs, with one
line: a file that is not a calibration set, a model that does not fit its shapes, a store of
another job.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from calibjob.config import canonical_model
from calibjob.data import open_npz
from calibjob.errors import ConfigError, StoreError
from calibjob.profile.plan import (
    ProfileJob,
    ProfileUnit,
    differing_fields,
    file_hash,
    largest_group,
    plan_units,
    select_points,
)
from calibjob.profile.store import ProfileStore
from calibjob.shards import ALL, Shard

err = Console(stderr=True)

REQUIRED = ("xs", "ts", "prompt_indices", "cs", "cs_pooled")
# job fields a store fixes once resolved; a later run that leaves them open adopts them
AUTO = {"batch_size": 0, "compile": "auto", "reduce_dtype": "auto", "dtype": "auto"}


@dataclass
class ProfileResult:
    units_total: int
    units_run: int
    points_run: int
    recomputed: list[int]
    seconds: float
    points_per_s: float


@dataclass
class CalibSet:
    """The arrays of a calibration file that profiling reads (large ones memory-mapped)."""

    path: Path
    xs: np.ndarray
    ts: np.ndarray
    prompt_indices: np.ndarray
    cs: np.ndarray
    cs_pooled: np.ndarray
    model_version: str | None
    dtype: str | None


def read_set(path: str | Path) -> CalibSet:
    """A calibration `.npz` (merge's output); one line for anything else."""
    p = Path(path)
    try:
        arrays = open_npz(p)
    except ConfigError as e:
        raise ConfigError(f"{p} is not a calibration file ({e})") from None
    missing = [k for k in REQUIRED if k not in arrays]
    if missing:
        raise ConfigError(
            f"{p} is not a calibration file (no {', '.join(missing)}; make one with "
            f"`calibjob merge`)"
        )
    xs, ts = arrays["xs"], np.asarray(arrays["ts"])
    pi = np.asarray(arrays["prompt_indices"])
    cs, pooled = arrays["cs"], arrays["cs_pooled"]
    n = len(ts)
    if (
        xs.ndim != 4 or xs.shape[0] != n or pi.shape != (n,) or cs.ndim != 4 or cs.shape[1] != 2
        or pooled.ndim != 3 or pooled.shape[:2] != cs.shape[:2] or n == 0
    ):
        raise ConfigError(f"{p} is not a calibration file (its arrays' shapes do not fit)")
    if pi.min() < 0 or pi.max() >= cs.shape[0]:
        raise ConfigError(f"{p} is not a calibration file (prompt indices out of range)")
    mv = str(arrays["model_version"]) if "model_version" in arrays else None
    dt = str(arrays["dtype"]) if "dtype" in arrays else None
    return CalibSet(p, xs, ts, pi, cs, pooled, mv, dt)


def resolve_job(
    cal: CalibSet,
    store_path: str | Path,
    *,
    model_version: str | None = None,
    dtype: str | None = None,
    num_samples: int = 0,
    seed: int = 0,
    batch_size: int = 0,
    unit_points: int | None = None,
    compile: str = "auto",
    local_ckpt: str | None = None,
) -> ProfileJob:
    """The job for this set and these options; 'auto' fields take an existing store's choice,
    else the device's."""
    from calibjob import remote

    if remote.is_url(str(store_path)):
        raise ConfigError(f"profile stores are local folders for now, not {store_path}")
    if model_version is None and cal.model_version is None:
        raise ConfigError(
            f"{cal.path} does not say which model made it (an older file): pass --model-version"
        )
    if model_version is not None and cal.model_version is not None:
        if canonical_model(model_version) != canonical_model(cal.model_version):
            raise ConfigError(
                f"{cal.path} was made with {cal.model_version}, not --model-version {model_version}"
            )
    model = canonical_model(model_version or cal.model_version)
    extra = {} if unit_points is None else {"unit_points": unit_points}
    job = ProfileJob(
        calib_hash=file_hash(cal.path),
        calib_points=len(cal.ts),
        model_version=model,
        dtype=dtype or cal.dtype or "auto",
        num_samples=num_samples,
        seed=seed,
        batch_size=batch_size,
        compile=compile,
        calib_file=str(cal.path),
        local_ckpt=local_ckpt,
        **extra,
    ).validate()
    if ProfileStore.exists(store_path):
        st = ProfileStore.open(store_path, mode="r")
        job = job.replace(
            **{k: getattr(st.job, k) for k, auto in AUTO.items() if getattr(job, k) == auto}
        )
        diff = differing_fields(st.job, job)
        if diff:
            details = ", ".join(
                f"{k}: store has {st.job.to_dict()[k]!r}, asked {job.to_dict()[k]!r}" for k in diff
            )
            raise StoreError(f"{store_path} holds another profile job ({details})")
    if "auto" in (job.dtype, job.compile, job.reduce_dtype) or job.batch_size == 0:
        from calibjob import device

        points = select_points(cal.ts, job.num_samples, job.seed)
        job = job.replace(
            dtype=device.resolve_dtype(job.dtype),
            compile=device.resolve_compile(job.compile),
            reduce_dtype=job.reduce_dtype if job.reduce_dtype != "auto"
            else ("float32" if device.on_gpu() else "float64"),
            batch_size=device.resolve_batch_size(
                job.batch_size, largest_group(cal.ts, cal.prompt_indices, points)
            ),
        )
    return job


def plan(cal: CalibSet, job: ProfileJob) -> tuple[np.ndarray, list[ProfileUnit]]:
    points = select_points(cal.ts, job.num_samples, job.seed)
    return plan_units(cal.ts, cal.prompt_indices, points, job.batch_size, job.unit_points)


def check_model(model, cal: CalibSet) -> None:
    """One line when the model cannot take the set's shapes."""
    c = model.mmdit.config
    n, h, w, ch = cal.xs.shape
    problems = []
    if cal.cs.shape[-1] != c.token_level_text_embed_dim:
        problems.append(f"text width {cal.cs.shape[-1]} (model: {c.token_level_text_embed_dim})")
    if cal.cs_pooled.shape[-1] != c.pooled_text_embed_dim:
        problems.append(
            f"pooled text width {cal.cs_pooled.shape[-1]} (model: {c.pooled_text_embed_dim})"
        )
    if ch != c.vae_latent_dim:
        problems.append(f"latent channels {ch} (model: {c.vae_latent_dim})")
    if h % c.patch_size or w % c.patch_size or max(h, w) > c.max_latent_resolution:
        problems.append(
            f"latent {h}x{w} (model: multiples of {c.patch_size} up to {c.max_latent_resolution})"
        )
    if problems:
        raise ConfigError(
            f"model {model.name} does not match {cal.path}: {'; '.join(problems)}"
        )


def load_model(job: ProfileJob):
    from calibjob import models

    return models.load(
        job.model_version, dtype=job.dtype, local_ckpt=job.local_ckpt, text_encoders=False
    )


def profile_shard(
    cal: CalibSet,
    job: ProfileJob,
    store_path: str | Path,
    shard: Shard = ALL,
    *,
    show_progress: bool | None = None,
    model=None,
) -> ProfileResult:
    """Profile shard `shard` of `job` (resolved) over `cal` into the store at `store_path`.
    `model` may be passed in (a benchmark's); by default the job's model is loaded."""
    t0 = time.perf_counter()
    timesteps, units = plan(cal, job)
    unit_t = [u.timestep for u in units]
    store = ProfileStore.open(store_path) if ProfileStore.exists(store_path) else None
    if store is not None and store.meta["unit_timesteps"] != unit_t:
        raise StoreError(f"{store_path} was planned differently (its units differ)")
    todo, recomputed = units, []
    if store is not None:
        mine = [u.index for u in shard.units(units)]
        recomputed = store.verify_done(mine)
        done = store.done_mask()
        todo = [u for u in shard.units(units) if not done[u.index]]
        if not todo:
            return ProfileResult(len(units), 0, 0, recomputed, time.perf_counter() - t0, 0.0)
    else:
        todo = shard.units(units)

    from calibjob.profile.forward import Profiler
    from calibjob.profile.taps import tap_specs

    if model is None:
        model = load_model(job)
    check_model(model, cal)
    taps = [[s.layer, s.input, s.channels] for s in tap_specs(model.mmdit)]
    store = ProfileStore.create_or_open(store_path, job, taps, timesteps, unit_t)
    if recomputed:
        err.print(f"calibjob: profile units {recomputed} failed verification; recomputing")
    prof = Profiler(
        model, reduce_dtype=job.reduce_dtype, bins=job.hist_bins, limit=job.hist_range,
        compile=job.compile == "on",
    )
    ts_dtype = cal.ts.dtype
    n_points = sum(u.num_points for u in todo)
    show = sys.stderr.isatty() if show_progress is None else show_progress
    progress = Progress(
        TextColumn("[bold]profile {task.fields[shard]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("points, unit {task.fields[unit]}"),
        TextColumn("{task.fields[rate]} points/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err,
        disable=not show,
    )
    t_loop = time.perf_counter()
    done_points = 0
    with progress:
        task = progress.add_task(
            "profile", total=n_points, shard=str(shard), unit="-", rate="-"
        )

        def on_batch(b: int) -> None:
            nonlocal done_points
            done_points += b
            rate = done_points / max(time.perf_counter() - t_loop, 1e-9)
            progress.update(task, advance=b, rate=f"{rate:.1f}")

        for i, unit in enumerate(todo):
            progress.update(task, unit=f"{i + 1}/{len(todo)}")
            t = np.array([timesteps[unit.timestep]], dtype=ts_dtype)
            stats = prof.run_unit(unit, t, cal.xs, cal.cs, cal.cs_pooled, on_batch)
            store.write_unit(unit.index, stats)
            store.record_progress(
                str(shard),
                {
                    "points_per_s": done_points / max(time.perf_counter() - t_loop, 1e-9),
                    "units_left": len(todo) - i - 1,
                    "pid": os.getpid(),
                },
            )
    seconds = time.perf_counter() - t0
    return ProfileResult(
        len(units), len(todo), n_points, recomputed, seconds, n_points / max(seconds, 1e-9)
    )


__all__ = [
    "CalibSet", "ProfileResult", "check_model", "load_model", "profile_shard", "read_set",
    "resolve_job",
]
