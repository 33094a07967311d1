# ruff: noqa: I001  (calibjob.device must load OpenBLAS before anything imports MLX)
"""The spec's loop, kept as the yardstick: one trajectory at a time through DiffusionKit's own
`CFGDenoiser` (CFG batch 2), modulation cached and adaLN weights reloaded per trajectory.

Tests compare the engine against it; `make bench` times it beside the engine. It is plain on
purpose: no batching, no reuse, exactly PHASE1's `x_cali_list.append(x)` before each call.
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
    return_final the denoised latent after the last step (H, W, C)."""
    pipe = _Pipeline(model)
    denoiser = CFGDenoiser(pipe)
    sampler = model.sampler
    sigmas = DiffusionPipeline.get_sigmas(None, sampler, num_steps)
    timesteps = sampler.timestep(sigmas).astype(model.activation_dtype)
    denoiser.cache_modulation_params(mx.array(cs_pooled).astype(model.activation_dtype), timesteps)

    np.random.seed(seed + trajectory)
    h, w = latent_size
    noise = mx.array(np.random.randn(1, 16, h, w)).transpose(0, 2, 3, 1)
    x_t = mx.ones([1, h, w, 16]) * 0.0609
    x = sampler.noise_scaling(sigmas[0], noise, x_t)

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
