"""The built-in models: DiffusionKit's own classes at toy size, deterministic weights.

They need no download, so the dry run, the tests and CI run the real code paths (DiffusionKit's
MMDiT, CLIPTextModel, T5 encoder stack and VAEDecoder) on any machine. Latents have the real
shape (H x W x 16); the text side is toy-sized.

- `tiny` (SD3): L = 77 CLIP + 32 T5 tokens, D = 64, Dp = 64; 2 joint blocks, learned positions.
- `tiny-flux`, `tiny-flux-dev` (FLUX.1): L = 32 (dev: 64) T5 tokens, D = 64, Dp = 32 (CLIP-L's
  pooled output); 2 joint + 2 unified blocks with RoPE, patchify by reshape, qk-norm; dev adds
  the guidance embedding.
"""

from __future__ import annotations

import mlx.core as mx
from diffusionkit.mlx.clip import CLIPTextModel
from diffusionkit.mlx.config import CLIPTextModelConfig, MMDiTConfig, PositionalEncoding
from diffusionkit.mlx.mmdit import MMDiT
from diffusionkit.mlx.t5 import SD3T5Encoder
from diffusionkit.mlx.vae import VAEDecoder
from mlx.utils import tree_flatten, tree_map
from transformers import T5Config

from calibjob.models.text import TextEncoders, make_t5_safe

WEIGHT_SEED = 20241121  # fixed: the tiny model is the same network on every machine
VOCAB = 512
CLIP_LEN = 77
T5_LEN = 32
TOKEN_DIM = 64  # T5 width; CLIP-L (32) + CLIP-G (32) hidden states are zero-padded to it
POOLED_DIM = 64


class ByteTokenizer:
    """A deterministic stand-in for DiffusionKit's BPE tokenizers (no vocab download).

    UTF-8 bytes mapped into the vocabulary, CLIP-style BOS/EOS with EOS the largest id (CLIP
    pools at argmax of the ids), or T5-style (no BOS, EOS = 1, pad 0).
    """

    def __init__(self, max_length: int, clip_style: bool, pad_with_eos: bool = False):
        self.max_length = max_length
        self.clip_style = clip_style
        self.pad_with_eos = pad_with_eos
        self.pad_to_max_length = True
        self.eos_token = VOCAB - 1 if clip_style else 1

    def tokenize(self, text: str) -> list[int]:
        body = [2 + b % (VOCAB - 4) for b in text.encode("utf-8")]
        if self.clip_style:
            return [VOCAB - 2] + body[: self.max_length - 2] + [self.eos_token]
        return body[: self.max_length - 1] + [self.eos_token]


def mmdit_config(
    dtype: mx.Dtype,
    *,
    depth: int = 2,
    hidden: int = 64,
    heads: int = 2,
    mlp_ratio: int = 2,
    text_dim: int = TOKEN_DIM,
    pooled_dim: int = POOLED_DIM,
    max_latent_resolution: int = 128,
) -> MMDiTConfig:
    """The tiny model's MMDiT config; the sizes are parameters so benchmarks can grow it."""
    return MMDiTConfig(
        num_heads=heads,
        depth_multimodal=depth,
        hidden_size_override=hidden,
        mlp_ratio=mlp_ratio,
        vae_latent_dim=16,
        max_latent_resolution=max_latent_resolution,
        pooled_text_embed_dim=pooled_dim,
        token_level_text_embed_dim=text_dim,
        dtype=dtype,
        float16_dtype=mx.float16,
        low_memory_mode=False,  # DiffusionKit's low-memory SDPA flag fails on MLX >= 0.24.2
    )


def _seeded(build, seed: int, dtype: mx.Dtype):
    """Build a module with weights from a fixed seed, cast to dtype, evaluated."""
    mx.random.seed(seed)
    module = build()
    module.update(tree_map(lambda p: p.astype(dtype), module.parameters()))
    mx.eval(module.parameters())
    return module


def build_mmdit(dtype: mx.Dtype = mx.float32) -> MMDiT:
    return _seeded(lambda: MMDiT(mmdit_config(dtype)), WEIGHT_SEED, dtype)


def build_text_encoders(dtype: mx.Dtype = mx.float32) -> TextEncoders:
    clip_l = _seeded(
        lambda: CLIPTextModel(
            CLIPTextModelConfig(num_layers=2, model_dims=32, num_heads=2, vocab_size=VOCAB)
        ),
        WEIGHT_SEED + 1,
        dtype,
    )
    clip_g = _seeded(
        lambda: CLIPTextModel(
            CLIPTextModelConfig(
                num_layers=2, model_dims=32, num_heads=2, vocab_size=VOCAB, projection_dim=32
            )
        ),
        WEIGHT_SEED + 2,
        dtype,
    )
    t5 = _seeded(lambda: SD3T5Encoder(t5_config(), low_memory_mode=True), WEIGHT_SEED + 3, dtype)
    return TextEncoders(
        clip_l=clip_l,
        tokenizer_l=ByteTokenizer(CLIP_LEN, clip_style=True, pad_with_eos=True),
        clip_g=clip_g,
        tokenizer_g=ByteTokenizer(CLIP_LEN, clip_style=True),
        t5=make_t5_safe(t5),
        t5_tokenizer=ByteTokenizer(T5_LEN, clip_style=False),
        token_dim=TOKEN_DIM,
    )


def build_flux_mmdit(dtype: mx.Dtype = mx.float32, *, guidance_embed: bool = False,
                     adjust=lambda m: m) -> MMDiT:
    """FLUX.1's MMDiT at toy size: the schnell/dev configs' features, 64 wide. `adjust(mmdit)`
    runs before the weights are drawn (the FLUX family gives its key projections a bias)."""
    config = MMDiTConfig(
        num_heads=2,
        depth_multimodal=2,
        depth_unified=2,
        parallel_mlp_for_unified_blocks=True,
        hidden_size_override=64,
        mlp_ratio=2,
        patchify_via_reshape=True,
        pos_embed_type=PositionalEncoding.PreSDPARope,
        rope_axes_dim=(8, 12, 12),  # sums to the head width, 32, as (16, 56, 56) sums to 128
        pooled_text_embed_dim=32,  # the tiny CLIP-L's pooled width
        token_level_text_embed_dim=TOKEN_DIM,
        use_qk_norm=True,
        guidance_embed=guidance_embed,
        dtype=dtype,
        float16_dtype=mx.bfloat16,
        low_memory_mode=False,
    )
    seed = WEIGHT_SEED + (6 if guidance_embed else 5)
    return _seeded(lambda: adjust(MMDiT(config)), seed, dtype)


def build_flux_text_parts(t5_tokens: int = T5_LEN) -> tuple:
    """CLIP-L with its tokenizer, and T5 with a tokenizer of `t5_tokens` (the same weights as
    `tiny`'s), for the FLUX family to put together."""
    sd3 = build_text_encoders(mx.float32)
    return sd3.clip_l, sd3.tokenizer_l, sd3.t5, ByteTokenizer(t5_tokens, clip_style=False)


def t5_config() -> T5Config:
    return T5Config(
        vocab_size=VOCAB,
        d_model=TOKEN_DIM,
        d_kv=32,
        d_ff=128,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
    )


def build_vae_decoder(dtype: mx.Dtype = mx.float32) -> VAEDecoder:
    """DiffusionKit's SD3 VAEDecoder at toy width: 16 latent channels in, RGB out, 8x upsampling."""
    return _seeded(
        lambda: VAEDecoder(
            in_channels=16,
            out_channels=3,
            block_out_channels=[16, 16, 16, 16],
            layers_per_block=1,
            resnet_groups=8,
        ),
        WEIGHT_SEED + 4,
        dtype,
    )


def parameter_count(module) -> int:
    return sum(v.size for _, v in tree_flatten(module.parameters()))
