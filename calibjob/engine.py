"""The batched Euler loop: one work unit (trajectories of one prompt) in, its recorded x_t out.

The arithmetic is DiffusionKit's `sample_euler` with `CFGDenoiser`, batched: B trajectories of
one prompt run as one CFG batch ordered [pos_1..pos_B, neg_1..neg_B]. `x` is recorded BEFORE
each model call, with the model timestep of that call.

Modulation parameters: once per prompt the engine computes, for every step, what
`MMDiT.cache_modulation_params` would put in each module's `_modulation_params` (the same ops on
the same shapes, so the same numbers), evaluated in one go rather than one sync per module and
step, and without emptying the adaLN weights, so nothing has to be reloaded when the prompt
changes. During a model call each module's `_modulation_params` is a `ModulationSlot` that hands
back, whatever timestep it is asked for, the step's parameters repeated to the CFG batch. The
parameters are therefore plain inputs of the step function: one `mx.compile` per batch size
serves every step and every prompt, and nothing captured at trace time can go stale.

`compile=True` (the CLI's `--compile`; None = on a GPU only, see device.resolve_compile) fuses
the elementwise work around the matmuls. Measured (2026-11, mlx 0.32.4): on CPU it changes
neither speed nor a bit; on an H100 (SD3-2b shapes, fp16, batch 13) a step is 6% faster, MLX
first JIT-compiles ~10 fused CUDA kernels (~40 s once per machine, cached under
MLX_PTX_CACHE_DIR, default /tmp/mlx/VERSION/ptx), and results are deterministic but differ from
the spec loop at fp16 rounding (max 2.4e-3 on |x| <= 5 after 10 steps), where the eager step is
bit-identical to it.

The loop keeps one step queued ahead (`mx.async_eval`): the host builds and launches step i+1
while the device computes step i.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import numpy as np

from calibjob import device
from calibjob.device import mx  # mlx.core, imported after the OpenBLAS preload
from calibjob.models import Model
from calibjob.selection import initial_noise

EMPTY_LATENT = 0.0609  # DiffusionPipeline.get_empty_latent's fill (SD3's latent shift)
# Blocks per segment of the segmented step (0 = one graph per step). CALIBJOB_SEGMENT overrides
# it (the memory benchmark's variants).
# Measured on an H200 (SD3-2b shapes, fp16, batch 13, compiled; bench/memory.py --segments
# 0,1,2): one graph per step peaks at 17.9 GB (6.53 ms per trajectory-step), segments of 2
# blocks at 12.5 GB (6.39 ms), of 1 block at 8.5 GB (6.32 ms): the least memory and no slower.
SEGMENT_BLOCKS = int(os.environ.get("CALIBJOB_SEGMENT", "1"))


class ModulationSlot:
    """Stands in for a module's `_modulation_params` dict during a model call: any timestep key
    gets `value`, the current step's parameters already repeated to the CFG batch."""

    __slots__ = ("value",)

    def __init__(self):
        self.value: mx.array | None = None

    def __getitem__(self, key) -> mx.array:
        if self.value is None:
            raise RuntimeError("modulation slot read outside an engine step")
        return self.value


@contextlib.contextmanager
def slots_installed(modules: list, slots: list[ModulationSlot]) -> Iterator[None]:
    """Each module's `_modulation_params` is its slot while the block runs; whatever was
    there before comes back afterwards (the engine's units and phase 2's profiled forwards)."""
    saved = [m.__dict__.get("_modulation_params") for m in modules]
    for m, slot in zip(modules, slots, strict=True):
        m._modulation_params = slot
    try:
        yield
    finally:
        for m, old, slot in zip(modules, saved, slots, strict=True):
            slot.value = None
            if old is None:
                del m._modulation_params
            else:
                m._modulation_params = old


def modulated_modules(mmdit) -> list:
    """The modules whose forward reads `_modulation_params`, in a fixed order."""
    mods = []
    for block in mmdit.multimodal_transformer_blocks:
        mods += [block.image_transformer_block, block.text_transformer_block]
    for block in getattr(mmdit, "unified_transformer_blocks", None) or []:
        mods.append(block.transformer_block)
    mods.append(mmdit.final_layer)
    return mods


def modulation_params(mmdit, cs_pooled: mx.array, timesteps: mx.array) -> list[list[mx.array]]:
    """Per step, per module (in `modulated_modules` order): the modulation parameters
    (2, 1, 1, k*hidden), computed exactly as `MMDiT.cache_modulation_params` does, unevaluated."""
    modules = modulated_modules(mmdit)
    # each module's adaLN_modulation is Sequential(SiLU, Linear) on the same input: the SiLU is
    # computed once per step and shared (same function, same input, so the same numbers)
    silu = modules[0].adaLN_modulation.layers[0]
    y_embed = mmdit.y_embedder(cs_pooled)
    n = cs_pooled.shape[0]
    out = []
    for i in range(timesteps.shape[0]):
        timestep = timesteps[i]
        inputs = y_embed[:, None, None, :] + mmdit.t_embedder(mx.repeat(timestep[None], n, axis=0))
        act = silu(inputs)
        out.append([m.adaLN_modulation.layers[1](act) for m in modules])
    return out


def joint_pieces(mmdit, act: mx.Dtype, slots: list[ModulationSlot], batch: int):
    """DiffusionKit's MMDiT forward (SD3: joint blocks only, no RoPE) taken apart, for a CFG
    batch of `batch` trajectories: `head(x, cond) -> (x_in, h, c)` (x (B,H,W,C), cond the
    (2B, L, 1, D) conditioning; x_in the doubled input in `act`) and one function per joint
    block, `(h, c, m_img, m_txt) -> (h, c)`, that hands the block its modulation parameters
    through its slots (`slots` in `modulated_modules` order). The same ops in the same order
    as `MMDiT.__call__`, so the same numbers; plain functions, for the caller to compile."""
    t_key = mx.array([0.0])  # the slots ignore the key; MMDiT only calls .item() on it
    mx.eval(t_key)
    rep = (lambda m: m) if batch == 1 else (lambda m: mx.repeat(m, batch, axis=0))

    def block_fn(i: int):
        block, s_img, s_txt = mmdit.multimodal_transformer_blocks[i], slots[2 * i], slots[2 * i + 1]

        def f(h, c, m_img, m_txt):
            s_img.value, s_txt.value = rep(m_img), rep(m_txt)
            h, c = block(h, c, t_key, positional_encodings=None)
            s_img.value = s_txt.value = None
            return h, c

        return f

    def head(x, cond):
        x_in = mx.concatenate([x, x], axis=0).astype(act)
        c = mmdit.context_embedder(cond)
        h = mmdit.x_embedder(x_in) + mmdit.x_pos_embedder(x_in)
        return x_in, h.reshape(x_in.shape[0], -1, 1, mmdit.config.hidden_size), c

    return head, [block_fn(i) for i in range(len(mmdit.multimodal_transformer_blocks))]


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
        compile: bool | None = False,
        segment: int | None = None,
    ):
        self.model = model
        self.num_steps = num_steps
        self.cfg_scale = cfg_scale
        self.latent_size = tuple(latent_size)
        self.seed = seed
        # None: the job's 'auto' (on a GPU only)
        self.compile = device.resolve_compile("auto") == "on" if compile is None else compile
        # blocks per segment (0: the whole step as one graph); see _segmented_step
        self.segment = SEGMENT_BLOCKS if segment is None else segment
        sigmas, timesteps = model.schedule(num_steps)
        self.sigmas_np, self.timesteps_np = sigmas, timesteps
        self.sigmas = mx.array(sigmas)
        self.timesteps = mx.array(timesteps)
        # evaluated scalars, so a step's inputs cost no slicing on the device
        self._sigma = [mx.array(s) for s in sigmas]
        # the MMDiT forward calls `.item()` on its timestep (a device sync if it were lazy); the
        # slots ignore the key, so one evaluated (1,) array serves every step, also under compile
        self._t_key = mx.array(timesteps[:1])
        mx.eval(self._sigma, self._t_key)
        self._modules = modulated_modules(model.mmdit)
        self._slots = [ModulationSlot() for _ in self._modules]
        self._prompt: int | None = None
        self._mods: list[list[mx.array]] = []
        self._cond: mx.array | None = None
        self._cond_by_batch: dict[int, mx.array] = {}
        self._steps: dict[int, Callable] = {}

    # ---- per prompt --------------------------------------------------------------------

    def set_prompt(self, prompt: int, cs: np.ndarray, cs_pooled: np.ndarray) -> None:
        """Compute a prompt's modulation parameters (cs (2, L, D), cs_pooled (2, Dp))."""
        if self._prompt == prompt:
            return
        self.release_prompt()
        act = self.model.activation_dtype
        self._mods = modulation_params(
            self.model.mmdit, mx.array(cs_pooled).astype(act), self.timesteps
        )
        self._cond = mx.array(cs).astype(act)
        mx.eval(self._mods, self._cond)
        self._prompt = prompt

    def release_prompt(self) -> None:
        """Drop the prompt's modulation parameters and conditioning (the weights stay intact)."""
        self._mods, self._cond, self._prompt = [], None, None
        self._cond_by_batch = {}

    def _conditioning(self, batch: int) -> mx.array:
        """(2B, L, 1, D): [pos]*B + [neg]*B, built once per prompt and batch size, not per step."""
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

    def _step_fn(self, batch: int) -> Callable:
        """One Euler step for a CFG batch of `batch` trajectories:
        (x, cond, sigma, sigma_next, mods) -> x_next. Compiled once per batch size."""
        if batch in self._steps:
            return self._steps[batch]
        if self.segment > 0 and not getattr(self.model.mmdit.config, "depth_unified", 0):
            self._steps[batch] = self._segmented_step(batch)
            return self._steps[batch]
        mmdit, sampler = self.model.mmdit, self.model.sampler
        act, cfg = self.model.activation_dtype, self.cfg_scale
        slots, t_key = self._slots, self._t_key

        def step(x, cond, sigma, sigma_next, mods):
            for slot, m in zip(slots, mods, strict=True):
                slot.value = m if batch == 1 else mx.repeat(m, batch, axis=0)
            x_in = mx.concatenate([x, x], axis=0).astype(act)
            out = mmdit(
                latent_image_embeddings=x_in, token_level_text_embeddings=cond, timestep=t_key
            )
            for slot in slots:
                slot.value = None
            denoised = sampler.calculate_denoised(sigma, out, x_in)
            pos, neg = denoised.split(2)
            denoised = neg + cfg * (pos - neg)
            d = (x - denoised) / sigma
            return x + d * (sigma_next - sigma)

        fn = mx.compile(step) if self.compile else step
        self._steps[batch] = fn
        return fn

    def _segmented_step(self, batch: int) -> Callable:
        """The same Euler step, with DiffusionKit's MMDiT forward taken apart at its joint
        blocks: each block is its own (compiled) function, and the host stays at most one
        segment of `self.segment` blocks ahead of the device (async_eval of segment j, then
        wait for j-1). MLX keeps an op's temporaries until the device has run it, so a host
        that queues a whole step ahead keeps a whole step's activations alive; this bounds
        them to about two segments. Same ops in the same order as MMDiT.__call__ (SD3: no
        RoPE, no unified blocks), so the eager result is the same to the bit."""
        import calibjob.diffusionkit_imports  # noqa: F401  (before DiffusionKit)

        # isort: split
        from diffusionkit.mlx.mmdit import unpatchify

        mmdit, sampler = self.model.mmdit, self.model.sampler
        act, cfg, t_key, k = self.model.activation_dtype, self.cfg_scale, self._t_key, self.segment
        slots = self._slots  # order: (img, txt) per block, then the final layer
        rep = (lambda m: m) if batch == 1 else (lambda m: mx.repeat(m, batch, axis=0))
        head, blocks = joint_pieces(mmdit, act, slots, batch)

        def tail(x, x_in, h, sigma, sigma_next, m_final):
            slots[-1].value = rep(m_final)
            out = mmdit.final_layer(h, t_key)
            slots[-1].value = None
            hh, ww = x_in.shape[1], x_in.shape[2]
            out = unpatchify(
                out,
                patch_size=mmdit.config.patch_size,
                target_height=hh,
                target_width=ww,
                vae_latent_dim=mmdit.config.vae_latent_dim,
            )
            denoised = sampler.calculate_denoised(sigma, out, x_in)
            pos, neg = denoised.split(2)
            denoised = neg + cfg * (pos - neg)
            d = (x - denoised) / sigma
            return x + d * (sigma_next - sigma)

        fns = [mx.compile(f) if self.compile else f for f in blocks]
        head_fn = mx.compile(head) if self.compile else head
        tail_fn = mx.compile(tail) if self.compile else tail

        def step(x, cond, sigma, sigma_next, mods):
            x_in, h, c = head_fn(x, cond)
            queued = None
            for i, f in enumerate(fns):
                h, c = f(h, c, mods[2 * i], mods[2 * i + 1])
                if (i + 1) % k == 0 and i + 1 < len(fns):
                    mx.async_eval(h, c)
                    if queued is not None:
                        mx.eval(queued)  # the device finished the segment before this one
                    queued = h
            return tail_fn(x, x_in, h, sigma, sigma_next, mods[-1])

        return step

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
        cond = self._conditioning(batch)
        x = self.initial_latents(trajectories)
        mx.eval(x)
        recorded = []
        with self._slots_installed():
            for i in range(self.num_steps):
                recorded.append(x)
                nxt = fn(x, cond, self._sigma[i], self._sigma[i + 1], self._mods[i])
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
