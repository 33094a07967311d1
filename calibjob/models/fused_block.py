"""DiffusionKit's MMDiT blocks for the fused step (`compile = "fused"`): the same ops in the same
order as `MultiModalTransformerBlock`, `UnifiedTransformerBlock`, `TransformerBlock.pre_sdpa /
post_sdpa` and `FinalLayer`, with the passes over the tokens that MLX cannot fuse done by
`cuda_ops` (one kernel each on CUDA, DiffusionKit's own ops elsewhere).

Layout changes, none of which changes a number: q/k/v stay (B, L, 1, C) until both streams are
joined, and only then become (B, heads, L, head_dim) views for attention (DiffusionKit
transposes each stream to heads and back first); the join is token-major, so that each
stream's part of the attention output is a contiguous block of rows for its o-projection (no
copy); the q/k norm (SD3.5, FLUX.1) normalises the same rows as (B, L, heads, head_dim).
Each block takes its modulation rows directly rather than through a `ModulationSlot`.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from diffusionkit.mlx.mmdit import SDPA_FLASH_ATTN_THRESHOLD, RoPE

from calibjob.models.cuda_ops import (
    gated_modulated_norm,
    gated_residual,
    gelu,
    joint_tokens,
    modulated_norm,
)


def _pre(tb, x: mx.array, mods: mx.array):
    """`TransformerBlock.pre_sdpa`: the modulated first norm and q, k, v as (B, L, 1, C)."""
    k = tb.num_modulation_params
    normed = modulated_norm(x, mods, k, 0, 1, tb.norm1)
    attn = tb.attn
    q, kk, v = attn.q_proj(normed), attn.k_proj(normed), attn.v_proj(normed)
    if tb.config.use_qk_norm:
        b, heads = x.shape[0], tb.config.num_heads
        q = q.reshape(b, -1, heads, tb.per_head_dim)
        kk = kk.reshape(b, -1, heads, tb.per_head_dim)
        q, kk = tb.qk_norm(q, kk)
        q = q.reshape(b, -1, 1, tb.config.hidden_size)
        kk = kk.reshape(b, -1, 1, tb.config.hidden_size)
    return q, kk, v, normed


def _mlp(mlp, x: mx.array) -> mx.array:
    """DiffusionKit's `FFN.__call__`, its activation through `cuda_ops.gelu`."""
    return mlp.fc2(gelu(mlp.fc1(x), mlp.act_fn))


def _post(tb, residual: mx.array, out: mx.array, mods: mx.array, normed: mx.array) -> mx.array:
    """`TransformerBlock.post_sdpa`: o_proj, the gated residual, the MLP (sequential: after the
    modulated second norm, fused with the residual update; parallel: on the first norm's
    output). `out` is a joint block's token-major rows (L * B, C) (`_joint_attention`), or a
    unified block's (B, L, 1, C); only unified blocks have a parallel MLP in DiffusionKit."""
    k = tb.num_modulation_params
    attention_out = tb.attn.o_proj(out)
    if tb.parallel_mlp:
        p = mx.split(mods, k, axis=-1)
        return residual + p[2] * (attention_out + _mlp(tb.mlp, normed))
    residual, normed2 = gated_modulated_norm(residual, attention_out, mods, k, 2, 3, 4, tb.norm2)
    return gated_residual(residual, _mlp(tb.mlp, normed2), mods, k, 5)


def _sdpa(block, q, k, v, pos) -> mx.array:
    """The block's attention on (B, heads, L, head_dim) q/k/v, RoPE first where the model has
    it."""
    if pos is not None:
        q, k = RoPE.apply(q, pos), RoPE.apply(k, pos)
    extra = {}
    if block.config.low_memory_mode:
        extra["memory_efficient_threshold"] = SDPA_FLASH_ATTN_THRESHOLD
    return block.sdpa(q=q, k=k, v=v, scale=1.0 / np.sqrt(block.per_head_dim), **extra)


def _attention(block, q, k, v, pos) -> mx.array:
    """Attention over (B, L, 1, C) q/k/v, output (B, L, 1, C)."""
    b, heads, dh = q.shape[0], block.config.num_heads, block.per_head_dim

    def to_heads(t):
        return t.reshape(b, -1, heads, dh).transpose(0, 2, 1, 3)

    o = _sdpa(block, to_heads(q), to_heads(k), to_heads(v), pos)
    return o.transpose(0, 2, 1, 3).reshape(b, -1, 1, block.config.hidden_size)


def _joint_attention(block, first: tuple, second: tuple, pos) -> tuple[mx.array, mx.array]:
    """Joint attention of two streams' (q, k, v), each (B, L_i, 1, C), first's tokens first:
    each stream's part of the output as token-major rows (L_i * B, C). The tokens are joined
    token-major (`joint_tokens`), so the attention output, laid out as q is, splits into two
    contiguous blocks of rows that the o-projections read in place."""
    q, k, v = joint_tokens(first, second)  # (L, B, 1, C)
    n, b = q.shape[:2]
    heads, dh = block.config.num_heads, block.per_head_dim

    def to_heads(t):
        return t.reshape(n, b, heads, dh).transpose(1, 2, 0, 3)

    o = _sdpa(block, to_heads(q), to_heads(k), to_heads(v), pos)
    o = o.transpose(2, 0, 1, 3).reshape(n * b, block.config.hidden_size)
    l1 = first[0].shape[1]
    return o[: l1 * b], o[l1 * b :]


def joint_block(block, h, c, m_img, m_txt, pos=None):
    """`MultiModalTransformerBlock.__call__` on image tokens h and text tokens c with their
    modulation rows; returns (h, c), c None after a block that drops the text stream."""
    ib, tb = block.image_transformer_block, block.text_transformer_block
    qi, ki, vi, ni = _pre(ib, h, m_img)
    qt, kt, vt, nt = _pre(tb, c, m_txt)
    text_first = block.config.depth_unified > 0  # FLUX.1 joins text first, SD3 image first
    img, txt = (qi, ki, vi), (qt, kt, vt)
    if text_first:
        o_txt, o_img = _joint_attention(block, txt, img, pos)
    else:
        o_img, o_txt = _joint_attention(block, img, txt, pos)
    h = _post(ib, h, o_img, m_img, ni)
    c = None if tb.skip_post_sdpa else _post(tb, c, o_txt, m_txt, nt)
    return h, c


def unified_block(block, u, m, pos=None):
    """`UnifiedTransformerBlock.__call__` (its fc2 bias already zeroed by `pieces.prepare`)."""
    tb = block.transformer_block
    q, k, v, normed = _pre(tb, u, m)
    return _post(tb, u, _attention(block, q, k, v, pos), m, normed)


def final_layer(layer, h, m) -> mx.array:
    """`FinalLayer.__call__`."""
    return layer.linear(modulated_norm(h, m, 2, 0, 1, layer.norm_final))
