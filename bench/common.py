"""What both benchmarks share: a random-weight MMDiT of DiffusionKit's class wrapped as a
calibjob Model, a store pre-filled with random conditioning, and the full job run in-process
through `calibjob.worker.run_shard` with that model standing in for `models.load`."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _p in (ROOT, ROOT / "tests"):  # run as `python bench/x.py` from a checkout; the spec
    if str(_p) not in sys.path:  # loop and the hub fixture are test code, not the package's
        sys.path.insert(0, str(_p))

import numpy as np  # noqa: E402

import calibjob.diffusionkit_imports  # noqa: E402, F401  (DiffusionKit without torch)
from calibjob import device  # noqa: E402
from calibjob.device import mx  # noqa: E402  (mlx.core, after the OpenBLAS preload)

TRAJ_STEP_GFLOP_PER_TOKEN = 1.48  # SD3-2b: 24 joint blocks of width 1536, attention included


def rss_mb() -> float:
    """Peak RSS of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def random_mmdit(config, dtype: mx.Dtype, seed: int = 0, adaln_scale: float = 0.1, build=None):
    """DiffusionKit's MMDiT with random weights (its own initialisers), cast to dtype. The adaLN
    weights are scaled down so that 24 random blocks stay finite in float16. `build(mmdit)`
    adjusts the module before its weights are drawn (FLUX.1's key bias)."""
    from diffusionkit.mlx.mmdit import MMDiT
    from mlx.utils import tree_flatten, tree_unflatten

    mx.random.seed(seed)
    mmdit = MMDiT(config)
    if build is not None:
        mmdit = build(mmdit)
    params = [
        (k, (v * adaln_scale if "adaLN" in k else v).astype(dtype))
        for k, v in tree_flatten(mmdit.parameters())
    ]
    mmdit.update(tree_unflatten(params))
    mx.eval(mmdit.parameters())
    return mmdit


def mmdit_config(*, depth: int, hidden: int, heads: int, text_dim: int, pooled_dim: int, dtype):
    """A mid-size MMDiT of DiffusionKit's class: the tiny model's config, grown."""
    from calibjob.models.tiny import mmdit_config as tiny_config

    return tiny_config(
        dtype, depth=depth, hidden=hidden, heads=heads, mlp_ratio=4, text_dim=text_dim,
        pooled_dim=pooled_dim, max_latent_resolution=192,
    )


def sd3_2b_config(dtype):
    """DiffusionKit's SD3_2b (depth 24, hidden 1536, 24 heads) with the low-memory SDPA flag off."""
    from diffusionkit.mlx.config import SD3_2b

    return dataclasses.replace(SD3_2b, dtype=dtype, low_memory_mode=False)


def make_model(mmdit, dtype_name: str, name: str = "sd3-medium", shift: float = 3.0):
    """A loaded model of `name`'s family (its sampler, guidance and latents) holding `mmdit`."""
    from calibjob.families import model_info
    from calibjob.models import Model, family_of

    info = model_info(name)
    return Model(info.key, mmdit, family_of(info).sampler(shift), None, dtype_name)


def random_conditioning(prompts: int, tokens: int, dim: int, pooled: int, seed: int = 1):
    """cs (P, 2, L, D), cs_pooled (P, 2, Dp) float32: index 1 (the empty negative) shared."""
    rng = np.random.default_rng(seed)
    cs = rng.standard_normal((prompts, 2, tokens, dim), dtype=np.float32) * 0.5
    cs[:, 1] = cs[0, 1]
    cp = rng.standard_normal((prompts, 2, pooled), dtype=np.float32)
    cp[:, 1] = cp[0, 1]
    return cs, cp


def job_config(**over):
    """The paper job (jobs/paper.toml) with overrides, resolved for this device like the CLI."""
    from calibjob.config import JobConfig, load_job_file
    from calibjob.jobs.run import resolve_config

    fields = load_job_file(ROOT / "jobs" / "paper.toml")
    fields.update(over)
    if "latent_size" in fields:
        fields["latent_size"] = tuple(fields["latent_size"])
    return resolve_config(JobConfig(**fields), None)


def prepare_store(path: Path, cfg, model, cs: np.ndarray, cs_pooled: np.ndarray) -> None:
    """Create the job's store and write its conditioning, as the worker's encode step would."""

    from calibjob.core.store import JobStore
    from calibjob.jobs.run import RUN

    store = JobStore.create_or_open(path, RUN, cfg)
    sigmas, ts = model.schedule(cfg.num_sampling_steps)
    arrays = {"cs": cs.astype(np.float32), "cs_pooled": cs_pooled.astype(np.float32),
              "sigmas": sigmas, "ts": ts}  # fmt: skip
    store.write_prepared(arrays, row_chunked={"cs", "cs_pooled"})


def run_job(cfg, store_path: Path, model, units: list | None = None):
    """The full `calibjob run` of cfg in this process (calibjob.core.runner, shard 0/1,
    store writes, markers and progress records), with `model` as the loaded model; whether the
    step is compiled is the job's `compile` field. `units`, if given, receives (start, end,
    trajectories) per unit, seconds from the job's start: where the job's time outside the
    model's steps goes."""
    from calibjob import models
    from calibjob.core.runner import run_shards
    from calibjob.core.shards import ALL
    from calibjob.engine import Engine
    from calibjob.jobs.run import RUN

    real_load, real_unit = models.load, Engine.run_unit

    def timed_unit(self, prompt, trajectories, *a, **k):
        start = time.perf_counter() - t0
        out = real_unit(self, prompt, trajectories, *a, **k)
        units.append((start, time.perf_counter() - t0, len(trajectories)))
        return out

    models.load = lambda *a, **k: model
    if units is not None:
        Engine.run_unit = timed_unit
    try:
        t0 = time.perf_counter()
        res = run_shards(RUN, cfg, str(store_path), [ALL], show_progress=False)
        return res, time.perf_counter() - t0
    finally:
        models.load, Engine.run_unit = real_load, real_unit


def unit_summary(units: list, wall: float, steps: int) -> dict:
    """The job's units against its wall time: the first unit (traces, kernel loads), the
    median ms per trajectory-step of the rest, and the seconds outside any unit."""
    per = [(e - s) / (b * steps) * 1e3 for s, e, b in units]
    inside = sum(e - s for s, e, _ in units)
    return {
        "units": len(units),
        "first_unit_s": units[0][1] - units[0][0] if units else 0.0,
        "unit_ms_per_traj_step_median": float(np.median(per[1:] or per or [0.0])),
        "unit_ms_per_traj_step_max": float(max(per[1:] or per or [0.0])),
        "seconds_in_units": inside,
        "seconds_outside_units": wall - inside,
    }


def spec_seconds(model, cs, cs_pooled, cfg, trajectories: list[int]) -> list[float]:
    """Wall seconds of the spec's loop (tests/spec_loop.py: spec_trajectory) per trajectory."""
    from spec_loop import spec_trajectory

    out = []
    p = len(cfg.prompts)
    for k in trajectories:
        t0 = time.perf_counter()
        spec_trajectory(
            model,
            cs[k % p],
            cs_pooled[k % p],
            trajectory=k,
            seed=cfg.seed,
            num_steps=cfg.num_sampling_steps,
            cfg_scale=cfg.cfg_scale,
            latent_size=tuple(cfg.latent_size),
        )
        out.append(time.perf_counter() - t0)
    return out


def mlx_ms(fn, reps: int = 20) -> float:
    """Mean ms per call of fn() (an unevaluated MLX array), reps calls queued then evaluated,
    after 3 warm-up calls."""
    mx.eval([fn() for _ in range(3)])
    mx.synchronize()
    t0 = time.perf_counter()
    mx.eval([fn() for _ in range(reps)])
    mx.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3


def engine_unit_seconds(
    model, cfg, cs, cs_pooled, trajectories, *, compile, steps=None, reps=1, around=None,
    **engine,
):
    """Wall seconds of Engine.run_unit for one unit (after one untimed warm-up run, which also
    traces the compiled step), and the warm-up's own seconds. `around`: a context manager
    entered around the timed runs alone. `engine`: further Engine arguments (`segment`)."""
    from calibjob.engine import Engine

    eng = Engine(
        model,
        num_steps=steps or cfg.num_sampling_steps,
        cfg_scale=cfg.cfg_scale,
        latent_size=tuple(cfg.latent_size),
        seed=cfg.seed,
        compile=compile,
        **engine,
    )
    p = trajectories[0] % len(cfg.prompts)
    t0 = time.perf_counter()
    eng.run_unit(p, trajectories, cs[p], cs_pooled[p])
    first = time.perf_counter() - t0
    times = []
    with around if around is not None else contextlib.nullcontext():
        for _ in range(reps):
            t0 = time.perf_counter()
            eng.run_unit(p, trajectories, cs[p], cs_pooled[p])
            times.append(time.perf_counter() - t0)
    eng.release_prompt()
    return times, first


def env_note() -> str:
    return (
        f"mlx {mx.__version__}, device {mx.default_device()}, "
        f"OpenBLAS preloaded: {device.OPENBLAS_LOADED}, pid {os.getpid()}"
    )
