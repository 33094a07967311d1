"""GPU benchmark: the paper job through calibjob's engine and store beside the spec's loop.

An MMDiT of DiffusionKit's SD3_2b config with random weights (float16), 589 text tokens
(cs (20, 2, 589, 4096)), 256x256 (latent 32x32x16), CFG 1.5, 100 steps, 256 trajectories:
the full job run in-process by `calibjob.worker.run_shard` (store writes, done markers,
progress records; model built and conditioning written beforehand, as a loaded model and an
encoded store). Beside it, in the same process on the same GPU, the spec's batch-1 loop
(`tests/spec_loop.py: spec_trajectory`) on a few trajectories, extrapolated to 256. No hub access.

    python bench/gpu.py                 # on a machine with MLX's CUDA backend
    python bench/gpu.py --small         # the same logic on a small model (CPU check)

Prints one table; `--json PATH` also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (puts the checkout on sys.path, OpenBLAS before MLX)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from calibjob.jobs import open_store  # noqa: E402

DENSE_MS = 2.5  # dense fp16 limit per trajectory-step on an H100 (1.48 GFLOP/token, ~1 PFLOP/s)


def jit_modules() -> int:
    """Kernels in MLX's CUDA JIT cache (MLX_PTX_CACHE_DIR, default /tmp/mlx/VERSION/ptx)."""
    d = Path(os.environ.get("MLX_PTX_CACHE_DIR") or Path(tempfile.gettempdir()) / "mlx")
    return sum(1 for _ in d.rglob("*.txt")) if d.is_dir() else 0


# the engine's step paths: (name, compiled, fused blocks)
UNITS = (("eager", False, False), ("compiled", True, False), ("fused", True, True))


def drift(model, cfg, cs, cs_pooled, trajectories: list[int]) -> dict:
    """Max |x - x_spec| over every recorded point of `trajectories` (100 steps) and over the
    final latents, for the engine eager, compiled and fused (the job's batch, so the products
    have the job's shapes), against the spec's eager batch-1 loop; and max |x_spec|."""
    from spec_loop import spec_trajectory

    from calibjob.engine import Engine

    batch = [trajectories[0] + len(cfg.prompts) * j for j in range(cfg.batch_size)]
    p = trajectories[0] % len(cfg.prompts)
    ref = {}
    for k in trajectories:
        xs, _, final = spec_trajectory(
            model, cs[p], cs_pooled[p], trajectory=k, seed=cfg.seed,
            num_steps=cfg.num_sampling_steps, cfg_scale=cfg.cfg_scale,
            latent_size=tuple(cfg.latent_size), return_final=True,
        )  # fmt: skip
        ref[k] = (np.asarray(xs), np.asarray(final))
    out = {"max_abs_x_spec": float(max(np.abs(r[0]).max() for r in ref.values()))}
    for key, flag, fused in UNITS:
        eng = Engine(model, num_steps=cfg.num_sampling_steps, cfg_scale=cfg.cfg_scale,
                     latent_size=tuple(cfg.latent_size), seed=cfg.seed,
                     compile=flag, fused=fused)  # fmt: skip
        xs, final = eng.run_unit(p, batch, cs[p], cs_pooled[p])
        eng.release_prompt()
        pts = max(float(np.abs(xs[batch.index(k)] - ref[k][0]).max()) for k in ref)
        fin = max(float(np.abs(final[batch.index(k)] - ref[k][1]).max()) for k in ref)
        out[key] = {"max_abs_diff_points": pts, "max_abs_diff_final": fin}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="small model and job (logic check)")
    ap.add_argument("--spec-trajectories", type=int, default=3, help="spec-loop trajectories timed")
    ap.add_argument("--compile", choices=["auto", "on", "off", "fused"], default="auto",
                    help="the job's compile field (auto: fused on CUDA, on on Metal)")
    ap.add_argument("--sweep", default="1,13,26", help="batch sizes for the 10-step sweep")
    ap.add_argument("--no-compare", action="store_true",
                    help="skip the eager / compiled / fused units")
    ap.add_argument("--only-job", action="store_true", help="the job alone (no spec, no sweep)")
    ap.add_argument("--no-job", action="store_true", help="everything but the job")
    ap.add_argument("--warm", action="store_true",
                    help="first a 2-step unit at each of the job's batch sizes, so that MLX's "
                    "kernel cache is warm when the job starts (the 'warm' figures)")
    ap.add_argument("--torch", action="store_true",
                    help="time diffusers eager and torch.compile on the same shapes "
                    "(bench/sd3_torch.py in a subprocess; needs torch and diffusers)")
    ap.add_argument("--drift", action="store_true",
                    help="each path's distance from the eager spec loop after 100 steps")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()
    con = Console(width=110)
    compile_flag = {"auto": None, "on": True, "off": False, "fused": True}[args.compile]
    fused_kw = {"fused": True} if args.compile == "fused" else {}
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "env": common.env_note()}

    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))

    if args.small:
        dtype, dname = mx.float32, "float32"
        config = common.mmdit_config(
            depth=2, hidden=128, heads=2, text_dim=256, pooled_dim=128, dtype=dtype
        )
        tokens, text_dim, pooled = 77, 256, 128
        job = dict(num_fid_samples=8, num_sampling_steps=10, num_selected_steps=5, dtype=dname)
    else:
        dtype, dname = mx.float16, "float16"
        config = common.sd3_2b_config(dtype)
        tokens, text_dim, pooled = 589, 4096, 2048
        job = dict(dtype=dname)
    t0 = time.perf_counter()
    mmdit = common.random_mmdit(config, dtype)
    model = common.make_model(mmdit, dname)
    cfg = common.job_config(**job)
    cs, cs_pooled = common.random_conditioning(len(cfg.prompts), tokens, text_dim, pooled)
    S = cfg.num_sampling_steps
    con.print(f"model built in {time.perf_counter() - t0:.1f} s; {common.env_note()}")
    con.print(f"job: {cfg.num_fid_samples} x {S} steps, batch {cfg.batch_size}")
    n_img = (cfg.latent_size[0] // 2) * (cfg.latent_size[1] // 2)
    results["tokens_per_sample"] = n_img + tokens
    results["batch_size"] = cfg.batch_size
    per_prompt = [k for k in range(cfg.num_fid_samples) if k % len(cfg.prompts) == 0]
    unit = per_prompt[: cfg.batch_size]

    if args.warm:  # every unit size the job will run: per prompt, chunks of the batch size
        n_p = len(cfg.prompts)
        counts = [len(range(p, cfg.num_fid_samples, n_p)) for p in range(n_p)]
        sizes = {n for c in counts for n in (min(c, cfg.batch_size), c % cfg.batch_size) if n}
        for b in sorted(sizes):
            trajs = [len(cfg.prompts) * j for j in range(b)]
            common.engine_unit_seconds(model, cfg, cs, cs_pooled, trajs, compile=compile_flag,
                                       steps=2, **fused_kw)  # fmt: skip
        con.print(f"warmed: units of {sorted(sizes)}")
    steps_total = cfg.num_fid_samples * S
    job_ms = wall = None
    if not args.no_job:
        jit_before = jit_modules()
        results["jit_modules_cached_at_start"] = jit_before
        # 1. the job, first in a fresh process (so MLX's kernel JIT is paid inside it, as for a
        #    user), in-process through the worker and the store
        with tempfile.TemporaryDirectory(prefix="calibjob-gpu-") as tmp:
            store = Path(tmp) / "paper.zarr"
            if args.compile != "auto":
                cfg = cfg.replace(compile=args.compile)
            job_cfg = cfg
            common.prepare_store(store, job_cfg, model, cs, cs_pooled)
            job_units: list = []
            res, wall = common.run_job(job_cfg, store, model, units=job_units)
            done = int(open_store(store, mode="r").done_mask().sum())
            finite = bool(np.isfinite(open_store(store, mode="r").read_row("xs", 0)).all())
        job_ms = wall / steps_total * 1e3
        results.update(
            job_seconds=wall, job_minutes=wall / 60, job_ms_per_traj_step=job_ms,
            trajectories_done=done, finite=finite,
        )
        results["jit_modules_compiled_by_job"] = jit_modules() - jit_before
        results["job_units"] = common.unit_summary(job_units, wall, S)
        con.print(f"job units: {results['job_units']}")
        con.print(
            f"job: {wall:.1f} s, {done} trajectories done, finite: {finite}; MLX kernel JIT cache: "
            f"{jit_before} modules at start, {results['jit_modules_compiled_by_job']} new"
        )
        save()
    if args.only_job:
        return

    # 2. the spec's loop: batch 1, per-trajectory modulation cache and adaLN reload
    spec = common.spec_seconds(model, cs, cs_pooled, cfg, list(range(args.spec_trajectories)))
    spec_traj = sum(spec[1:]) / max(1, len(spec) - 1) if len(spec) > 1 else spec[0]
    results["spec_seconds"] = spec
    results["spec_ms_per_traj_step"] = spec_traj / S * 1e3
    con.print(f"spec loop: {[round(s, 2) for s in spec]} s per trajectory (first is warm-up)")
    save()

    # 3. eager, compiled and fused on one unit of the job's size (warm-up run excluded)
    if not args.no_compare:
        for key, flag, fused in UNITS:
            times, first = common.engine_unit_seconds(
                model, cfg, cs, cs_pooled, unit, compile=flag, fused=fused
            )
            results[f"unit_{key}_ms_per_traj_step"] = times[0] / (len(unit) * S) * 1e3
            results[f"unit_{key}_first_s"] = first
            con.print(f"unit {key}: {times[0]:.2f} s ({first:.2f} s first run)")
            save()

    # 4. a short sweep of CFG batch sizes (one prompt, 10 steps, compile as the job)
    sweep = {}
    for b in [int(s) for s in args.sweep.split(",") if s]:
        trajs = [len(cfg.prompts) * j for j in range(b)]
        times, _ = common.engine_unit_seconds(
            model, cfg, cs, cs_pooled, trajs, compile=compile_flag, steps=10, **fused_kw
        )
        sweep[b] = times[0] / (b * 10) * 1e3
        con.print(f"sweep batch {b}: {sweep[b]:.2f} ms per trajectory-step")
    results["sweep_ms_per_traj_step"] = sweep
    save()

    # 5. how far each path's points are from the eager spec loop's (same trajectories)
    if args.drift:
        results["drift"] = drift(model, cfg, cs, cs_pooled, unit[:2])
        for k, v in results["drift"].items():
            con.print(f"drift {k}: {v}")
        save()

    # 6. diffusers on the same shapes, eager and torch.compile (another process: torch)
    if args.torch:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "torch.json"
            subprocess.run([sys.executable, str(Path(__file__).parent / "sd3_torch.py"),
                            "--no-ops", "--batches", f"{cfg.batch_size},{2 * cfg.batch_size}",
                            "--json", str(out)], check=True)  # fmt: skip
            results["diffusers_ms_per_traj_step"] = json.loads(out.read_text())[
                "model_ms_per_traj_step"
            ]
        save()

    spec_ms = results["spec_ms_per_traj_step"]
    t = Table(title=f"calibjob on {mx.default_device()} ({results['date']})")
    t.add_column("figure")
    t.add_column("value", justify="right")
    t.add_column("target / note")
    t.add_row("spec loop (batch 1), ms / traj-step", f"{spec_ms:.2f}",
              f"mean of {max(1, len(spec) - 1)} trajectories after 1 warm-up")
    t.add_row("spec loop, paper job (extrapolated), min", f"{spec_ms * steps_total / 6e4:.2f}",
              f"x {cfg.num_fid_samples} trajectories")
    for key, _, _ in UNITS:
        if f"unit_{key}_ms_per_traj_step" in results:
            t.add_row(f"engine unit of {len(unit)}, {key}, ms / traj-step",
                      f"{results[f'unit_{key}_ms_per_traj_step']:.2f}",
                      f"first run {results[f'unit_{key}_first_s']:.1f} s")
    if job_ms is not None:
        t.add_row("calibjob job, ms / traj-step", f"{job_ms:.2f}",
                  f"batch {cfg.batch_size}, compile {job_cfg.compile}")
        t.add_row("calibjob job (run_shard, store), min", f"{wall / 60:.2f}",
                  "<= 3.0 (stretch 2.0)")
        t.add_row("ratio to the spec loop", f"{spec_ms / job_ms:.2f}x", ">= 3x")
        if not args.small:
            t.add_row("fraction of the dense fp16 limit", f"{DENSE_MS / job_ms:.0%}",
                      f"{DENSE_MS} ms / traj-step")
    for b, ms in sweep.items():
        t.add_row(f"engine batch {b} (10 steps), ms / traj-step", f"{ms:.2f}", "")
    ours = results.get("unit_fused_ms_per_traj_step")
    for k, ms in results.get("diffusers_ms_per_traj_step", {}).items():
        t.add_row(f"diffusers SD3Transformer2DModel {k}, ms / traj-step", f"{ms:.2f}",
                  f"fused unit / this: {ours / ms:.2f}" if ours else "")
    con.print(t)
    if job_ms is not None:
        con.print(f"{results['env']}; job trajectories done {done}; finite {finite}")
    save()


if __name__ == "__main__":
    main()
