"""The peer beside bench/gpu.py: diffusers' SD3Transformer2DModel (SD3 Medium's shapes: 24
joint blocks, width 1536, 24 heads), random float16 weights, 589 text tokens, 256x256 (a 32x32
latent), the CFG batch doubled, timed per trajectory-step, eager and under `torch.compile`
(default mode), after warm-up; and the step's matrix-product shapes and its attention alone,
for `bench/step_profile.py` to set MLX's beside. Needs torch with CUDA and diffusers; no hub.

    python bench/sd3_torch.py [--batches 13,26] [--no-compile] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

TOKENS_TXT, TOKENS_IMG, WIDTH, HEADS = 589, 256, 1536, 24


def step_products(batch: int) -> list[tuple[str, int, int, int, int]]:
    """(name, M, K, N, count per step) of the SD3-2b step at `batch` trajectories (2 rows each
    under CFG): per joint block and stream q, k, v, o, fc1, fc2; the last block's text stream
    stops after q, k, v."""
    rows = 2 * batch
    out = []
    for stream, tokens in (("img", TOKENS_IMG), ("txt", TOKENS_TXT)):
        m = rows * tokens
        full = 24 if stream == "img" else 23
        out += [
            (f"{stream} q/k/v", m, WIDTH, WIDTH, 3 * 24),
            (f"{stream} o", m, WIDTH, WIDTH, full),
            (f"{stream} fc1", m, WIDTH, 4 * WIDTH, full),
            (f"{stream} fc2", m, 4 * WIDTH, WIDTH, full),
        ]
    return out


def cuda_ms(fn, reps: int = 20) -> float:
    """Mean ms of fn() over reps launches, timed with CUDA events after 3 warm-up calls."""
    import torch

    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def ops(batch: int) -> dict:
    """ms per call of each product shape (F.linear with bias) and of the joint attention."""
    import torch
    import torch.nn.functional as F

    res = {}
    with torch.no_grad():
        for name, m, k, n, _ in step_products(batch):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            w = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
            b = torch.randn(n, device="cuda", dtype=torch.float16)
            res[f"{name} {m}x{k}x{n}"] = cuda_ms(lambda x=x, w=w, b=b: F.linear(x, w, b))
        m = 2 * batch * TOKENS_IMG
        x = torch.randn(m, WIDTH, device="cuda", dtype=torch.float16)
        w = torch.randn(3 * WIDTH, WIDTH, device="cuda", dtype=torch.float16) * 0.02
        res[f"img q/k/v fused {m}x{WIDTH}x{3 * WIDTH}"] = cuda_ms(lambda: F.linear(x, w))
        q, k, v = (
            torch.randn(2 * batch, HEADS, TOKENS_IMG + TOKENS_TXT, 64, device="cuda",
                        dtype=torch.float16)
            for _ in range(3)
        )  # fmt: skip
        res["attention"] = cuda_ms(lambda: F.scaled_dot_product_attention(q, k, v))
    return res


def build_model():
    """diffusers' SD3Transformer2DModel at SD3 Medium's shapes, random float16 weights (seed 0)."""
    import torch
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    with torch.device("cuda"):
        return SD3Transformer2DModel(
            num_layers=24, attention_head_dim=64, num_attention_heads=24,
            caption_projection_dim=WIDTH, pos_embed_max_size=192,
        ).to(torch.float16).eval()  # fmt: skip


def model_inputs(batch: int) -> dict:
    """The forward's keyword arguments for `batch` trajectories (2 rows each: CFG)."""
    import torch

    rows, kw = 2 * batch, {"device": "cuda", "dtype": torch.float16}
    return dict(hidden_states=torch.randn(rows, 16, 32, 32, **kw),
                encoder_hidden_states=torch.randn(rows, TOKENS_TXT, 4096, **kw) * 0.5,
                pooled_projections=torch.randn(rows, 2048, **kw),
                timestep=torch.full((rows,), 500.0, **kw), return_dict=False)  # fmt: skip


def model_ms(batches: list[int], compile: bool, reps: int = 5) -> dict:
    """ms per trajectory-step of the whole SD3Transformer2DModel forward, eager and compiled."""
    import torch

    model = build_model()
    res = {}
    variants = [("eager", model)]
    if compile:
        variants.append(("torch.compile", torch.compile(model)))
    for label, fn in variants:
        for b in batches:
            inputs = model_inputs(b)
            t0 = time.perf_counter()
            with torch.no_grad():
                ms = cuda_ms(lambda inputs=inputs, fn=fn: fn(**inputs), reps)
            res[f"{label} b{b}"] = ms / b
            print(f"diffusers {label} batch {b}: {ms / b:.2f} ms per trajectory-step "
                  f"({time.perf_counter() - t0:.0f} s with warm-up)", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="13,26")
    ap.add_argument("--no-compile", action="store_true", help="eager only")
    ap.add_argument("--no-ops", action="store_true", help="skip the per-product timings")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import torch

    batches = [int(b) for b in args.batches.split(",") if b]
    res: dict = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name()}
    if not args.no_ops:
        res["ops_ms"] = ops(batches[0])
        for k, v in res["ops_ms"].items():
            print(f"torch {k}: {v:.3f} ms", flush=True)
    res["model_ms_per_traj_step"] = model_ms(batches, not args.no_compile)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
