"""DiffusionKit's MMDiT forward taken apart, for the engine's segmented step and phase 2's taps.

`MMDiT.__call__` runs, in order: the context embedder, the patch embedder (plus the learned
position embedding, SD3) or the RoPE tables (FLUX.1), the joint blocks, the unified blocks
(FLUX.1: text and image tokens joined, text first), the final layer and the unpatchify. Here the
same ops in the same order are a head, one function per block and a tail, so that each can be
compiled on its own and the host can stay one segment ahead of the device. Every branch below
is one of DiffusionKit's own (`depth_unified`, `patchify_via_reshape`, `pos_embed_type`), read
from the MMDiT's config: the pieces know no model family.

Modulation: every module reading `_modulation_params` gets a `ModulationSlot` instead, and the
caller hands each block its parameters (computed once per prompt by `modulation_params`, as
`MMDiT.cache_modulation_params` would, plus the guidance embedding where the model has one).
The slots ignore the timestep key, so one evaluated key serves every step, also under compile.

Two things DiffusionKit's forward does that the pieces do differently, with the same numbers:
- a unified block sets its MLP's fc2 bias to `bias * 0.0` on every call (its o_proj carries the
  shared bias); under `mx.compile` that assignment would store a traced array in the model, so
  `prepare` does it once, eagerly, and the pieces run the block's own methods without it;
- a guidance-embedded model's forward feeds its guidance embedding the timestep (DiffusionKit
  0.5.2 never passes a guidance scale); `modulation_params` adds the guidance term the model
  defines, vec = vector_in(pooled) + time_in(emb(t)) + guidance_in(emb(g)), g embedded like
  the timestep (times 1000, in the timesteps' dtype).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from diffusionkit.mlx.config import PositionalEncoding
from diffusionkit.mlx.mmdit import RoPE, unpatchify

from calibjob.models import fused_block as fb
from calibjob.models.cuda_ops import prepare_gelu


class ModulationSlot:
    """Stands in for a module's `_modulation_params` dict during a model call: any timestep key
    gets `value`, the current step's parameters already repeated to the batch."""

    __slots__ = ("value",)

    def __init__(self):
        self.value: mx.array | None = None

    def __getitem__(self, key) -> mx.array:
        if self.value is None:
            raise RuntimeError("modulation slot read outside an engine step")
        return self.value


@contextlib.contextmanager
def slots_installed(modules: list, slots: list[ModulationSlot]) -> Iterator[None]:
    """Each module's `_modulation_params` is its slot while the block runs; whatever was
    there before comes back afterwards (the engine's units and phase 2's profiled forwards)."""
    saved = [m.__dict__.get("_modulation_params") for m in modules]
    for m, slot in zip(modules, slots, strict=True):
        m._modulation_params = slot
    try:
        yield
    finally:
        for m, old, slot in zip(modules, saved, slots, strict=True):
            slot.value = None
            if old is None:
                del m._modulation_params
            else:
                m._modulation_params = old


def modulated_modules(mmdit) -> list:
    """The modules whose forward reads `_modulation_params`, in a fixed order: (image, text)
    per joint block, one per unified block, then the final layer."""
    mods = []
    for block in mmdit.multimodal_transformer_blocks:
        mods += [block.image_transformer_block, block.text_transformer_block]
    for block in getattr(mmdit, "unified_transformer_blocks", None) or []:
        mods.append(block.transformer_block)
    mods.append(mmdit.final_layer)
    return mods


def prepare(mmdit) -> None:
    """Once per loaded MMDiT, eagerly: what DiffusionKit's unified blocks do to their fc2 bias
    on every call (see the module docstring). Idempotent: (b * 0) * 0 == b * 0, sign included."""
    for block in getattr(mmdit, "unified_transformer_blocks", None) or []:
        fc2 = block.transformer_block.mlp.fc2
        fc2.bias = fc2.bias * 0.0
        mx.eval(fc2.bias)


def guidance_term(mmdit, guidance: float | None, rows: int, dtype: mx.Dtype) -> mx.array | None:
    """guidance_in(emb(g)) for `rows` rows, (rows, 1, 1, hidden); None for a model without a
    guidance embedding. Refuses a missing scale where the model needs one."""
    if not getattr(mmdit.config, "guidance_embed", False):
        return None
    if guidance is None:
        raise ValueError("this model embeds a guidance scale: pass one")
    g = mx.array([guidance * 1000.0] * rows).astype(dtype)
    return mmdit.guidance_in(mmdit.t_embedder.timestep_embedding(g)[:, None, None, :])


def modulation_params(
    mmdit, cs_pooled: mx.array, timesteps: mx.array, guidance: float | None = None,
    *, batched: bool = False,
) -> list[list[mx.array]]:
    """Per step, per module (in `modulated_modules` order): the modulation parameters
    (rows, 1, 1, k*hidden) for pooled conditioning of `rows` rows, computed as
    `MMDiT.cache_modulation_params` does (plus the guidance term), unevaluated.

    `batched`: every step's rows through each module's adaLN product at once (one product per
    module, its weights read once, rather than one per module and step: ~0.17 s a prompt of
    SD3-2b's 100 steps on an H200). The same ops row by row, but whether a product's rows come
    out the same bits whatever their number is the BLAS's affair (OpenBLAS's differ for some
    widths), so the engine batches only a compiled step on a GPU, which the spec loop's bits
    do not bind."""
    modules = modulated_modules(mmdit)
    # each module's adaLN_modulation is Sequential(SiLU, Linear) on the same input: the SiLU is
    # computed once per step and shared (same function, same input, so the same numbers)
    silu = modules[0].adaLN_modulation.layers[0]
    y_embed = mmdit.y_embedder(cs_pooled)
    n = cs_pooled.shape[0]
    g_embed = guidance_term(mmdit, guidance, n, timesteps.dtype)
    acts = []
    for i in range(timesteps.shape[0]):
        timestep = timesteps[i]
        inputs = y_embed[:, None, None, :] + mmdit.t_embedder(mx.repeat(timestep[None], n, axis=0))
        if g_embed is not None:
            inputs = inputs + g_embed
        acts.append(silu(inputs))
    if batched:  # rows step-major: row i*n + j is step i, branch j
        act = mx.concatenate(acts, axis=0)
        per_module = [m.adaLN_modulation.layers[1](act) for m in modules]
        return [[p[i * n : (i + 1) * n] for p in per_module] for i in range(len(acts))]
    return [[m.adaLN_modulation.layers[1](act) for m in modules] for act in acts]


def positional_encodings(mmdit, text_len: int, latent_size: tuple[int, int]) -> mx.array | None:
    """The RoPE tables of a model with RoPE (FLUX.1) for this text length and latent size,
    evaluated; None for a model with learned position embeddings (SD3)."""
    if mmdit.config.pos_embed_type != PositionalEncoding.PreSDPARope:
        return None
    p = mmdit.config.patch_size
    rope = mmdit.pre_sdpa_rope
    # RoPE's own __call__ caches the tables on the module, where they count as a parameter: a
    # caller that saves and restores the MMDiT's parameters (DiffusionKit's modulation cache
    # dance) restores stale tables under a new resolution. Its methods, without the cache:
    positions = rope._get_positions((latent_size[0] // p, latent_size[1] // p), text_len)
    pe = mx.expand_dims(rope.rope(positions, rope.theta), axis=1)
    mx.eval(pe)
    return pe


@dataclass
class Pieces:
    """The forward for a batch of `rows` model rows, in pieces:

    - `head(x_in, cond) -> state`: x_in (rows, H, W, C) in the activation dtype, cond
      (rows, L, 1, D); state is (h, c), image then text tokens (after SD3's last joint
      block (h,): its text stream is dropped); h is `image_in(x_in)`, kept apart because c,
      `mmdit.context_embedder(cond)`, is the same at every step of a unit (the engine
      computes it once);
    - `blocks[i](*state, *mods, *extra) -> state`, taking the modulation parameters of the
      modules `block_modules[i]` (indices into `modulated_modules`) and `extra` (the RoPE
      tables where the model has them); after the first unified block the state is (u,);
    - `tail(*state, m_final) -> out` (rows, H, W, C), the MMDiT's output.

    `names[i]` are block i's layer names for phase 2 (`mm_00_img`, `mm_00_txt`, `uni_00`).
    """

    head: Callable
    image_in: Callable
    blocks: list[Callable]
    block_modules: list[tuple[int, ...]]
    names: list[tuple[str, ...]]
    tail: Callable
    extra: tuple


def forward_pieces(
    mmdit,
    slots: list[ModulationSlot],
    *,
    rows: int,
    batch: int,
    text_len: int,
    latent_size: tuple[int, int],
    fused: bool = False,
) -> Pieces:
    """The pieces for `rows` model rows, of which `batch` share one modulation row (the
    trajectories of one prompt: the modulation parameters, one row per branch, are repeated
    `batch` times). `slots` in `modulated_modules` order. `fused`: the blocks of
    `fused_block` (the same numbers off CUDA; single kernels for the token passes on CUDA)."""
    config = mmdit.config
    if fused:
        prepare_gelu()
    t_key = mx.array([0.0])  # the slots ignore the key; the blocks only call .item() on it
    mx.eval(t_key)
    rep = (lambda m: m) if batch == 1 else (lambda m: mx.repeat(m, batch, axis=0))
    pe = positional_encodings(mmdit, text_len, latent_size)
    extra = () if pe is None else (pe,)
    joint = mmdit.multimodal_transformer_blocks
    unified = getattr(mmdit, "unified_transformer_blocks", None) or []
    hidden = config.hidden_size

    def image_in(x_in):
        h = mmdit.x_embedder(x_in)
        if hasattr(mmdit, "x_pos_embedder"):
            h = h + mmdit.x_pos_embedder(x_in)
        return h.reshape(rows, -1, 1, hidden)

    def head(x_in, cond):
        return image_in(x_in), mmdit.context_embedder(cond)

    def joint_fn(i: int):
        block, s_img, s_txt = joint[i], slots[2 * i], slots[2 * i + 1]
        if fused:

            def g(h, c, m_img, m_txt, *pos):
                h, c = fb.joint_block(block, h, c, rep(m_img), rep(m_txt), pos[0] if pos else None)
                return (h,) if c is None else (h, c)

            return g

        def f(h, c, m_img, m_txt, *pos):
            s_img.value, s_txt.value = rep(m_img), rep(m_txt)
            h, c = block(h, c, t_key, positional_encodings=pos[0] if pos else None)
            s_img.value = s_txt.value = None
            return (h,) if c is None else (h, c)  # SD3's last block drops the text stream

        return f

    def unified_fn(i: int):
        block, slot = unified[i], slots[2 * len(joint) + i]
        tb = block.transformer_block
        scale = 1.0 / np.sqrt(block.per_head_dim)

        def f(*args):
            *state, m = args[: len(args) - len(extra)]
            u = mx.concatenate((state[1], state[0]), axis=1) if len(state) == 2 else state[0]
            if fused:
                return (fb.unified_block(block, u, rep(m), args[-1] if extra else None),)
            slot.value = rep(m)
            inter = tb.pre_sdpa(u, timestep=t_key)
            q, k = inter["q"], inter["k"]
            if extra:
                pos = args[-1]
                q, k = RoPE.apply(q, pos), RoPE.apply(k, pos)
            out = mx.fast.scaled_dot_product_attention(q, k, inter["v"], scale=scale)
            out = out.transpose(0, 2, 1, 3).reshape(rows, -1, 1, hidden)
            u = tb.post_sdpa(residual=u, sdpa_output=out, **inter)
            slot.value = None
            return (u,)

        return f

    def tail(*args):
        *state, m_final = args
        h = state[0][:, text_len:, ...] if unified else state[0]
        if fused:
            out = fb.final_layer(mmdit.final_layer, h, rep(m_final))
        else:
            slots[-1].value = rep(m_final)
            out = mmdit.final_layer(h, t_key)
            slots[-1].value = None
        hh, ww = latent_size
        if config.patchify_via_reshape:
            return mmdit.x_embedder.unpack(out, (hh, ww))
        return unpatchify(
            out, patch_size=config.patch_size, target_height=hh, target_width=ww,
            vae_latent_dim=config.vae_latent_dim,
        )  # fmt: skip

    n = len(joint)
    blocks = [joint_fn(i) for i in range(n)] + [unified_fn(i) for i in range(len(unified))]
    block_modules = [(2 * i, 2 * i + 1) for i in range(n)] + [
        (2 * n + i,) for i in range(len(unified))
    ]
    names = [(f"mm_{i:02d}_img", f"mm_{i:02d}_txt") for i in range(n)] + [
        (f"uni_{i:02d}",) for i in range(len(unified))
    ]
    return Pieces(head, image_in, blocks, block_modules, names, tail, extra)


def forward(
    mmdit, x_in: mx.array, cond: mx.array, pooled: mx.array, timestep: mx.array,
    guidance: float | None = None, fused: bool = False,
) -> mx.array:
    """One eager forward through the pieces, each row with its own pooled conditioning (rows
    of several prompts may share a call): x_in (R, H, W, C), cond (R, L, 1, D), pooled (R, Dp),
    timestep (1,) -> the MMDiT's output (R, H, W, C), unevaluated. `fused`: see
    `forward_pieces`."""
    modules = modulated_modules(mmdit)
    slots = [ModulationSlot() for _ in modules]
    mods = modulation_params(mmdit, pooled, timestep, guidance)[0]
    p = forward_pieces(
        mmdit, slots, rows=x_in.shape[0], batch=1, text_len=cond.shape[1],
        latent_size=(x_in.shape[1], x_in.shape[2]), fused=fused,
    )  # fmt: skip
    with slots_installed(modules, slots):
        state = p.head(x_in, cond)
        for f, idx in zip(p.blocks, p.block_modules, strict=True):
            state = f(*state, *(mods[j] for j in idx), *p.extra)
        return p.tail(*state, mods[-1])
