"""The fused step's CUDA kernels (`calibjob/models/cuda_ops.py`) against the separate MLX ops
they stand for, at SD3-2b's width in float16 and FLUX.1's in bfloat16 (CUDA only; off CUDA the
functions are those ops, and every difference is 0).

    python bench/cuda_ops_check.py

`bench/step_profile.py` prints the same check before its `fused` variant.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from calibjob.models import cuda_ops


def check_all() -> dict:
    """`check` at SD3-2b's shapes in float16 and FLUX.1's width in bfloat16."""
    return {"sd3 float16": check(), "flux bfloat16": check(8, 4352, 3072, dtype=mx.bfloat16)}


def check(rows: int = 26, tokens: int = 845, d: int = 1536, eps: float = 1e-6,
          dtype=mx.float16) -> dict:  # fmt: skip
    """Max |kernel - separate ops| in units of the output's largest magnitude for the norms,
    and how many outputs differ in any bit (each must be 0) for the rest: the gated norm given
    y token-major against y batch-major, the post-MLP residual, the join (token-major), and
    the GELU against MLX's own on every value of the dtype and on the MLP's activations at
    this width (through `act` and through `act` compiled, as the step runs it)."""
    from diffusionkit.mlx.mmdit import LayerNorm

    norm = LayerNorm(d, eps=eps)
    mx.random.seed(3)
    x = mx.random.normal((rows, tokens, 1, d)).astype(dtype) * 3 + 1
    y = mx.random.normal((rows, tokens, 1, d)).astype(dtype)
    mods = (mx.random.normal((rows, 1, 1, 6 * d)) * 0.2).astype(dtype)
    g, sh, sc = (mods[..., i * d : (i + 1) * d] for i in (2, 3, 4))

    def rel(a, b):
        a, b = a.astype(mx.float32), b.astype(mx.float32)
        return (mx.abs(a - b).max() / mx.abs(b).max()).item()

    ref = mx.fast.layer_norm(x, None, None, eps) * (1.0 + sc) + sh
    r_ref = x + y * g
    m_ref = mx.fast.layer_norm(r_ref, None, None, eps) * (1.0 + sc) + sh
    r, m = cuda_ops.gated_modulated_norm(x, y, mods, 6, 2, 3, 4, norm)
    yt = mx.contiguous(y.transpose(1, 0, 2, 3)).reshape(-1, d)  # y token-major, as o_proj's
    rt, mt = cuda_ops.gated_modulated_norm(x, yt, mods, 6, 2, 3, 4, norm)
    a = [mx.random.normal((rows, n, 1, d)).astype(dtype) for n in (256, 589) for _ in "qkv"]
    joined = cuda_ops.joint_tokens(tuple(a[:3]), tuple(a[3:]))
    join = sum(
        not_equal(j, mx.concatenate([a[i], a[3 + i]], axis=1).transpose(1, 0, 2, 3))
        for i, j in enumerate(joined)
    )
    g5 = mods[..., 5 * d : 6 * d]
    cuda_ops.prepare_gelu()
    act, gelu = nn.GELU(), cuda_ops.gelu
    every = every_value(dtype)
    h = mx.random.normal((rows, tokens, 1, 4 * d)).astype(dtype) * 2
    lut = gelu(h, act)
    return {"modulated_norm": rel(cuda_ops.modulated_norm(x, mods, 6, 3, 4, norm), ref),
            "gated_residual": rel(r, r_ref), "gated_modulated_norm": rel(m, m_ref),
            "gated, y token-major, not bit-equal to y batch-major": not_equal(rt, r)
            + not_equal(mt, m),
            "post-MLP residual not bit-equal": not_equal(
                cuda_ops.gated_residual(x, y, mods, 6, 5), x + y * g5),
            "joint_tokens not bit-equal": join,
            "gelu_values_not_bit_equal": not_equal(gelu(every, act), act(every)),
            "gelu_activations_not_bit_equal": not_equal(lut, act(h)),
            "gelu_activations_not_bit_equal_compiled": not_equal(lut, mx.compile(act)(h)),
            }  # fmt: skip


def every_value(dtype) -> mx.array:
    """All 65,536 values of a 2-byte dtype, as (1, 8192, 1, 8)."""
    return mx.arange(65536, dtype=mx.uint32).astype(mx.uint16).view(dtype).reshape(1, -1, 1, 8)


def not_equal(a: mx.array, b: mx.array) -> int:
    """Elements that differ in any bit, NaNs of any payload counted equal."""
    same = a.view(mx.uint16) == b.view(mx.uint16)
    nan = mx.isnan(a.astype(mx.float32)) & mx.isnan(b.astype(mx.float32))
    return int((~(same | nan)).sum().item())


if __name__ == "__main__":
    import calibjob.diffusionkit_imports  # noqa: F401  (DiffusionKit without torch)

    for shape, diffs in check_all().items():
        print(f"{shape}: " + ", ".join(f"{k} {v:.3g}" for k, v in diffs.items()))
