"""The `profile` job: activation statistics of the MMDiT over a calibration set (phase 2).

Rows are units: a unit is consecutive batches of one timestep (calibjob.profile.plan), and its
row holds the unit's partial statistics of every tap side by side (`sum`, `sumsq`, `min`, `max`,
`hist`, `rows`). What the store's record keeps beside the spec, fixed when it is created: the
taps [[layer, input, channels], ...], the timesteps (denoising order), each unit's timestep and
points. Nothing is prepared once per store; each worker reads the set and loads the MMDiT.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from calibjob.config import canonical_model, step_compiled
from calibjob.core.job import ArraySpec, Job, Layout, Session
from calibjob.core.store import JobStore
from calibjob.data import CalibSet, read_set
from calibjob.errors import ConfigError
from calibjob.profile.plan import (
    ARRAYS,
    ProfileJob,
    ProfileUnit,
    file_hash,
    largest_group,
    plan_units,
    select_points,
)


def build_spec(
    cal: CalibSet,
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
    """The job for this set and these options, validated; 'auto' fields still open."""
    if model_version is None and cal.model_version is None:
        raise ConfigError(
            f"{cal.path} does not say which model made it (an older file): pass --model-version"
        )
    if model_version is not None and cal.model_version is not None:
        if canonical_model(model_version) != canonical_model(cal.model_version):
            raise ConfigError(
                f"{cal.path} was made with {cal.model_version}, not --model-version {model_version}"
            )
    extra = {} if unit_points is None else {"unit_points": unit_points}
    return ProfileJob(
        calib_hash=file_hash(cal.path),
        calib_points=len(cal.ts),
        model_version=canonical_model(model_version or cal.model_version),
        dtype=dtype or cal.dtype or "auto",
        num_samples=num_samples,
        seed=seed,
        batch_size=batch_size,
        compile=compile,
        calib_file=str(Path(cal.path).resolve()),
        local_ckpt=local_ckpt,
        **extra,
    ).validate()


def resolve(job: ProfileJob, cal: CalibSet, existing: ProfileJob | None) -> ProfileJob:
    """'auto' fields: an existing store's choices, else the device's."""
    if existing is not None:
        job = job.with_choices_of(existing)
    if "auto" in (job.dtype, job.compile, job.reduce_dtype) or job.batch_size == 0:
        from calibjob import device

        points = select_points(cal.ts, job.num_samples, job.seed)
        reduce = job.reduce_dtype
        if reduce == "auto":
            reduce = "float32" if device.on_gpu() else "float64"
        job = job.replace(
            dtype=device.resolve_dtype(job.dtype, job.model_version),
            # the profiled forward has its own taps: compiled or not, never the fused blocks
            compile="on" if step_compiled(device.resolve_compile(job.compile)) else "off",
            reduce_dtype=reduce,
            batch_size=device.resolve_batch_size(
                job.batch_size, largest_group(cal.ts, cal.prompt_indices, points)
            ),
        )
    return job


def read_job_set(job: ProfileJob) -> CalibSet:
    """The set a job was made from, checked against the hash its spec recorded."""
    cal = read_set(job.calib_file)
    if file_hash(cal.path) != job.calib_hash:
        raise ConfigError(
            f"{job.calib_file} is not the calibration set this profile was started on (its "
            f"bytes changed); profile the new set into a new store"
        )
    return cal


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
    if cal.branches != model.info.branches:
        problems.append(
            f"{cal.branches} conditioning branch(es) (model: {model.info.branches}, guidance "
            f"{model.info.guidance})"
        )
    if problems:
        raise ConfigError(f"model {model.name} does not match {cal.path}: {'; '.join(problems)}")


class ProfileSession(Session):
    """Reads the set, plans its units, loads the MMDiT once (also for the store's record)."""

    def __init__(self, job: ProfileJob, cal: CalibSet | None = None, model=None):
        self.job = job
        self.cal = cal if cal is not None else read_job_set(job)
        self.timesteps, self._units = plan(self.cal, job)
        self.model = model
        self.profiler = None
        self.phases: dict[str, tuple[float, float]] = {}

    def _model(self):
        if self.model is None:
            from calibjob import models

            self.model = models.load(
                self.job.model_version, dtype=self.job.dtype, local_ckpt=self.job.local_ckpt,
                text_encoders=False,
            )  # fmt: skip
        check_model(self.model, self.cal)
        return self.model

    def store_meta(self) -> dict:
        from calibjob.profile.taps import tap_specs

        taps = [[s.layer, s.input, s.channels] for s in tap_specs(self._model().mmdit)]
        return {
            "taps": taps,
            "timesteps": [float(t) for t in self.timesteps],
            "unit_timesteps": [u.timestep for u in self._units],
            "unit_points": [u.num_points for u in self._units],
        }

    def prepare(self, store: JobStore, compute: bool) -> None:
        if not compute:
            return
        from calibjob.profile.forward import Profiler

        if store.meta["unit_timesteps"] != [u.timestep for u in self._units]:
            raise ConfigError(f"{store.path} was planned differently (its units differ)")
        j = self.job
        self.profiler = Profiler(
            self._model(), reduce_dtype=j.reduce_dtype, bins=j.hist_bins, limit=j.hist_range,
            compile=j.compile == "on", guidance_scale=self.cal.guidance_scale,
        )  # fmt: skip

    def units(self) -> list[ProfileUnit]:
        return self._units

    def compute(self, unit: ProfileUnit, on_work) -> dict[str, np.ndarray]:
        c = self.cal
        t = np.array([self.timesteps[unit.timestep]], dtype=c.ts.dtype)
        stats = self.profiler.run_unit(unit, t, c.xs, c.cs, c.cs_pooled, on_work)
        return {name: getattr(stats, name)[None] for name in ARRAYS}


class ProfileJobDef(Job):
    name = "profile"
    spec_class = ProfileJob
    row_word = "unit"
    throughput = "points/s"  # calibration points profiled per second of the unit loop
    entries = frozenset(ARRAYS)
    loop_phase = "profile"
    store_noun = "profile"
    another = "another profile job"
    reader = "calibjob profile-report"
    work_word = "point"

    def layout(self, spec: ProfileJob, meta: dict) -> Layout:
        u, taps = len(meta["unit_timesteps"]), meta["taps"]
        c, t = sum(int(x[2]) for x in taps), len(taps)
        f64, f32, i64 = "float64", "float32", "int64"
        arrays = {
            "sum": ArraySpec((c,), f64), "sumsq": ArraySpec((c,), f64),
            "min": ArraySpec((c,), f32), "max": ArraySpec((c,), f32),
            "hist": ArraySpec((t, spec.hist_bins + 3), i64), "rows": ArraySpec((t,), i64),
        }  # fmt: skip
        return Layout(u, arrays)

    def unit_rows(self, spec: ProfileJob, meta: dict) -> list[tuple[int, ...]]:
        return [(u,) for u in range(len(meta["unit_timesteps"]))]

    def row_work(self, spec: ProfileJob, meta: dict) -> np.ndarray:
        n = len(meta["unit_timesteps"])
        if "unit_points" in meta:
            return np.asarray(meta["unit_points"], dtype=np.int64)
        return np.full(n, -(-(spec.num_samples or spec.calib_points) // max(n, 1)))

    def describe(self, spec: ProfileJob) -> str:
        n = spec.num_samples or spec.calib_points
        return f"profile of {Path(spec.calib_file).name}: {spec.model_version}, {n} points"

    def row_ok(self, arrays: dict[str, np.ndarray]) -> bool:
        return int(arrays["rows"].min()) > 0

    def session(self, spec: ProfileJob, location: str) -> ProfileSession:
        return ProfileSession(spec)

    def resolve(self, spec: ProfileJob, existing: ProfileJob | None, share: int = 1):
        return resolve(spec, read_job_set(spec), existing)


PROFILE = ProfileJobDef()
