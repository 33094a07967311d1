"""GPU benchmark of FLUX.1: calibjob's engine and job beside the bare MMDiT forward.

A FLUX.1 MMDiT of DiffusionKit's own config (19 joint + 38 unified blocks, hidden 3072) with
random bfloat16 weights, random conditioning of FLUX.1's shapes (T5: 256 tokens schnell, 512
dev; pooled 768), no CFG. No hub access. In one run, same process, same GPU:

1. the bare forward: DiffusionKit's `MMDiT.__call__` with its own modulation cache, timed per
   sample-step after a warm-up, at 256x256 batch 32 and 1024x1024 batch 4;
2. calibjob's engine (`Engine.run_unit`, the device's default step: fused on CUDA; and the
   generic compiled step beside it) at the same batches, and its peak memory (after a reset)
   at 1024x1024 for each batch in --mem-batches;
3. `jobs/flux-schnell.toml` whole (256 x 4 steps at 1024x1024, auto batch) through the runner
   and a store, timed from the model's build to the last store write;
   or with --dev: `jobs/flux-dev.toml` (50 steps, guidance 3.5) on --dev-prompts prompts,
   13 trajectories each (the real job's units), extrapolated to 256 trajectories.

    python bench/flux_gpu.py [--dev] [--json PATH]    # on a machine with MLX's CUDA backend
    python bench/flux_gpu.py --small                  # the same logic, toy sizes (CPU check)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (puts the checkout on sys.path, OpenBLAS before MLX)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

# what the issue measured on one H200 (random bf16 weights, FLUX.1 shapes, 256 T5 tokens)
ISSUE_MS = {"bare": {(32, 32): 17.3, (128, 128): 164.0},
            "diffusers eager": {(32, 32): 16.9, (128, 128): 162.0}}  # fmt: skip


def flux_config(dev: bool, small: bool):
    from diffusionkit.mlx.config import FLUX_DEV, FLUX_SCHNELL, PositionalEncoding

    base = FLUX_DEV if dev else FLUX_SCHNELL
    if small:
        return dataclasses.replace(
            base, num_heads=2, depth_multimodal=2, depth_unified=2, hidden_size_override=64,
            rope_axes_dim=(8, 12, 12), pooled_text_embed_dim=32, token_level_text_embed_dim=64,
            dtype=mx.float32, pos_embed_type=PositionalEncoding.PreSDPARope,
            low_memory_mode=False,
        )  # fmt: skip
    return dataclasses.replace(base, low_memory_mode=False)


def conditioning(prompts: int, tokens: int, dim: int, pooled: int):
    rng = np.random.default_rng(1)
    cs = rng.standard_normal((prompts, 1, tokens, dim), dtype=np.float32) * 0.5
    cp = rng.standard_normal((prompts, 1, pooled), dtype=np.float32)
    return cs, cp


def bare_ms(mmdit, cs, cp, latent, batch, dtype, reps=3) -> float:
    """DiffusionKit's own forward: its modulation cache for one timestep, then MMDiT.__call__,
    ms per sample (= sample-step) after one warm-up; the adaLN weights put back afterwards."""
    # only the adaLN weights (the cache empties them): restoring every parameter would also
    # restore the RoPE module's cached tables, stale under another resolution
    kept = [(k, v) for k, v in tree_flatten(mmdit.parameters()) if "adaLN" in k]
    t = mx.array([500.0]).astype(dtype)
    pooled = mx.repeat(mx.array(cp[0]).astype(dtype), batch, axis=0)
    mmdit.cache_modulation_params(pooled, t)
    x = mx.array(np.random.default_rng(2).standard_normal((batch, *latent, 16))).astype(dtype)
    c = mx.expand_dims(mx.repeat(mx.array(cs[0]).astype(dtype), batch, axis=0), 2)
    try:
        times = []
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            mx.eval(mmdit(latent_image_embeddings=x, token_level_text_embeddings=c,
                          timestep=mx.broadcast_to(t, [batch])))  # fmt: skip
            times.append(time.perf_counter() - t0)
    finally:
        mmdit.clear_modulation_params_cache()
        mmdit.load_weights(kept, strict=False)
        if hasattr(mmdit, "to_offload"):
            del mmdit.to_offload
    return min(times[1:]) / batch * 1e3


def engine_ms(model, cs, cp, latent, batch, steps, guidance, compile, fused=None):
    """calibjob's engine: ms per sample-step of one unit after a warm-up unit, and the unit's
    peak memory in GB (reset before it). `fused` None: the device's default step."""
    from calibjob.device import resolve_compile
    from calibjob.engine import Engine

    if fused is None:
        fused = compile and resolve_compile("auto") == "fused"
    eng = Engine(model, num_steps=steps, cfg_scale=0.0, guidance_scale=guidance,
                 latent_size=latent, seed=0, compile=compile, fused=fused)  # fmt: skip
    trajs = list(range(batch))
    eng.run_unit(0, trajs, cs[0], cp[0])
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    eng.run_unit(0, trajs, cs[0], cp[0])
    wall = time.perf_counter() - t0
    peak = mx.get_peak_memory() / 1e9
    eng.release_prompt()
    return wall / (batch * steps) * 1e3, peak


def job(args, dev: bool, cs, cp, model, build_s: float) -> dict:
    """The job spec through the runner and a store (model build time added)."""
    name = "flux-dev" if dev else "flux-schnell"
    over: dict = {}
    if args.small:
        over = dict(num_fid_samples=8, latent_size=[16, 16], dtype="float32", batch_size=4)
    elif dev:
        over = dict(num_prompts=args.dev_prompts, num_fid_samples=13 * args.dev_prompts)
    from calibjob.config import JobConfig, load_job_file
    from calibjob.jobs.run import resolve_config

    fields = {**load_job_file(name), **over}
    fields["latent_size"] = tuple(fields["latent_size"])
    cfg = resolve_config(JobConfig(**fields), None)
    if args.small:
        cfg = cfg.replace(model_version="tiny-flux-dev" if dev else "tiny-flux")
    p = len(cfg.prompts)
    with tempfile.TemporaryDirectory(prefix="calibjob-flux-") as tmp:
        store = Path(tmp) / "flux.zarr"
        t0 = time.perf_counter()
        common.prepare_store(store, cfg, model, cs[:p], cp[:p])
        res, wall = common.run_job(cfg, store, model)
        total = time.perf_counter() - t0 + build_s
        from calibjob.jobs import open_store

        st = open_store(store, mode="r")
        done = int(st.done_mask().sum())
        finite = bool(np.isfinite(st.read_row("xs", 0)).all())
    steps = cfg.num_fid_samples * cfg.num_sampling_steps
    out = dict(spec=name, trajectories=cfg.num_fid_samples, steps=cfg.num_sampling_steps,
               batch=cfg.batch_size, loop_s=wall, total_s=total, done=done, finite=finite,
               ms_per_sample_step=wall / steps * 1e3)  # fmt: skip
    if dev and not args.small:
        full = 256 * cfg.num_sampling_steps
        out["extrapolated_256_min"] = (wall / steps * full + build_s) / 60
    return out


def encode_gb(tokens: int, small: bool) -> dict:
    """FLUX.1's encode phase alone: CLIP-L and T5-XXL (DiffusionKit's classes, T5 made safe, as
    calibjob loads them) with random bfloat16 weights, then 20 prompts encoded at `tokens` T5
    tokens: peak memory after building (weights) and while encoding."""
    from diffusionkit.mlx.clip import CLIPTextModel
    from diffusionkit.mlx.config import CLIPTextModelConfig
    from diffusionkit.mlx.t5 import SD3T5Encoder
    from transformers import T5Config

    from calibjob.models.flux import FluxText
    from calibjob.models.text import make_t5_safe
    from calibjob.models.tiny import ByteTokenizer, _seeded

    dt = mx.float32 if small else mx.bfloat16
    t5cfg = T5Config(  # google/t5-v1_1-xxl's encoder
        vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6,
    ) if not small else T5Config(vocab_size=512, d_model=64, d_kv=32, d_ff=128, num_layers=2,
                                 num_heads=2, feed_forward_proj="gated-gelu")  # fmt: skip
    clip_cfg = CLIPTextModelConfig(num_layers=12, model_dims=768, num_heads=12, vocab_size=49408,
                                   hidden_act="quick_gelu") if not small else CLIPTextModelConfig(
        num_layers=2, model_dims=32, num_heads=2, vocab_size=512)  # fmt: skip
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory() / 1e9
    t5 = _seeded(lambda: SD3T5Encoder(t5cfg, low_memory_mode=False), 3, dt)
    clip = _seeded(lambda: CLIPTextModel(clip_cfg), 4, dt)
    text = FluxText(clip, ByteTokenizer(77, clip_style=True, pad_with_eos=True), make_t5_safe(t5),
                    ByteTokenizer(tokens, clip_style=False), tokens)  # fmt: skip
    weights = mx.get_active_memory() / 1e9 - base
    mx.reset_peak_memory()
    prompts = [f"prompt {i}: a lighthouse in a storm at dusk, oil on canvas" for i in range(20)]
    t0 = time.perf_counter()
    text.encode(prompts)
    out = {"tokens": tokens, "weights_gb": weights, "encode_peak_gb": mx.get_peak_memory() / 1e9,
           "encode_s": time.perf_counter() - t0}  # fmt: skip
    del text, t5, clip
    mx.clear_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="toy sizes (logic check on CPU)")
    ap.add_argument("--dev", action="store_true", help="the dev job (guidance embedding)")
    ap.add_argument("--dev-prompts", type=int, default=3, help="dev job: prompts of 13 each")
    ap.add_argument("--mem-batches", default="1,2,4,8", help="engine peak memory at 1024x1024")
    ap.add_argument("--no-bare", action="store_true", help="skip the forward comparison")
    ap.add_argument("--encode", action="store_true", help="also the encode phase (T5-XXL, CLIP-L)")
    ap.add_argument("--only-mem", action="store_true", help="only the memory figures")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    con = Console(width=110)
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "env": common.env_note()}

    def save():
        if args.json:
            args.json.write_text(json.dumps(res, indent=1, default=str))

    if args.encode:
        for n in (256, 512):
            res[f"encode_{n}"] = encode_gb(n if not args.small else 32, args.small)
            con.print(f"encode at {n} T5 tokens: {res[f'encode_{n}']}")
            save()
    dtype, dname = (mx.float32, "float32") if args.small else (mx.bfloat16, "bfloat16")
    config = flux_config(args.dev, args.small)
    tokens = 64 if args.small else (512 if args.dev else 256)
    dim, pooled = config.token_level_text_embed_dim, config.pooled_text_embed_dim
    t0 = time.perf_counter()
    from calibjob.models.flux import with_key_bias

    mmdit = common.random_mmdit(config, dtype, build=with_key_bias)  # as the loader builds it
    from calibjob.models.pieces import prepare

    prepare(mmdit)
    model = common.make_model(mmdit, dname, "flux-dev" if args.dev else "flux-schnell", 1.0)
    build_s = time.perf_counter() - t0
    res["build_s"] = build_s
    res["weights_gb"] = mx.get_active_memory() / 1e9
    cs, cp = conditioning(20, tokens, dim, pooled)
    con.print(f"model built in {build_s:.1f} s, {res['weights_gb']:.1f} GB; {res['env']}")
    guidance = 3.5 if args.dev else None
    compile = not args.small
    sizes = [((16, 16), 4), ((16, 16), 2)] if args.small else [((32, 32), 32), ((128, 128), 4)]

    if not args.no_bare and not args.dev and not args.only_mem:
        for latent, b in sizes:
            key = f"{latent[0] * 8}px_b{b}"
            res[f"bare_{key}"] = bare_ms(mmdit, cs, cp, latent, b, dtype)
            res[f"engine_{key}"], res[f"engine_{key}_peak_gb"] = engine_ms(
                model, cs, cp, latent, b, 4, guidance, compile)
            res[f"engine_generic_{key}"], _ = engine_ms(
                model, cs, cp, latent, b, 4, guidance, compile, fused=False)
            con.print(f"{key}: bare {res[f'bare_{key}']:.1f} ms, engine "
                      f"{res[f'engine_{key}']:.1f} ms per sample-step (the generic compiled "
                      f"step: {res[f'engine_generic_{key}']:.1f})")
            save()
    if not args.dev:
        big = (16, 16) if args.small else (128, 128)
        res["mem"] = {}
        for b in [int(s) for s in args.mem_batches.split(",") if s]:
            ms, peak = engine_ms(model, cs, cp, big, b, 2, guidance, compile)
            res["mem"][b] = {"ms": ms, "peak_gb": peak}
            con.print(f"engine 1024px batch {b}: {ms:.1f} ms per sample-step, peak {peak:.2f} GB")
            save()

    if args.only_mem:
        return
    res["job"] = job(args, args.dev, cs, cp, model, build_s)
    con.print(res["job"])
    save()

    t = Table(title=f"FLUX.1 on {mx.default_device()} ({res['date']})")
    for c in ("figure", "value", "beside it"):
        t.add_column(c)
    for latent, b in sizes:
        key = f"{latent[0] * 8}px_b{b}"
        if f"bare_{key}" in res:
            ref = ISSUE_MS["bare"].get(latent)
            t.add_row(f"bare forward {key}, ms/sample-step", f"{res[f'bare_{key}']:.1f}",
                      f"issue: {ref}" if ref else "")
            e, bare = res[f"engine_{key}"], res[f"bare_{key}"]
            d = ISSUE_MS["diffusers eager"].get(latent)
            t.add_row(f"calibjob engine {key}, ms/sample-step", f"{e:.1f}",
                      f"{e / bare - 1:+.1%} vs bare (target <= +5%)"
                      + (f"; diffusers eager {d} (issue)" if d else ""))
    j = res["job"]
    t.add_row(f"{j['spec']} job ({j['trajectories']} x {j['steps']}, batch {j['batch']}), min",
              f"{j['total_s'] / 60:.2f}", "build + store + loop; target <= 4 (schnell)")
    if "extrapolated_256_min" in j:
        t.add_row("flux-dev job, 256 trajectories (extrapolated), min",
                  f"{j['extrapolated_256_min']:.1f}", f"from {j['loop_s'] / 60:.1f} min measured")
    con.print(t)
    save()


if __name__ == "__main__":
    main()
