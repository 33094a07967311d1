"""The peer beside bench/flux_gpu.py: diffusers' FluxTransformer2DModel, PyTorch eager, bf16,
random weights of FLUX.1-schnell's shapes, the same batches and text length (256 T5 tokens),
timed per sample-step after a warm-up. Needs torch with CUDA and diffusers; no hub access.

    python bench/flux_torch.py [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = FluxTransformer2DModel(guidance_embeds=False).to(torch.bfloat16).eval()
    res = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name()}
    for px, batch in ((256, 32), (1024, 4)):
        side = px // 16  # 2x2 patches of the 8x-downsampled latent
        n = side * side
        x = torch.randn(batch, n, 64, device="cuda", dtype=torch.bfloat16)
        c = torch.randn(batch, 256, 4096, device="cuda", dtype=torch.bfloat16) * 0.5
        pooled = torch.randn(batch, 768, device="cuda", dtype=torch.bfloat16)
        t = torch.full((batch,), 0.5, device="cuda", dtype=torch.bfloat16)
        rows = torch.arange(side, device="cuda").repeat_interleave(side)
        cols = torch.arange(side, device="cuda").repeat(side)
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=1).float()
        txt_ids = torch.zeros(256, 3, device="cuda")
        times = []
        with torch.no_grad():
            for _ in range(args.reps + 1):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                model(hidden_states=x, encoder_hidden_states=c, pooled_projections=pooled,
                      timestep=t, img_ids=img_ids, txt_ids=txt_ids, return_dict=False)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        res[f"diffusers_eager_{px}px_b{batch}_ms"] = min(times[1:]) / batch * 1e3
        print(f"diffusers eager {px}px batch {batch}: "
              f"{res[f'diffusers_eager_{px}px_b{batch}_ms']:.1f} ms per sample-step", flush=True)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
