"""The fused step's CUDA kernels (MLX's CUDA backend), with the plain MLX ops everywhere else.

Measured on an H200 (SD3-2b shapes, fp16, batch 13, `bench/kernel_profile.py`): besides the
matrix products and attention, the step's time went to passes over the tokens that MLX cannot
fuse: its layer-norm kernel (70 us a call, ~1.1 TB/s), the modulation after it, the residual
update before the second norm, the copies that join image and text q/k/v (~2 TB/s), and the
copies that slice each adaLN parameter out of the block's modulation row. Here:

- `modulated_norm`: layer_norm(x) * (1 + scale) + shift in one pass, the shift and scale read
  straight from the block's modulation (rows, 1, 1, k*D) by chunk index;
- `gated_modulated_norm`: r = x + y * gate, then the modulated norm of r; both returned (y
  may come token-major, as the o-projection gives it);
- `gated_residual`: x + y * gate alone (after the MLP), 16 bytes a load;
- `joint_tokens`: the two streams' q, k and v joined along the tokens in one kernel,
  token-major (tokens, batch, channels), so that the attention output (which cuDNN lays out as
  q) splits into one contiguous block of rows per stream, read in place by its o-projection;
- `gelu`: the MLP's GELU as a table lookup. MLX's fused GELU (erf, every op rounded) is bound by
  its instructions at ~2 TB/s (0.52 ms per trajectory-step, the largest pass left); a 2-byte
  dtype has 65,536 values, so the function is a 128 KB table made by MLX's own `gelu` on the
  device (equal to it by construction), held in each block's shared memory.

Each rounds as the separate ops do (every op's result in the activation dtype, the norm's
statistics in float32), so the data stays the model's arithmetic; what is left is the order of
the norm's float32 sums, the kind of difference `mx.compile` already makes. Off CUDA (CPU,
Metal) each function is DiffusionKit's own ops, so the fused step equals the generic one to the
bit there and its Python is tested everywhere.
"""

from __future__ import annotations

import hashlib

import mlx.core as mx
import mlx.nn as nn
from diffusionkit.mlx.mmdit import affine_transform

from calibjob.device import on_cuda

_HEADER = """
namespace calib {
// 8 consecutive elements as float: one or two 16-byte loads where p is 16-byte aligned
template <typename T>
__device__ inline void load8(const T* p, float* v) {
  constexpr int per = 16 / sizeof(T);
  if ((reinterpret_cast<unsigned long long>(p) & 15) == 0) {
#pragma unroll
    for (int k = 0; k < 8 / per; ++k) {
      uint4 u = reinterpret_cast<const uint4*>(p)[k];
      const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
      for (int j = 0; j < per; ++j) v[k * per + j] = static_cast<float>(e[j]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = static_cast<float>(p[j]);
  }
}
template <typename T>
__device__ inline void store8(T* p, const T* v) {
  constexpr int per = 16 / sizeof(T);
  if ((reinterpret_cast<unsigned long long>(p) & 15) == 0) {
#pragma unroll
    for (int k = 0; k < 8 / per; ++k)
      reinterpret_cast<uint4*>(p)[k] = reinterpret_cast<const uint4*>(v)[k];
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) p[j] = v[j];
  }
}
__device__ inline float warp_sum(float s) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
  return s;
}
}  // namespace calib
"""

# A block of R rows, TPR threads a row (TPR = D / 8 / CH rounded up to whole warps): thread t
# holds the row's chunks of 8 channels t, t + TPR, ... (CH of them) in registers; the row's sums
# go warp by warp through shared memory. Few registers a thread and many threads a row keep
# enough loads in flight to stream the tokens near the memory's rate. Template: T, D
# (channels), K (chunks of the modulation row), SHIFT, SCALE (and GATE) chunk indices, CH, R,
# YBT (the gated kernel's y given token-major: row t * B + b for model row b's token t); the
# batch and token counts are read at run time from x's shape, so one compiled kernel serves
# every batch size (NVRTC takes seconds a kernel). LOAD fills v[CH * 8] from the row (and
# writes the residual where there is one).
_NORM = """
  constexpr int TPR = ((D / 8 + CH - 1) / CH + 31) / 32 * 32;
  constexpr int NW = TPR / 32;
  __shared__ float part[2][R][NW];
  const int L = x_shape[1];  // tokens per model row
  const int B = x_shape[0];
  const int t = threadIdx.x, r = threadIdx.y;
  const int row = blockIdx.x * R + r;
  const bool live = row < B * L;
  const size_t base = (size_t)row * D;
  const T* mrow = mods + (size_t)(live ? row / L : 0) * K * D;  // this model row's modulation
  float v[CH * 8];
#pragma unroll
  for (int p = 0; p < CH; ++p) {
    const int c = (p * TPR + t) * 8;
#pragma unroll
    for (int j = 0; j < 8; ++j) v[p * 8 + j] = 0.f;
    if (live && c < D) {
      LOAD
    }
  }
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < CH * 8; ++i) s += v[i];
  s = calib::warp_sum(s);
  if ((t & 31) == 0) part[0][r][t >> 5] = s;
  __syncthreads();
  s = 0.f;
#pragma unroll
  for (int w = 0; w < NW; ++w) s += part[0][r][w];
  const float mean = s / D;
  float q = 0.f;
#pragma unroll
  for (int p = 0; p < CH; ++p) {
    if ((p * TPR + t) * 8 < D) {
#pragma unroll
      for (int j = 0; j < 8; ++j) q += (v[p * 8 + j] - mean) * (v[p * 8 + j] - mean);
    }
  }
  q = calib::warp_sum(q);
  if ((t & 31) == 0) part[1][r][t >> 5] = q;
  __syncthreads();
  q = 0.f;
#pragma unroll
  for (int w = 0; w < NW; ++w) q += part[1][r][w];
  const float rstd = rsqrtf(q / D + EPS);
  if (!live) return;
#pragma unroll
  for (int p = 0; p < CH; ++p) {
    const int c = (p * TPR + t) * 8;
    if (c < D) {
      float sc[8], sh[8];
      calib::load8(mrow + SCALE * D + c, sc);
      calib::load8(mrow + SHIFT * D + c, sh);
      alignas(16) T o[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        T n = static_cast<T>((v[p * 8 + j] - mean) * rstd);
        T g = static_cast<T>(1.f + sc[j]);
        T m = static_cast<T>(static_cast<float>(n) * static_cast<float>(g));
        o[j] = static_cast<T>(static_cast<float>(m) + sh[j]);
      }
      calib::store8(out + base + c, o);
    }
  }
"""

_LOAD_PLAIN = "calib::load8(x + base + c, v + p * 8);"

# r = x + y * gate, each op rounded to T as the separate ops round; r is written, then normed
_LOAD_GATED = """
      float xv[8], yv[8], gv[8];
      const size_t yrow = YBT ? (size_t)(row % L) * B + row / L : (size_t)row;
      calib::load8(x + base + c, xv);
      calib::load8(y + yrow * D + c, yv);
      calib::load8(mrow + GATE * D + c, gv);
      alignas(16) T r[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        T t = static_cast<T>(yv[j] * gv[j]);
        r[j] = static_cast<T>(xv[j] + static_cast<float>(t));
        v[p * 8 + j] = static_cast<float>(r[j]);
      }
      calib::store8(res + base + c, r);
"""

# r = x + y * gate alone (a block's residual update after its MLP), rounded as the separate
# ops round: thread i takes chunks of 8 i, i + S, ... (CH of them, S = all chunks / CH, loads
# first). Template: T, D, K, GATE, CH.
_RESIDUAL = """
  const size_t n = (size_t)x_shape[0] * x_shape[1] * (D / 8);  // chunks in all
  const size_t S = (n + CH - 1) / CH;
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  const int L = x_shape[1];
  float xv[CH][8], yv[CH][8], gv[CH][8];
#pragma unroll
  for (int p = 0; p < CH; ++p) {
    const size_t k = i + p * S;
    if (k < n) {
      const size_t row = k / (D / 8);
      const int c = (k % (D / 8)) * 8;
      calib::load8(x + row * D + c, xv[p]);
      calib::load8(y + row * D + c, yv[p]);
      calib::load8(mods + (row / L) * K * D + GATE * D + c, gv[p]);
    }
  }
#pragma unroll
  for (int p = 0; p < CH; ++p) {
    const size_t k = i + p * S;
    if (k < n) {
      alignas(16) T r[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        T t = static_cast<T>(yv[p][j] * gv[p][j]);
        r[j] = static_cast<T>(xv[p][j] + static_cast<float>(t));
      }
      calib::store8(out + k * 8, r);
    }
  }
"""

# q, k, v of two streams joined along the tokens: thread i copies 16 bytes of each, i in the
# output's order. Template: T, C (channels), BT (token-major output: (L1 + L2, B, C) rather
# than (B, L1 + L2, C)); the batch and the two streams' token counts come from the shapes.
_JOIN = """
  constexpr int V = 16 / sizeof(T);  // elements per 16 bytes
  constexpr int CV = C / V;
  const int B = q1_shape[0], L1 = q1_shape[1], L2 = q2_shape[1];
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (size_t)B * (L1 + L2) * CV) return;
  const size_t row = BT ? (i / CV) % B : i / ((size_t)(L1 + L2) * CV);
  const int t = BT ? i / ((size_t)B * CV) : (i / CV) % (L1 + L2);
  const int c = (i % CV) * V;
  const size_t src = t < L1 ? (row * L1 + t) * C + c : (row * L2 + (t - L1)) * C + c;
  const size_t dst = i * V;
  const uint4* a;
  a = reinterpret_cast<const uint4*>((t < L1 ? q1 : q2) + src);
  reinterpret_cast<uint4*>(q + dst)[0] = a[0];
  a = reinterpret_cast<const uint4*>((t < L1 ? k1 : k2) + src);
  reinterpret_cast<uint4*>(k + dst)[0] = a[0];
  a = reinterpret_cast<const uint4*>((t < L1 ? v1 : v2) + src);
  reinterpret_cast<uint4*>(v + dst)[0] = a[0];
"""

# out = table[x] for every 2-byte element: the table (65,536 entries, 128 KB) copied into the
# block's shared memory, then the blocks (one per multiprocessor) stride over x 16 bytes a
# load, two loads in flight per thread. The count comes from the shape: all of x, rows of a
# multiple of 8 elements (the caller checks).
_GELU = """
  extern __shared__ unsigned short table[];
  for (int k = threadIdx.x; k < 65536 / 8; k += blockDim.x)
    reinterpret_cast<uint4*>(table)[k] = reinterpret_cast<const uint4*>(tbl)[k];
  __syncthreads();
  const size_t chunks = (size_t)x_shape[0] * x_shape[1] * x_shape[2] * x_shape[3] / 8;
  const size_t stride = (size_t)gridDim.x * blockDim.x;
  const uint4* src = reinterpret_cast<const uint4*>(x);
  uint4* dst = reinterpret_cast<uint4*>(out);
  for (size_t c = (size_t)blockIdx.x * blockDim.x + threadIdx.x; c < chunks; c += 2 * stride) {
    const bool two = c + stride < chunks;
    const uint4 a = src[c];
    const uint4 b = two ? src[c + stride] : a;
    dst[c] = calib::look(table, a);
    if (two) dst[c + stride] = calib::look(table, b);
  }
"""
_GELU_HEADER = """
namespace calib {
__device__ inline uint4 look(const unsigned short* table, uint4 u) {
  const unsigned short* e = reinterpret_cast<const unsigned short*>(&u);
  uint4 o;
  unsigned short* r = reinterpret_cast<unsigned short*>(&o);
#pragma unroll
  for (int j = 0; j < 8; ++j) r[j] = table[e[j]];
  return o;
}
}  // namespace calib
"""
_TABLE_BYTES = 65536 * 2
# one 1024-thread block per multiprocessor of an H100 or H200 (the loop covers any other count)
_BLOCKS = 132

_kernels: dict = {}
_tables: dict = {}


def _kernel(kind: str, eps: float = 0.0):
    """The compiled kernel `kind` (norm, gated, residual, join or gelu), one per epsilon."""
    if (kind, eps) not in _kernels:
        if kind == "gelu":
            tag = hashlib.sha1((_GELU_HEADER + _GELU).encode()).hexdigest()[:10]
            _kernels[(kind, eps)] = mx.fast.cuda_kernel(
                name=f"calib_gelu_{tag}", input_names=["x", "tbl"], output_names=["out"],
                source=_GELU, header=_GELU_HEADER, shared_memory=_TABLE_BYTES,
            )  # fmt: skip
            return _kernels[(kind, eps)]
        if kind == "join":
            body, inputs, outputs = _JOIN, ["q1", "q2", "k1", "k2", "v1", "v2"], ["q", "k", "v"]
        elif kind == "residual":
            body, inputs, outputs = _RESIDUAL, ["x", "y", "mods"], ["out"]
        else:
            body = _NORM.replace("LOAD", _LOAD_GATED if kind == "gated" else _LOAD_PLAIN)
            body = body.replace("EPS", f"{float(eps)!r}f")
            inputs = ["x", "y", "mods"] if kind == "gated" else ["x", "mods"]
            outputs = ["res", "out"] if kind == "gated" else ["out"]
        # the source's hash in the name: MLX caches compiled kernels on disk by name
        tag = hashlib.sha1((_HEADER + body).encode()).hexdigest()[:10]
        _kernels[(kind, eps)] = mx.fast.cuda_kernel(
            name=f"calib_{kind}_{tag}", input_names=inputs, output_names=outputs,
            source=body, header=_HEADER,
        )  # fmt: skip
    return _kernels[(kind, eps)]


def _tokens_fit(x: mx.array) -> bool:
    """The kernels' layout: (rows, L, 1, D) tokens of a 2-byte dtype, D a multiple of 8,
    at most 8192 channels (a block of 1024 threads, 8 channels each)."""
    return (
        on_cuda() and x.ndim == 4 and x.shape[2] == 1 and x.shape[-1] % 8 == 0
        and x.shape[-1] <= 8192 and x.dtype in (mx.float16, mx.bfloat16)
    )  # fmt: skip


def _norm_fits(x: mx.array, mods: mx.array) -> bool:
    """The norm kernels' case: tokens that fit, more than one row (DiffusionKit normalises a
    single row by another formula) and one modulation row per model row."""
    return (
        _tokens_fit(x) and x.shape[0] > 1 and mods.shape[0] == x.shape[0]
        and mods.size == x.shape[0] * mods.shape[-1]
    )  # fmt: skip


# chunks of 8 channels a thread (CH) and token rows a block (R) of the norm kernels: on an H200
# at SD3's shapes, 3 and 1 were the fastest for the text stream, plain and gated, and within
# 10% of the fastest for the image stream (bench/norm_kernels.py)
NORM_LAYOUT = {"CH": 3, "R": 1}


def _norm(kind: str, inputs: list[mx.array], x, mods, chunks: dict, eps: float,
          layout: dict | None = None) -> list:  # fmt: skip
    d, outputs = x.shape[-1], 2 if kind == "gated" else 1
    lay = layout or NORM_LAYOUT
    ch, r = lay["CH"], lay["R"]
    tpr = (-(-d // 8 // ch) + 31) // 32 * 32  # threads a row, whole warps
    n = x.shape[0] * x.shape[1]  # token rows, r to a block
    return _kernel(kind, eps)(
        inputs=inputs,
        template=[("T", x.dtype), ("D", d), ("K", mods.shape[-1] // d), *chunks.items(),
                  ("CH", ch), ("R", r)],
        grid=((n + r - 1) // r * tpr, r, 1),
        threadgroup=(tpr, r, 1),
        output_shapes=[x.shape] * outputs,
        output_dtypes=[x.dtype] * outputs,
    )  # fmt: skip


def modulated_norm(x: mx.array, mods: mx.array, k: int, shift: int, scale: int, norm) -> mx.array:
    """DiffusionKit's `affine_transform(x, shift, scale, norm)`, shift and scale being chunks
    `shift` and `scale` of the k chunks of `mods` (rows, 1, 1, k*D); x (rows, L, 1, D)."""
    if not _norm_fits(x, mods):
        p = mx.split(mods, k, axis=-1)
        return affine_transform(x, shift=p[shift], residual_scale=p[scale], norm_module=norm)
    (out,) = _norm("norm", [x, mods], x, mods, {"SHIFT": shift, "SCALE": scale}, norm.eps)
    return out


def batch_major(y: mx.array, rows: int) -> mx.array:
    """Token-major rows (L * rows, D) (`joint_tokens`' order) as (rows, L, 1, D)."""
    return y.reshape(-1, rows, 1, y.shape[-1]).transpose(1, 0, 2, 3)


def gated_modulated_norm(
    x: mx.array, y: mx.array, mods: mx.array, k: int, gate: int, shift: int, scale: int, norm
) -> tuple[mx.array, mx.array]:
    """r = x + y * gate, and `modulated_norm(r, ...)`: a block's residual update after
    attention and the modulated norm before its MLP, as DiffusionKit's `post_sdpa` computes
    them. y is x's shape, or 2-D (L * rows, D) in token-major order (`joint_tokens`).
    Returns (r, normed)."""
    by_token = y.ndim == 2
    if not (_norm_fits(x, mods) and (y.shape == x.shape or by_token and y.size == x.size)):
        p = mx.split(mods, k, axis=-1)
        r = x + (batch_major(y, x.shape[0]) if by_token else y) * p[gate]
        return r, affine_transform(r, shift=p[shift], residual_scale=p[scale], norm_module=norm)
    chunks = {"SHIFT": shift, "SCALE": scale, "GATE": gate, "YBT": int(by_token)}
    r, out = _norm("gated", [x, y, mods], x, mods, chunks, norm.eps)
    return r, out


# chunks of 8 channels a thread of the residual kernel (1, 2 and 4 measured: 2 the fastest)
RESIDUAL_CHUNKS = 2


def gated_residual(x: mx.array, y: mx.array, mods: mx.array, k: int, gate: int) -> mx.array:
    """x + y * gate, gate being chunk `gate` of the k chunks of `mods` (rows, 1, 1, k*D): a
    block's residual update after its MLP."""
    if not (_norm_fits(x, mods) and y.shape == x.shape and y.dtype == x.dtype):
        return x + y * mx.split(mods, k, axis=-1)[gate]
    d = x.shape[-1]
    n = -(-x.size // 8 // RESIDUAL_CHUNKS)  # threads
    (out,) = _kernel("residual")(
        inputs=[x, y, mods],
        template=[("T", x.dtype), ("D", d), ("K", k), ("GATE", gate), ("CH", RESIDUAL_CHUNKS)],
        grid=((n + 255) // 256 * 256, 1, 1),
        threadgroup=(256, 1, 1),
        output_shapes=[x.shape],
        output_dtypes=[x.dtype],
    )
    return out


def joint_tokens(first: tuple, second: tuple) -> tuple[mx.array, mx.array, mx.array]:
    """(q, k, v) of two streams, each (B, L, 1, C), joined along the tokens, first's then
    second's, token-major: (L1 + L2, B, 1, C). One kernel on CUDA; the concatenation and a
    transposed copy otherwise."""
    a = first[0]
    same = all(t.shape[0] == a.shape[0] and t.shape[2:] == a.shape[2:] for t in first + second)
    if not (_tokens_fit(a) and same and all(t.dtype == a.dtype for t in first + second)):
        return tuple(
            mx.contiguous(mx.concatenate([f, s], axis=1).transpose(1, 0, 2, 3))
            for f, s in zip(first, second, strict=True)
        )
    b, l1, l2, c = a.shape[0], a.shape[1], second[0].shape[1], a.shape[-1]
    n = b * (l1 + l2) * c // 8
    shape = (l1 + l2, b, 1, c)
    inputs = [first[0], second[0], first[1], second[1], first[2], second[2]]
    return tuple(
        _kernel("join")(
            inputs=inputs,
            template=[("T", a.dtype), ("C", c), ("BT", 1)],
            grid=((n + 255) // 256 * 256, 1, 1),
            threadgroup=(256, 1, 1),
            output_shapes=[shape] * 3,
            output_dtypes=[a.dtype] * 3,
        )
    )


def prepare_gelu() -> None:
    """Build the GELU tables (float16, bfloat16) on the device: each dtype's 65,536 values
    through MLX's own `gelu`. Called before a step is compiled (nothing can be evaluated inside
    `mx.compile`'s trace); without its table, `gelu` uses MLX's op."""
    if not on_cuda() or _tables:
        return
    for dtype in (mx.float16, mx.bfloat16):
        every = mx.arange(65536, dtype=mx.uint32).astype(mx.uint16).view(dtype)
        _tables[dtype] = nn.gelu(every).view(mx.uint16)
    mx.eval(list(_tables.values()))


def gelu(x: mx.array, act) -> mx.array:
    """The MLP's activation `act` on x (rows, L, 1, D): the table lookup where `act` is MLX's
    exact GELU (DiffusionKit's SD3 and FLUX.1 MLPs), x fits and its dtype's table is built;
    `act(x)` otherwise."""
    exact = isinstance(act, nn.GELU) and getattr(act, "_approx", None) == "none"
    table = _tables.get(x.dtype)
    # a table exists only on CUDA; whole chunks of 8 per row, so every row starts 16-byte aligned
    if not (exact and table is not None and x.ndim == 4 and x.shape[-1] % 8 == 0):
        return act(x)
    (out,) = _kernel("gelu")(
        inputs=[x, table],
        grid=(_BLOCKS * 1024, 1, 1),
        threadgroup=(1024, 1, 1),
        output_shapes=[x.shape],
        output_dtypes=[x.dtype],
    )
    return out
