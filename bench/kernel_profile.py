"""Every GPU kernel of one SD3 step, by name and duration, for the engine and for diffusers +
torch.compile side by side: what the step's time is made of, from Nsight Compute.

The process warms its step up (JIT and compile), then brackets exactly one step with
cudaProfilerStart/Stop, so `ncu --profile-from-start off` times that step's kernels and no
others (each kernel replayed alone: its own duration, without the gaps between kernels).

    ncu --profile-from-start off --clock-control none --cache-control none \
        --metrics gpu__time_duration.sum --csv python bench/kernel_profile.py --mlx > mlx.csv
    ncu ... python bench/kernel_profile.py --torch > torch.csv
    python bench/kernel_profile.py --summary mlx.csv torch.csv [--batch 13]

SD3-2b shapes, random float16 weights, 589 text tokens, 256x256, CFG, batch 13 (26 rows).
`--variant` picks the engine's step: `generic` or `fused` (the job's fused step).
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import glob
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# (category, pattern on the kernel name), first match wins
CATEGORIES = [
    ("attention", r"sdpa|fmha|flash|attention|attn"),
    ("matrix product", r"nvjet|gemm|cutlass|xmma|cublas|s\d+gemm|_mm_"),
    ("layer norm", r"layer_?norm|layernorm|calib_norm|calib_gated"),
    ("copy / concat", r"copy|concat|cat_|\bcat\b|calib_join"),
]


def profiler(on: bool) -> None:
    """cudaProfilerStart/Stop through whichever CUDA runtime the process can load."""
    names = ["libcudart.so.13", "libcudart.so.12", "libcudart.so"]
    for p in sys.path:
        names += glob.glob(f"{p}/nvidia/cu*/lib/libcudart.so*")
        names += glob.glob(f"{p}/nvidia/cuda_runtime/lib/libcudart.so*")
    for n in names:
        try:
            lib = ctypes.CDLL(n)
        except OSError:
            continue
        rc = (lib.cudaProfilerStart if on else lib.cudaProfilerStop)()
        print(f"cudaProfiler{'Start' if on else 'Stop'} via {n}: {rc}", file=sys.stderr)
        return
    print("no CUDA runtime found for the profiler API", file=sys.stderr)


def mlx_step(batch: int, variant: str) -> None:
    import common
    import mlx.core as mx
    from sd3_torch import TOKENS_TXT

    from calibjob.engine import Engine

    dtype = mx.float16
    mmdit = common.random_mmdit(common.sd3_2b_config(dtype), dtype)
    model = common.make_model(mmdit, "float16")
    cfg = common.job_config(dtype="float16")
    cs, cp = common.random_conditioning(len(cfg.prompts), TOKENS_TXT, 4096, 2048)
    eng = Engine(model, num_steps=1, cfg_scale=cfg.cfg_scale, latent_size=tuple(cfg.latent_size),
                 seed=cfg.seed, compile=True, fused=variant == "fused")  # fmt: skip
    trajs = [len(cfg.prompts) * j for j in range(batch)]
    for _ in range(3):
        eng.run_unit(0, trajs, cs[0], cp[0])
    mx.synchronize()
    profiler(True)
    eng.run_unit(0, trajs, cs[0], cp[0])
    mx.synchronize()
    profiler(False)


def torch_step(batch: int) -> None:
    import torch
    from sd3_torch import build_model, model_inputs

    fn = torch.compile(build_model())
    inputs = model_inputs(batch)
    with torch.no_grad():
        for _ in range(3):
            fn(**inputs)
        torch.cuda.synchronize()
        profiler(True)
        fn(**inputs)
        torch.cuda.synchronize()
        profiler(False)


def read_ncu(path: Path) -> list[tuple[str, float]]:
    """(kernel name, microseconds) per launch from `ncu --csv --metrics gpu__time_duration.sum`."""
    rows = [r for r in csv.reader(open(path, errors="replace")) if len(r) > 14]
    if not rows:
        return []
    head = rows[0]
    name, val, unit = (head.index(c) for c in ("Kernel Name", "Metric Value", "Metric Unit"))
    scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}
    return [(r[name], float(r[val].replace(",", "")) * scale.get(r[unit], 1.0)) for r in rows[1:]]


def category(name: str) -> str:
    low = name.lower()
    for cat, pat in CATEGORIES:
        if re.search(pat, low):
            return cat
    return "other elementwise"


def summary(paths: list[Path], batch: int, top: int) -> dict:
    """Per file: ms per trajectory-step by category, and the heaviest kernels by name."""
    out = {}
    for path in paths:
        launches = read_ncu(path)
        cats: dict = defaultdict(lambda: [0.0, 0])
        names: dict = defaultdict(lambda: [0.0, 0])
        for n, us in launches:
            c = cats[category(n)]
            c[0] += us
            c[1] += 1
            k = names[n[:90]]
            k[0] += us
            k[1] += 1
        total = sum(us for _, us in launches)
        per = 1e3 * batch  # us per step -> ms per trajectory-step
        print(f"\n== {path}: {len(launches)} kernels, {total / per:.2f} ms per trajectory-step")
        for cat, (us, cnt) in sorted(cats.items(), key=lambda kv: -kv[1][0]):
            print(f"  {cat:<20}{us / per:7.3f} ms  {cnt:5d} launches")
        print(f"  heaviest {top} kernels (ms per trajectory-step, launches, mean us):")
        for n, (us, cnt) in sorted(names.items(), key=lambda kv: -kv[1][0])[:top]:
            print(f"  {us / per:7.3f} {cnt:5d} {us / cnt:8.1f}  {n}")
        out[str(path)] = {
            "total_ms": total / per,
            "categories_ms": {k: v[0] / per for k, v in cats.items()},
            "kernels": {k: [v[0] / per, v[1]] for k, v in names.items()},
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mlx", action="store_true", help="one engine step (run under ncu)")
    ap.add_argument("--torch", action="store_true", help="one torch.compile forward (under ncu)")
    ap.add_argument("--variant", default="generic", help="generic or fused")
    ap.add_argument("--batch", type=int, default=13)
    ap.add_argument("--summary", nargs="+", type=Path, help="summarise ncu --csv files")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.summary:
        res = summary(args.summary, args.batch, args.top)
        if args.json:
            args.json.write_text(json.dumps(res, indent=1))
    elif args.mlx:
        mlx_step(args.batch, args.variant)
    elif args.torch:
        torch_step(args.batch)


if __name__ == "__main__":
    main()
