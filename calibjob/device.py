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
import mlx.nn as nn  # noqa: E402,F401  (for modules that need it: imported here, after it too)


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


# ---- memory: what the device offers, what a job needs, the batch that fits --------------------

# Measured footprints (GB, float16, 256x256 i.e. 256 image tokens + 589 text tokens, CFG rows
# included; see README "Memory"): MMDiT weights, and activations per trajectory in the batch
# on top of them (eager / compiled step). Other sizes scale with tokens and width.
MMDIT_PARAMS = {
    "argmaxinc/mlx-stable-diffusion-3-medium": (2.085e9, 1536),
    "argmaxinc/mlx-stable-diffusion-3.5-large": (8.146e9, 2432),
    "argmaxinc/mlx-stable-diffusion-3.5-large-4bit-quantized": (8.146e9 / 4, 2432),
}
REF_TOKENS, REF_WIDTH = 256 + 589, 1536
# per trajectory at REF_TOKENS x REF_WIDTH, fp16, the step in 1-block segments (the worst of
# batches 4-26 on an H200, bench/memory.py: 0.335 eager and 0.335 compiled, both at batch 13)
TRAJECTORY_GB = {"off": 0.34, "on": 0.34}
if os.environ.get("CALIBJOB_TRAJECTORY_GB"):  # "off:GB,on:GB", a benchmark's fresh figures
    TRAJECTORY_GB.update(
        {
            k: float(v)
            for k, v in (p.split(":") for p in os.environ["CALIBJOB_TRAJECTORY_GB"].split(","))
        }
    )
# the encode phase of DiffusionKit's SD3 text encoders (CLIP-L, CLIP-G, T5-XXL; the same for every
# SD3 key), float16: 11.16 GB of weights and 11.89 GB at its peak (H200, bench/hub_e2e.py). The
# encoders load alone, so this bounds a run whatever the batch.
ENCODE_GB = 11.9
RESERVE_GB = 1.0  # conditioning, the step's inputs, MLX's kernels and allocator slack
MAX_GPU_BATCH = 32  # throughput flattens past 16-32 on an H100


def device_memory_gb() -> float:
    """Memory this process may plan for: Metal's recommended working set, a CUDA card's
    memory (MLX's device info, else nvidia-smi), else the machine's RAM."""
    info = {}
    for get in (
        getattr(mx, "device_info", None),
        getattr(getattr(mx, "metal", None), "device_info", None),
    ):
        try:
            info = dict(get()) if get else {}
        except Exception:  # noqa: BLE001  (no such device: try the next source)
            info = {}
        if info:
            break
    for key in ("max_recommended_working_set_size", "memory_size", "total_memory"):
        if info.get(key):
            return float(info[key]) / 1e9
    if on_gpu() and sys.platform.startswith("linux"):
        gb = _nvidia_smi_gb()
        if gb:
            return gb
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return 16.0


def _nvidia_smi_gb() -> float | None:
    import subprocess

    first = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0].strip() or "0"
    try:
        out = subprocess.run(
            [
                "nvidia-smi",
                "-i",
                first,
                "--query-gpu=memory.total",
                "--format=csv,noheader,nounits",
            ],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
        return float(out.split()[0]) * 1.048576e6 / 1e9  # MiB
    except Exception:  # noqa: BLE001
        return None


def dtype_bytes(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def weights_gb(model: str, dtype: str) -> float:
    """The MMDiT's weights in memory (the tiny model: none worth counting)."""
    params, _ = MMDIT_PARAMS.get(model, (0.0, REF_WIDTH))
    return params * dtype_bytes(dtype) / 1e9


def encode_gb(model: str, dtype: str) -> float:
    """Peak memory of the encode phase (the tiny model: none worth counting)."""
    return ENCODE_GB * dtype_bytes(dtype) / 2 if model in MMDIT_PARAMS else 0.0


def note_encode_over(model: str, dtype: str, max_memory: float) -> None:
    """Say before the run that --max-memory cannot hold the encode phase: it steers only
    the batch, and the text encoders need what they need."""
    need = encode_gb(model, dtype)
    if 0 < max_memory < need:
        print(
            f"calibjob: note: encoding the prompts needs about {need:.1f} GB (the text "
            f"encoders, loaded alone), more than --max-memory {max_memory:g}; the cap steers "
            f"only the denoising batch",
            file=sys.stderr,
        )


def trajectory_gb(
    model: str, dtype: str, compile: str, latent_size=(32, 32), text_tokens=589
) -> float:
    """Activation memory one more trajectory in the batch costs (measured at the reference
    shape, scaled linearly in tokens, width and bytes per element)."""
    _, width = MMDIT_PARAMS.get(model, (0.0, 64))
    tokens = (latent_size[0] // 2) * (latent_size[1] // 2) + text_tokens
    per = TRAJECTORY_GB["on" if compile == "on" else "off"]
    return per * tokens / REF_TOKENS * width / REF_WIDTH * dtype_bytes(dtype) / 2


def fit_batch(budget_gb: float, fixed_gb: float, per_traj_gb: float, cap: int) -> int:
    """The largest batch in [1, cap] whose fixed + batch * per-trajectory memory stays within
    the budget; 0 if not even one trajectory fits."""
    if per_traj_gb <= 0:
        return cap
    return max(0, min(cap, int((budget_gb - fixed_gb) // per_traj_gb)))


def memory_plan(
    model: str,
    dtype: str,
    compile: str,
    latent_size=(32, 32),
    max_memory: float = 0.0,
    share: int = 1,
) -> tuple[float, float, float]:
    """(budget, fixed, per trajectory) in GB for one worker: the device's memory (or
    --max-memory, whichever is smaller) divided among `share` workers on the device."""
    budget = device_memory_gb()
    if max_memory > 0:
        budget = min(budget, max_memory)
    fixed = weights_gb(model, dtype) + RESERVE_GB
    return budget / max(1, share), fixed, trajectory_gb(model, dtype, compile, latent_size)


def resolve_batch_size(
    batch_size: int,
    trajectories_per_prompt: int,
    *,
    model: str = "tiny",
    dtype: str = "float32",
    compile: str = "off",
    latent_size=(32, 32),
    max_memory: float = 0.0,
    share: int = 1,
) -> int:
    """0 = auto: on a GPU one unit per prompt up to 32, and never more than the memory this
    worker may plan for holds (weights + reserve + batch x measured per-trajectory footprint);
    on CPU at most 4, where batching buys little and smaller units lose less on a kill."""
    if batch_size > 0:
        return batch_size
    cap = max(1, min(MAX_GPU_BATCH if on_gpu() else 4, trajectories_per_prompt))
    budget, fixed, per = memory_plan(model, dtype, compile, latent_size, max_memory, share)
    b = fit_batch(budget, fixed, per, cap)
    if b < 1:
        from calibjob.errors import ConfigError

        who = f" (a 1/{share} share of the device)" if share > 1 else ""
        raise ConfigError(
            f"{model} needs about {fixed + per:.1f} GB at batch 1 but {budget:.1f} GB are "
            f"available{who}; raise --max-memory, run fewer workers on this device, or use "
            f"a machine with more memory"
        )
    return b
