"""A model family's MLX side: what the jobs ask of a model, and nothing else knows.

`Family` is the interface the jobs and the engine use; `calibjob/models/sd3.py` and
`calibjob/models/flux.py` are its two implementations. What a family decides:

- loading: text encoders, MMDiT and VAE decoder, from the Hugging Face cache or `--local-ckpt`,
  or built at toy size with seeded weights (the built-in models);
- prompt encoding: per prompt `cs (branches, L, D)` and `cs_pooled (branches, Dp)`, the branch
  axis holding what the family's guidance uses (SD3: prompt and empty prompt; FLUX.1: prompt);
- the sampler, whose class fixes DiffusionKit's schedule (`DiffusionPipeline.get_sigmas`);
- the latents: channels, the empty latent's fill, and the latent format the VAE decodes from.

Guidance (CFG, none, embedded) is a fact of the model (`calibjob.families.ModelInfo`), and the
MMDiT's pieces for the segmented step follow DiffusionKit's own config (`models/pieces.py`).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from calibjob.families import ModelInfo


class Family:
    """The interface; see the module docstring. Subclasses set the class attributes."""

    name: str = ""
    latent_channels: int = 16
    # DiffusionPipeline.get_empty_latent's fill, which DiffusionKit 0.5.2 uses for both families
    empty_latent: float = 0.0609
    latent_scale: float = 1.0  # the latent format: decode (x / scale) + shift
    latent_shift: float = 0.0

    def sampler(self, shift: float) -> Any:
        raise NotImplementedError

    def load_text(self, info: ModelInfo, dtype: mx.Dtype) -> Any:
        """Text encoders with an `encode(prompts) -> (cs, cs_pooled)` (P, branches, ...)."""
        raise NotImplementedError

    def load_mmdit(self, info: ModelInfo, dtype: mx.Dtype, local_ckpt: str | None) -> Any:
        raise NotImplementedError

    def load_vae_decoder(self, info: ModelInfo, local_ckpt: str | None) -> Any:
        """The VAE decoder in float32 (previews are few)."""
        raise NotImplementedError

    def build_text(self, info: ModelInfo) -> Any:
        """A built-in model's text encoders (float32)."""
        raise NotImplementedError

    def build_mmdit(self, info: ModelInfo, dtype: mx.Dtype) -> Any:
        """A built-in model's MMDiT."""
        raise NotImplementedError

    def process_out(self, latents: mx.array) -> mx.array:
        """Model latents -> what the VAE decoder takes (DiffusionKit's LatentFormat)."""
        return latents / self.latent_scale + self.latent_shift
