"""GPU benchmark of phase 2: `calibjob profile` over a paper-shaped calibration set.

A random-weight MMDiT of DiffusionKit's SD3_2b config (float16; as bench/gpu.py) and a
synthetic set of the paper's shape: 256 trajectories x 25 selected steps = 6,400 points,
latent 32x32x16, 20 prompts of 589 x 4096 tokens (cs (20, 2, 589, 4096)), written as an
uncompressed .npz like merge's. Reported, on the same batches (one (timestep, prompt) per call,
CFG doubled): seconds of the bare forwards (no taps, MMDiT output evaluated), seconds of the
full profile job (`calibjob.profile.worker.profile_shard`: taps, device-side statistics, store
writes), the overhead ratio, and peak device memory of each against the weights. Targets
(issue 11): the job <= 2 min on one H100, overhead <= 1x the bare forwards.

    python bench/profile_gpu.py                       # on a machine with MLX's CUDA backend
    python bench/profile_gpu.py --model tiny --points 64   # the same logic on CPU, tiny model

Prints one table; `--json PATH` also writes the figures.
"""

from __future__ import annotations

import argparse
import json
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

TARGET_S = 120.0
PROMPTS = 20
STEPS, SELECTED = 100, 25


def build(model_name: str):
    """(model, tokens, text width, pooled width, dtype name, model_version for the job)."""
    if model_name == "tiny":
        from calibjob.models import load

        return load("tiny", text_encoders=False), 109, 64, 64, "float32", "tiny"
    if model_name == "small":
        config = common.mmdit_config(depth=2, hidden=128, heads=2, text_dim=256, pooled_dim=128,
                                     dtype=mx.float32)
        mmdit = common.random_mmdit(config, mx.float32)
        return common.make_model(mmdit, "float32"), 77, 256, 128, "float32", "sd3-medium"
    dtype = mx.float16
    mmdit = common.random_mmdit(common.sd3_2b_config(dtype), dtype)
    return common.make_model(mmdit, "float16"), 589, 4096, 2048, "float16", "sd3-medium"


def synthetic_set(path: Path, model, points: int, tokens: int, dim: int, pooled: int,
                  dtype: str, model_version: str, seed: int = 0) -> None:
    """A calibration file of the paper's layout: `points` points over 25 selected steps of a
    100-step schedule, trajectories round-robin over 20 prompts, x_t ~ N(0, sigma^2)."""
    rng = np.random.default_rng(seed)
    sigmas, ts_all = model.schedule(STEPS)
    sel = np.linspace(0, STEPS - 1, SELECTED, dtype=int)
    traj = points // SELECTED + (points % SELECTED > 0)
    pairs = [(k, s) for k in range(traj) for s in sel][:points]
    order = rng.permutation(len(pairs))
    k_idx = np.array([pairs[i][0] for i in order])
    s_idx = np.array([pairs[i][1] for i in order])
    xs = rng.standard_normal((points, 32, 32, 16), dtype=np.float32)
    xs *= np.asarray(sigmas, np.float32)[s_idx][:, None, None, None]
    cs, cp = common.random_conditioning(PROMPTS, tokens, dim, pooled)
    store_dt = np.float16 if dtype == "float16" else np.float32
    np.savez(
        path, xs=xs, ts=ts_all[s_idx], prompt_indices=k_idx % PROMPTS, cs=cs.astype(store_dt),
        cs_pooled=cp.astype(store_dt), prompts=np.array([f"prompt {i}" for i in range(PROMPTS)]),
        cfg_scale=np.array(1.5), trajectory_indices=k_idx, step_indices=s_idx, sigmas=sigmas,
        model_version=np.array(model_version), shift=np.array(3.0), dtype=np.array(dtype),
    )


def kernel_check() -> dict:
    """The CUDA statistics kernel against the MLX-ops path and float64 numpy, on values at and
    next to every bin edge, +-8, inf, NaN, and on fp16 activations of the SD3-2b tap shapes:
    histograms, counts, min and max must be equal; sums are reported as relative errors."""
    from calibjob.profile import kernel, taps

    if not kernel.available():
        return {"kernel": "not available (no CUDA device): MLX-ops path"}
    out: dict = {"kernel": "cuda"}
    rng = np.random.default_rng(0)
    edges = np.linspace(-8, 8, 513).astype(np.float32)
    special = np.array([-1e-30, 1e-30, 0.0, -0.0, 9.0, -9.0, 1e4, -1e4, np.inf, -np.inf, np.nan])
    vals = np.concatenate([edges, np.nextafter(edges, np.float32(-np.inf)),
                           np.nextafter(edges, np.float32(np.inf)), special,
                           rng.standard_normal(4000).astype(np.float32) * 4])
    cases = [("edges f32", vals[: len(vals) // 64 * 64].reshape(-1, 64).astype(np.float32)),
             ("edges f16", vals[: len(vals) // 64 * 64].reshape(-1, 64).astype(np.float16))]
    for rows, c in [(26 * 256, 1536), (26 * 589, 6144), (2 * 589, 1536), (333, 100)]:
        a = rng.standard_normal((rows, c)).astype(np.float32)
        a *= rng.uniform(0.1, 6, c).astype(np.float32)  # channels of different ranges
        cases.append((f"{rows}x{c} f16", a.astype(np.float16)))
    ok = True
    for name, a in cases:
        x = mx.array(a)
        got = [np.array(v) for v in kernel.tap_stats(x, 512, 8.0)]
        taps.USE_KERNEL = False
        ref = [np.array(v) for v in taps.batch_stats(x, mx.float32, 512, 8.0)]
        taps.USE_KERNEL = True
        a64 = a.astype(np.float64)
        fin = ~np.isnan(a64).any(axis=0) & np.isfinite(a64).all(axis=0)
        exact = (np.array_equal(got[4], ref[4]) and int(got[5]) == int(ref[5])
                 and np.array_equal(got[2][fin], ref[2][fin])
                 and np.array_equal(got[3][fin], ref[3][fin]))
        truth, scale = a64[:, fin].sum(axis=0), np.abs(a64[:, fin]).sum(axis=0)

        def rel_err(s, truth=truth, scale=scale, fin=fin):
            return float(np.max(np.abs(s[fin] - truth) / scale)) if fin.any() else 0.0

        rel, rel_ref = rel_err(got[0]), rel_err(ref[0])
        out[name] = {"exact": exact, "sum_rel_err": rel, "ops_sum_rel_err": rel_ref}
        ok &= exact
        print(f"kernel check {name}: hist/min/max/rows equal {exact}; sum rel. err "
              f"{rel:.2e} (MLX ops {rel_ref:.2e})", flush=True)
    # under mx.compile too
    f = mx.compile(lambda x: kernel.tap_stats(x, 512, 8.0))
    x = mx.array(cases[2][1])
    same = all(np.array_equal(np.array(u), np.array(v))
               for u, v in zip(f(x), kernel.tap_stats(x, 512, 8.0), strict=True))
    out["compiled_equal"] = same
    out["all_exact"] = bool(ok and same)
    print(f"kernel check: compiled equal {same}; all exact {out['all_exact']}", flush=True)
    return out


def weights_bytes(mmdit) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(mmdit.parameters()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["sd3-2b", "small", "tiny"], default="sd3-2b",
                    help="sd3-2b: SD3_2b shapes, random fp16 weights (default); small/tiny: a "
                    "CPU check of the logic")
    ap.add_argument("--points", type=int, default=SELECTED * 256, help="points in the set")
    ap.add_argument("--batch-size", type=int, default=0, help="0: auto (a GPU: whole groups)")
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto")
    ap.add_argument("--reduce-dtype", choices=["auto", "float32", "float64"], default="auto")
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--check-only", action="store_true", help="the kernel check alone")
    args = ap.parse_args()
    con = Console(width=110)
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "env": common.env_note(),
                 "model": args.model, "points": args.points}

    res["kernel_check"] = kernel_check()
    if args.check_only:
        if args.json:
            args.json.write_text(json.dumps(res, indent=1))
        return
    from calibjob import api
    from calibjob.core.shards import ALL
    from calibjob.data import read_set
    from calibjob.jobs import open_store
    from calibjob.jobs.profile import build_spec, plan, resolve
    from calibjob.profile.forward import Profiler

    t0 = time.perf_counter()
    model, tokens, dim, pooled, dname, version = build(args.model)
    res["weights_gb"] = weights_bytes(model.mmdit) / 1e9
    con.print(f"model {args.model} built in {time.perf_counter() - t0:.1f} s "
              f"({res['weights_gb']:.2f} GB of weights); {common.env_note()}")
    with tempfile.TemporaryDirectory(prefix="calibjob-profile-") as tmp:
        npz, store = Path(tmp) / "set.npz", Path(tmp) / "profile.zarr"
        t0 = time.perf_counter()
        synthetic_set(npz, model, args.points, tokens, dim, pooled, dname, version)
        cal = read_set(npz)
        job = resolve(build_spec(cal, dtype=dname, batch_size=args.batch_size,
                                 compile=args.compile), cal, None)  # fmt: skip
        if args.reduce_dtype != "auto":
            job = job.replace(reduce_dtype=args.reduce_dtype)
        timesteps, units = plan(cal, job)
        con.print(f"set of {cal.ts.size} points written in {time.perf_counter() - t0:.1f} s; "
                  f"{len(units)} units, batch {job.batch_size}, compile {job.compile}, "
                  f"reduce {job.reduce_dtype}")
        res.update(batch_size=job.batch_size, compile=job.compile, units=len(units),
                   reduce_dtype=job.reduce_dtype)
        prof = Profiler(model, reduce_dtype=job.reduce_dtype, bins=job.hist_bins,
                        limit=job.hist_range, compile=job.compile == "on")

        def tstep(u):
            return np.array([timesteps[u.timestep]], dtype=cal.ts.dtype)

        # warm-up: one unit each way (kernel JIT, compile traces), untimed
        u0 = units[0]
        t0 = time.perf_counter()
        prof.run_unit_bare(u0, tstep(u0), cal.xs, cal.cs, cal.cs_pooled)
        prof.run_unit(u0, tstep(u0), cal.xs, cal.cs, cal.cs_pooled)
        res["warmup_s"] = time.perf_counter() - t0

        # bare forwards over every unit
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        for u in units:
            prof.run_unit_bare(u, tstep(u), cal.xs, cal.cs, cal.cs_pooled)
        res["bare_s"] = time.perf_counter() - t0
        res["bare_peak_gb"] = mx.get_peak_memory() / 1e9
        con.print(f"bare forwards: {res['bare_s']:.1f} s, peak {res['bare_peak_gb']:.2f} GB")

        # the profile job itself (taps, statistics, store writes), same model in-process
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        api.profile(npz, str(store), ALL, progress=False, model=model, dtype=dname,
                    batch_size=job.batch_size, compile=job.compile)  # fmt: skip
        res["profile_s"] = time.perf_counter() - t0
        res["profile_peak_gb"] = mx.get_peak_memory() / 1e9
        st = open_store(store, mode="r")
        assert st.done_mask().all()
        res["stats_mb_per_unit"] = sum(int(t[2]) for t in st.meta["taps"]) * 24 / 1e6
        con.print(f"profile job: {res['profile_s']:.1f} s, peak {res['profile_peak_gb']:.2f} GB")
    res["overhead"] = res["profile_s"] / res["bare_s"] - 1
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))

    t = Table(title=f"calibjob profile on {mx.default_device()} ({res['date']})")
    t.add_column("figure")
    t.add_column("value", justify="right")
    t.add_column("target / note")
    t.add_row("points profiled", str(args.points), f"{len(units)} units, batch {job.batch_size}")
    t.add_row("bare forwards, s", f"{res['bare_s']:.1f}", "same batches, no taps")
    t.add_row("profile job, s", f"{res['profile_s']:.1f}",
              f"<= {TARGET_S:.0f} for 6,400 points on one H100")
    t.add_row("profiling overhead", f"{res['overhead']:.2f}x", "<= 1x the bare forwards")
    t.add_row("warm-up (one unit each way), s", f"{res['warmup_s']:.1f}", "JIT / compile")
    t.add_row("weights, GB", f"{res['weights_gb']:.2f}", "")
    t.add_row("peak memory, bare, GB", f"{res['bare_peak_gb']:.2f}", "mx.get_peak_memory")
    t.add_row("peak memory, profile, GB", f"{res['profile_peak_gb']:.2f}",
              "<= weights + activations + statistics")
    t.add_row("statistics per unit, MB", f"{res['stats_mb_per_unit']:.3f}",
              "sum, sumsq (f64), min, max (f32)")
    con.print(t)
    con.print(res["env"])


if __name__ == "__main__":
    main()
