"""The GELU table's kernels alone (issue 22), on CUDA: every input checked, then ms a call.

The step's GELU (DiffusionKit's `nn.GELU()`: x * (1 + erf(x / sqrt 2)) / 2, every op rounded to
the activation dtype) took 0.48-0.52 ms per trajectory-step on an H200, bound by its
instructions (erf and the roundings), not by memory: MLX's fused kernel 145 us a call. A 2-byte
dtype has 65,536 values, so the whole function is a 128 KB table, made by MLX's own `gelu` on
the device (so equal to it by construction); the kernel then only loads, looks up and stores.
`calibjob/models/cuda_ops.py` runs the shared-memory form in the fused step.

Two kernels: the table read through the read-only cache (`lut-global`) and the table copied into
each block's shared memory, the blocks looping over the tokens (`lut-shared`, 128 KB of dynamic
shared memory, which MLX allows by raising the 48 KB default). For each, every one of the 65,536
inputs against MLX's `gelu` (eager and compiled), then ms a call at the step's shapes beside
MLX's compiled `gelu`. Measured on an H200 (2026-12-03), 26 x 589 x 6144 fp16: MLX 0.325 ms,
lut-global 0.135, lut-shared 0.131; every value equal for both kernels, fp16 and bf16. In the
step, the shared-memory table won (`bench/step_profile.py`: 5.46 against 6.11 ms per
trajectory-step).

    python bench/gelu_lut.py [--json PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (the checkout on sys.path, OpenBLAS before MLX)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

_GLOBAL = """
  const size_t n = (size_t)x_shape[0] * x_shape[1] * x_shape[2] * x_shape[3];
  const size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * 8;
  if (i >= n) return;
  uint4 u = *reinterpret_cast<const uint4*>(x + i);
  const unsigned short* e = reinterpret_cast<const unsigned short*>(&u);
  uint4 o;
  unsigned short* r = reinterpret_cast<unsigned short*>(&o);
#pragma unroll
  for (int j = 0; j < 8; ++j) r[j] = __ldg(tbl + e[j]);
  *reinterpret_cast<uint4*>(out + i) = o;
"""

_SHARED = """
  extern __shared__ unsigned short s_tbl[];
  for (int k = threadIdx.x; k < 65536 / 8; k += blockDim.x)
    reinterpret_cast<uint4*>(s_tbl)[k] = reinterpret_cast<const uint4*>(tbl)[k];
  __syncthreads();
  const size_t n = (size_t)x_shape[0] * x_shape[1] * x_shape[2] * x_shape[3];
  const size_t step = (size_t)gridDim.x * blockDim.x * 8;
  for (size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * 8; i < n; i += step) {
    uint4 u = *reinterpret_cast<const uint4*>(x + i);
    const unsigned short* e = reinterpret_cast<const unsigned short*>(&u);
    uint4 o;
    unsigned short* r = reinterpret_cast<unsigned short*>(&o);
#pragma unroll
    for (int j = 0; j < 8; ++j) r[j] = s_tbl[e[j]];
    *reinterpret_cast<uint4*>(out + i) = o;
  }
"""

SMS = 132  # the H200's multiprocessors: one block of 1024 threads each for `lut-shared`


def kernels(only: str | None = None) -> dict:
    """The two table kernels, or the one named `only` (the source's hash in the name: MLX
    caches kernels by name)."""
    out = {}
    for kind, src, shared in (("lut-global", _GLOBAL, 0), ("lut-shared", _SHARED, 65536 * 2)):
        if only and kind != only:
            continue
        tag = hashlib.sha1(src.encode()).hexdigest()[:10]
        out[kind] = mx.fast.cuda_kernel(
            name=f"calib_gelu_{kind.replace('-', '_')}_{tag}", input_names=["x", "tbl"],
            output_names=["out"], source=src, shared_memory=shared,
        )  # fmt: skip
    return out


def run(kind: str, kernel, x: mx.array, tbl: mx.array) -> mx.array:
    """The table kernel on x (4-D, a multiple of 8 elements in all)."""
    n = x.size // 8
    grid = (SMS * 1024, 1, 1) if kind == "lut-shared" else ((n + 255) // 256 * 256, 1, 1)
    block = (1024, 1, 1) if kind == "lut-shared" else (256, 1, 1)
    (out,) = kernel(inputs=[x, tbl], grid=grid, threadgroup=block,
                    output_shapes=[x.shape], output_dtypes=[x.dtype])  # fmt: skip
    return out


def every_value(dtype) -> mx.array:
    """All 65,536 values of a 2-byte dtype, as (1, 8192, 1, 8)."""
    bits = mx.arange(65536, dtype=mx.uint32).astype(mx.uint16)
    return bits.view(dtype).reshape(1, 8192, 1, 8)


def same(a: mx.array, b: mx.array) -> mx.array:
    """Equal to the bit, or both NaN (whose payload an op may choose)."""
    bits = a.view(mx.uint16) == b.view(mx.uint16)
    return bits | (mx.isnan(a.astype(mx.float32)) & mx.isnan(b.astype(mx.float32)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    gelu = nn.GELU()
    compiled = mx.compile(gelu)
    ks = kernels()
    res: dict = {"env": common.env_note()}
    for dname, dtype in (("float16", mx.float16), ("bfloat16", mx.bfloat16)):
        xs = every_value(dtype)
        ref = gelu(xs)
        tbl = ref.reshape(-1).view(mx.uint16)
        mx.eval(tbl)
        r = {"compiled_equals_eager": int((~same(compiled(xs), ref)).sum().item()) == 0}
        for kind, k in ks.items():
            try:
                out = run(kind, k, xs, tbl)
                r[f"{kind} values not equal"] = int((~same(out, ref)).sum().item())
            except Exception as e:  # noqa: BLE001  (a launch MLX refuses: report it)
                r[f"{kind} error"] = str(e).splitlines()[0][:200]
        for tokens in (256, 589):
            x = (mx.random.normal((26, tokens, 1, 6144)) * 2).astype(dtype)
            mx.eval(x)
            r[f"mlx compiled gelu, {tokens} tokens, ms"] = common.mlx_ms(lambda x=x: compiled(x))
            for kind, k in ks.items():
                if f"{kind} error" not in r:
                    r[f"{kind}, {tokens} tokens, ms"] = common.mlx_ms(
                        lambda x=x, k=k, kind=kind, t=tbl: run(kind, k, x, t)
                    )
        res[dname] = r
        print(dname, json.dumps(r, indent=1), flush=True)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
