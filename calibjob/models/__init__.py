"""Models behind one small interface: encode prompts, build the schedule, hold the MMDiT.

`load(name, ...)` gives a `Model` holding DiffusionKit's own MMDiT and sampler, so that later
quantization phases can profile the very network that made the calibration data:

    from calibjob.models import load
    model = load("tiny")                      # or "sd3-medium", "flux-schnell", local_ckpt=...
    cs, cs_pooled = model.encode(["a red fox"])
    sigmas, timesteps = model.schedule(100)

A model's family (`models/sd3.py`, `models/flux.py`, behind `models/family.py`) decides how it
loads, encodes and samples; its facts (guidance, text length, footprint) are `model.info`.
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

from calibjob.errors import ModelUnavailable
from calibjob.families import TINY, ModelInfo, model_info
from calibjob.models import pieces
from calibjob.models.family import Family

for _name in ("diffusionkit", "diffusionkit.mlx", "diffusionkit.mlx.mmdit", "argmaxtools"):
    logging.getLogger(_name).setLevel(logging.WARNING)
logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # its retries are not our message

__all__ = ["Model", "ModelUnavailable", "load"]


def family_of(info: ModelInfo) -> Family:
    """The family implementation of a model (imported on first use)."""
    if info.family == "flux":
        from calibjob.models.flux import FAMILY
    else:
        from calibjob.models.sd3 import FAMILY
    return FAMILY


@dataclass
class Model:
    """A loaded model: DiffusionKit's MMDiT and sampler, text encoders until freed."""

    name: str  # the model's key
    mmdit: MMDiT | None  # None: text encoders only (encode, free, then load the MMDiT)
    sampler: Any
    text: Any | None
    dtype: str
    local_ckpt: str | None = None
    _decoder: Any = field(default=None, repr=False)

    @property
    def info(self) -> ModelInfo:
        return model_info(self.name)

    @property
    def family(self) -> Family:
        return family_of(self.info)

    @property
    def activation_dtype(self) -> mx.Dtype:
        return device.mx_dtype(self.dtype)

    def encode(self, prompts: list[str] | tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        """cs (P, branches, L, D), cs_pooled (P, branches, Dp) float32; under CFG (SD3) index 1
        of axis 1 is the empty prompt, otherwise (FLUX.1) the axis holds the prompt alone."""
        if self.text is None:
            raise RuntimeError("the text encoders were freed; load the model again to encode")
        return self.text.encode(prompts)

    def free_text_encoders(self) -> None:
        """Drop the text encoders (the real low-memory win: T5-XXL alone is ~9 GB fp16)."""
        self.text = None
        gc.collect()
        mx.clear_cache()

    def schedule(self, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """sigmas (S+1,) float32 as DiffusionKit's get_sigmas builds them (last is 0), and the
        model timesteps (S,) of the S model calls, in the activation dtype the model sees."""
        sigmas = DiffusionPipeline.get_sigmas(None, self.sampler, num_steps)
        timesteps = self.sampler.timestep(sigmas).astype(self.activation_dtype)[:num_steps]
        # numpy has no bfloat16: such timesteps go out as float32 holding the bfloat16 values
        if timesteps.dtype == mx.bfloat16:
            timesteps = timesteps.astype(mx.float32)
        return np.array(sigmas), np.array(timesteps)

    def decoder(self):
        """The VAE decoder (built or loaded on first use)."""
        if self._decoder is None:
            if self.info.builtin:
                from calibjob.models.tiny import build_vae_decoder

                self._decoder = build_vae_decoder(mx.float32)
            else:
                self._decoder = self.family.load_vae_decoder(self.info, self.local_ckpt)
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
    """Load a model by name ('tiny', 'tiny-flux', 'sd3-medium', 'flux-dev' or a DiffusionKit
    key); `mmdit=False` loads the text encoders alone (the worker encodes, frees them, then
    loads the MMDiT)."""
    info = model_info(name)
    family = family_of(info)
    dtype = device.resolve_dtype(dtype, info.key)
    device.warn_reference_blas()
    mdt = device.mx_dtype(dtype)
    if info.builtin:
        net = family.build_mmdit(info, mdt) if mmdit else None
        text = family.build_text(info) if text_encoders else None
    else:
        text = family.load_text(info, mdt) if text_encoders else None
        net = family.load_mmdit(info, mdt, local_ckpt) if mmdit else None
    if net is not None:
        pieces.prepare(net)
    return Model(info.key, net, family.sampler(shift), text, dtype, local_ckpt)
