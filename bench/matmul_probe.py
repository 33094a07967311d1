"""Why MLX's matrix products of the SD3 step are slower than torch's on the same GPU: the same
shapes timed three ways (each call waited for; 20 calls queued; the weight stored transposed),
meant to run under Nsight Compute too, so the kernels' own durations and names can be set
beside the wall-clock figures (host work per call vs. a slower kernel).

    python bench/matmul_probe.py --mlx|--torch [--reps 20]
    ncu --clock-control none --metrics gpu__time_duration.sum --csv \
        python bench/matmul_probe.py --mlx --reps 3 > k.csv
    python bench/matmul_probe.py --ncu-summary k.csv
"""

from __future__ import annotations

import argparse
import time

SHAPES = [(6656, 1536, 1536), (15314, 1536, 6144)]  # img q; txt fc1 (batch 13, CFG)


def mlx_probe(reps: int) -> None:
    import mlx.core as mx

    for m, k, n in SHAPES:
        x = mx.random.normal((m, k)).astype(mx.float16)
        w = (mx.random.normal((n, k)) * 0.02).astype(mx.float16)
        wt = mx.array(w.T)  # (k, n) row-major: no transpose flag
        b = mx.zeros((n,), mx.float16)
        mx.eval(x, w, wt, b)
        for label, fn in (("addmm w.T", lambda b=b, x=x, w=w: mx.addmm(b, x, w.T)),
                          ("matmul w.T", lambda x=x, w=w: x @ w.T),
                          ("matmul wt", lambda x=x, wt=wt: x @ wt)):  # fmt: skip
            mx.eval(fn())
            mx.synchronize()
            t0 = time.perf_counter()
            for _ in range(reps):
                mx.eval(fn())
                mx.synchronize()
            each = (time.perf_counter() - t0) / reps * 1e3
            t0 = time.perf_counter()
            mx.eval([fn() for _ in range(reps)])
            mx.synchronize()
            queued = (time.perf_counter() - t0) / reps * 1e3
            tflops = 2 * m * k * n / (queued * 1e-3) / 1e12
            print(f"mlx {m}x{k}x{n} {label}: {each:.3f} ms each, {queued:.3f} ms queued "
                  f"({tflops:.0f} TFLOP/s)", flush=True)


def torch_probe(reps: int) -> None:
    import torch
    import torch.nn.functional as F

    for m, k, n in SHAPES:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        w = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
        b = torch.zeros(n, device="cuda", dtype=torch.float16)
        F.linear(x, w, b)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            F.linear(x, w, b)
        torch.cuda.synchronize()
        queued = (time.perf_counter() - t0) / reps * 1e3
        print(f"torch {m}x{k}x{n} linear: {queued:.3f} ms queued "
              f"({2 * m * k * n / (queued * 1e-3) / 1e12:.0f} TFLOP/s)", flush=True)


def ncu_summary(path: str) -> None:
    """Kernel name, process and duration (us) from `ncu --csv --metrics
    gpu__time_duration.sum` output, in launch order."""
    import csv

    rows = [r for r in csv.reader(open(path, errors="replace")) if len(r) > 14]
    head = rows[0]
    name, pid, val, unit = (head.index(c) for c in ("Kernel Name", "Process ID", "Metric Value",
                                                     "Metric Unit"))
    for r in rows[1:]:
        v = float(r[val].replace(",", ""))
        scale = {"ns": 1e-3, "nsecond": 1e-3, "ms": 1e3, "msecond": 1e3}.get(r[unit], 1.0)
        us = v * scale
        print(f"{r[pid]:>7} {us:9.1f} us  {r[name][:110]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mlx", action="store_true")
    ap.add_argument("--torch", action="store_true")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--ncu-summary", help="summarise an ncu --csv file instead")
    args = ap.parse_args()
    if args.ncu_summary:
        return ncu_summary(args.ncu_summary)
    if args.mlx:
        mlx_probe(args.reps)
    if args.torch:
        torch_probe(args.reps)


if __name__ == "__main__":
    main()
