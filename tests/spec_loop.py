# ruff: noqa: I001  (calibjob.device must load OpenBLAS before anything imports MLX)
"""The spec's loop, kept as the yardstick: one trajectory at a time through DiffusionKit's own
`CFGDenoiser` (SD3: CFG batch 2; FLUX.1-schnell: `cfg_weight=0`, one branch), modulation
cached and adaLN weights reloaded per trajectory; and, for FLUX.1-dev, whose guidance embedding
DiffusionKit never feeds, a plain loop that applies it by the model's formula.

Tests compare the engine against them; `make bench` times the first beside the engine. They
are plain on purpose: no batching, no reuse, exactly PHASE1's `x_cali_list.append(x)` before
each call.
"""

from __future__ import annotations

import calibjob.diffusionkit_imports  # noqa: F401  (before MLX and DiffusionKit)

# isort: split
import mlx.core as mx
import numpy as np
from diffusionkit.mlx import CFGDenoiser, DiffusionPipeline, to_d
from mlx.utils import tree_flatten

from calibjob.models import Model


class _Pipeline:
    """What CFGDenoiser needs of a DiffusionPipeline; `load_mmdit(only_modulation_dict=True)`
    hands back the adaLN weights kept in memory instead of reading the hub checkpoint."""

    def __init__(self, model: Model):
        self.mmdit = model.mmdit
        self.sampler = model.sampler
        self.activation_dtype = model.activation_dtype
        self._adaln = [(k, v) for k, v in tree_flatten(model.mmdit.parameters()) if "adaLN" in k]

    def load_mmdit(self, only_modulation_dict: bool = False):
        assert only_modulation_dict
        return self._adaln


def spec_trajectory(
    model: Model,
    cs: np.ndarray,
    cs_pooled: np.ndarray,
    *,
    trajectory: int,
    seed: int,
    num_steps: int,
    cfg_scale: float,
    latent_size: tuple[int, int],
    return_final: bool = False,
):
    """One trajectory, the spec's way. Returns xs (S, H, W, C) and ts (S,), and with
    return_final the denoised latent after the last step (H, W, C). `cs`, `cs_pooled` are the
    prompt's (branches, ...) rows; a FLUX.1 model runs with `cfg_scale` 0."""
    pipe = _Pipeline(model)
    denoiser = CFGDenoiser(pipe)
    sampler = model.sampler
    sigmas = DiffusionPipeline.get_sigmas(None, sampler, num_steps)
    timesteps = sampler.timestep(sigmas).astype(model.activation_dtype)
    denoiser.cache_modulation_params(mx.array(cs_pooled).astype(model.activation_dtype), timesteps)

    x = _start(sampler, sigmas, seed + trajectory, latent_size)

    conditioning = mx.array(cs).astype(model.activation_dtype)
    x_cali, t_cali = [], []
    for i in range(num_steps):
        x_cali.append(np.array(x[0]))  # collect BEFORE the model call
        t_cali.append(np.array(timesteps[i]))
        denoised = denoiser(
            x, timesteps[i], sigmas[i], conditioning=conditioning, cfg_weight=cfg_scale
        )
        d = to_d(x, sigmas[i], denoised)
        x = x + d * (sigmas[i + 1] - sigmas[i])
        mx.eval(x)

    denoiser.clear_cache()  # reloads the adaLN weights, as the spec does per trajectory
    model.mmdit.clear_modulation_params_cache()
    if hasattr(model.mmdit, "to_offload"):
        del model.mmdit.to_offload
    xs, ts = np.stack(x_cali).astype(np.float32), np.array(t_cali)
    return (xs, ts, np.array(x[0])) if return_final else (xs, ts)


def _start(sampler, sigmas, seed: int, latent_size: tuple[int, int]) -> mx.array:
    """DiffusionPipeline.denoise_latents' start: get_noise(seed) on the 0.0609-filled empty
    latent, scaled to sigma_0."""
    np.random.seed(seed)
    h, w = latent_size
    noise = mx.array(np.random.randn(1, 16, h, w)).transpose(0, 2, 3, 1)
    x_t = mx.ones([1, h, w, 16]) * 0.0609
    return sampler.noise_scaling(sigmas[0], noise, x_t)


def guided_trajectory(
    model: Model,
    cs: np.ndarray,
    cs_pooled: np.ndarray,
    *,
    trajectory: int,
    seed: int,
    num_steps: int,
    guidance: float,
    latent_size: tuple[int, int],
):
    """One trajectory of a guidance-embedded FLUX.1 model (dev), written from the model's
    definition: vec = vector_in(pooled) + time_in(emb(t)) + guidance_in(emb(g)), emb the
    sinusoidal embedding of 1000 x the value, and each module's adaLN_modulation(vec) its
    modulation. One branch, batch 1, DiffusionKit's sampler and schedule and Euler step.

    The modulation goes into the modules' own `_modulation_params` caches, keyed by the step's
    timestep, and the network is DiffusionKit's `MMDiT.__call__` with its guidance line off
    (it would embed the timestep as the guidance; the caches already hold the right vec)."""
    mmdit, sampler, act = model.mmdit, model.sampler, model.activation_dtype
    sigmas = DiffusionPipeline.get_sigmas(None, sampler, num_steps)
    timesteps = sampler.timestep(sigmas).astype(act)
    pooled = mx.array(cs_pooled).astype(act)  # (1, Dp)
    y = mmdit.y_embedder(pooled)[:, None, None, :]
    g = mmdit.guidance_in(
        mmdit.t_embedder.timestep_embedding(mx.array([guidance * 1000.0]).astype(act))[
            :, None, None, :
        ]
    )
    modules = [b.image_transformer_block for b in mmdit.multimodal_transformer_blocks]
    modules += [b.text_transformer_block for b in mmdit.multimodal_transformer_blocks]
    modules += [b.transformer_block for b in mmdit.unified_transformer_blocks]
    modules.append(mmdit.final_layer)
    for m in modules:
        m._modulation_params = {}
    for i in range(num_steps):
        t = timesteps[i]
        vec = y + mmdit.t_embedder(t[None]) + g
        for m in modules:
            m._modulation_params[t.item()] = m.adaLN_modulation(vec)

    x = _start(sampler, sigmas, seed + trajectory, latent_size)
    conditioning = mx.expand_dims(mx.array(cs).astype(act), 2)  # (1, L, 1, D)
    xs = []
    mmdit.config.guidance_embed = False
    try:
        for i in range(num_steps):
            xs.append(np.array(x[0]))
            x_in = x.astype(act)
            out = mmdit(
                latent_image_embeddings=x_in, token_level_text_embeddings=conditioning,
                timestep=mx.broadcast_to(timesteps[i], [1]),
            )  # fmt: skip
            denoised = sampler.calculate_denoised(sigmas[i], out, x_in)
            x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
            mx.eval(x)
    finally:
        mmdit.config.guidance_embed = True
        for m in modules:
            del m._modulation_params
    return np.stack(xs).astype(np.float32), np.array(timesteps[:num_steps])
