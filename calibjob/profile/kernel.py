"""One tap's statistics in one pass over its input, as a CUDA kernel (MLX's CUDA backend).

Takes a tap input (rows, C) in its own dtype; gives what `taps.batch_stats` gives: per-channel
sum and sum of squares (float32), min and max, the histogram slots and the row count.

Why a kernel: composed of MLX ops, the statistics cost 5.5x the forward itself on an H100, this
kernel 0.07x on an H200 (bench/profile_gpu.py). The ops paid a float32 copy of every
activation, one pass per statistic, and a scatter-add of one index per element; the forward
reads each activation once, and so does this kernel.

Thread (c, g) walks rows g*RPG .. (g+1)*RPG - 1 of channel c (consecutive threads read
consecutive channels: coalesced), keeping sum, sum of squares, min and max in registers,
and counts slots in its warp's histogram in shared memory; a block then adds its counts to the
global histogram (integer atomics: exact in any order). The (G, C) partials are reduced by MLX
in a fixed order, so the result is the same on every run: float32 sums of RPG rows, then of
the G partials (rounding grows with RPG + G, not with the number of rows).

Slots are `taps.histogram_slots`' to the bit: x * scale is exact (scale a power of two), +limit
lands in the last bin, NaN in its own slot. min and max skip NaN (it is counted in the
histogram's NaN slot).
"""

from __future__ import annotations

from calibjob.device import mx  # mlx.core, after the OpenBLAS preload

ROWS_PER_GROUP = 128  # rows one thread sums: (G, C) partials with G = rows / 128
THREADS = 256  # per block: 8 warps, each with its own shared-memory histogram

_SOURCE = """
    constexpr int NSLOTS = BINS + 3;
    constexpr int WARPS = THREADS / 32;
    __shared__ int counts[WARPS * NSLOTS];
    const int tid = threadIdx.x;
    const int nthreads = blockDim.x;  // as launched (THREADS): the loops never assume it
    const int nwarps = (nthreads + 31) / 32;
    for (int i = tid; i < WARPS * NSLOTS; i += nthreads) counts[i] = 0;
    __syncthreads();

    const int rows = x_shape[0];
    const int C = x_shape[1];
    const int c = blockIdx.x * nthreads + tid;
    const int g = blockIdx.y;
    const float limit = params[0];
    const float scale = params[1];
    int* mine = counts + (tid / 32) * NSLOTS;
    if (c < C) {
        const int r0 = g * RPG;
        const int r1 = min(r0 + RPG, rows);
        const float INF = __int_as_float(0x7f800000);
        float s = 0.0f, ss = 0.0f, lo = INF, hi = -INF;
        for (int r = r0; r < r1; ++r) {
            const float v = static_cast<float>(x[(size_t)r * C + c]);
            s += v;
            ss += v * v;
            lo = fminf(lo, v);
            hi = fmaxf(hi, v);
            int slot;
            if (isnan(v)) {
                slot = BINS + 2;
            } else if (v == limit) {
                slot = BINS;
            } else {
                float f = floorf(v * scale) + (float)(BINS / 2 + 1);
                f = fminf(fmaxf(f, 0.0f), (float)(BINS + 1));
                slot = (int)f;
            }
            atomicAdd(mine + slot, 1);
        }
        const size_t o = (size_t)g * C + c;
        psum[o] = s;
        psumsq[o] = ss;
        pmin[o] = lo;
        pmax[o] = hi;
    }
    __syncthreads();
    for (int i = tid; i < NSLOTS; i += nthreads) {
        int n = 0;
        for (int w = 0; w < nwarps; ++w) n += counts[w * NSLOTS + i];
        if (n) atomicAdd(hist + i, n);
    }
"""

_kernel = None


def available() -> bool:
    """True when MLX runs on a CUDA device (the kernel's only backend)."""
    if mx.default_device() != mx.gpu:
        return False
    try:
        return bool(mx.cuda.is_available()) and hasattr(mx.fast, "cuda_kernel")
    except AttributeError:
        return False


def tap_stats(flat: mx.array, bins: int, limit: float) -> tuple:
    """(rows, C) -> sum, sumsq (C,) float32; min, max (C,) float32; hist (bins + 3,) int32;
    rows, a 0-d int32. Lazy, like any MLX op."""
    global _kernel
    if _kernel is None:
        _kernel = mx.fast.cuda_kernel(
            name="calibjob_tap_stats",
            input_names=["x", "params"],
            output_names=["psum", "psumsq", "pmin", "pmax", "hist"],
            source=_SOURCE,
        )
    rows, c = flat.shape
    groups = -(-rows // ROWS_PER_GROUP)
    params = mx.array([limit, bins / (2.0 * limit)], dtype=mx.float32)
    psum, psumsq, pmin, pmax, hist = _kernel(
        inputs=[flat, params],
        template=[("T", flat.dtype), ("RPG", ROWS_PER_GROUP), ("BINS", bins),
                  ("THREADS", THREADS)],
        grid=(c, groups, 1),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[(groups, c)] * 4 + [(bins + 3,)],
        output_dtypes=[mx.float32] * 4 + [mx.int32],
        init_value=0,
    )
    return (
        psum.sum(axis=0),
        psumsq.sum(axis=0),
        pmin.min(axis=0),
        pmax.max(axis=0),
        hist,
        mx.array(rows, dtype=mx.int32),
    )
