"""Where the engine's step spends its time on a GPU: the step's matrix products and attention
alone (MLX, beside torch's figures from `bench/sd3_torch.py --json`), and the engine's unit with
one stage left out or changed, timed in one process (SD3-2b shapes, random float16 weights,
589 text tokens, 256x256, CFG, compiled, 10 steps).

    python bench/step_profile.py [--batch 13] [--torch-json T.json] [--json PATH]

Variants of the unit: `generic` (the job's step), `no-attention` (the attention's output
replaced by v: what attention costs), `no-layernorm` (layer norms as identity: what they cost),
`one-graph` (the whole step as one compiled graph rather than one per block: what the segment
boundaries cost), `eager`, `fused` (the job's fused step:
models/fused_block.py with models/cuda_ops.py's kernels; `fused-segN`: in segments of N
blocks, 0 = one graph per step; `fused-mlx-gelu`: with MLX's own GELU rather than the table,
what the table buys; `fused-lut-global`: the table read through the cache (bench/gelu_lut.py)
rather than from shared memory; `fused-normCH.R`: the norm kernels with CH chunks of 8
channels a thread and R rows a block, `bench/norm_kernels.py`; `fused-mlx-residual`: the
post-MLP residual as MLX's op rather than `cuda_ops.gated_residual`; `fused-batch-major`:
q/k/v joined batch-major, so each stream's attention output is copied for its o-projection).
Each line also gives the share of the unit's wall time the host spent waiting on the device:
near 100% means the device is the limit. Run with MLX_USE_CUDA_GRAPHS=0 to see what MLX's CUDA
graphs add.
Variants tried and removed with their code (README, "Performance"): q/k/v as one product per
stream (commit 23a4716, no gain); the GELU as one kernel doing MLX's ops in one pass (commit
7fc3685: 132 against MLX's 145 us a call, the unit unchanged); the o-projection on (B, L, C)
views of the attention output (`fused-o-copy`, commit 6364f63: the copy stayed); the join
writing q/k/v heads-first (commit 7f6ab75, compared by its variant `fused-join-blc`: slower); the
norm kernels holding a row in fp16 registers (commit 47f1165: slower alone, the unit unchanged).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import mlx.core as mx  # noqa: E402
from sd3_torch import HEADS, TOKENS_IMG, TOKENS_TXT, WIDTH, step_products  # noqa: E402


def ops(batch: int) -> dict:
    res = {}
    for name, m, k, n, _ in step_products(batch):
        x = mx.random.normal((m, k)).astype(mx.float16)
        w = (mx.random.normal((n, k)) * 0.02).astype(mx.float16)
        b = mx.random.normal((n,)).astype(mx.float16)
        mx.eval(x, w, b)
        res[f"{name} {m}x{k}x{n}"] = common.mlx_ms(lambda x=x, w=w, b=b: mx.addmm(b, x, w.T))
    m = 2 * batch * TOKENS_IMG
    x = mx.random.normal((m, WIDTH)).astype(mx.float16)
    w = (mx.random.normal((3 * WIDTH, WIDTH)) * 0.02).astype(mx.float16)
    mx.eval(x, w)
    res[f"img q/k/v fused {m}x{WIDTH}x{3 * WIDTH}"] = common.mlx_ms(lambda: x @ w.T)
    q, k, v = (
        mx.random.normal((2 * batch, HEADS, TOKENS_IMG + TOKENS_TXT, 64)).astype(mx.float16)
        for _ in range(3)
    )
    mx.eval(q, k, v)
    res["attention"] = common.mlx_ms(
        lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125)
    )
    return res


class HostWait:
    """Seconds the host spends blocked in mx.eval while installed: the rest of a unit's wall
    time is the host building and launching work. A host that almost never waits is what the
    device waits on."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._eval = mx.eval

    def __enter__(self) -> HostWait:
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return self._eval(*a, **k)
            finally:
                self.seconds += time.perf_counter() - t0

        mx.eval = timed
        return self

    def __exit__(self, *exc) -> None:
        mx.eval = self._eval


def unit_ms(model, cfg, cs, cp, batch: int, **engine) -> tuple[float, float, float]:
    """ms per trajectory-step of one unit of prompt 0 (10 steps, best of 2 after a warm-up
    run), the warm-up's seconds, and the share of the timed runs' wall the host waited."""
    trajs = [len(cfg.prompts) * j for j in range(batch)]
    wait = HostWait()
    times, first = common.engine_unit_seconds(
        model, cfg, cs, cp, trajs, steps=10, reps=2, around=wait, **engine
    )
    return min(times) / (batch * 10) * 1e3, first, wait.seconds / sum(times)


def small(args) -> None:
    """The variants on a small float32 model (the logic, on CPU)."""
    dtype = mx.float32
    config = common.mmdit_config(
        depth=2, hidden=128, heads=2, text_dim=256, pooled_dim=128, dtype=dtype
    )
    mmdit = common.random_mmdit(config, dtype)
    model = common.make_model(mmdit, "float32")
    cfg = common.job_config(dtype="float32")
    cs, cp = common.random_conditioning(len(cfg.prompts), 77, 256, 128)
    variants(mmdit, model, cfg, cs, cp, args)
    if args.check_steps:
        distances(model, cfg, cs, cp, args)


def variants(mmdit, model, cfg, cs, cp, args) -> dict:
    """ms per trajectory-step of the unit under each variant (module docstring)."""
    units = {}
    b = args.batch
    real_sdpa = [blk.sdpa for blk in mmdit.multimodal_transformer_blocks]
    real_ln = mx.fast.layer_norm
    from calibjob.models import fused_block

    real_gelu = fused_block.gelu
    real_residual, real_joint = fused_block.gated_residual, fused_block._joint_attention
    from calibjob.models import cuda_ops

    real_layout = dict(cuda_ops.NORM_LAYOUT)
    for name in [v for v in args.variants.split(",") if v]:
        kw = {"compile": name != "eager", "fused": name.startswith("fused")}
        if name == "one-graph":
            kw["segment"] = 0
        if name.startswith("fused-seg"):  # fused-segN: N blocks per compiled segment
            kw["segment"] = int(name.removeprefix("fused-seg"))
        if name == "no-attention":
            for blk in mmdit.multimodal_transformer_blocks:
                blk.sdpa = lambda q, k, v, scale=None, **_: v
        if name == "fused-mlx-gelu":
            fused_block.gelu = lambda x, act: act(x)
        if name == "fused-lut-global":
            fused_block.gelu = lut_global_gelu()
        if name.startswith("fused-norm"):  # fused-normCH.R: the norm kernels' layout
            ch, r = name.removeprefix("fused-norm").split(".")
            cuda_ops.NORM_LAYOUT.update(CH=int(ch), R=int(r))
        if name == "fused-mlx-residual":
            fused_block.gated_residual = (
                lambda x, y, mods, k, gate: x + y * mx.split(mods, k, axis=-1)[gate]
            )
        if name == "fused-batch-major":
            fused_block._joint_attention = batch_major_attention
        if name == "no-layernorm":
            mx.fast.layer_norm = lambda x, weight=None, bias=None, eps=None: (
                x if weight is None else x * weight + bias
            )
        try:
            ms, first, waited = unit_ms(model, cfg, cs, cp, b, **kw)
        finally:
            for blk, f in zip(mmdit.multimodal_transformer_blocks, real_sdpa, strict=True):
                blk.sdpa = f
            mx.fast.layer_norm = real_ln
            fused_block.gelu = real_gelu
            fused_block.gated_residual, fused_block._joint_attention = real_residual, real_joint
            cuda_ops.NORM_LAYOUT.update(real_layout)
        units[name] = ms
        print(f"unit {name}: {ms:.2f} ms per trajectory-step (first run {first:.1f} s); the "
              f"host waited {waited:.0%} of the time", flush=True)
    if "generic" in units:
        g = units["generic"]
        for name, ms in units.items():
            print(f"  {name:<14}{ms:7.2f}  {ms - g:+.2f} vs generic", flush=True)
    return units


def lut_global_gelu():
    """`cuda_ops.gelu` with the table read through the cache (bench/gelu_lut.py's kernel)."""
    import gelu_lut

    from calibjob.models import cuda_ops

    kernel = gelu_lut.global_kernel()

    def gelu(x, act):
        table = cuda_ops._tables.get(x.dtype)
        if table is None or x.ndim != 4 or x.size % 8:
            return act(x)
        return gelu_lut.run_global(kernel, x, table)

    return gelu


def batch_major_attention(block, first: tuple, second: tuple, pos):
    """`fused_block._joint_attention` as session 9 had it: the tokens joined batch-major, so
    that each stream's part of the attention output is strided and copied for its
    o-projection."""
    from norm_kernels import join

    from calibjob.models import fused_block

    q, k, v = join(first, second, by_token=False)
    o = fused_block._attention(block, q, k, v, pos)
    l1 = first[0].shape[1]
    return o[:, :l1], o[:, l1:]


def distances(model, cfg, cs, cp, args) -> dict:
    """Max |x - x_eager| over every recorded point of one unit, `args.check_steps` steps, for
    the compiled step and, where asked, the fused one."""
    from calibjob.engine import Engine

    trajs = [len(cfg.prompts) * j for j in range(args.batch)]

    def run(compile: bool, fused: bool = False):
        eng = Engine(model, num_steps=args.check_steps, cfg_scale=cfg.cfg_scale,
                     latent_size=tuple(cfg.latent_size), seed=cfg.seed, compile=compile,
                     fused=fused)  # fmt: skip
        xs, _ = eng.run_unit(0, trajs, cs[0], cp[0])
        eng.release_prompt()
        return xs

    ref = run(False)
    out = {"max_abs_x": float(abs(ref).max())}
    kinds = [("compiled", False)] + ([("fused", True)] if "fused" in args.variants else [])
    for key, fused in kinds:
        out[key] = float(abs(run(True, fused) - ref).max())
        print(f"{key}: max |x - x_eager| over {args.check_steps} steps: {out[key]:.3g} "
              f"(|x| <= {out['max_abs_x']:.3g})", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=13)
    ap.add_argument("--variants", default="generic,no-attention,no-layernorm,one-graph")
    ap.add_argument("--torch-json", type=Path, help="bench/sd3_torch.py's figures to set beside")
    ap.add_argument("--small", action="store_true", help="a small model, no products (CPU check)")
    ap.add_argument("--no-ops", action="store_true", help="skip the products timed alone")
    ap.add_argument("--check-steps", type=int, default=0,
                    help="after timing: each variant's max distance from the eager unit over "
                    "this many steps (batch --batch, every recorded point)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    res: dict = {"env": common.env_note(), "batch": args.batch}
    if args.small:
        return small(args)
    peer = json.loads(args.torch_json.read_text()) if args.torch_json else {}

    o = {} if args.no_ops else ops(args.batch)
    res["ops_ms"] = o
    tops = peer.get("ops_ms", {})
    counts = {f"{n} {m}x{k}x{nn}": c for n, m, k, nn, c in step_products(args.batch)}
    tot_mlx = tot_torch = 0.0
    print(f"{'op':<34}{'MLX ms':>9}{'torch ms':>10}{'ratio':>7}{'per step':>10}", flush=True)
    for k, v in o.items():
        t = tops.get(k)
        c = counts.get(k, 24 if k == "attention" else 0)
        tot_mlx += v * c
        tot_torch += (t or 0) * c
        ratio = f"{t / v:.2f}" if t else "-"
        print(f"{k:<34}{v:9.3f}{(t or 0):10.3f}{ratio:>7}{v * c:10.1f}", flush=True)
    b = args.batch
    print(f"products + attention per step: MLX {tot_mlx:.1f} ms, torch {tot_torch:.1f} ms; per "
          f"trajectory-step MLX {tot_mlx / b:.2f}, torch {tot_torch / b:.2f}", flush=True)
    res["ops_per_traj_step_mlx"], res["ops_per_traj_step_torch"] = tot_mlx / b, tot_torch / b

    if "fused" in args.variants:
        from cuda_ops_check import check_all

        res["kernels_max_rel_diff"] = check_all()
        print(f"fused kernels against the separate ops, max |diff| / max |ref|: "
              f"{res['kernels_max_rel_diff']}", flush=True)
    dtype = mx.float16
    mmdit = common.random_mmdit(common.sd3_2b_config(dtype), dtype)
    model = common.make_model(mmdit, "float16")
    cfg = common.job_config(dtype="float16")
    cs, cp = common.random_conditioning(len(cfg.prompts), TOKENS_TXT, 4096, 2048)
    res["unit_ms_per_traj_step"] = variants(mmdit, model, cfg, cs, cp, args)
    if args.check_steps:
        res["distance_from_eager"] = distances(model, cfg, cs, cp, args)
    for k, v in peer.get("model_ms_per_traj_step", {}).items():
        print(f"diffusers {k}: {v:.2f} ms per trajectory-step", flush=True)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
