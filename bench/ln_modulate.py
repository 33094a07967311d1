"""The first steps toward the fused step, kept to measure them alone: DiffusionKit's adaLN norms
through calibjob's single kernels (`calibjob/models/cuda_ops.py`), installed in DiffusionKit's
own block code for the timed unit, and the kernels checked against the separate ops. CUDA only;
`bench/step_profile.py --variants ln-kernel,ln-gated` and `bench/kernel_profile.py --variant`
use it.

- `ln-kernel`: every modulated layer norm (`affine_transform` with a norm) in one kernel;
- `ln-gated`: that, and the residual update before a block's second norm fused into it.
"""

from __future__ import annotations

import mlx.core as mx

from calibjob.models.cuda_ops import gated_modulated_norm, joint_tokens, modulated_norm


def check_all() -> dict:
    """`check` at SD3-2b's shapes in float16 and FLUX.1's width in bfloat16."""
    return {"sd3 float16": check(), "flux bfloat16": check(8, 4352, 3072, dtype=mx.bfloat16)}


def check(rows: int = 26, tokens: int = 845, d: int = 1536, eps: float = 1e-6,
          dtype=mx.float16) -> dict:  # fmt: skip
    """Max |kernel - separate ops| in units of the output's largest magnitude, for each kernel
    of cuda_ops (the join must be exact)."""
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
    r, m = gated_modulated_norm(x, y, mods, 6, 2, 3, 4, norm)
    a = [mx.random.normal((rows, n, 1, d)).astype(dtype) for n in (256, 589) for _ in "qkv"]
    joined = joint_tokens(tuple(a[:3]), tuple(a[3:]))
    join = max(rel(j, mx.concatenate([a[i], a[3 + i]], axis=1)) for i, j in enumerate(joined))
    return {"modulated_norm": rel(modulated_norm(x, mods, 6, 3, 4, norm), ref),
            "gated_residual": rel(r, r_ref), "gated_modulated_norm": rel(m, m_ref),
            "joint_tokens": join}  # fmt: skip


def install(gated: bool = False):
    """DiffusionKit's `affine_transform` (where it normalises a batch of rows) and, if `gated`,
    `TransformerBlock.post_sdpa` (sequential MLP) use the kernels; returns the undo."""
    from diffusionkit.mlx import mmdit

    original, post = mmdit.affine_transform, mmdit.TransformerBlock.post_sdpa

    def affine(x, shift, residual_scale, norm_module=None):
        if norm_module is None or x.shape[0] == 1 or x.ndim != 4:
            return original(x, shift, residual_scale, norm_module)
        mods = mx.concatenate([shift, residual_scale], axis=-1)
        return modulated_norm(x, mods, 2, 0, 1, norm_module)

    def post_sdpa(self, residual, sdpa_output, modulated_pre_attention, post_attn_scale=None,
                  post_norm2_shift=None, post_norm2_residual_scale=None, post_mlp_scale=None,
                  **kw):  # fmt: skip
        if self.parallel_mlp or residual.shape[0] == 1:
            return post(self, residual, sdpa_output, modulated_pre_attention, post_attn_scale,
                        post_norm2_shift, post_norm2_residual_scale, post_mlp_scale, **kw)
        a = self.attn.o_proj(sdpa_output)
        mods = mx.concatenate([post_attn_scale, post_norm2_shift, post_norm2_residual_scale], -1)
        r, m = gated_modulated_norm(residual, a, mods, 3, 0, 1, 2, self.norm2)
        return r + post_mlp_scale * self.mlp(m)

    mmdit.affine_transform = affine
    if gated:
        mmdit.TransformerBlock.post_sdpa = post_sdpa

    def undo():
        mmdit.affine_transform = original
        mmdit.TransformerBlock.post_sdpa = post

    return undo
