"""MLX on this machine: the OpenBLAS preload, and the dtype and batch size for the device.

Import this module before anything imports `mlx.core`: on Linux the mlx-cpu wheel links
netlib's reference BLAS, and loading OpenBLAS first (RTLD_GLOBAL) makes MLX bind to it
(measured 5.7 -> 196 GFLOP/s fp32 on a 2-core x86_64 box). numpy's bundled OpenBLAS does not
help: its symbols carry a prefix.
"""

from __future__ import annotations

import ctypes
import os
import sys

OPENBLAS_LOADED = False
_warned = False


def preload_openblas() -> bool:
    """Load the system OpenBLAS into the global symbol namespace, once, on Linux."""
    global OPENBLAS_LOADED
    if OPENBLAS_LOADED or not sys.platform.startswith("linux"):
        return OPENBLAS_LOADED
    if os.environ.get("CALIBJOB_NO_OPENBLAS") == "1":  # the benchmark's "without" column
        return False
    if "mlx.core" in sys.modules:
        return False  # too late: MLX already bound its BLAS
    for name in ("libopenblas.so.0", "libopenblasp-r0.so", "libopenblas.so"):
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
            OPENBLAS_LOADED = True
            break
        except OSError:
            continue
    return OPENBLAS_LOADED


preload_openblas()

import mlx.core as mx  # noqa: E402  (must come after the preload)


def on_gpu() -> bool:
    return mx.default_device() == mx.gpu


def warn_reference_blas() -> None:
    """Say once that CPU matmuls will be slow, and how to fix it."""
    global _warned
    if _warned or on_gpu() or OPENBLAS_LOADED or not sys.platform.startswith("linux"):
        return
    _warned = True
    print(
        "calibjob: OpenBLAS not found, MLX runs on the reference BLAS (about 30x slower); "
        "install it with: apt-get install libopenblas0-pthread",
        file=sys.stderr,
    )


def resolve_dtype(name: str) -> str:
    """'auto' is float32 on CPU (MLX's fp16 CPU matmul is ~50x slower) and float16 on a GPU."""
    if name != "auto":
        return name
    return "float16" if on_gpu() else "float32"


def mx_dtype(name: str) -> mx.Dtype:
    return {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}[name]


def resolve_compile(name: str) -> str:
    """'auto' is 'on' (`mx.compile` the Euler step) on a GPU, 'off' on CPU. Measured (mlx
    0.32.4): on an H100 the paper job takes 2.9 min compiled against 3.1 eager once MLX's
    kernel cache is warm
    (3.6 against 3.4 on a fresh machine, which JIT-compiles ~10 fused kernels once); compiled
    results are deterministic but differ from the spec loop at fp16 rounding (eager is
    bit-identical to it). On CPU compiling gains nothing and costs a C++ compile."""
    if name != "auto":
        return name
    return "on" if on_gpu() else "off"


def resolve_batch_size(batch_size: int, trajectories_per_prompt: int) -> int:
    """0 = auto: on a GPU one unit per prompt up to 32 (throughput flattens past 16-32 on an
    H100); on CPU 4, where batching buys little and smaller units lose less on a kill."""
    if batch_size > 0:
        return batch_size
    cap = 32 if on_gpu() else 4
    return max(1, min(cap, trajectories_per_prompt))
