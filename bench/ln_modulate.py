"""A trial for the GPU step: the layer norm and the adaLN modulation after it in one CUDA kernel.

DiffusionKit computes `layer_norm(x) * (1 + scale) + shift` as two passes over the tokens: MLX's
layer-norm kernel (which `mx.compile` cannot fuse into), then an elementwise kernel. Here one
kernel reads each token once and writes the modulated row; the rounding follows the two-pass
path (the normalised value rounded to the activation dtype, then each operation rounded).
CUDA only (`mx.fast.cuda_kernel`); `bench/step_profile.py --variants ln-kernel` installs it in
DiffusionKit's `affine_transform` for the timed unit and checks it against the generic path.
"""

from __future__ import annotations

import mlx.core as mx

_SOURCE = """
    const int row = blockIdx.x;
    const int tid = threadIdx.x;
    const int b = row / L;
    const T* xr = x + (size_t)row * D;
    const T* sc = scale + (size_t)b * D;
    const T* sh = shift + (size_t)b * D;
    T* outr = out + (size_t)row * D;
    constexpr int PER = (D + 255) / 256;
    float v[PER];
    float s = 0.f;
    #pragma unroll
    for (int j = 0; j < PER; ++j) {
        int i = tid + j * 256;
        v[j] = i < D ? static_cast<float>(xr[i]) : 0.f;
        s += v[j];
    }
    __shared__ float red[8];
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
    if ((tid & 31) == 0) red[tid >> 5] = s;
    __syncthreads();
    float tot = 0.f;
    #pragma unroll
    for (int w = 0; w < 8; ++w) tot += red[w];
    const float mean = tot / D;
    __syncthreads();
    float q = 0.f;
    #pragma unroll
    for (int j = 0; j < PER; ++j) {
        int i = tid + j * 256;
        float d = i < D ? v[j] - mean : 0.f;
        q += d * d;
    }
    for (int o = 16; o > 0; o >>= 1) q += __shfl_xor_sync(0xffffffff, q, o);
    if ((tid & 31) == 0) red[tid >> 5] = q;
    __syncthreads();
    float var = 0.f;
    #pragma unroll
    for (int w = 0; w < 8; ++w) var += red[w];
    const float rstd = rsqrtf(var / D + static_cast<float>(EPS));
    #pragma unroll
    for (int j = 0; j < PER; ++j) {
        int i = tid + j * 256;
        if (i < D) {
            T n = static_cast<T>((v[j] - mean) * rstd);
            T g = static_cast<T>(1.f + static_cast<float>(sc[i]));
            T m = static_cast<T>(static_cast<float>(n) * static_cast<float>(g));
            outr[i] = static_cast<T>(static_cast<float>(m) + static_cast<float>(sh[i]));
        }
    }
"""

_KERNELS: dict = {}


def ln_modulate(x: mx.array, shift: mx.array, scale: mx.array, eps: float) -> mx.array:
    """layer_norm(x) * (1 + scale) + shift for x (B, L, 1, D), shift and scale (B, 1, 1, D)."""
    if eps not in _KERNELS:  # one kernel per epsilon, written into its source
        _KERNELS[eps] = mx.fast.cuda_kernel(
            name="ln_modulate", input_names=["x", "scale", "shift"], output_names=["out"],
            source=_SOURCE.replace("EPS", f"{eps!r}"),
        )  # fmt: skip
    kernel = _KERNELS[eps]
    rows_b, tokens, d = x.shape[0], x.shape[1], x.shape[-1]
    scale = mx.broadcast_to(scale, (rows_b, 1, 1, d))
    shift = mx.broadcast_to(shift, (rows_b, 1, 1, d))
    (out,) = kernel(
        inputs=[x, scale, shift],
        template=[("T", x.dtype), ("D", d), ("L", tokens)],
        grid=(rows_b * tokens * 256, 1, 1),
        threadgroup=(256, 1, 1),
        output_shapes=[x.shape],
        output_dtypes=[x.dtype],
    )
    return out


def check(rows: int = 26, tokens: int = 845, d: int = 1536, eps: float = 1e-6) -> float:
    """Max |kernel - two-pass path| in units of the output's largest magnitude (float16)."""
    x = mx.random.normal((rows, tokens, 1, d)).astype(mx.float16) * 3 + 1
    sc = (mx.random.normal((rows, 1, 1, d)) * 0.2).astype(mx.float16)
    sh = (mx.random.normal((rows, 1, 1, d)) * 0.2).astype(mx.float16)
    ref = mx.fast.layer_norm(x, None, None, eps) * (1.0 + sc) + sh
    out = ln_modulate(x, sh, sc, eps)
    return (mx.abs(out.astype(mx.float32) - ref.astype(mx.float32)).max()
            / mx.abs(ref.astype(mx.float32)).max()).item()  # fmt: skip


def install():
    """DiffusionKit's `affine_transform` uses the kernel where it normalises a batch (its
    batch-1 branch already calls MLX's fused layer norm); returns a function that undoes it."""
    from diffusionkit.mlx import mmdit

    original = mmdit.affine_transform

    def affine(x, shift, residual_scale, norm_module=None):
        if norm_module is None or x.shape[0] == 1 or x.ndim != 4:
            return original(x, shift, residual_scale, norm_module)
        return ln_modulate(x, shift, residual_scale, norm_module.eps)

    mmdit.affine_transform = affine
    return lambda: setattr(mmdit, "affine_transform", original)
