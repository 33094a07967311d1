"""The SD3 family (SD3 Medium, SD3.5 Large, and the built-in `tiny`): real weights through
DiffusionKit's own loaders (CLIP-L, CLIP-G, T5-XXL, MMDiT, VAE), CFG with the empty prompt as
the negative branch, DiffusionKit's `ModelSamplingDiscreteFlow` and `SD3LatentFormat`.

The hub may be unreachable, the repository gated, or the weights elsewhere on disk: every such
case becomes one ModelUnavailable error that says what to do.
"""

from __future__ import annotations

import mlx.core as mx
from diffusionkit.mlx import T5_MAX_LENGTH, SD3LatentFormat, model_io
from diffusionkit.mlx.mmdit import MMDiT
from diffusionkit.mlx.sampler import ModelSamplingDiscreteFlow

from calibjob.errors import ModelUnavailable
from calibjob.families import MODELS, ModelInfo
from calibjob.models.family import Family
from calibjob.models.hub import fetching as _fetching
from calibjob.models.text import TextEncoders, make_t5_safe

SD3_KEYS = tuple(m.key for m in MODELS if m.family == "sd3" and not m.builtin)


def _prepare(key: str, local_ckpt: str | None, dtype: mx.Dtype) -> None:
    if key not in SD3_KEYS:
        raise ModelUnavailable(
            f"unknown SD3 model {key!r}: choose one of {', '.join(SD3_KEYS)}"
        )
    model_io.LOCAl_SD3_CKPT = local_ckpt
    model_io._FLOAT16 = mx.float16 if dtype == mx.float16 else mx.bfloat16


def load_mmdit(key: str, dtype: mx.Dtype, local_ckpt: str | None = None) -> MMDiT:
    """The real MMDiT, with DiffusionKit's low-memory SDPA flag off (MLX >= 0.24.2 rejects it)."""
    _prepare(key, local_ckpt, dtype)
    float16 = dtype != mx.float32

    def load() -> MMDiT:
        try:
            return model_io.load_mmdit(
                key=key, float16=float16, model_key=key, low_memory_mode=False
            )
        except ValueError as e:
            if local_ckpt and "parameters" in str(e):  # the file's tensors do not fit
                from calibjob.checkpoints import mismatch

                raise ModelUnavailable(mismatch(local_ckpt, key, str(e))) from None
            raise

    return _fetching("MMDiT", key, load)


def load_text_encoders(key: str, dtype: mx.Dtype) -> TextEncoders:
    """CLIP-L, CLIP-G and T5-XXL with their tokenizers, T5 made safe for many prompts."""
    _prepare(key, None, dtype)
    float16 = dtype != mx.float32
    base = model_io._DEFAULT_MODEL
    clip_l = _fetching(
        "CLIP-L", base, model_io.load_text_encoder, base, float16, model_key="clip_l"
    )
    tok_l = _fetching(
        "CLIP-L tokenizer",
        base,
        model_io.load_tokenizer,
        base,
        merges_key="tokenizer_l_merges",
        vocab_key="tokenizer_l_vocab",
        pad_with_eos=True,
    )
    clip_g = _fetching(
        "CLIP-G", base, model_io.load_text_encoder, base, float16, model_key="clip_g"
    )
    tok_g = _fetching(
        "CLIP-G tokenizer",
        base,
        model_io.load_tokenizer,
        base,
        merges_key="tokenizer_g_merges",
        vocab_key="tokenizer_g_vocab",
        pad_with_eos=False,
    )
    t5 = _fetching("T5-XXL", base, model_io.load_t5_encoder, float16=float16, low_memory_mode=False)
    t5_tok = _fetching(
        "T5 tokenizer", base, model_io.load_t5_tokenizer, max_context_length=T5_MAX_LENGTH[key]
    )
    # T5's width (4096 for T5-XXL) is the token width the CLIP features are zero-padded to
    width = t5.wte.weight.shape[-1]
    return TextEncoders(clip_l, tok_l, clip_g, tok_g, make_t5_safe(t5), t5_tok, token_dim=width)


def load_vae_decoder(key: str, dtype: mx.Dtype, local_ckpt: str | None = None):
    _prepare(key, local_ckpt, dtype)
    return _fetching(
        "VAE decoder", key, model_io.load_vae_decoder, key=key, float16=dtype != mx.float32
    )


class SD3(Family):
    name = "sd3"
    latent_scale = SD3LatentFormat().scale_factor
    latent_shift = SD3LatentFormat().shift_factor

    def sampler(self, shift: float) -> ModelSamplingDiscreteFlow:
        return ModelSamplingDiscreteFlow(shift=shift)

    def load_text(self, info: ModelInfo, dtype: mx.Dtype) -> TextEncoders:
        return load_text_encoders(info.key, dtype)

    def load_mmdit(self, info: ModelInfo, dtype: mx.Dtype, local_ckpt: str | None) -> MMDiT:
        return load_mmdit(info.key, dtype, local_ckpt)

    def load_vae_decoder(self, info: ModelInfo, local_ckpt: str | None):
        return load_vae_decoder(info.key, mx.float32, local_ckpt)

    def build_text(self, info: ModelInfo) -> TextEncoders:
        from calibjob.models import tiny

        return tiny.build_text_encoders(mx.float32)

    def build_mmdit(self, info: ModelInfo, dtype: mx.Dtype) -> MMDiT:
        from calibjob.models import tiny

        return tiny.build_mmdit(dtype)


FAMILY = SD3()
