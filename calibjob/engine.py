"""The batched Euler loop: one work unit (trajectories of one prompt) in, its recorded x_t out.

The arithmetic is DiffusionKit's `sample_euler` with `CFGDenoiser`, batched: B trajectories of
one prompt run as one CFG batch ordered [pos_1..pos_B, neg_1..neg_B]. `x` is recorded BEFORE
each model call, with the model timestep of that call. Modulation parameters are cached once per
prompt (at batch 2) and repeated to the unit's batch on read; the adaLN weights that caching
empties are kept in memory and put back when the prompt changes (no hub download).
"""

from __future__ import annotations

from collections.abc import Callable

import calibjob.device  # noqa: F401  (OpenBLAS before MLX)
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from calibjob.models import Model
from calibjob.selection import initial_noise

EMPTY_LATENT = 0.0609  # DiffusionPipeline.get_empty_latent's fill (SD3's latent shift)


class RepeatedParams(dict):
    """A modulation cache whose entries (batch 2: [pos, neg]) are repeated to the unit's CFG
    batch on read, so the cache is computed once per prompt whatever the unit size."""

    repeats = 1

    def __getitem__(self, key):
        v = super().__getitem__(key)
        return v if self.repeats == 1 else mx.repeat(v, self.repeats, axis=0)


class Engine:
    """Runs work units of one job on one loaded model."""

    def __init__(
        self,
        model: Model,
        *,
        num_steps: int,
        cfg_scale: float,
        latent_size: tuple[int, int],
        seed: int,
        compile: bool = False,
    ):
        self.model = model
        self.num_steps = num_steps
        self.cfg_scale = cfg_scale
        self.latent_size = tuple(latent_size)
        self.seed = seed
        self.compile = compile
        sigmas, timesteps = model.schedule(num_steps)
        self.sigmas_np, self.timesteps_np = sigmas, timesteps
        self.sigmas = mx.array(sigmas)
        self.timesteps = mx.array(timesteps)
        self._prompt: int | None = None
        self._kept: list | None = None
        self._caches: list[RepeatedParams] = []
        self._cond: mx.array | None = None
        self._cond_by_batch: dict[int, mx.array] = {}
        self._steps: dict[tuple[int, int], Callable] = {}

    # ---- per prompt --------------------------------------------------------------------

    def set_prompt(self, prompt: int, cs: np.ndarray, cs_pooled: np.ndarray) -> None:
        """Cache modulation parameters for a prompt (cs (2, L, D), cs_pooled (2, Dp))."""
        if self._prompt == prompt:
            return
        self.release_prompt()
        act = self.model.activation_dtype
        mmdit = self.model.mmdit
        self._kept = tree_flatten(mmdit.parameters())
        mmdit.cache_modulation_params(mx.array(cs_pooled).astype(act), self.timesteps)
        self._caches = []
        for _, module in mmdit.named_modules():
            cache = getattr(module, "_modulation_params", None)
            if cache is not None:
                module._modulation_params = RepeatedParams(cache)
                self._caches.append(module._modulation_params)
        self._cond = mx.array(cs).astype(act)
        self._cond_by_batch = {}
        self._steps = {}
        self._prompt = prompt

    def release_prompt(self) -> None:
        """Drop the modulation cache and put the adaLN weights back."""
        if self._prompt is None:
            return
        mmdit = self.model.mmdit
        mmdit.clear_modulation_params_cache()
        mmdit.load_weights(self._kept, strict=False)
        if hasattr(mmdit, "to_offload"):
            del mmdit.to_offload
        self._kept, self._caches, self._cond, self._prompt = None, [], None, None
        self._cond_by_batch, self._steps = {}, {}

    def _conditioning(self, batch: int) -> mx.array:
        """(2B, L, 1, D): [pos]*B + [neg]*B, built once per batch size, not per step."""
        if batch not in self._cond_by_batch:
            c = mx.expand_dims(mx.repeat(self._cond, batch, axis=0), 2)
            mx.eval(c)
            self._cond_by_batch[batch] = c
        return self._cond_by_batch[batch]

    # ---- per unit ----------------------------------------------------------------------

    def initial_latents(self, trajectories: list[int] | tuple[int, ...]) -> mx.array:
        """noise_scaling(sigma_0, noise, empty latent), as DiffusionPipeline.denoise_latents."""
        noise = mx.array(
            np.stack([initial_noise(self.seed, k, self.latent_size, 16) for k in trajectories])
        )
        x_t = mx.ones(noise.shape) * EMPTY_LATENT
        return self.model.sampler.noise_scaling(self.sigmas[0], noise, x_t)

    def _step_fn(self, i: int, batch: int) -> Callable[[mx.array], mx.array]:
        """One Euler step i for a CFG batch of `batch` trajectories."""
        key = (i, batch)
        if key in self._steps:
            return self._steps[key]
        mmdit, sampler = self.model.mmdit, self.model.sampler
        act, cfg = self.model.activation_dtype, self.cfg_scale
        cond = self._conditioning(batch)
        timestep = mx.broadcast_to(self.timesteps[i], [2 * batch])
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]

        def step(x: mx.array) -> mx.array:
            x_in = mx.concatenate([x, x], axis=0).astype(act)
            out = mmdit(
                latent_image_embeddings=x_in, token_level_text_embeddings=cond, timestep=timestep
            )
            denoised = sampler.calculate_denoised(sigma, out, x_in)
            pos, neg = denoised.split(2)
            denoised = neg + cfg * (pos - neg)
            d = (x - denoised) / sigma
            return x + d * (sigma_next - sigma)

        fn = mx.compile(step) if self.compile else step
        self._steps[key] = fn
        return fn

    def run_unit(
        self,
        prompt: int,
        trajectories: list[int] | tuple[int, ...],
        cs: np.ndarray,
        cs_pooled: np.ndarray,
        on_step: Callable[[int], None] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Denoise a unit. Returns xs (B, S, H, W, C) float32 (x before each call) and the final
        latents (B, H, W, C)."""
        self.set_prompt(prompt, cs, cs_pooled)
        batch = len(trajectories)
        for c in self._caches:
            c.repeats = batch
        x = self.initial_latents(trajectories)
        recorded = []
        for i in range(self.num_steps):
            recorded.append(x)
            x = self._step_fn(i, batch)(x)
            mx.eval(x)
            if on_step is not None:
                on_step(batch)
        xs = mx.stack(recorded, axis=1)
        mx.eval(xs)
        return np.array(xs, dtype=np.float32), np.array(x, dtype=np.float32)
