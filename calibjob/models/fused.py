"""The joint block with each stream's q, k and v as one matrix product (a faster path for GPUs).

DiffusionKit's `MultiModalTransformerBlock` projects each stream's normalised tokens three
times (q, k, v: three (tokens x D) @ (D x D) products), then concatenates image and text tokens
three times and rearranges each of q, k and v for attention. Here each stream does one
(tokens x D) @ (D x 3D) product with the three weight matrices stacked, the two streams' outputs
are concatenated once, and q, k and v are views of that one array. The arithmetic is the
model's: every output element is the same dot product plus the same bias; only the matrix
library's tiling, and so the last bits of the rounding, may differ. So the path is taken where
the step is compiled for a GPU (`compile = "fused"`); the CPU keeps the generic path, equal to
the spec's loop to the bit.

The stacked weights are made once per model, and the q, k and v projections' weights become
views of them (same values, no second copy in memory), so the generic path, phase 2's taps and
previews see the model unchanged.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from diffusionkit.mlx.config import PositionalEncoding
from diffusionkit.mlx.mmdit import RoPE, affine_transform


def fusable(mmdit) -> bool:
    """Whether every joint block's projections are plain linear layers (a quantized model's
    are not: it keeps the generic path)."""
    for block in mmdit.multimodal_transformer_blocks:
        for tb in (block.image_transformer_block, block.text_transformer_block):
            a = tb.attn
            if not all(type(p) is nn.Linear for p in (a.q_proj, a.k_proj, a.v_proj)):
                return False
    return True


def stack_projections(mmdit) -> list[tuple[tuple[mx.array, mx.array], ...]]:
    """Per joint block, per stream (image, text): the (3D, D) stacked q/k/v weight and its
    (3D,) bias (zeros where a projection has none: x + 0 is x). Once per model: the separate
    weights become views of the stacked one (module docstring)."""
    out = []
    for block in mmdit.multimodal_transformer_blocks:
        pair = []
        for tb in (block.image_transformer_block, block.text_transformer_block):
            projs = (tb.attn.q_proj, tb.attn.k_proj, tb.attn.v_proj)
            if hasattr(tb, "_fused_qkv"):
                pair.append(tb._fused_qkv)
                continue
            w = mx.concatenate([p.weight for p in projs], axis=0)
            dtype = w.dtype
            b = mx.concatenate(
                [p.bias if "bias" in p else mx.zeros((p.weight.shape[0],), dtype) for p in projs]
            )
            mx.eval(w, b)
            d = projs[0].weight.shape[0]
            for j, p in enumerate(projs):
                p.weight = w[j * d : (j + 1) * d]
            mx.eval([p.weight for p in projs])
            tb._fused_qkv = (w, b)
            pair.append((w, b))
        out.append(tuple(pair))
    return out


def joint_block(block, stacked, slots, rep, extra_rope: bool):
    """`f(h, c, m_img, m_txt, *pos) -> (h, c)` (or `(h,)` after the last SD3 block): the same
    block as `MultiModalTransformerBlock.__call__`, q/k/v fused per stream."""
    config = block.config
    heads, hd, hidden = config.num_heads, block.per_head_dim, config.hidden_size
    text_first = config.depth_unified > 0
    rope = config.pos_embed_type == PositionalEncoding.PreSDPARope and extra_rope
    scale = 1.0 / np.sqrt(hd)
    streams = (block.image_transformer_block, block.text_transformer_block)
    s_img, s_txt = slots

    def pre(tb, x, m, w, b):
        mods = mx.split(m, tb.num_modulation_params, axis=-1)
        y = affine_transform(x, shift=mods[0], residual_scale=mods[1], norm_module=tb.norm1)
        inter = {"modulated_pre_attention": y}
        if len(mods) > 2:
            inter["post_attn_scale"] = mods[2]
        if len(mods) > 3:
            inter.update(
                post_norm2_shift=mods[3], post_norm2_residual_scale=mods[4],
                post_mlp_scale=mods[5],
            )  # fmt: skip
        return mx.addmm(b, y, w.T), inter

    def f(h, c, m_img, m_txt, *pos):
        rows, n_img, n_txt = h.shape[0], h.shape[1], c.shape[1]
        s_img.value, s_txt.value = rep(m_img), rep(m_txt)
        (w_i, b_i), (w_t, b_t) = stacked
        qkv_i, inter_i = pre(streams[0], h, s_img.value, w_i, b_i)
        qkv_t, inter_t = pre(streams[1], c, s_txt.value, w_t, b_t)
        both = (qkv_t, qkv_i) if text_first else (qkv_i, qkv_t)
        qkv = mx.concatenate(both, axis=1).reshape(rows, -1, 3, heads, hd)
        q, k, v = (qkv[:, :, j].transpose(0, 2, 1, 3) for j in range(3))
        if config.use_qk_norm:
            q, k = _qk_norm(streams, q, k, n_img, n_txt, text_first)
        if rope:
            q, k = RoPE.apply(q, pos[0]), RoPE.apply(k, pos[0])
        out = block.sdpa(q, k, v, scale=scale).transpose(0, 2, 1, 3).reshape(rows, -1, 1, hidden)
        if text_first:
            o_txt, o_img = out[:, :n_txt], out[:, n_txt:]
        else:
            o_img, o_txt = out[:, :n_img], out[:, -n_txt:]
        h = streams[0].post_sdpa(residual=h, sdpa_output=o_img, **inter_i)
        if streams[1].skip_post_sdpa:
            c = None
        else:
            c = streams[1].post_sdpa(residual=c, sdpa_output=o_txt, **inter_t)
        s_img.value = s_txt.value = None
        return (h,) if c is None else (h, c)

    return f


def _qk_norm(streams, q, k, n_img: int, n_txt: int, text_first: bool):
    """Each stream's own RMS norms on its tokens' q and k (B, H, L, d), as the generic block
    applies them before the streams are joined."""
    sizes = (n_txt, n_img) if text_first else (n_img, n_txt)
    order = (streams[1], streams[0]) if text_first else streams
    qs = mx.split(q, [sizes[0]], axis=2)
    ks = mx.split(k, [sizes[0]], axis=2)
    pairs = [tb.qk_norm(qq, kk) for tb, qq, kk in zip(order, qs, ks, strict=True)]
    return (
        mx.concatenate([p[0] for p in pairs], axis=2),
        mx.concatenate([p[1] for p in pairs], axis=2),
    )
