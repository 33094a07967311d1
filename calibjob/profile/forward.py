"""Profiled forwards: a unit's batches through the MMDiT with taps in, its statistics out.

A batch is B points of one (timestep, prompt), fed as during generation: a CFG batch of 2B
rows [pos_1..pos_B, neg_1..neg_B], x doubled, the prompt's conditioning then the empty
prompt's. The modulation parameters come from the engine's machinery (`modulation_params`,
`ModulationSlot`): computed once per (prompt, timestep), handed to the blocks through slots, so
the adaLN weights are never emptied and nothing is reloaded between prompts.

The forward is lazy: only the taps' statistics are evaluated, so MLX never computes what
follows the last tap (the final layer) and frees each activation once its statistics are
taken. One batch stays queued ahead (`mx.async_eval`) while the host adds up the previous
one. Host accumulation is float64 (sums) in the units' fixed batch order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import numpy as np

import calibjob.profile.taps as taps_mod
from calibjob.device import mx  # mlx.core, after the OpenBLAS preload
from calibjob.engine import (
    SEGMENT_BLOCKS,
    ModulationSlot,
    joint_pieces,
    modulated_modules,
    modulation_params,
    slots_installed,
)
from calibjob.profile.plan import ProfileUnit, UnitStats

# keep every prompt's conditioning on the device when all of them take at most this much
COND_CACHE_BYTES = 2 << 30


class Profiler:
    """Runs a profile job's units on one loaded model."""

    def __init__(
        self, model, *, reduce_dtype: str, bins: int, limit: float, compile: bool = False
    ):
        self.model = model
        self.mmdit = model.mmdit
        self.act = model.activation_dtype
        self.specs = taps_mod.tap_specs(self.mmdit)
        self.offsets = np.cumsum([0] + [s.channels for s in self.specs])
        self.bins = bins
        red = {"float64": mx.float64, "float32": mx.float32}[reduce_dtype]
        self.recorder = taps_mod.Recorder(self.specs, red, bins, limit)
        self.compile = compile
        self._modules = modulated_modules(self.mmdit)
        self._slots = [ModulationSlot() for _ in self._modules]
        self._fns: dict[int, Callable] = {}
        self._cond: dict[int, mx.array] = {}

    # ---- pieces --------------------------------------------------------------------------

    def _fn(self, batch: int) -> Callable:
        """(x (B,H,W,16), cond (2,L,D), mods) -> the batch's statistics; one per batch size."""
        if batch not in self._fns:
            joint_only = not getattr(self.mmdit.config, "depth_unified", 0)
            self._fns[batch] = self._segmented(batch) if joint_only else self._whole(batch)
        return self._fns[batch]

    def _whole(self, batch: int) -> Callable:
        """The MMDiT's own forward as one graph (models with unified blocks)."""
        mmdit, act, slots, recorder = self.mmdit, self.act, self._slots, self.recorder
        t_key = mx.array([0.0])  # the slots ignore the key; MMDiT only calls .item() on it
        mx.eval(t_key)

        def forward(x, cond, mods):
            for slot, m in zip(slots, mods, strict=True):
                slot.value = m if batch == 1 else mx.repeat(m, batch, axis=0)
            x_in = mx.concatenate([x, x], axis=0).astype(act)
            c = mx.expand_dims(mx.repeat(cond, batch, axis=0), 2)
            recorder.start()
            mmdit(latent_image_embeddings=x_in, token_level_text_embeddings=c, timestep=t_key)
            out = recorder.finish()
            for slot in slots:
                slot.value = None
            return out

        return mx.compile(forward) if self.compile else forward

    def _segmented(self, batch: int) -> Callable:
        """The forward taken apart at its joint blocks, as the engine's segmented step
        (`engine.joint_pieces`): each block a (compiled) function that returns its taps'
        statistics, the host at most one segment ahead of the device. A whole forward queued
        at once kept every block's activations alive until the device caught up (53 GB at
        batch 13 on an H100). The final layer is never computed: no tap follows the last
        block."""
        head, blocks = joint_pieces(self.mmdit, self.act, self._slots, batch)
        recorder, k = self.recorder, max(1, SEGMENT_BLOCKS)
        names = [(f"mm_{i:02d}_img", f"mm_{i:02d}_txt") for i in range(len(blocks))]
        taps_of = [[j for j, s in enumerate(self.specs) if s.layer in n] for n in names]
        # the blocks' statistics, joined in block order, are all taps' in spec order
        assert [j for idx in taps_of for j in idx] == list(range(len(self.specs)))

        def with_stats(block, idx, last):
            def f(h, c, m_img, m_txt):
                recorder.start()
                h, c = block(h, c, m_img, m_txt)
                stats = recorder.finish(idx)
                return stats if last else (h, c, *stats)

            return mx.compile(f) if self.compile else f

        fns = [with_stats(b, taps_of[i], i == len(blocks) - 1) for i, b in enumerate(blocks)]

        def forward(x, cond, mods):
            _, h, c = head(x, mx.expand_dims(mx.repeat(cond, batch, axis=0), 2))
            parts, queued = [], None
            for i, f in enumerate(fns):
                if i == len(fns) - 1:
                    parts.append(f(h, c, mods[2 * i], mods[2 * i + 1]))
                    break
                h, c, *stats = f(h, c, mods[2 * i], mods[2 * i + 1])
                parts.append(tuple(stats))
                if (i + 1) % k == 0:
                    mx.async_eval(h, c, parts)
                    if queued is not None:
                        mx.eval(queued)  # the device finished the segment before this one
                    queued = h
            return taps_mod.concat_stats(parts)

        return forward

    def _conditioning(self, cs: np.ndarray, prompt: int) -> mx.array:
        """A prompt's (2, L, D) conditioning on the device (all prompts kept if they fit)."""
        if prompt not in self._cond:
            if cs.nbytes > COND_CACHE_BYTES:
                self._cond.clear()
            c = mx.array(np.asarray(cs[prompt])).astype(self.act)
            mx.eval(c)
            self._cond[prompt] = c
        return self._cond[prompt]

    @contextlib.contextmanager
    def _installed(self) -> Iterator[None]:
        """Slots in for the modules' modulation caches, taps in for the linear layers."""
        with (
            slots_installed(self._modules, self._slots),
            taps_mod.installed(self.mmdit, self.recorder),
        ):
            yield

    # ---- a unit --------------------------------------------------------------------------

    def run_unit(
        self, unit: ProfileUnit, timestep: np.ndarray, xs, cs, cs_pooled,
        on_batch: Callable[[int], None] | None = None,
    ) -> UnitStats:
        """The unit's statistics. `timestep` is a (1,) array in the set's ts dtype; xs, cs,
        cs_pooled the set's arrays (memory maps are fine: only the batch's rows are read)."""
        c_total = int(self.offsets[-1])
        acc = _Accumulator(c_total, len(self.specs), self.bins)
        t = mx.array(timestep)
        mods: dict[int, list[mx.array]] = {}
        pending = None
        with self._installed():
            for batch in unit.batches:
                p = batch.prompt
                if p not in mods:
                    pooled = mx.array(np.asarray(cs_pooled[p])).astype(self.act)
                    mods[p] = modulation_params(self.mmdit, pooled, t)[0]
                    mx.eval(mods[p])
                x = mx.array(np.asarray(xs[np.asarray(batch.points)]))
                out = self._fn(len(batch.points))(x, self._conditioning(cs, p), mods[p])
                mx.async_eval(out)
                if pending is not None:
                    acc.add(pending[0])
                    if on_batch is not None:
                        on_batch(pending[1])
                pending = (out, len(batch.points))
            if pending is not None:
                acc.add(pending[0])
                if on_batch is not None:
                    on_batch(pending[1])
        return acc.result()


    def run_unit_bare(self, unit: ProfileUnit, timestep: np.ndarray, xs, cs, cs_pooled) -> None:
        """The same batches through the same model calls with no taps (the MMDiT's output
        evaluated instead of statistics): the yardstick profiling's overhead is measured
        against (bench/profile_gpu.py)."""
        t = mx.array(timestep)
        mmdit, act, slots = self.mmdit, self.act, self._slots
        t_key = mx.array([0.0])
        mods: dict[int, list[mx.array]] = {}
        with slots_installed(self._modules, slots):
            pending = None
            for batch in unit.batches:
                p, b = batch.prompt, len(batch.points)
                if p not in mods:
                    pooled = mx.array(np.asarray(cs_pooled[p])).astype(act)
                    mods[p] = modulation_params(mmdit, pooled, t)[0]
                    mx.eval(mods[p])
                x = mx.array(np.asarray(xs[np.asarray(batch.points)]))
                for slot, m in zip(slots, mods[p], strict=True):
                    slot.value = m if b == 1 else mx.repeat(m, b, axis=0)
                cond = mx.expand_dims(mx.repeat(self._conditioning(cs, p), b, axis=0), 2)
                out = mmdit(
                    latent_image_embeddings=mx.concatenate([x, x], axis=0).astype(act),
                    token_level_text_embeddings=cond, timestep=t_key,
                )
                mx.async_eval(out)
                if pending is not None:
                    mx.eval(pending)
                pending = out
            if pending is not None:
                mx.eval(pending)


class _Accumulator:
    """A unit's running statistics on the host, added batch by batch in order."""

    def __init__(self, channels: int, taps: int, bins: int):
        self.sum = np.zeros(channels, np.float64)
        self.sumsq = np.zeros(channels, np.float64)
        self.min = np.full(channels, np.inf, np.float32)
        self.max = np.full(channels, -np.inf, np.float32)
        self.hist = np.zeros((taps, bins + taps_mod.EXTRA_SLOTS), np.int64)
        self.rows = np.zeros(taps, np.int64)

    def add(self, out) -> None:
        s, ss, lo, hi, hist, rows = (np.asarray(a) for a in out)
        self.sum += s.astype(np.float64)
        self.sumsq += ss.astype(np.float64)
        np.minimum(self.min, lo, out=self.min)
        np.maximum(self.max, hi, out=self.max)
        self.hist += hist
        self.rows += rows

    def result(self) -> UnitStats:
        return UnitStats(self.sum, self.sumsq, self.min, self.max, self.hist, self.rows)
