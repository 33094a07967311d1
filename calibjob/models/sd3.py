"""Real SD3 weights through DiffusionKit's own loaders (CLIP-L, CLIP-G, T5-XXL, MMDiT, VAE).

The hub may be unreachable, the repository gated, or the weights elsewhere on disk: every such
case becomes one ModelUnavailable error that says what to do.
"""

from __future__ import annotations

import mlx.core as mx
from diffusionkit.mlx import T5_MAX_LENGTH, model_io
from diffusionkit.mlx.mmdit import MMDiT

from calibjob.config import SD3_KEYS
from calibjob.errors import ModelUnavailable
from calibjob.models.text import TextEncoders, make_t5_safe


def _fetching(what: str, repo: str, fn, /, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except ModelUnavailable:
        raise
    except Exception as e:  # hub errors come in many classes (offline, gated, 404, OSError)
        why = first_sentence(str(e))
        where = (
            "pass --local-ckpt PATH to a local MMDiT checkpoint (.safetensors)"
            if what in ("MMDiT", "VAE decoder")
            else "--local-ckpt replaces only the MMDiT checkpoint: the text encoders and "
            "tokenizers come from the Hugging Face cache (fill it on a machine with network and "
            "copy ~/.cache/huggingface, see the README)"
        )
        raise ModelUnavailable(
            f"cannot load the {what} of {repo} ({type(e).__name__}: {why}) Log in with "
            f"`huggingface-cli login` on a machine with network and accept the model's licence, "
            f"or {where}."
        ) from None


def first_sentence(text: str) -> str:
    """The first whole sentence of a (possibly multi-line) message, never cut mid-word."""
    flat = " ".join(text.split())
    if not flat:
        return ""
    for i, ch in enumerate(flat):
        if ch in ".!?" and (i + 1 == len(flat) or flat[i + 1] == " "):
            return flat[: i + 1]
    return flat + "."


def _prepare(key: str, local_ckpt: str | None, dtype: mx.Dtype) -> None:
    if key not in SD3_KEYS:
        raise ModelUnavailable(
            f"unknown model {key!r}: choose tiny or one of {', '.join(SD3_KEYS)}"
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
