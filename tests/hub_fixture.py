"""A Hugging Face hub cache of the real layout, with seeded random weights, written offline.

DiffusionKit 0.5.2 (and calibjob's loaders built on it) fetch, for an SD3 or FLUX.1 model key,
these files through `hf_hub_download` (and `transformers` for the T5 config and tokenizer):

- `argmaxinc/mlx-stable-diffusion-3-medium`: `sd3_medium.safetensors` (MMDiT as
  `model.diffusion_model.*` and VAE as `first_stage_model.*`, the original SD3 layout) and
  `config.json`;
- `argmaxinc/mlx-stable-diffusion-3.5-large`: `sd3.5_large.safetensors` (same layout, qk-norm)
  and `config.json`;
- `argmaxinc/mlx-FLUX.1-schnell`: `flux-schnell.safetensors` (the MMDiT alone, bfloat16, in
  Black Forest Labs' original layout: `img_in`, `txt_in`, `time_in`, `vector_in`,
  `double_blocks.N.{img,txt}_*`, `single_blocks.N.{linear1,linear2,norm,modulation}`,
  `final_layer`), `ae.safetensors` (the autoencoder as `encoder.*` / `decoder.*`, float32)
  and `config.json`;
- `argmaxinc/mlx-FLUX.1-dev`: `flux1-dev.safetensors` (the same layout plus the guidance
  embedding `guidance_in`), `ae.safetensors` and `config.json`;
- `argmaxinc/stable-diffusion` (shared by all): `clip_l/` and, for SD3 only, `clip_g/`
  (`config.json`, `model.fp16.safetensors` in the Hugging Face CLIP layout), `tokenizer_l/` and
  (SD3) `tokenizer_g/` (`vocab.json`, `merges.txt`), `t5/t5xxl.safetensors` (Hugging Face T5
  encoder layout);
- `google/t5-v1_1-xxl`: `config.json`, `tokenizer.json`, `tokenizer_config.json`,
  `special_tokens_map.json` (FLUX.1 pads T5 to 256 tokens for schnell, 512 for dev).

This module knows every tensor of those files (name, shape, dtype) as a table, so that

- a test can run the table, as lazy MLX arrays that are never evaluated, through DiffusionKit's
  own state-dict adjustments against the models' parameter trees (no gigabytes), and
- `python tests/hub_fixture.py DIR [--model KEY]...` writes the cache for real (full size: SD3
  Medium and the shared text encoders about 15.5 GB, SD3.5 Large another 16.5 GB, each FLUX.1
  key 23.8 GB + a 0.34 GB autoencoder beside CLIP-L and T5's 10.0 GB), so that the real
  `sd3-medium`, `flux-schnell` or `flux-dev` path (loaders, encoders, engine, merge, preview,
  profile) runs end to end with `HF_HUB_OFFLINE=1` and `HF_HUB_CACHE=DIR` on a machine that
  cannot reach the hub.

FLUX.1's attention has a key bias (its fused `qkv` and `linear1` biases hold one); DiffusionKit's
MMDiT has none, and its FLUX mapping, unlike its SD3 one, does not drop it: the table keeps it,
as the real files do (test_hub_fixture_flux.py says what that does to calibjob's loader).

The weights are random (seeded by the seed and each tensor's name, so a rerun writes the same
bytes), scaled by fan-in so that 24-38 blocks stay finite in float16. The tokenizers are small
but working: a byte-level BPE for CLIP with a few thousand merges learned from the prompt file,
and a Unigram T5 tokenizer (`tokenizer.json`) with the T5 special tokens. Their token ids are NOT
the real ones: the fixture checks that the path runs, never what the model makes of a prompt.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

SD3_MEDIUM = "argmaxinc/mlx-stable-diffusion-3-medium"
SD35_LARGE = "argmaxinc/mlx-stable-diffusion-3.5-large"
FLUX_SCHNELL = "argmaxinc/mlx-FLUX.1-schnell"
FLUX_DEV = "argmaxinc/mlx-FLUX.1-dev"
TEXT_REPO = "argmaxinc/stable-diffusion"
T5_REPO = "google/t5-v1_1-xxl"
SD3_KEYS = (SD3_MEDIUM, SD35_LARGE)
FLUX_KEYS = (FLUX_SCHNELL, FLUX_DEV)
CHECKPOINT = {
    SD3_MEDIUM: "sd3_medium.safetensors",
    SD35_LARGE: "sd3.5_large.safetensors",
    FLUX_SCHNELL: "flux-schnell.safetensors",
    FLUX_DEV: "flux1-dev.safetensors",
}
FLUX_AE = "ae.safetensors"  # FLUX.1's autoencoder, beside the MMDiT in each FLUX repository
NAMES = {
    "sd3-medium": SD3_MEDIUM,
    "sd3.5-large": SD35_LARGE,
    "flux-schnell": FLUX_SCHNELL,
    "flux-dev": FLUX_DEV,
}

CLIP_BOS, CLIP_EOS = 49406, 49407  # the real ids: CLIP pools at the argmax id, which must be EOS


@dataclass(frozen=True)
class Tensor:
    """One tensor of a checkpoint: its name, shape, safetensors dtype and how it is filled."""

    key: str
    shape: tuple[int, ...]
    dtype: str = "F16"  # or "BF16", "F32"
    init: str = "random"  # "random" (scaled by fan-in), "ones", "zeros"
    scale: float = 1.0  # multiplies the fan-in scale (adaLN weights are kept small)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * ITEMSIZE[self.dtype]


ITEMSIZE = {"F16": 2, "BF16": 2, "F32": 4}


# ---- sizes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class MMDiTSize:
    depth: int
    qk_norm: bool
    pos_embed: int = 192 * 192  # DiffusionKit's max_latent_resolution 192, squared
    text_dim: int = 4096
    pooled_dim: int = 2048
    latent: int = 16
    patch: int = 2
    mlp_ratio: int = 4

    @property
    def hidden(self) -> int:
        return 64 * self.depth  # SD3's convention (and DiffusionKit's)


@dataclass(frozen=True)
class FluxSize:
    """FLUX.1's MMDiT (Black Forest Labs' `Flux` with `FluxParams`): `joint` double-stream and
    `unified` single-stream blocks, fused qkv with bias, RMS qk-norm per head, the unified
    blocks' attention and MLP fused into `linear1`/`linear2`; dev adds `guidance_in`."""

    joint: int = 19
    unified: int = 38
    hidden: int = 3072
    heads: int = 24
    mlp_ratio: int = 4
    latent: int = 16
    patch: int = 2
    text_dim: int = 4096  # T5-XXL's width
    pooled_dim: int = 768  # CLIP-L's pooled (projected) width
    freq_dim: int = 256  # sinusoidal timestep (and guidance) features
    guidance: bool = False  # dev: the guidance embedding `guidance_in`
    axes_dim: tuple[int, ...] = (16, 56, 56)  # RoPE's axes; they sum to the head width

    @property
    def in_channels(self) -> int:
        return self.latent * self.patch * self.patch  # 2x2 latent patches packed: 64

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass(frozen=True)
class ClipSize:
    layers: int
    dim: int
    heads: int
    projection: int
    act: str
    vocab: int = 49408
    positions: int = 77


@dataclass(frozen=True)
class T5Size:
    layers: int = 24
    d_model: int = 4096
    d_kv: int = 64
    heads: int = 64
    d_ff: int = 10240
    vocab: int = 32128
    buckets: int = 32


@dataclass(frozen=True)
class Sizes:
    """Every dimension the fixture writes. FULL is the real models; `small()` is for tests."""

    mmdit: dict[str, MMDiTSize]
    clip_l: ClipSize
    clip_g: ClipSize
    t5: T5Size
    mmdit_dtype: dict[str, str] = field(default_factory=dict)
    flux: dict[str, FluxSize] = field(default_factory=dict)
    vae_ch: tuple[int, ...] = (128, 256, 512, 512)  # DiffusionKit's VAE configs' block widths
    flux_ae_dtype: str = "F32"  # Black Forest Labs published ae.safetensors in float32


FULL = Sizes(
    mmdit={SD3_MEDIUM: MMDiTSize(depth=24, qk_norm=False), SD35_LARGE: MMDiTSize(38, True)},
    clip_l=ClipSize(layers=12, dim=768, heads=12, projection=768, act="quick_gelu"),
    clip_g=ClipSize(layers=32, dim=1280, heads=20, projection=1280, act="gelu"),
    t5=T5Size(),
    # StabilityAI published SD3 Medium in float16 and SD3.5 Large in bfloat16; Black Forest
    # Labs both FLUX.1 transformers in bfloat16
    mmdit_dtype={SD3_MEDIUM: "F16", SD35_LARGE: "BF16", FLUX_SCHNELL: "BF16", FLUX_DEV: "BF16"},
    flux={FLUX_SCHNELL: FluxSize(), FLUX_DEV: FluxSize(guidance=True)},
)


def small() -> Sizes:
    """Every model at toy size with the real names (for a CPU test of the real load path; the
    MMDiT config must then be swapped in: `small_mmdit_config` into DiffusionKit for SD3,
    `small_flux_config` into calibjob's FLUX loader). The VAE stays full size: DiffusionKit
    builds it from its own fixed config."""
    clip_l = ClipSize(layers=2, dim=32, heads=2, projection=32, act="quick_gelu")
    clip_g = ClipSize(layers=2, dim=64, heads=2, projection=64, act="gelu")
    t5 = T5Size(layers=1, d_model=128, d_kv=8, heads=2, d_ff=64, vocab=4096, buckets=32)
    mm = MMDiTSize(depth=2, qk_norm=False, pos_embed=32 * 32, text_dim=128, pooled_dim=96)
    # FLUX: the text widths are the small encoders' (T5's d_model, CLIP-L's projection)
    fx = FluxSize(
        joint=2, unified=2, hidden=64, heads=2, text_dim=t5.d_model,
        pooled_dim=clip_l.projection, axes_dim=(8, 12, 12),
    )  # fmt: skip
    return replace(
        FULL,
        mmdit={SD3_MEDIUM: mm, SD35_LARGE: replace(mm, qk_norm=True)},
        clip_l=clip_l,
        clip_g=clip_g,
        t5=t5,
        flux={FLUX_SCHNELL: fx, FLUX_DEV: replace(fx, guidance=True)},
    )


def small_mmdit_config(key: str, dtype=None):
    """DiffusionKit's MMDiTConfig for `small()`'s MMDiT of `key`."""
    from diffusionkit.mlx.config import MMDiTConfig

    s = small().mmdit[key]
    kw = {} if dtype is None else {"dtype": dtype, "float16_dtype": dtype}
    return MMDiTConfig(
        depth_multimodal=s.depth,
        num_heads=s.depth,
        use_qk_norm=s.qk_norm,
        max_latent_resolution=int(round(s.pos_embed**0.5)),
        pooled_text_embed_dim=s.pooled_dim,
        token_level_text_embed_dim=s.text_dim,
        low_memory_mode=False,
        **kw,
    )


def small_flux_config(key: str, dtype=None):
    """DiffusionKit's FLUX.1 config of `key` (FLUX_SCHNELL, or FLUX_DEV with its guidance
    embedding) at `small()`'s sizes, every other feature kept (RoPE, qk-norm, packed patches,
    parallel MLP in the unified blocks)."""
    import dataclasses

    from diffusionkit.mlx.config import FLUX_DEV as DEV
    from diffusionkit.mlx.config import FLUX_SCHNELL as SCHNELL

    s = small().flux[key]
    kw = {} if dtype is None else {"dtype": dtype, "float16_dtype": dtype}
    return dataclasses.replace(
        DEV if s.guidance else SCHNELL,
        num_heads=s.heads,
        depth_multimodal=s.joint,
        depth_unified=s.unified,
        hidden_size_override=s.hidden,
        mlp_ratio=s.mlp_ratio,
        rope_axes_dim=s.axes_dim,
        pooled_text_embed_dim=s.pooled_dim,
        token_level_text_embed_dim=s.text_dim,
        low_memory_mode=False,
        **kw,
    )


# ---- the tables ----------------------------------------------------------------------------


def mmdit_tensors(s: MMDiTSize, dtype: str = "F16") -> list[Tensor]:
    """The MMDiT in the original SD3 layout (`model.diffusion_model.*`): fused qkv, `x_block`
    and `context_block`, the last context block pre-only (no projection, no MLP)."""
    h, p = s.hidden, "model.diffusion_model."
    out = [
        Tensor(p + "pos_embed", (1, s.pos_embed, h), dtype),
        Tensor(p + "x_embedder.proj.weight", (h, s.latent, s.patch, s.patch), dtype),
        Tensor(p + "x_embedder.proj.bias", (h,), dtype),
        Tensor(p + "context_embedder.weight", (h, s.text_dim), dtype),
        Tensor(p + "context_embedder.bias", (h,), dtype),
    ]
    for emb, fan_in in (("t_embedder", 256), ("y_embedder", s.pooled_dim)):
        out += [
            Tensor(f"{p}{emb}.mlp.0.weight", (h, fan_in), dtype),
            Tensor(f"{p}{emb}.mlp.0.bias", (h,), dtype),
            Tensor(f"{p}{emb}.mlp.2.weight", (h, h), dtype),
            Tensor(f"{p}{emb}.mlp.2.bias", (h,), dtype),
        ]
    for i in range(s.depth):
        for side in ("x_block", "context_block"):
            b = f"{p}joint_blocks.{i}.{side}."
            pre_only = side == "context_block" and i == s.depth - 1
            mods = 2 if pre_only else 6
            out += [
                Tensor(b + "attn.qkv.weight", (3 * h, h), dtype),
                Tensor(b + "attn.qkv.bias", (3 * h,), dtype),
                Tensor(b + "adaLN_modulation.1.weight", (mods * h, h), dtype, scale=0.1),
                Tensor(b + "adaLN_modulation.1.bias", (mods * h,), dtype, scale=0.1),
            ]
            if s.qk_norm:
                out += [
                    Tensor(b + "attn.ln_q.weight", (64,), dtype, "ones"),
                    Tensor(b + "attn.ln_k.weight", (64,), dtype, "ones"),
                ]
            if not pre_only:
                m = s.mlp_ratio * h
                out += [
                    Tensor(b + "attn.proj.weight", (h, h), dtype),
                    Tensor(b + "attn.proj.bias", (h,), dtype),
                    Tensor(b + "mlp.fc1.weight", (m, h), dtype),
                    Tensor(b + "mlp.fc1.bias", (m,), dtype),
                    Tensor(b + "mlp.fc2.weight", (h, m), dtype),
                    Tensor(b + "mlp.fc2.bias", (h,), dtype),
                ]
    out += [
        Tensor(p + "final_layer.linear.weight", (s.patch * s.patch * s.latent, h), dtype),
        Tensor(p + "final_layer.linear.bias", (s.patch * s.patch * s.latent,), dtype),
        Tensor(p + "final_layer.adaLN_modulation.1.weight", (2 * h, h), dtype, scale=0.1),
        Tensor(p + "final_layer.adaLN_modulation.1.bias", (2 * h,), dtype, scale=0.1),
    ]
    return out


def flux_tensors(s: FluxSize, dtype: str = "BF16") -> list[Tensor]:
    """FLUX.1's MMDiT in Black Forest Labs' original layout (no prefix), as
    `model_io.flux_state_dict_adjustments` takes it: `img_in` (packed 2x2 patches), `txt_in`,
    `time_in`/`vector_in` (and dev's `guidance_in`) as `in_layer`/`out_layer` MLPs;
    `double_blocks.N.{img,txt}_{mod.lin,attn.qkv,attn.norm,attn.proj,mlp.0,mlp.2}`;
    `single_blocks.N.{linear1,linear2,norm,modulation.lin}` (linear1 = q, k, v and the MLP's
    input, linear2 = the attention's and the MLP's outputs); `final_layer`."""
    h, m, hd = s.hidden, s.mlp_ratio * s.hidden, s.head_dim
    out = [
        Tensor("img_in.weight", (h, s.in_channels), dtype),
        Tensor("img_in.bias", (h,), dtype),
    ]
    mlps = [("time_in", s.freq_dim), ("vector_in", s.pooled_dim)]
    if s.guidance:
        mlps.append(("guidance_in", s.freq_dim))
    for emb, fan_in in mlps:
        out += [
            Tensor(f"{emb}.in_layer.weight", (h, fan_in), dtype),
            Tensor(f"{emb}.in_layer.bias", (h,), dtype),
            Tensor(f"{emb}.out_layer.weight", (h, h), dtype),
            Tensor(f"{emb}.out_layer.bias", (h,), dtype),
        ]
    out += [
        Tensor("txt_in.weight", (h, s.text_dim), dtype),
        Tensor("txt_in.bias", (h,), dtype),
    ]

    def qk_norm(b: str) -> list[Tensor]:
        return [
            Tensor(b + "norm.query_norm.scale", (hd,), dtype, "ones"),
            Tensor(b + "norm.key_norm.scale", (hd,), dtype, "ones"),
        ]

    for i in range(s.joint):
        for side in ("img", "txt"):
            b = f"double_blocks.{i}.{side}_"
            out += [
                Tensor(b + "mod.lin.weight", (6 * h, h), dtype, scale=0.1),
                Tensor(b + "mod.lin.bias", (6 * h,), dtype, scale=0.1),
                Tensor(b + "attn.qkv.weight", (3 * h, h), dtype),
                Tensor(b + "attn.qkv.bias", (3 * h,), dtype),
                *qk_norm(b + "attn."),
                Tensor(b + "attn.proj.weight", (h, h), dtype),
                Tensor(b + "attn.proj.bias", (h,), dtype),
                Tensor(b + "mlp.0.weight", (m, h), dtype),
                Tensor(b + "mlp.0.bias", (m,), dtype),
                Tensor(b + "mlp.2.weight", (h, m), dtype),
                Tensor(b + "mlp.2.bias", (h,), dtype),
            ]
    for i in range(s.unified):
        b = f"single_blocks.{i}."
        out += [
            Tensor(b + "linear1.weight", (3 * h + m, h), dtype),
            Tensor(b + "linear1.bias", (3 * h + m,), dtype),
            Tensor(b + "linear2.weight", (h, h + m), dtype),
            Tensor(b + "linear2.bias", (h,), dtype),
            *qk_norm(b),
            Tensor(b + "modulation.lin.weight", (3 * h, h), dtype, scale=0.1),
            Tensor(b + "modulation.lin.bias", (3 * h,), dtype, scale=0.1),
        ]
    p2 = s.patch * s.patch * s.latent
    out += [
        Tensor("final_layer.linear.weight", (p2, h), dtype),
        Tensor("final_layer.linear.bias", (p2,), dtype),
        Tensor("final_layer.adaLN_modulation.1.weight", (2 * h, h), dtype, scale=0.1),
        Tensor("final_layer.adaLN_modulation.1.bias", (2 * h,), dtype, scale=0.1),
    ]
    return out


def _resnet(b: str, cin: int, cout: int, dtype: str) -> list[Tensor]:
    out = [
        Tensor(b + "norm1.weight", (cin,), dtype, "ones"),
        Tensor(b + "norm1.bias", (cin,), dtype, "zeros"),
        Tensor(b + "conv1.weight", (cout, cin, 3, 3), dtype),
        Tensor(b + "conv1.bias", (cout,), dtype),
        Tensor(b + "norm2.weight", (cout,), dtype, "ones"),
        Tensor(b + "norm2.bias", (cout,), dtype, "zeros"),
        Tensor(b + "conv2.weight", (cout, cout, 3, 3), dtype),
        Tensor(b + "conv2.bias", (cout,), dtype),
    ]
    if cin != cout:
        out += [
            Tensor(b + "nin_shortcut.weight", (cout, cin, 1, 1), dtype),
            Tensor(b + "nin_shortcut.bias", (cout,), dtype),
        ]
    return out


def _mid(b: str, c: int, dtype: str) -> list[Tensor]:
    out = _resnet(b + "block_1.", c, c, dtype)
    out += [
        Tensor(b + "attn_1.norm.weight", (c,), dtype, "ones"),
        Tensor(b + "attn_1.norm.bias", (c,), dtype, "zeros"),
    ]
    for n in ("q", "k", "v", "proj_out"):
        out += [
            Tensor(f"{b}attn_1.{n}.weight", (c, c, 1, 1), dtype),
            Tensor(f"{b}attn_1.{n}.bias", (c,), dtype),
        ]
    return out + _resnet(b + "block_2.", c, c, dtype)


def vae_model(part: str):
    """DiffusionKit's VAE decoder or encoder (`part`) at its real size, as its loader builds it:
    what a checkpoint's VAE tensors must match."""
    from diffusionkit.mlx.config import VAEDecoderConfig, VAEEncoderConfig
    from diffusionkit.mlx.vae import VAEDecoder, VAEEncoder

    cls, cfg = (
        (VAEDecoder, VAEDecoderConfig()) if part == "decoder" else (VAEEncoder, VAEEncoderConfig())
    )
    return cls(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        resnet_groups=cfg.resnet_groups,
    )


def vae_tensors(
    dtype: str = "F16",
    ch=(128, 256, 512, 512),
    latent: int = 16,
    prefix: str = "first_stage_model.",
) -> list[Tensor]:
    """SD3's VAE in the LDM layout (`first_stage_model.{encoder,decoder}.*`, 1x1 convs for the
    mid attention): encoder 2 resnets per level, decoder 3, 16 latent channels. FLUX.1's
    autoencoder (`ae.safetensors`) is the same network with no prefix (`encoder.*`,
    `decoder.*`), in float32, and neither has quant convs."""
    e, d = prefix + "encoder.", prefix + "decoder."
    out = [
        Tensor(e + "conv_in.weight", (ch[0], 3, 3, 3), dtype),
        Tensor(e + "conv_in.bias", (ch[0],), dtype),
    ]
    cin = ch[0]
    for lvl, c in enumerate(ch):
        for j in range(2):
            out += _resnet(f"{e}down.{lvl}.block.{j}.", cin, c, dtype)
            cin = c
        if lvl < len(ch) - 1:
            out += [
                Tensor(f"{e}down.{lvl}.downsample.conv.weight", (c, c, 3, 3), dtype),
                Tensor(f"{e}down.{lvl}.downsample.conv.bias", (c,), dtype),
            ]
    out += _mid(e + "mid.", ch[-1], dtype)
    out += [
        Tensor(e + "norm_out.weight", (ch[-1],), dtype, "ones"),
        Tensor(e + "norm_out.bias", (ch[-1],), dtype, "zeros"),
        Tensor(e + "conv_out.weight", (2 * latent, ch[-1], 3, 3), dtype),
        Tensor(e + "conv_out.bias", (2 * latent,), dtype),
        Tensor(d + "conv_in.weight", (ch[-1], latent, 3, 3), dtype),
        Tensor(d + "conv_in.bias", (ch[-1],), dtype),
    ]
    out += _mid(d + "mid.", ch[-1], dtype)
    cin = ch[-1]
    for lvl in reversed(range(len(ch))):  # LDM: up.3 runs first (widest), up.0 last
        c = ch[lvl]
        for j in range(3):
            out += _resnet(f"{d}up.{lvl}.block.{j}.", cin, c, dtype)
            cin = c
        if lvl > 0:
            out += [
                Tensor(f"{d}up.{lvl}.upsample.conv.weight", (c, c, 3, 3), dtype),
                Tensor(f"{d}up.{lvl}.upsample.conv.bias", (c,), dtype),
            ]
    out += [
        Tensor(d + "norm_out.weight", (ch[0],), dtype, "ones"),
        Tensor(d + "norm_out.bias", (ch[0],), dtype, "zeros"),
        Tensor(d + "conv_out.weight", (3, ch[0], 3, 3), dtype),
        Tensor(d + "conv_out.bias", (3,), dtype),
    ]
    return out


def clip_tensors(s: ClipSize) -> list[Tensor]:
    """CLIPTextModelWithProjection, Hugging Face layout (`text_model.*`, `text_projection`)."""
    t = "text_model."
    out = [
        Tensor(t + "embeddings.token_embedding.weight", (s.vocab, s.dim)),
        Tensor(t + "embeddings.position_embedding.weight", (s.positions, s.dim)),
    ]
    for i in range(s.layers):
        b = f"{t}encoder.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out += [
                Tensor(f"{b}self_attn.{n}.weight", (s.dim, s.dim)),
                Tensor(f"{b}self_attn.{n}.bias", (s.dim,)),
            ]
        out += [
            Tensor(b + "layer_norm1.weight", (s.dim,), init="ones"),
            Tensor(b + "layer_norm1.bias", (s.dim,), init="zeros"),
            Tensor(b + "mlp.fc1.weight", (4 * s.dim, s.dim)),
            Tensor(b + "mlp.fc1.bias", (4 * s.dim,)),
            Tensor(b + "mlp.fc2.weight", (s.dim, 4 * s.dim)),
            Tensor(b + "mlp.fc2.bias", (s.dim,)),
            Tensor(b + "layer_norm2.weight", (s.dim,), init="ones"),
            Tensor(b + "layer_norm2.bias", (s.dim,), init="zeros"),
        ]
    out += [
        Tensor(t + "final_layer_norm.weight", (s.dim,), init="ones"),
        Tensor(t + "final_layer_norm.bias", (s.dim,), init="zeros"),
        Tensor("text_projection.weight", (s.projection, s.dim)),
    ]
    return out


def t5_tensors(s: T5Size) -> list[Tensor]:
    """T5 v1.1 encoder in the Hugging Face layout (`shared`, `encoder.block.N.layer.{0,1}`),
    relative attention bias in block 0 only, gated-GELU feed-forward (`wi_0`, `wi_1`, `wo`)."""
    inner = s.d_kv * s.heads
    out = [
        Tensor("shared.weight", (s.vocab, s.d_model)),
        Tensor("encoder.embed_tokens.weight", (s.vocab, s.d_model)),
    ]
    for i in range(s.layers):
        b = f"encoder.block.{i}.layer."
        out += [
            Tensor(b + "0.SelfAttention.q.weight", (inner, s.d_model)),
            Tensor(b + "0.SelfAttention.k.weight", (inner, s.d_model)),
            Tensor(b + "0.SelfAttention.v.weight", (inner, s.d_model)),
            Tensor(b + "0.SelfAttention.o.weight", (s.d_model, inner)),
        ]
        if i == 0:
            out.append(
                Tensor(b + "0.SelfAttention.relative_attention_bias.weight", (s.buckets, s.heads))
            )
        out += [
            Tensor(b + "0.layer_norm.weight", (s.d_model,), init="ones"),
            Tensor(b + "1.DenseReluDense.wi_0.weight", (s.d_ff, s.d_model)),
            Tensor(b + "1.DenseReluDense.wi_1.weight", (s.d_ff, s.d_model)),
            Tensor(b + "1.DenseReluDense.wo.weight", (s.d_model, s.d_ff)),
            Tensor(b + "1.layer_norm.weight", (s.d_model,), init="ones"),
        ]
    out.append(Tensor("encoder.final_layer_norm.weight", (s.d_model,), init="ones"))
    return out


# ---- configs and tokenizers ----------------------------------------------------------------


def clip_config(s: ClipSize) -> dict:
    return {
        "architectures": ["CLIPTextModelWithProjection"],
        "model_type": "clip_text_model",
        "hidden_size": s.dim,
        "intermediate_size": 4 * s.dim,
        "num_attention_heads": s.heads,
        "num_hidden_layers": s.layers,
        "max_position_embeddings": s.positions,
        "vocab_size": s.vocab,
        "projection_dim": s.projection,
        "hidden_act": s.act,
        "layer_norm_eps": 1e-5,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
        "torch_dtype": "float16",
    }


def t5_config(s: T5Size) -> dict:
    """google/t5-v1_1-xxl's config.json (its public values at full size)."""
    return {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "d_model": s.d_model,
        "d_ff": s.d_ff,
        "d_kv": s.d_kv,
        "num_heads": s.heads,
        "num_layers": s.layers,
        "num_decoder_layers": s.layers,
        "vocab_size": s.vocab,
        "relative_attention_num_buckets": s.buckets,
        "relative_attention_max_distance": 128,
        "feed_forward_proj": "gated-gelu",
        "dense_act_fn": "gelu_new",
        "is_gated_act": True,
        "layer_norm_epsilon": 1e-6,
        "dropout_rate": 0.1,
        "initializer_factor": 1.0,
        "is_encoder_decoder": True,
        "tie_word_embeddings": False,
        "decoder_start_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 0,
        "output_past": True,
    }


def flux_config_json(key: str, s: FluxSize) -> dict:
    """A FLUX.1 repository's config.json (DiffusionKit's `load_flux` fetches it and reads
    nothing from it): Black Forest Labs' `FluxParams` of the fixture's size."""
    return {
        "_class_name": "Flux",
        "model_key": key,
        "in_channels": s.in_channels,
        "vec_in_dim": s.pooled_dim,
        "context_in_dim": s.text_dim,
        "hidden_size": s.hidden,
        "mlp_ratio": float(s.mlp_ratio),
        "num_heads": s.heads,
        "depth": s.joint,
        "depth_single_blocks": s.unified,
        "axes_dim": list(s.axes_dim),
        "theta": 10000,
        "qkv_bias": True,
        "guidance_embed": s.guidance,
        "note": "calibjob hub fixture: random weights of the real layout",
    }


def mmdit_config_json(key: str, s: MMDiTSize) -> dict:
    return {
        "_class_name": "SD3Transformer2DModel",
        "model_key": key,
        "num_layers": s.depth,
        "attention_head_dim": 64,
        "num_attention_heads": s.depth,
        "joint_attention_dim": s.text_dim,
        "pooled_projection_dim": s.pooled_dim,
        "in_channels": s.latent,
        "out_channels": s.latent,
        "patch_size": s.patch,
        "pos_embed_max_size": int(round(s.pos_embed**0.5)),
        "qk_norm": "rms_norm" if s.qk_norm else None,
        "note": "calibjob hub fixture: random weights of the real layout",
    }


def _byte_chars() -> list[str]:
    """The 256 characters a byte-level BPE vocabulary starts from (printable Latin-1 as
    themselves, the other bytes shifted past 255), in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _words(text: str) -> Counter:
    import regex

    pat = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", regex.I)
    return Counter(regex.findall(pat, regex.sub(r"\s+", " ", text.lower())))


def learn_bpe(text: str, num_merges: int) -> list[tuple[str, str]]:
    """Byte-pair merges learned from `text` the CLIP way (words end in '</w>'), most frequent
    pair first, ties broken by the pair itself so that the result is deterministic."""
    vocab = {tuple(w[:-1]) + (w[-1] + "</w>",): n for w, n in _words(text).items()}
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter = Counter()
        for sym, n in vocab.items():
            for a, b in zip(sym, sym[1:], strict=False):
                pairs[(a, b)] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        new = {}
        for sym, n in vocab.items():
            out, i = [], 0
            while i < len(sym):
                if i + 1 < len(sym) and (sym[i], sym[i + 1]) == best:
                    out.append(sym[i] + sym[i + 1])
                    i += 2
                else:
                    out.append(sym[i])
                    i += 1
            new[tuple(out)] = n
        vocab = new
    return merges


def clip_tokenizer_files(corpus: str, num_merges: int = 2000) -> dict[str, str]:
    """vocab.json and merges.txt: every byte character alone and word-final, the merges'
    results, and the start/end tokens at CLIP's real ids (the end token must be the largest id:
    CLIP pools at the argmax)."""
    chars = _byte_chars()
    merges = learn_bpe(corpus, num_merges)
    tokens = chars + [c + "</w>" for c in chars]
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:
            tokens.append(a + b)
            seen.add(a + b)
    vocab = {t: i for i, t in enumerate(tokens)}
    vocab["<|startoftext|>"] = CLIP_BOS
    vocab["<|endoftext|>"] = CLIP_EOS
    merges_txt = "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n"
    return {"vocab.json": json.dumps(vocab, ensure_ascii=False), "merges.txt": merges_txt}


def t5_tokenizer_files(corpus: str, vocab_size: int) -> dict[str, str]:
    """A working T5 tokenizer (Unigram over '▁'-prefixed words and single characters, `</s>`
    appended, `<pad>`=0, `</s>`=1, `<unk>`=2, `<extra_id_N>` last), as `tokenizer.json` with
    its config files. Ids stay below `vocab_size` (the model's embedding rows)."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    words = sorted(_words(corpus))
    chars = sorted({c for w in words for c in w} | set("abcdefghijklmnopqrstuvwxyz0123456789"))
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -10.0) for c in chars] + [("▁" + c, -9.0) for c in chars]
    budget = vocab_size - 100 - len(pieces) - 28  # 100 extra ids; T5's 28 spare rows
    pieces += [("▁" + w, -5.0) for w in words if len(w) > 1][: max(0, budget)]
    extra = [f"<extra_id_{i}>" for i in range(99, -1, -1)]  # T5 numbers them from the end
    tok = Tokenizer(Unigram(pieces + [(e, 0.0) for e in extra], unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Replace(" {2,}", " "), normalizers.Strip(right=True)]
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    from tokenizers import AddedToken

    tok.add_special_tokens(
        [AddedToken(t, special=True) for t in ["<pad>", "</s>", "<unk>", *extra]]
    )
    special = {
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "additional_special_tokens": extra[::-1],
    }
    config = {
        "tokenizer_class": "T5Tokenizer",
        "model_max_length": 512,
        "extra_ids": 100,
        "legacy": False,
        **special,
    }
    return {
        "tokenizer.json": tok.to_str(),
        "tokenizer_config.json": json.dumps(config, indent=1),
        "special_tokens_map.json": json.dumps(special, indent=1),
    }


# ---- what goes where -----------------------------------------------------------------------


def _check_keys(keys: Iterable[str]) -> list[str]:
    keys = list(keys)
    unknown = [k for k in keys if k not in CHECKPOINT]
    if unknown:
        raise ValueError(f"no fixture for {unknown}; known: {sorted(CHECKPOINT)}")
    return keys


def checkpoint_tensors(key: str, sizes: Sizes = FULL) -> list[Tensor]:
    """The model key's checkpoint: SD3's holds MMDiT then VAE (both in the checkpoint's dtype);
    FLUX.1's the MMDiT alone (its autoencoder is `ae.safetensors`: `ae_tensors`)."""
    dt = sizes.mmdit_dtype.get(key, "F16")
    if key in FLUX_KEYS:
        return flux_tensors(sizes.flux[key], dt)
    return mmdit_tensors(sizes.mmdit[key], dt) + vae_tensors(dt, sizes.vae_ch)


def ae_tensors(sizes: Sizes = FULL) -> list[Tensor]:
    """FLUX.1's `ae.safetensors`: the VAE's encoder and decoder, no prefix, float32."""
    return vae_tensors(sizes.flux_ae_dtype, sizes.vae_ch, prefix="")


def weight_files(keys: Iterable[str], sizes: Sizes = FULL) -> dict[tuple[str, str], list[Tensor]]:
    """(repository, filename) -> tensors, for every safetensors file the keys need: each
    key's checkpoint (and a FLUX.1 key's `ae.safetensors`), CLIP-L and T5-XXL, and CLIP-G
    where an SD3 key asks for it (FLUX.1 pools CLIP-L alone)."""
    keys = _check_keys(keys)
    out = {}
    for k in keys:
        out[(k, CHECKPOINT[k])] = checkpoint_tensors(k, sizes)
        if k in FLUX_KEYS:
            out[(k, FLUX_AE)] = ae_tensors(sizes)
    out[(TEXT_REPO, "clip_l/model.fp16.safetensors")] = clip_tensors(sizes.clip_l)
    if any(k in SD3_KEYS for k in keys):
        out[(TEXT_REPO, "clip_g/model.fp16.safetensors")] = clip_tensors(sizes.clip_g)
    out[(TEXT_REPO, "t5/t5xxl.safetensors")] = t5_tensors(sizes.t5)
    return out


def text_files(keys: Iterable[str], sizes: Sizes = FULL, corpus: str = "") -> dict:
    """(repository, filename) -> text, for every config and tokenizer file."""
    keys = _check_keys(keys)
    out = {}
    for k in keys:
        if k in FLUX_KEYS:
            cfg = flux_config_json(k, sizes.flux[k])
        else:
            cfg = mmdit_config_json(k, sizes.mmdit[k])
        out[(k, "config.json")] = json.dumps(cfg, indent=1)
    sides = ("l", "g") if any(k in SD3_KEYS for k in keys) else ("l",)
    for side in sides:
        size = sizes.clip_l if side == "l" else sizes.clip_g
        out[(TEXT_REPO, f"clip_{side}/config.json")] = json.dumps(clip_config(size), indent=1)
    clip_tok = clip_tokenizer_files(corpus or DEFAULT_CORPUS)
    for side in sides:
        for name, text in clip_tok.items():
            out[(TEXT_REPO, f"tokenizer_{side}/{name}")] = text
    out[(T5_REPO, "config.json")] = json.dumps(t5_config(sizes.t5), indent=1)
    for name, text in t5_tokenizer_files(corpus or DEFAULT_CORPUS, sizes.t5.vocab).items():
        out[(T5_REPO, name)] = text
    return out


DEFAULT_CORPUS = (
    "a photo of an astronaut riding a horse on the moon, the red fox in the snow at dawn, "
    "a city street at night with neon lights and rain, a bowl of fruit on a wooden table"
)


def lazy_state_dict(tensors: list[Tensor]) -> dict:
    """name -> an MLX array of the tensor's shape and dtype, never evaluated (no memory)."""
    import mlx.core as mx

    dt = {"F16": mx.float16, "BF16": mx.bfloat16, "F32": mx.float32}
    return {t.key: mx.zeros(t.shape, dtype=dt[t.dtype]) for t in tensors}


# ---- writing -------------------------------------------------------------------------------


def _fan_in(t: Tensor) -> int:
    if len(t.shape) == 1:
        return t.shape[0]
    if "embed" in t.key or t.key.endswith("shared.weight") or "relative_attention_bias" in t.key:
        return t.shape[-1]  # a table: each row is one vector
    return int(np.prod(t.shape[1:]))


def tensor_bits(t: Tensor, seed: int) -> np.ndarray:
    """The tensor's 16-bit words: random sign and mantissa, one exponent per tensor chosen so
    that magnitudes are about scale/sqrt(fan_in) (uniform in [m, 2m)); seeded by the seed and
    the tensor's name alone. Drawn as bits: ten times faster than normal floats."""
    n = int(np.prod(t.shape, dtype=np.int64))
    one = {"F16": 0x3C00, "BF16": 0x3F80}[t.dtype]
    if t.init == "ones":
        return np.full(n, one, dtype=np.uint16)
    if t.init == "zeros":
        return np.zeros(n, dtype=np.uint16)
    target = t.scale / np.sqrt(_fan_in(t)) / 1.5
    e = int(np.floor(np.log2(target)))
    rng = np.random.default_rng([seed, zlib.crc32(t.key.encode())])
    r = rng.integers(0, 1 << 16, size=n, dtype=np.uint16)
    if t.dtype == "F16":
        return (r & np.uint16(0x83FF)) | np.uint16((max(e, -14) + 15) << 10)
    return (r & np.uint16(0x807F)) | np.uint16((e + 127) << 7)


def tensor_data(t: Tensor, seed: int) -> np.ndarray:
    """The tensor's data as written (little-endian): its 16-bit words, or for float32 the
    float16 draw of the same name widened (exact, and as fast)."""
    if t.dtype == "F32":
        half = tensor_bits(replace(t, dtype="F16"), seed).view(np.float16)
        return half.astype("<f4")
    return tensor_bits(t, seed).astype("<u2", copy=False)


def write_safetensors(path: Path, tensors: list[Tensor], seed: int, threads: int) -> int:
    """Stream a safetensors file (8-byte header length, JSON header, raw little-endian data),
    tensors drawn on `threads` threads, written in order; returns the bytes written."""
    header, off = {}, 0
    for t in tensors:
        header[t.key] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [off, off + t.nbytes],
        }
        off += t.nbytes
    header["__metadata__"] = {"format": "pt", "calibjob": "hub fixture, random weights"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f, ThreadPoolExecutor(max(1, threads)) as pool:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for data in _ordered(pool, tensors, seed, window=2 * max(1, threads)):
            f.write(data.tobytes())
    os.replace(tmp, path)
    return 8 + len(raw) + off


def _ordered(pool, tensors, seed, window) -> Iterator[np.ndarray]:
    pending = []
    for t in tensors:
        pending.append(pool.submit(tensor_data, t, seed))
        if len(pending) >= window:
            yield pending.pop(0).result()
    for fut in pending:
        yield fut.result()


def _commit(repo: str) -> str:
    return hashlib.sha1(f"calibjob-hub-fixture:{repo}".encode()).hexdigest()


def snapshot_dir(cache: Path, repo: str) -> Path:
    """Where huggingface_hub looks for `repo`'s files at revision main (refs/main -> commit)."""
    return Path(cache) / f"models--{repo.replace('/', '--')}" / "snapshots" / _commit(repo)


def write_cache(
    cache: Path,
    keys: Iterable[str],
    *,
    sizes: Sizes = FULL,
    seed: int = 0,
    corpus: str = "",
    threads: int | None = None,
    progress=print,
) -> dict[str, int]:
    """Write the hub cache for `keys` under `cache` (HF_HUB_CACHE). Files already there with
    the right size are kept (the weights are a function of the seed and names). Returns bytes
    per file."""
    keys = list(keys)
    threads = threads or os.cpu_count() or 1
    cache = Path(cache)
    repos = set(keys) | {TEXT_REPO, T5_REPO}
    for repo in repos:
        refs = cache / f"models--{repo.replace('/', '--')}" / "refs"
        refs.mkdir(parents=True, exist_ok=True)
        (refs / "main").write_text(_commit(repo))
    written = {}
    for (repo, name), text in text_files(keys, sizes, corpus).items():
        p = snapshot_dir(cache, repo) / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
        written[f"{repo}/{name}"] = p.stat().st_size
    for (repo, name), tensors in weight_files(keys, sizes).items():
        p = snapshot_dir(cache, repo) / name
        size = 8 + sum(t.nbytes for t in tensors)
        if p.exists() and p.stat().st_size > size:  # header + data: a finished file is larger
            written[f"{repo}/{name}"] = p.stat().st_size
            continue
        t0 = time.perf_counter()
        written[f"{repo}/{name}"] = write_safetensors(p, tensors, seed, threads)
        dt = time.perf_counter() - t0
        progress(f"{repo}/{name}: {written[f'{repo}/{name}'] / 1e9:.2f} GB in {dt:.1f} s")
    return written


def table(keys: Iterable[str], sizes: Sizes = FULL) -> list[tuple[str, str, int, int]]:
    """(repository/file, tensor count, parameters, bytes) per weight file, no data drawn."""
    out = []
    for (repo, name), ts in weight_files(keys, sizes).items():
        n = sum(int(np.prod(t.shape, dtype=np.int64)) for t in ts)
        out.append((f"{repo}/{name}", len(ts), n, sum(t.nbytes for t in ts)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python tests/hub_fixture.py",
        description="Write (or list) a Hugging Face hub cache of the files DiffusionKit fetches "
        "for SD3 and FLUX.1 with seeded random weights of the real shapes. Point HF_HUB_CACHE "
        "at DIR and set HF_HUB_OFFLINE=1 to run calibjob's real sd3-medium, sd3.5-large, "
        "flux-schnell or flux-dev path on it.",
    )
    ap.add_argument(
        "cache", type=Path, nargs="?", help="the cache directory to write (HF_HUB_CACHE)"
    )
    ap.add_argument(
        "--model",
        action="append",
        choices=sorted(NAMES),
        help="model(s) to write, repeatable (default: sd3-medium); the text encoders are "
        "shared (CLIP-G only for SD3), each FLUX.1 key brings its ae.safetensors",
    )
    ap.add_argument(
        "--table", action="store_true", help="list files, tensors and sizes; write nothing"
    )
    ap.add_argument(
        "--small", action="store_true", help="toy sizes with the real names (tests only)"
    )
    ap.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    ap.add_argument(
        "--corpus",
        type=Path,
        help="text the tokenizers learn their merges from "
        "(default: a built-in sentence); e.g. prompts/sample_prompts.txt",
    )
    ap.add_argument("--threads", type=int, default=0, help="threads drawing weights (0: all cores)")
    args = ap.parse_args(argv)
    keys = [NAMES[m] for m in (args.model or ["sd3-medium"])]
    sizes = small() if args.small else FULL
    if args.table:
        total = 0
        for f, n, params, nbytes in table(keys, sizes):
            print(f"{f:64s} {n:6d} tensors {params / 1e9:7.3f} B params {nbytes / 1e9:7.2f} GB")
            total += nbytes
        print(f"{'total':64s} {'':21s} {total / 1e9:7.2f} GB")
        return 0
    if args.cache is None:
        print("hub_fixture: give the cache directory to write (or --table)", file=sys.stderr)
        return 2
    corpus = args.corpus.read_text(encoding="utf-8") if args.corpus else ""
    t0 = time.perf_counter()
    out = write_cache(
        args.cache, keys, sizes=sizes, seed=args.seed, corpus=corpus, threads=args.threads or None
    )
    gb, dt = sum(out.values()) / 1e9, time.perf_counter() - t0
    print(f"wrote {gb:.2f} GB in {dt:.1f} s to {args.cache}")
    print(f"use it with: HF_HUB_OFFLINE=1 HF_HUB_CACHE={args.cache}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
