"""Profiled forwards: a unit's batches through the MMDiT with taps in, its statistics out.

A batch is B points of one (timestep, prompt), fed as during generation: under CFG (SD3) a
batch of 2B rows [pos_1..pos_B, neg_1..neg_B], x doubled, the prompt's conditioning then the
empty prompt's; without it (FLUX.1) B rows. The modulation parameters come from the engine's
machinery (`models/pieces.py`): computed once per (prompt, timestep), with the guidance term of
a guidance-embedded model, handed to the blocks through slots, so the adaLN weights are never
emptied and nothing is reloaded between prompts.

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
from calibjob.engine import SEGMENT_BLOCKS
from calibjob.models.pieces import (
    ModulationSlot,
    forward_pieces,
    modulated_modules,
    modulation_params,
    prepare,
    slots_installed,
)
from calibjob.profile.plan import ProfileUnit, UnitStats

STATS = 6  # a block's joined statistics: sum, sumsq, min, max, hist, rows (taps.finish)
# keep every prompt's conditioning on the device when all of them take at most this much
COND_CACHE_BYTES = 2 << 30


class Profiler:
    """Runs a profile job's units on one loaded model."""

    def __init__(
        self, model, *, reduce_dtype: str, bins: int, limit: float, compile: bool = False,
        guidance_scale: float | None = None,
    ):
        self.model = model
        self.mmdit = model.mmdit
        prepare(self.mmdit)
        self.branches = model.info.branches
        self.guidance_scale = guidance_scale
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

    def _input(self, x: mx.array) -> mx.array:
        """The model rows of a batch's x: doubled under CFG, in the activation dtype."""
        nb = self.branches
        return (mx.concatenate([x] * nb, axis=0) if nb > 1 else x).astype(self.act)

    def _pieces(self, batch: int, cond_len: int, latent: tuple[int, int]):
        return forward_pieces(
            self.mmdit, self._slots, rows=self.branches * batch, batch=batch,
            text_len=cond_len, latent_size=latent,
        )  # fmt: skip

    def _fn(self, batch: int, cond_len: int, latent: tuple[int, int]) -> Callable:
        """(x (B,H,W,C), cond (branches,L,D), mods) -> the batch's statistics; one per batch
        size.

        The forward taken apart at its blocks, as the engine's segmented step
        (`models/pieces.py`): each block a (compiled) function that returns its taps'
        statistics, the host at most one segment ahead of the device. A whole forward queued
        at once kept every block's activations alive until the device caught up (53 GB at
        batch 13 on an H100). The final layer is never computed: no tap follows the last
        block."""
        if batch in self._fns:
            return self._fns[batch]
        p = self._pieces(batch, cond_len, latent)
        recorder, k, extra = self.recorder, max(1, SEGMENT_BLOCKS), p.extra
        taps_of = [[j for j, s in enumerate(self.specs) if s.layer in n] for n in p.names]
        # the blocks' statistics, joined in block order, are all taps' in spec order
        assert [j for idx in taps_of for j in idx] == list(range(len(self.specs)))
        last = len(p.blocks) - 1

        def with_stats(block, idx, is_last):
            def f(*args):
                recorder.start()
                state = block(*args)
                stats = recorder.finish(idx)
                return stats if is_last else (*state, *stats)

            return mx.compile(f) if self.compile else f

        fns = [with_stats(b, taps_of[i], i == last) for i, b in enumerate(p.blocks)]

        def forward(x, cond, mods):
            c = mx.expand_dims(mx.repeat(cond, batch, axis=0), 2)
            state = p.head(self._input(x), c)
            parts, queued = [], None
            for i, (f, idx) in enumerate(zip(fns, p.block_modules, strict=True)):
                args = (*state, *(mods[j] for j in idx), *extra)
                if i == last:
                    parts.append(f(*args))
                    break
                out = f(*args)
                n_state = len(out) - STATS  # the block's state, then its taps' statistics
                state, stats = tuple(out[:n_state]), out[n_state:]
                parts.append(tuple(stats))
                if (i + 1) % k == 0:
                    mx.async_eval(state, parts)
                    if queued is not None:
                        mx.eval(queued)  # the device finished the segment before this one
                    queued = state[0]
            return taps_mod.concat_stats(parts)

        self._fns[batch] = forward
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
                    mods[p] = modulation_params(self.mmdit, pooled, t, self.guidance_scale)[0]
                    mx.eval(mods[p])
                x = mx.array(np.asarray(xs[np.asarray(batch.points)]))
                cond = self._conditioning(cs, p)
                fn = self._fn(len(batch.points), cond.shape[1], tuple(xs.shape[1:3]))
                out = fn(x, cond, mods[p])
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
        mods: dict[int, list[mx.array]] = {}
        latent = tuple(xs.shape[1:3])
        with slots_installed(self._modules, self._slots):
            pending = None
            for batch in unit.batches:
                p, b = batch.prompt, len(batch.points)
                if p not in mods:
                    pooled = mx.array(np.asarray(cs_pooled[p])).astype(self.act)
                    mods[p] = modulation_params(self.mmdit, pooled, t, self.guidance_scale)[0]
                    mx.eval(mods[p])
                x = mx.array(np.asarray(xs[np.asarray(batch.points)]))
                cond = self._conditioning(cs, p)
                pieces = self._pieces(b, cond.shape[1], latent)
                state = pieces.head(self._input(x), mx.expand_dims(mx.repeat(cond, b, axis=0), 2))
                for f, idx in zip(pieces.blocks, pieces.block_modules, strict=True):
                    state = f(*state, *(mods[p][j] for j in idx), *pieces.extra)
                out = pieces.tail(*state, mods[p][-1])
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
