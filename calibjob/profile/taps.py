"""Where profiling listens: the inputs of every linear layer of the MMDiT's blocks, reduced on
the device into per-batch statistics as the forward runs.

For joint block i the image and text streams are layers `mm_{i:02d}_img` and `mm_{i:02d}_txt`,
unified block i is `uni_{i:02d}`. Each stream has four inputs (TaQ-DiT's four linear layers):

    qkv_in   the modulated LayerNorm output that q_proj, k_proj and v_proj all take
    o_in     the attention output, o_proj's input
    fc1_in   the modulated input of the MLP
    fc2_in   the MLP's hidden activation after GELU

The last joint block's text stream has no o_proj and no MLP when the model has no unified blocks
(DiffusionKit's `skip_post_sdpa`: its text output is never used), so it has `qkv_in` only. In a
unified block with a parallel MLP, `fc1_in` is the same tensor as `qkv_in` and is recorded
under both names.

Capture: `installed(mmdit, recorder)` swaps a `Tap` module in for q_proj, o_proj, fc1 and fc2
(instance attributes of this one model; no class is patched) and puts the originals back on
exit. A tap hands its input to the recorder and calls the layer it stands in for, so the
forward computes exactly what it computes without taps.

Per batch and tap, `batch_stats` reduces the input (all rows, tokens and both CFG halves) to
per-channel sum, sum of squares, min and max and one histogram, on the device: only these
small arrays ever reach the host. On a CUDA device one kernel does it in one pass
(`profile/kernel.py`); elsewhere (CPU, Metal) MLX ops do.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import calibjob.profile.kernel as kernel
from calibjob.device import mx, nn  # mlx, after the OpenBLAS preload
from calibjob.profile.plan import INPUTS

# where each input is captured: (attribute path under the TransformerBlock, layer attribute)
_SITES = {"qkv_in": ("attn", "q_proj"), "o_in": ("attn", "o_proj"), "fc1_in": ("mlp", "fc1"),
          "fc2_in": ("mlp", "fc2")}
# histogram slots: [below range, bins..., above range, NaN]
EXTRA_SLOTS = 3
# copies of the histogram the scatter-add spreads over: on a GPU most values fall in a few bins,
# and atomic adds to one counter serialize; on CPU the adds are sequential anyway (counts are
# integers: exact either way). On CUDA the one-pass kernel replaces this path (the ops path,
# copies and all, cost 5.5x the forward on an H100; the kernel 0.07x on an H200).
HIST_COPIES = 64 if mx.default_device() == mx.gpu else 1
# the one-pass CUDA kernel where it runs; CALIBJOB_STATS_KERNEL=0 takes the MLX-ops path (the
# GPU benchmark's comparison)
USE_KERNEL = kernel.available() and os.environ.get("CALIBJOB_STATS_KERNEL", "1") != "0"


@dataclass(frozen=True)
class TapSpec:
    """One recorded input: layer name, input name and its channel count."""

    layer: str
    input: str
    channels: int

    @property
    def key(self) -> str:
        return f"{self.layer}:{self.input}"


def _streams(mmdit) -> list[tuple[str, object]]:
    """(layer name, TransformerBlock) for every stream, in forward order."""
    out = []
    for i, block in enumerate(mmdit.multimodal_transformer_blocks):
        out.append((f"mm_{i:02d}_img", block.image_transformer_block))
        out.append((f"mm_{i:02d}_txt", block.text_transformer_block))
    for i, block in enumerate(getattr(mmdit, "unified_transformer_blocks", None) or []):
        out.append((f"uni_{i:02d}", block.transformer_block))
    return out


def _sites(mmdit) -> list[tuple[TapSpec, object, str]]:
    """(spec, module holding the layer, attribute name) for every tap, in forward order."""
    sites = []
    for name, tb in _streams(mmdit):
        for inp in INPUTS:
            if tb.skip_post_sdpa and inp != "qkv_in":
                continue  # o_proj is an Identity and post_sdpa never runs
            holder_name, attr = _SITES[inp]
            holder = getattr(tb, holder_name)
            layer = holder[attr]
            channels = int(layer.weight.shape[1])
            sites.append((TapSpec(name, inp, channels), holder, attr))
    return sites


def tap_specs(mmdit) -> list[TapSpec]:
    """Every recorded (layer, input) of this model, in a fixed order (forward order)."""
    return [spec for spec, _, _ in _sites(mmdit)]


class Tap(nn.Module):
    """Stands in for one linear layer: records its input, then calls it.

    Reads and writes of the layer's own attributes (`weight`, `bias`) go to the layer, so code
    that touches them (DiffusionKit's unified block zeroes fc2's bias on every call) acts on
    the real layer."""

    def __init__(self, inner: nn.Module, index: int, recorder: Recorder):
        super().__init__()
        self.inner = inner
        object.__setattr__(self, "_index", index)
        object.__setattr__(self, "_recorder", recorder)

    def __getattr__(self, name):
        if name == "inner" or name.startswith("_"):
            return super().__getattr__(name)
        return getattr(self["inner"], name)

    def __setattr__(self, name, value):
        if name != "inner" and "inner" in self and name in self["inner"]:
            setattr(self["inner"], name, value)
        else:
            super().__setattr__(name, value)

    def __call__(self, x: mx.array) -> mx.array:
        self._recorder.record(self._index, x)
        return self["inner"](x)


class Recorder:
    """Collects each tap's per-batch statistics during one forward (lazily, as MLX graphs)."""

    def __init__(self, specs: list[TapSpec], reduce_dtype: mx.Dtype, bins: int, limit: float):
        self.specs = specs
        self.reduce_dtype = reduce_dtype
        self.bins = bins
        self.limit = limit
        self._stats: list | None = None

    def start(self) -> None:
        self._stats = [None] * len(self.specs)

    def record(self, index: int, x: mx.array) -> None:
        if self._stats is None:
            return  # a forward outside profiling
        self._stats[index] = batch_stats(x, self.reduce_dtype, self.bins, self.limit)

    def finish(self, indices: list[int] | None = None) -> tuple[mx.array, ...]:
        """(sum, sumsq, min, max) each (C,) over the taps `indices` (default: all) in order,
        hist (taps, slots), rows (taps,) int32: what one batch (or one block of it)
        contributes. Ends the recording."""
        stats, self._stats = self._stats, None
        indices = range(len(self.specs)) if indices is None else indices
        missing = [self.specs[i].key for i in indices if stats is None or stats[i] is None]
        if stats is None or missing:
            raise RuntimeError(f"taps not reached in the forward: {', '.join(missing)}")
        return concat_stats([stats[i] for i in indices])


def concat_stats(parts: list[tuple]) -> tuple[mx.array, ...]:
    """Per-tap statistics joined in order: vectors concatenated, histograms and rows stacked
    (parts may also be such joins of consecutive taps)."""
    cols = list(zip(*parts, strict=True))
    stack = mx.stack if cols[5][0].ndim == 0 else mx.concatenate
    return (
        mx.concatenate(cols[0]),
        mx.concatenate(cols[1]),
        mx.concatenate(cols[2]),
        mx.concatenate(cols[3]),
        stack(cols[4]),
        stack(cols[5]),
    )


def histogram_slots(x: mx.array, bins: int, limit: float) -> mx.array:
    """Slot of every element: 0 below -limit, 1..bins the bins of [-limit, limit] (the last
    closed on the right, as numpy.histogram), bins+1 above +limit, bins+2 NaN.

    Exact: with bins/(2*limit) a power of two, x * scale is exact in floating point and
    floor() lands every value in the bin numpy puts it in (no rounding of x + limit)."""
    scale = bins / (2.0 * limit)
    half = bins // 2
    xf = x.astype(mx.float32)
    slot = mx.floor(xf * scale) + (half + 1)
    slot = mx.clip(slot, 0, bins + 1)
    slot = mx.where(xf == limit, bins, slot)
    slot = mx.where(mx.isnan(xf), bins + 2, slot)
    return slot.astype(mx.int32)


def batch_stats(x: mx.array, reduce_dtype: mx.Dtype, bins: int, limit: float) -> tuple:
    """One tap's input (..., C) -> sum, sumsq (C,) in reduce_dtype; min, max (C,) float32
    (exact: the input's dtype is no wider); histogram (bins + 3,) int32; rows, a 0-d int32."""
    c = x.shape[-1]
    rows = x.size // c
    flat = x.reshape(rows, c)
    if USE_KERNEL and reduce_dtype == mx.float32:
        return kernel.tap_stats(flat, bins, limit)
    # two levels (tokens of each CFG row, then rows): in float32 the rounding error grows with
    # the longest run summed, here max(tokens, rows) rather than their product
    xr = x.reshape(x.shape[0], -1, c).astype(reduce_dtype)
    s = xr.sum(axis=1).sum(axis=0)
    ss = (xr * xr).sum(axis=1).sum(axis=0)
    lo = flat.min(axis=0).astype(mx.float32)
    hi = flat.max(axis=0).astype(mx.float32)
    slots = histogram_slots(flat, bins, limit).reshape(-1)
    n_slots = bins + EXTRA_SLOTS
    copies = HIST_COPIES if HIST_COPIES > 1 and slots.size % HIST_COPIES == 0 else 1
    if copies > 1:
        # spread the adds over copies of the histogram (element i into copy i % copies), then
        # sum the copies: on a GPU the scatter's atomic adds then rarely hit the same counter
        lane = mx.arange(slots.size, dtype=mx.int32) % copies
        slots = slots + lane * n_slots
    hist = mx.zeros((copies * n_slots,), dtype=mx.int32).at[slots].add(1)
    if copies > 1:
        hist = hist.reshape(copies, n_slots).sum(axis=0)
    return s, ss, lo, hi, hist, mx.array(rows, dtype=mx.int32)


@contextlib.contextmanager
def installed(mmdit, recorder: Recorder) -> Iterator[list[TapSpec]]:
    """Swap taps in for the model's linear layers; put the layers back on exit."""
    sites = _sites(mmdit)
    originals = []
    try:
        for i, (_, holder, attr) in enumerate(sites):
            layer = holder[attr]
            originals.append((holder, attr, layer))
            holder[attr] = Tap(layer, i, recorder)
        yield [spec for spec, _, _ in sites]
    finally:
        for holder, attr, layer in originals:
            holder[attr] = layer
