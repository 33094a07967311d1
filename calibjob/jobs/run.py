"""The `run` job: denoising trajectories recorded for the calibration set (phase 1).

Rows are trajectories; a unit is up to `batch_size` trajectories of one prompt (trajectory k
uses prompt k % P), one batched Euler loop. Per row the store keeps `xs (S, H, W, C)` float32,
x before each of the S model calls. Prepared once per store: the prompts' conditioning `cs`,
`cs_pooled` and the schedule `sigmas`, `ts` (the text encoders load alone, encode, are freed,
and only then does the MMDiT load).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from calibjob.checkpoints import check_local_ckpt
from calibjob.config import JobConfig, step_compiled
from calibjob.core.job import ArraySpec, Job, Layout, Session
from calibjob.core.progress import peak_memory_gb
from calibjob.core.store import JobStore
from calibjob.errors import StoreError
from calibjob.families import LATENT_CHANNELS
from calibjob.prompts import read_prompts

PREPARED = ("cs", "cs_pooled", "sigmas", "ts")


@dataclass(frozen=True)
class Unit:
    """One batched model run: trajectories of one prompt."""

    index: int
    prompt: int
    trajectories: tuple[int, ...]

    @property
    def rows(self) -> tuple[int, ...]:
        return self.trajectories


def work_units(num_trajectories: int, num_prompts: int, batch_size: int) -> list[Unit]:
    """Cut trajectories 0..N-1 into units: grouped by prompt, in trajectory order, <= batch_size.
    Pure arithmetic: units depend on the job alone, never on the shard count."""
    if batch_size < 1:
        raise ValueError("batch_size must be resolved to a positive number first")
    units: list[Unit] = []
    for p in range(min(num_prompts, num_trajectories)):
        trajs = list(range(p, num_trajectories, num_prompts))
        for start in range(0, len(trajs), batch_size):
            units.append(Unit(len(units), p, tuple(trajs[start : start + batch_size])))
    return units


def units_for(cfg: JobConfig) -> list[Unit]:
    return work_units(cfg.num_fid_samples, len(cfg.prompts), cfg.batch_size)


# ---- the spec: what the command line leaves open ------------------------------------------


def prepare_config(cfg: JobConfig) -> JobConfig:
    """Resolve what needs no device (model key, prompts) and validate. `launch` stops here:
    the 'auto' fields are left to the workers (the login node is not a GPU node)."""
    cfg = cfg.with_model_defaults()
    if not cfg.prompts:
        cfg = cfg.replace(
            prompts=read_prompts(cfg.prompt_file, cfg.prompt_column, cfg.num_prompts)
        )
    cfg.validate()
    check_local_ckpt(cfg.local_ckpt)
    return cfg


def resolve_config(cfg: JobConfig, existing: JobConfig | None, share: int = 1) -> JobConfig:
    """Fill in the prompts and the 'auto' fields: the existing store's choices, else the
    device's (the batch that fits this worker's memory, its 1/`share` of the device when
    workers share one)."""
    cfg = prepare_config(cfg)
    if existing is not None:
        cfg = cfg.with_choices_of(existing)
    from calibjob import device

    if "auto" in (cfg.dtype, cfg.compile) or cfg.batch_size == 0:
        per_prompt = -(-cfg.num_fid_samples // len(cfg.prompts))
        cfg = cfg.replace(
            dtype=device.resolve_dtype(cfg.dtype, cfg.model_version),
            compile=device.resolve_compile(cfg.compile),
        )
        cfg = cfg.replace(
            batch_size=device.resolve_batch_size(
                cfg.batch_size, per_prompt, model=cfg.model_version, dtype=cfg.dtype,
                compile=cfg.compile, latent_size=cfg.latent_size, max_memory=cfg.max_memory,
                share=share,
            )
        )  # fmt: skip
    if cfg.max_memory > 0 and existing is None:
        device.note_encode_over(cfg.model_version, cfg.dtype, cfg.max_memory)
    return cfg


# ---- the session: encode once, then denoise units ------------------------------------------


def _load_model(cfg: JobConfig, *, text_encoders: bool, mmdit: bool):
    from calibjob import models

    return models.load(
        cfg.model_version, shift=cfg.shift, dtype=cfg.dtype, local_ckpt=cfg.local_ckpt,
        text_encoders=text_encoders, mmdit=mmdit,
    )  # fmt: skip


def _materialized(model):
    """Evaluate the loaded weights now: DiffusionKit's loaders are lazy, so the checkpoint's
    read and dtype cast would otherwise happen (and peak) inside the first denoising step."""
    import gc

    from calibjob.device import mx

    text = vars(model.text).values() if model.text is not None else ()
    encoders = [v for v in text if hasattr(v, "parameters")]
    for part in (model.mmdit, *encoders):
        if part is not None:
            mx.eval(part.parameters())
    gc.collect()
    mx.clear_cache()
    return model


def ensure_encoded(store: JobStore, model) -> None:
    """Encode all prompts once per store: the first process under the lock does it, the others
    wait on the lock and then find it done."""
    with store.loc.lock():
        if store.reload().prepared:
            return
        cfg = store.config
        cs, cs_pooled = model.encode(cfg.prompts)
        # stored as the model sees them (the engine casts to the activation dtype): float16 on
        # a GPU halves the paper's cs to 193 MB; numpy has no bfloat16, which stays float32
        dt = np.float16 if cfg.dtype == "float16" else np.float32
        sigmas, ts = model.schedule(cfg.num_sampling_steps)
        arrays = {"cs": cs.astype(dt), "cs_pooled": cs_pooled.astype(dt), "sigmas": sigmas,
                  "ts": ts}  # fmt: skip
        store.write_prepared(arrays, {"cs", "cs_pooled"}, what="the prompt conditioning")


class RunSession(Session):
    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        self.phases: dict[str, tuple[float, float]] = {}
        self.engine = None
        self.cs = self.cs_pooled = None

    def _phase(self, name: str, fn):
        from calibjob.device import mx

        mx.reset_peak_memory()
        t = time.perf_counter()
        out = fn()
        self.phases[name] = (time.perf_counter() - t, peak_memory_gb())
        return out

    def prepare(self, store: JobStore, compute: bool) -> None:
        """Text encoders and MMDiT are never in memory together (low_memory_mode, the default):
        T5-XXL alone is ~9.8 GB in float16 against the MMDiT's 4.2 GB, so this sets the run's
        peak."""
        cfg = self.cfg
        if not compute:
            ensure_encoded(store, _load_model(cfg, text_encoders=True, mmdit=False))
            return
        from calibjob.device import mx

        if not cfg.low_memory_mode:
            model = self._phase(
                "load", lambda: _load_model(cfg, text_encoders=not store.prepared, mmdit=True)
            )
            if not store.prepared:
                self._phase("encode", lambda: ensure_encoded(store, model))
        else:
            if not store.prepared:
                text = self._phase(
                    "load_text",
                    lambda: _materialized(_load_model(cfg, text_encoders=True, mmdit=False)),
                )
                self._phase("encode", lambda: ensure_encoded(store, text))
                text.free_text_encoders()
                del text
            model = self._phase(
                "load_mmdit",
                lambda: _materialized(_load_model(cfg, text_encoders=False, mmdit=True)),
            )
        mx.reset_peak_memory()  # the denoise phase's peak starts here
        from calibjob.engine import Engine

        store = store.reload()
        self.cs, self.cs_pooled = store.read_prepared("cs"), store.read_prepared("cs_pooled")
        self.engine = Engine(
            model, num_steps=cfg.num_sampling_steps, cfg_scale=cfg.cfg_scale,
            guidance_scale=cfg.guidance_scale, latent_size=cfg.latent_size, seed=cfg.seed,
            compile=step_compiled(cfg.compile), fused=cfg.compile == "fused",
        )  # fmt: skip
        if not np.array_equal(store.read_prepared("ts"), self.engine.timesteps_np):
            raise StoreError("the store's timesteps differ from this DiffusionKit's schedule")

    def units(self) -> list[Unit]:
        return units_for(self.cfg)

    def compute(self, unit: Unit, on_work) -> dict[str, np.ndarray]:
        p = unit.prompt
        xs, _ = self.engine.run_unit(
            p, unit.trajectories, self.cs[p], self.cs_pooled[p], on_work
        )
        return {"xs": xs}

    def close(self) -> None:
        if self.engine is not None:
            self.engine.release_prompt()


class RunJob(Job):
    name = "run"
    spec_class = JobConfig
    row_word = "trajectory"
    throughput = "traj-steps/s"  # trajectory-steps denoised per second of the unit loop
    entries = frozenset({"xs", *PREPARED})
    prepared = PREPARED
    loop_phase = "denoise"
    store_noun = "calibration-data"
    reader = "calibjob merge"

    def layout(self, spec: JobConfig, meta: dict) -> Layout:
        h, w = spec.latent_size
        shape = (spec.num_sampling_steps, h, w, LATENT_CHANNELS)
        return Layout(spec.num_fid_samples, {"xs": ArraySpec(shape, "float32")})

    def unit_rows(self, spec: JobConfig, meta: dict) -> list[tuple[int, ...]]:
        return [u.rows for u in units_for(spec)]

    def row_work(self, spec: JobConfig, meta: dict) -> np.ndarray:
        return np.full(spec.num_fid_samples, spec.num_sampling_steps, dtype=np.int64)

    def describe(self, spec: JobConfig) -> str:
        return f"{spec.model_version}, {spec.num_fid_samples} x {spec.num_sampling_steps} steps"

    def row_ok(self, arrays: dict[str, np.ndarray]) -> bool:
        return bool(np.isfinite(arrays["xs"]).all())

    def session(self, spec: JobConfig, location: str) -> RunSession:
        return RunSession(spec)

    def resolve(self, spec: JobConfig, existing: JobConfig | None, share: int = 1) -> JobConfig:
        return resolve_config(spec, existing, share)

    def check_share(self, spec: JobConfig, share: int) -> None:
        """Only where this machine runs the workers and the batch is not fixed yet."""
        if share <= 1:
            return
        from calibjob import device

        device.resolve_batch_size(
            spec.batch_size, -(-spec.num_fid_samples // len(spec.prompts)),
            model=spec.model_version, dtype=device.resolve_dtype(spec.dtype, spec.model_version),
            compile=device.resolve_compile(spec.compile), latent_size=spec.latent_size,
            max_memory=spec.max_memory, share=share,
        )  # fmt: skip


RUN = RunJob()


def open_run_store(path) -> JobStore:
    """A store of this job (for merge, inspect, preview); another job's store is named, with
    the command that reads it."""
    from calibjob.core.store import OtherJob
    from calibjob.jobs import open_store

    st = open_store(path, mode="r")
    if st.job is not RUN:
        raise OtherJob(str(path), st.job.name, RUN.store_noun)
    return st
