"""Model backends behind one small interface: encode prompts, build the schedule, hold the MMDiT.

`load(name, ...)` gives a `Model` holding DiffusionKit's own MMDiT and sampler, so that later
quantization phases can profile the very network that made the calibration data:

    from calibjob.models import load
    model = load("tiny")                      # or "sd3-medium", local_ckpt=...
    cs, cs_pooled = model.encode(["a red fox"])
    sigmas, timesteps = model.schedule(100)
"""

from __future__ import annotations

import gc
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

import calibjob.device as device  # OpenBLAS before MLX
import calibjob.diffusionkit_imports  # noqa: F401  (before DiffusionKit, here and in sd3/text/tiny)

with warnings.catch_warnings():  # where the real argmaxtools is installed: its imports' noise
    warnings.simplefilter("ignore")
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    import mlx.core as mx
    import numpy as np
    from diffusionkit.mlx import DiffusionPipeline
    from diffusionkit.mlx.mmdit import MMDiT
    from diffusionkit.mlx.sampler import ModelSamplingDiscreteFlow

from calibjob.config import TINY, canonical_model
from calibjob.errors import ModelUnavailable
from calibjob.models.text import TextEncoders

for _name in ("diffusionkit", "diffusionkit.mlx", "diffusionkit.mlx.mmdit", "argmaxtools"):
    logging.getLogger(_name).setLevel(logging.WARNING)
logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # its retries are not our message

__all__ = ["Model", "ModelUnavailable", "load"]


@dataclass
class Model:
    """A loaded backend: DiffusionKit's MMDiT and sampler, text encoders until freed."""

    name: str
    mmdit: MMDiT | None  # None: text encoders only (encode, free, then load the MMDiT)
    sampler: ModelSamplingDiscreteFlow
    text: TextEncoders | None
    dtype: str
    local_ckpt: str | None = None
    _decoder: Any = field(default=None, repr=False)

    @property
    def activation_dtype(self) -> mx.Dtype:
        return device.mx_dtype(self.dtype)

    def encode(self, prompts: list[str] | tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        """cs (P, 2, L, D), cs_pooled (P, 2, Dp) float32; index 1 of axis 1 is the empty prompt."""
        if self.text is None:
            raise RuntimeError("the text encoders were freed; load the model again to encode")
        return self.text.encode(prompts)

    def free_text_encoders(self) -> None:
        """Drop CLIP-L, CLIP-G and T5 (the real low-memory win: T5-XXL alone is ~9 GB fp16)."""
        self.text = None
        gc.collect()
        mx.clear_cache()

    def schedule(self, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """sigmas (S+1,) float32 as DiffusionKit's get_sigmas builds them (last is 0), and the
        model timesteps (S,) of the S model calls, in the activation dtype the model sees."""
        sigmas = DiffusionPipeline.get_sigmas(None, self.sampler, num_steps)
        timesteps = self.sampler.timestep(sigmas).astype(self.activation_dtype)[:num_steps]
        return np.array(sigmas), np.array(timesteps)

    def decoder(self):
        """The VAE decoder (built or loaded on first use)."""
        if self._decoder is None:
            if self.name == TINY:
                from calibjob.models.tiny import build_vae_decoder

                self._decoder = build_vae_decoder(mx.float32)
            else:
                from calibjob.models.sd3 import load_vae_decoder

                self._decoder = load_vae_decoder(self.name, mx.float32, self.local_ckpt)
        return self._decoder


def load(
    name: str = TINY,
    *,
    shift: float = 3.0,
    dtype: str = "auto",
    local_ckpt: str | None = None,
    text_encoders: bool = True,
    mmdit: bool = True,
) -> Model:
    """Load a backend by name ('tiny', 'sd3-medium' or a DiffusionKit SD3 key); `mmdit=False`
    loads the text encoders alone (the worker encodes, frees them, then loads the MMDiT)."""
    key = canonical_model(name)
    dtype = device.resolve_dtype(dtype)
    device.warn_reference_blas()
    mdt = device.mx_dtype(dtype)
    if key == TINY:
        from calibjob.models import tiny

        net = tiny.build_mmdit(mdt) if mmdit else None
        text = tiny.build_text_encoders(mx.float32) if text_encoders else None
    else:
        from calibjob.models import sd3

        text = sd3.load_text_encoders(key, mdt) if text_encoders else None
        net = sd3.load_mmdit(key, mdt, local_ckpt) if mmdit else None
    return Model(key, net, ModelSamplingDiscreteFlow(shift=shift), text, dtype, local_ckpt)
