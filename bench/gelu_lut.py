"""The GELU table's kernels alone (issue 22), on CUDA: every input checked, then ms a call.

The step's GELU (DiffusionKit's `nn.GELU()`: x * (1 + erf(x / sqrt 2)) / 2, every op rounded to
the activation dtype) took 0.48-0.52 ms per trajectory-step on an H200, bound by its
instructions (erf and the roundings), not by memory: MLX's fused kernel 145 us a call. A 2-byte
dtype has 65,536 values, so the whole function is a 128 KB table, made by MLX's own `gelu` on
the device (so equal to it by construction); the kernel then only loads, looks up and stores.
`calibjob/models/cuda_ops.py` runs the shared-memory form in the fused step.

Two kernels: the table read through the read-only cache (`lut-global`, here) and the table
copied into each block's shared memory, the blocks looping over the tokens (`lut-shared`: the
step's own `cuda_ops.gelu`, 128 KB of dynamic shared memory, which MLX allows by raising the 48
KB default). For each, every one of the 65,536 inputs against MLX's `gelu` (eager and compiled),
then ms a call at the step's shapes beside MLX's compiled `gelu`. Measured on an H200
(2026-12-03), 26 x 589 x 6144 fp16: MLX 0.325 ms, lut-global 0.135, lut-shared 0.131 (its first
form here, one load in flight per thread); every value equal for both kernels, fp16 and bf16. In
the step, the shared-memory table won (`bench/step_profile.py`: 5.46 against 6.11 ms per
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
from cuda_ops_check import every_value, not_equal  # noqa: E402

from calibjob.models import cuda_ops  # noqa: E402

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


def global_kernel():
    """The table read through the cache (the source's hash in the name: MLX caches kernels by
    name)."""
    tag = hashlib.sha1(_GLOBAL.encode()).hexdigest()[:10]
    return mx.fast.cuda_kernel(
        name=f"calib_gelu_lut_global_{tag}", input_names=["x", "tbl"], output_names=["out"],
        source=_GLOBAL,
    )  # fmt: skip


def run_global(kernel, x: mx.array, tbl: mx.array) -> mx.array:
    """The cache-read table kernel on x (4-D, a multiple of 8 elements in all)."""
    n = x.size // 8
    (out,) = kernel(inputs=[x, tbl], grid=((n + 255) // 256 * 256, 1, 1), threadgroup=(256, 1, 1),
                    output_shapes=[x.shape], output_dtypes=[x.dtype])  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    gelu = nn.GELU()
    compiled = mx.compile(gelu)
    cuda_ops.prepare_gelu()
    glob = global_kernel()
    kinds = {
        "lut-global": lambda x, tbl: run_global(glob, x, tbl),
        "lut-shared (cuda_ops.gelu)": lambda x, tbl: cuda_ops.gelu(x, gelu),
    }
    res: dict = {"env": common.env_note()}
    for dname, dtype in (("float16", mx.float16), ("bfloat16", mx.bfloat16)):
        xs = every_value(dtype)
        ref = gelu(xs)
        tbl = ref.reshape(-1).view(mx.uint16)
        mx.eval(tbl)
        r = {"compiled values not equal": not_equal(compiled(xs), ref)}
        for kind, f in kinds.items():
            r[f"{kind} values not equal"] = not_equal(f(xs, tbl), ref)
        for tokens in (256, 589):
            x = (mx.random.normal((26, tokens, 1, 6144)) * 2).astype(dtype)
            mx.eval(x)
            r[f"mlx compiled gelu, {tokens} tokens, ms"] = common.mlx_ms(lambda x=x: compiled(x))
            for kind, f in kinds.items():
                r[f"{kind}, {tokens} tokens, ms"] = common.mlx_ms(
                    lambda x=x, f=f, t=tbl: f(x, t)
                )
        res[dname] = r
        print(dname, json.dumps(r, indent=1), flush=True)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
