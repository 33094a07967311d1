"""The FLUX.1 family (schnell, dev, and the built-in `tiny-flux`, `tiny-flux-dev`), as
DiffusionKit 0.5.2's `FluxPipeline` runs it, with one correction.

- Prompts: the pooled conditioning is CLIP-L's pooled output of the prompt (no CLIP-G), the
  token-level conditioning T5 alone, its tokens zero-padded to the model's length (256 for
  schnell, 512 for dev); no negative prompt, so the branch axis holds the prompt alone.
- Sampler: `FluxSampler` (its `get_sigmas` takes S+1 points from 1 to 0, no trailing 0 added);
  `FluxLatentFormat` for decoding; the empty latent is DiffusionKit's 0.0609 fill.
- Loading: DiffusionKit's `load_flux` builds every FLUX.1 checkpoint with the schnell config,
  so FLUX.1-dev's guidance embedding is silently dropped; and `MMDiT.__call__` would feed it the
  timestep anyway. Here the MMDiT is built with DiffusionKit's `FLUX_DEV` config for dev, its
  checkpoint mapped by DiffusionKit's own `flux_state_dict_adjustments`, every tensor checked to
  fit (nothing missing, nothing left over), and the guidance term is added where calibjob
  computes the modulation inputs (`models/pieces.py`).
- The key bias: FLUX.1's fused qkv projections carry a bias for the keys too, and DiffusionKit's
  attention has no key bias (for SD3, without qk-norm, a key bias shifts every logit of a query
  by the same amount and softmax ignores it, so its SD3 mapping drops it). In FLUX.1 the keys
  are RMS-normalised and rotated after the projection, so the bias changes the attention: the
  MMDiT here gets key projections with a bias (`with_key_bias`), loaded from the checkpoint.
  (DiffusionKit's own `load_flux` on MLX >= 0.29 refuses the real files over these tensors;
  older MLX dropped them silently.)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from diffusionkit.mlx import FluxLatentFormat, model_io
from diffusionkit.mlx.config import FLUX_DEV, FLUX_SCHNELL
from diffusionkit.mlx.mmdit import MMDiT
from diffusionkit.mlx.sampler import FluxSampler
from mlx.utils import tree_flatten, tree_unflatten

from calibjob.errors import ModelUnavailable
from calibjob.families import ModelInfo
from calibjob.models.family import Family
from calibjob.models.hub import fetching
from calibjob.models.text import _tokenize, make_t5_safe


@dataclass
class FluxText:
    """CLIP-L and T5 with their tokenizers; `t5_tokens` is the model's T5 length."""

    clip_l: Any
    tokenizer_l: Any
    t5: Any
    t5_tokenizer: Any
    t5_tokens: int

    def encode_one(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """One prompt -> (cs (1, L, D), cs_pooled (1, Dp)) float32, as FluxPipeline.encode_text."""
        pooled = self.clip_l(_tokenize(self.tokenizer_l, text)[[0], :]).pooled_output
        mx.eval(pooled)
        tokens = _tokenize(self.t5_tokenizer, text)[[0], :]
        padded = mx.zeros((1, self.t5_tokens)).astype(tokens.dtype)
        padded[:, : tokens.shape[1]] = tokens
        cond = self.t5(padded)
        mx.eval(cond)
        return np.array(cond.astype(mx.float32)), np.array(pooled.astype(mx.float32))

    def encode(self, prompts: list[str] | tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        """All prompts -> cs (P, 1, L, D), cs_pooled (P, 1, Dp), one prompt at a time."""
        pairs = [self.encode_one(p) for p in prompts]
        return np.stack([c for c, _ in pairs]), np.stack([p for _, p in pairs])


def mmdit_config(info: ModelInfo):
    """DiffusionKit's FLUX.1 config for this variant (dev: with its guidance embedding), with
    DiffusionKit's low-memory SDPA flag off (MLX >= 0.24.2 rejects it)."""
    base = FLUX_DEV if info.guidance == "embedded" else FLUX_SCHNELL
    return dataclasses.replace(base, low_memory_mode=False)


def with_key_bias(mmdit: MMDiT) -> MMDiT:
    """Every attention's key projection with a bias, as FLUX.1's qkv has (module docstring):
    the same DiffusionKit forward, `attn.k_proj` now a biased `nn.Linear` of the same shape."""
    blocks = [(b.image_transformer_block, b.text_transformer_block)
              for b in mmdit.multimodal_transformer_blocks]  # fmt: skip
    streams = [tb for pair in blocks for tb in pair]
    streams += [b.transformer_block for b in getattr(mmdit, "unified_transformer_blocks", [])]
    for tb in streams:
        w = tb.attn.k_proj.weight
        tb.attn.k_proj = nn.Linear(w.shape[1], w.shape[0], bias=True)
    return mmdit


def checkpoint_weights(path: str, config, quantized: bool) -> dict[str, mx.array]:
    """A FLUX.1 checkpoint's tensors under the MMDiT's names (DiffusionKit's own mapping; the
    4-bit checkpoint is stored already mapped)."""
    weights = mx.load(path)
    if quantized:
        return weights
    return model_io.flux_state_dict_adjustments(
        weights, prefix="", hidden_size=config.hidden_size, mlp_ratio=config.mlp_ratio
    )


def fit_check(model: MMDiT, weights: dict[str, mx.array], path: str) -> None:
    """One line when the checkpoint's tensors do not fit the MMDiT (missing, left over, or of
    another shape): a dev checkpoint under the schnell config would silently lose its guidance
    embedding, the very thing this loader exists to keep."""
    want = dict(tree_flatten(model.parameters()))
    missing = sorted(set(want) - set(weights))
    extra = sorted(set(weights) - set(want))
    shapes = sorted(k for k in set(want) & set(weights) if want[k].shape != weights[k].shape)
    if missing or extra or shapes:
        parts = []
        found = (("missing", missing), ("left over", extra), ("of another shape", shapes))
        for what, keys in found:
            if keys:
                more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
                parts.append(f"{what}: {', '.join(keys[:3])}{more}")
        raise ModelUnavailable(
            f"{path} does not fit this FLUX.1 MMDiT ({'; '.join(parts)}); is it the checkpoint "
            f"of the --model-version asked for?"
        )


def load_mmdit(info: ModelInfo, dtype: mx.Dtype, local_ckpt: str | None = None) -> MMDiT:
    """The real FLUX.1 MMDiT from the hub cache or --local-ckpt, its weights in `dtype`."""
    model_io._FLOAT16 = mx.bfloat16
    config = mmdit_config(info)
    quantized = "4bit" in info.key

    def load() -> MMDiT:
        from huggingface_hub import hf_hub_download

        path = local_ckpt or hf_hub_download(info.key, model_io._MMDIT[info.key][info.key])
        model = MMDiT(config)
        if quantized:  # Argmax's 4-bit file is stored from DiffusionKit's model: no key bias
            nn.quantize(model)
        else:
            with_key_bias(model)
        weights = checkpoint_weights(path, config, quantized)
        weights = {k: v.astype(dtype) if v.dtype != mx.uint32 else v for k, v in weights.items()}
        fit_check(model, weights, path)
        model.update(tree_unflatten(list(weights.items())))
        return model

    return fetching("MMDiT", info.key, load)


def load_text_encoders(info: ModelInfo, dtype: mx.Dtype) -> FluxText:
    """CLIP-L and T5-XXL with their tokenizers (DiffusionKit's loaders), T5 made safe."""
    model_io._FLOAT16 = mx.bfloat16
    float16 = dtype != mx.float32
    base = model_io._DEFAULT_MODEL
    clip_l = fetching(
        "CLIP-L", base, model_io.load_text_encoder, base, float16, model_key="clip_l"
    )
    tok_l = fetching(
        "CLIP-L tokenizer", base, model_io.load_tokenizer, base,
        merges_key="tokenizer_l_merges", vocab_key="tokenizer_l_vocab", pad_with_eos=True,
    )  # fmt: skip
    t5 = fetching("T5-XXL", base, model_io.load_t5_encoder, float16=float16, low_memory_mode=False)
    t5_tok = fetching(
        "T5 tokenizer", base, model_io.load_t5_tokenizer, max_context_length=info.t5_tokens
    )
    return FluxText(clip_l, tok_l, make_t5_safe(t5), t5_tok, info.t5_tokens)


def load_vae_decoder(info: ModelInfo, local_ckpt: str | None = None):
    """FLUX.1's autoencoder (`ae.safetensors`, from the hub cache: --local-ckpt is the MMDiT's
    file, which holds no autoencoder, unlike SD3's)."""
    model_io.LOCAl_SD3_CKPT = None
    return fetching("VAE decoder", info.key, model_io.load_vae_decoder, key=info.key, float16=False)


class Flux(Family):
    name = "flux"
    latent_scale = FluxLatentFormat().scale_factor
    latent_shift = FluxLatentFormat().shift_factor

    def sampler(self, shift: float) -> FluxSampler:
        return FluxSampler(shift=shift)

    def load_text(self, info: ModelInfo, dtype: mx.Dtype) -> FluxText:
        return load_text_encoders(info, dtype)

    def load_mmdit(self, info: ModelInfo, dtype: mx.Dtype, local_ckpt: str | None) -> MMDiT:
        return load_mmdit(info, dtype, local_ckpt)

    def load_vae_decoder(self, info: ModelInfo, local_ckpt: str | None):
        return load_vae_decoder(info, local_ckpt)

    def build_text(self, info: ModelInfo) -> FluxText:
        from calibjob.models import tiny

        return FluxText(*tiny.build_flux_text_parts(info.t5_tokens), info.t5_tokens)

    def build_mmdit(self, info: ModelInfo, dtype: mx.Dtype) -> MMDiT:
        from calibjob.models import tiny

        embedded = info.guidance == "embedded"
        return tiny.build_flux_mmdit(dtype, guidance_embed=embedded, adjust=with_key_bias)


FAMILY = Flux()
