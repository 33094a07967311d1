"""The batched Euler loop: one work unit (trajectories of one prompt) in, its recorded x_t out.

The arithmetic is DiffusionKit's `sample_euler` with `CFGDenoiser`, batched: B trajectories of
one prompt run as one batch of B x branches rows, ordered [pos_1..pos_B, neg_1..neg_B] under CFG
(SD3), [pos_1..pos_B] without it (FLUX.1, whose guidance, where it has one, is embedded in the
modulation). `x` is recorded BEFORE each model call, with the model timestep of that call.

Modulation parameters: once per prompt the engine computes, for every step, what
`MMDiT.cache_modulation_params` would put in each module's `_modulation_params` (the same ops on
the same shapes, so the same numbers; plus the guidance term of a guidance-embedded model),
evaluated in one go rather than one sync per module and step, and without emptying the adaLN
weights, so nothing has to be reloaded when the prompt changes (with a compiled step on a GPU,
all steps' rows go through each module's product at once: `modulation_params(batched=True)`;
on CPU a product's bits can depend on its number of rows, so CPU keeps one product a step).
During a model call each module's `_modulation_params` is a `ModulationSlot` that hands back,
whatever timestep it is asked for, the step's parameters repeated to the batch. The
parameters are therefore plain inputs of the step function: one `mx.compile` per batch size
serves every step and every prompt, and nothing captured at trace time can go stale. The MMDiT
runs in pieces (`models/pieces.py`): a head, one function per block, a tail.

`compile=True` (the CLI's `--compile`; None = on a GPU only, see device.resolve_compile) fuses
the elementwise work around the matmuls. Measured (2026-11, mlx 0.32.4): on CPU it changes
neither speed nor a bit; on an H100 (SD3-2b shapes, fp16, batch 13) a step is 6% faster, MLX
first JIT-compiles ~10 fused CUDA kernels (~40 s once per machine, cached under
MLX_PTX_CACHE_DIR, default /tmp/mlx/VERSION/ptx), and results are deterministic but differ from
the spec loop at fp16 rounding (max 2.4e-3 on |x| <= 5 after 10 steps), where the eager step is
bit-identical to it.

`fused=True` (the job's `compile = "fused"`, the default on an NVIDIA GPU) runs the blocks of
`models/fused_block.py`: the same arithmetic, with the token passes MLX cannot fuse (modulated
layer norms, the residual before the second norm, the joined q/k/v) as single CUDA kernels;
measured on an H200 (SD3-2b shapes, fp16, batch 13) 5.69 against 6.36 ms per trajectory-step
compiled, and the same distance from the spec loop after 100 steps (1.87e-3 against 1.88e-3).
Off CUDA it equals the generic step to the bit.

The loop keeps one step queued ahead (`mx.async_eval`): the host builds and launches step i+1
while the device computes step i.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from calibjob import device
from calibjob.config import step_compiled
from calibjob.device import mx  # mlx.core, imported after the OpenBLAS preload
from calibjob.models import Model
from calibjob.models.pieces import (
    ModulationSlot,
    forward_pieces,
    modulated_modules,
    modulation_params,
    prepare,
    slots_installed,
)
from calibjob.selection import initial_noise

# Blocks per segment of the segmented step (0 = one graph per step). CALIBJOB_SEGMENT overrides
# it (the memory benchmark's variants).
# Measured on an H200 (SD3-2b shapes, fp16, batch 13, compiled; bench/memory.py --segments
# 0,1,2): one graph per step peaks at 17.9 GB (6.53 ms per trajectory-step), segments of 2
# blocks at 12.5 GB (6.39 ms), of 1 block at 8.5 GB (6.32 ms): the least memory and no slower.
SEGMENT_BLOCKS = int(os.environ.get("CALIBJOB_SEGMENT", "1"))


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
        guidance_scale: float | None = None,
        compile: bool | None = False,
        segment: int | None = None,
        fused: bool = False,
    ):
        self.model = model
        self.family = model.family
        self.branches = model.info.branches
        self.num_steps = num_steps
        self.cfg_scale = cfg_scale
        self.guidance_scale = guidance_scale
        self.latent_size = tuple(latent_size)
        self.seed = seed
        # None: the job's 'auto' (compiled on a GPU, fused on CUDA)
        auto = device.resolve_compile("auto")
        self.compile = step_compiled(auto) if compile is None else compile
        # the blocks of models/fused_block.py (the job's compile = "fused")
        self.fused = (auto == "fused") if compile is None else fused
        # blocks per segment (0: the whole step as one graph); see _step_fn
        self.segment = SEGMENT_BLOCKS if segment is None else segment
        prepare(model.mmdit)
        sigmas, timesteps = model.schedule(num_steps)
        self.sigmas_np, self.timesteps_np = sigmas, timesteps
        self.sigmas = mx.array(sigmas)
        self.timesteps = mx.array(timesteps).astype(model.activation_dtype)
        # evaluated scalars, so a step's inputs cost no slicing on the device
        self._sigma = [mx.array(s) for s in sigmas]
        mx.eval(self._sigma)
        self._modules = modulated_modules(model.mmdit)
        self._slots = [ModulationSlot() for _ in self._modules]
        self._prompt: int | None = None
        self._mods: list[list[mx.array]] = []
        self._cond: mx.array | None = None
        self._cond_by_batch: dict[int, mx.array] = {}
        self._steps: dict[int, Callable] = {}

    # ---- per prompt --------------------------------------------------------------------

    def set_prompt(self, prompt: int, cs: np.ndarray, cs_pooled: np.ndarray) -> None:
        """Compute a prompt's modulation parameters (cs (branches, L, D), cs_pooled
        (branches, Dp))."""
        if self._prompt == prompt:
            return
        self.release_prompt()
        act = self.model.activation_dtype
        self._mods = modulation_params(
            self.model.mmdit, mx.array(cs_pooled).astype(act), self.timesteps,
            self.guidance_scale, batched=self.compile and device.on_gpu(),
        )  # fmt: skip
        self._cond = mx.array(cs).astype(act)
        mx.eval(self._mods, self._cond)
        self._prompt = prompt

    def release_prompt(self) -> None:
        """Drop the prompt's modulation parameters and conditioning (the weights stay intact)."""
        self._mods, self._cond, self._prompt = [], None, None
        self._cond_by_batch = {}

    def _conditioning(self, batch: int) -> mx.array:
        """(branches*B, L, 1, hidden): the text tokens' embedding of [pos]*B (+ [neg]*B under
        CFG), computed once per prompt and batch size rather than at every step (the same
        product on the same rows, so the same numbers)."""
        if batch not in self._cond_by_batch:
            rows = mx.expand_dims(mx.repeat(self._cond, batch, axis=0), 2)
            c = self.model.mmdit.context_embedder(rows)
            mx.eval(c)
            self._cond_by_batch[batch] = c
        return self._cond_by_batch[batch]

    # ---- per unit ----------------------------------------------------------------------

    def initial_latents(self, trajectories: list[int] | tuple[int, ...]) -> mx.array:
        """noise_scaling(sigma_0, noise, empty latent), as DiffusionPipeline.denoise_latents."""
        c = self.family.latent_channels
        noise = mx.array(
            np.stack([initial_noise(self.seed, k, self.latent_size, c) for k in trajectories])
        )
        x_t = mx.ones(noise.shape) * self.family.empty_latent
        return self.model.sampler.noise_scaling(self.sigmas[0], noise, x_t)

    def _step_fn(self, batch: int) -> Callable:
        """One Euler step for `batch` trajectories: (x, c, sigma, sigma_next, mods) ->
        x_next, one per batch size (c: the text tokens' embedding, `_conditioning`).

        DiffusionKit's MMDiT forward runs in pieces (`models/pieces.py`): each block its own
        (compiled) function, and the host at most one segment of `self.segment` blocks ahead
        of the device (async_eval of segment j, then wait for j-1). MLX keeps an op's
        temporaries until the device has run them, so a host that queues a whole step ahead
        keeps a whole step's activations alive; this bounds them to about two segments. With
        `segment` 0 the whole step is one (compiled) function. Same ops in the same order as
        `MMDiT.__call__`, so the eager result is the same to the bit."""
        if batch in self._steps:
            return self._steps[batch]
        model, k, nb = self.model, self.segment, self.branches
        sampler, act, cfg = model.sampler, model.activation_dtype, self.cfg_scale
        p = forward_pieces(
            model.mmdit, self._slots, rows=nb * batch, batch=batch,
            text_len=self._cond.shape[1], latent_size=self.latent_size, fused=self.fused,
        )  # fmt: skip
        extra = p.extra

        def head(x, c):
            x_in = (mx.concatenate([x] * nb, axis=0) if nb > 1 else x).astype(act)
            return x_in, p.image_in(x_in), c

        def tail(*args):
            x, x_in, *state, sigma, sigma_next, m_final = args
            out = p.tail(*state, m_final)
            denoised = sampler.calculate_denoised(sigma, out, x_in)
            if nb > 1:  # CFG: [pos..., neg...]
                pos, neg = denoised.split(2)
                denoised = neg + cfg * (pos - neg)
            d = (x - denoised) / sigma
            return x + d * (sigma_next - sigma)

        def blocks_from(fns):
            def run(state, mods, sync: bool):
                queued = None
                for i, (f, idx) in enumerate(zip(fns, p.block_modules, strict=True)):
                    state = f(*state, *(mods[j] for j in idx), *extra)
                    if sync and (i + 1) % k == 0 and i + 1 < len(fns):
                        mx.async_eval(state)
                        if queued is not None:
                            mx.eval(queued)  # the device finished the segment before this one
                        queued = state[0]
                return state

            return run

        if k <= 0:
            blocks = blocks_from(p.blocks)

            def whole(x, c, sigma, sigma_next, mods):
                x_in, *state = head(x, c)
                state = blocks(tuple(state), mods, sync=False)
                return tail(x, x_in, *state, sigma, sigma_next, mods[-1])

            fn = mx.compile(whole) if self.compile else whole
        else:
            wrap = mx.compile if self.compile else (lambda f: f)
            blocks = blocks_from([wrap(f) for f in p.blocks])
            head_fn, tail_fn = wrap(head), wrap(tail)

            def fn(x, c, sigma, sigma_next, mods):
                x_in, *state = head_fn(x, c)
                state = blocks(tuple(state), mods, sync=True)
                return tail_fn(x, x_in, *state, sigma, sigma_next, mods[-1])

        self._steps[batch] = fn
        return fn

    def _slots_installed(self):
        """The slots stand in for the modules' modulation caches for a whole unit (installed
        once, not per step)."""
        return slots_installed(self._modules, self._slots)

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
        fn = self._step_fn(batch)
        c = self._conditioning(batch)
        x = self.initial_latents(trajectories)
        mx.eval(x)
        recorded = []
        with self._slots_installed():
            for i in range(self.num_steps):
                recorded.append(x)
                nxt = fn(x, c, self._sigma[i], self._sigma[i + 1], self._mods[i])
                mx.async_eval(nxt)  # queued behind step i-1: the device never waits for the host
                if i > 0:
                    mx.eval(x)  # step i-1 done; at most one step in flight ahead of it
                    if on_step is not None:
                        on_step(batch)
                x = nxt
        xs = mx.stack(recorded, axis=1)
        mx.eval(xs, x)
        if on_step is not None:
            on_step(batch)
        return np.array(xs, dtype=np.float32), np.array(x, dtype=np.float32)
