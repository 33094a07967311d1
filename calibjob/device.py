"""MLX on this machine: the OpenBLAS preload, the kernel cache, and the dtype and batch size
for the device.

Import this module before anything imports `mlx.core`: on Linux the mlx-cpu wheel links
netlib's reference BLAS, and loading OpenBLAS first (RTLD_GLOBAL) makes MLX bind to it
(measured 5.7 -> 196 GFLOP/s fp32 on a 2-core x86_64 box). numpy's bundled OpenBLAS does not
help: its symbols carry a prefix. On an NVIDIA GPU, MLX compiles its kernels at first use and
keeps them in MLX_PTX_CACHE_DIR, by default under /tmp, which a fresh machine does not have
(the paper job's first unit took 47.5 s on a fresh H200, 3.2 s with the cache warm): see
`use_kernel_cache`.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import re
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path

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


# ---- MLX's CUDA kernel cache: kept per user, or shared by a launch's tasks ---------------------

KERNEL_CACHE_ENV = "CALIBJOB_KERNEL_CACHE"  # the persistent cache's root; "off": MLX's default
_PRIVATE_ENV = "CALIBJOB_MLX_PTX_PRIVATE"  # marks an MLX_PTX_CACHE_DIR set by calibjob itself
KERNEL_CACHE_NAME = "calibjob-kernel-cache"  # a launch's shared cache, beside the store
KERNEL_CACHE_DIR: Path | None = None  # the persistent cache this process reads and adds to


def kernel_cache_root() -> Path | None:
    """The persistent kernel cache's root: $CALIBJOB_KERNEL_CACHE (None for 'off'), else
    $XDG_CACHE_HOME/calibjob/mlx-kernels, else ~/.cache/calibjob/mlx-kernels."""
    value = os.environ.get(KERNEL_CACHE_ENV, "")
    if value == "off":
        return None
    if value:
        return Path(value).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "calibjob" / "mlx-kernels"


def nvidia_gpu_models() -> list[str]:
    """This machine's NVIDIA GPU models, from the driver's /proc files (no CUDA, no process);
    where a container hides them, from nvidia-smi; none on a machine without the driver."""
    models = set()
    for info in Path("/proc/driver/nvidia/gpus").glob("*/information"):
        try:
            lines = info.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            key, _, value = line.partition(":")
            if key.strip() == "Model" and value.strip():
                models.add(value.strip())
    if not models and shutil.which("nvidia-smi"):
        import subprocess

        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20, check=True,
            ).stdout  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            out = ""
        models = {line.strip() for line in out.splitlines() if line.strip()}
    return sorted(models)


def kernel_cache_dir(root: Path, gpus: list[str]) -> Path | None:
    """The cache for this MLX version and these GPUs under `root`. MLX names a cached kernel
    by its module alone, and caches machine code for the GPU it compiled on, so one folder
    must never serve two MLX versions or two GPU models."""
    try:
        version = metadata.version("mlx")
    except metadata.PackageNotFoundError:
        return None
    gpu = "+".join(re.sub(r"[^A-Za-z0-9.]+", "-", g).strip("-") for g in gpus)
    return root / f"mlx-{version}" / gpu


def _copy_missing(src: Path, dst: Path, last_suffix: str = "") -> None:
    """Copy the files under `src` that `dst` lacks, each through a temporary name and a rename,
    so a reader of `dst` never sees half a file; files ending in `last_suffix` go last (MLX
    looks a kernel up by its .ptx file and then reads its .txt). Best effort: a cache that
    cannot be read or written costs only compile time."""
    try:
        files = sorted(
            (f for f in src.rglob("*") if f.is_file() and not f.name.startswith(".")),
            key=lambda f: bool(last_suffix) and f.name.endswith(last_suffix),
        )
        for f in files:
            target = dst / f.relative_to(src)
            if target.exists():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            shutil.copyfile(f, tmp)
            os.replace(tmp, target)
    except OSError:
        pass


def _publish(private: Path, shared: Path) -> None:
    """At exit: what this process compiled goes to the persistent cache, then its folder goes."""
    _copy_missing(private, shared, last_suffix=".ptx")
    shutil.rmtree(private, ignore_errors=True)


def use_kernel_cache() -> Path | None:
    """Give MLX a kernel cache that outlives the machine's /tmp, unless the user set
    MLX_PTX_CACHE_DIR (then MLX uses theirs as it is). Only on a machine with an NVIDIA GPU.

    MLX writes its cache files in place, not through a rename, so a process killed mid-write
    would leave a half kernel that every later run loads and fails on, and a task reading a
    shared cache could catch another node's file half-written. So MLX gets a private folder,
    filled at start from the persistent cache (`kernel_cache_dir` under `kernel_cache_root`),
    and what it compiled is copied back whole at exit. Returns the persistent cache."""
    global KERNEL_CACHE_DIR
    current = os.environ.get("MLX_PTX_CACHE_DIR")
    if not sys.platform.startswith("linux") or (
        current and current != os.environ.get(_PRIVATE_ENV)  # the user's, or a parent's
    ):
        return None
    root = kernel_cache_root()
    gpus = nvidia_gpu_models() if root is not None else []
    shared = kernel_cache_dir(root, gpus) if root is not None and gpus else None
    if shared is None:
        return None
    private = Path(tempfile.mkdtemp(prefix="calibjob-mlx-kernels-"))
    _copy_missing(shared, private)
    os.environ["MLX_PTX_CACHE_DIR"] = os.environ[_PRIVATE_ENV] = str(private)
    atexit.register(_publish, private, shared)
    KERNEL_CACHE_DIR = shared
    return shared


def kernel_cache_env(location: str, log_dir: str | Path) -> dict[str, str]:
    """The environment a launched task needs so that all of a launch's tasks share one kernel
    cache: the first node to compile a kernel stores it, the later ones start warm. The cache
    goes beside the store when the store is a folder (every task writes that store, so the
    nodes share its file system), else beside the launch's log folder (submitit needs that one
    shared too). A user's own MLX_PTX_CACHE_DIR or CALIBJOB_KERNEL_CACHE is passed on instead;
    the tasks key the cache by MLX version and GPU model themselves."""
    private = os.environ.get(_PRIVATE_ENV)
    for name in ("MLX_PTX_CACHE_DIR", KERNEL_CACHE_ENV):
        value = os.environ.get(name)
        if value and value != private:
            return {name: value}
    from calibjob.core.locations import is_url

    beside = Path(log_dir).parent if is_url(location) else Path(location).parent
    return {KERNEL_CACHE_ENV: str(beside.expanduser().resolve() / KERNEL_CACHE_NAME)}


preload_openblas()
use_kernel_cache()

import mlx.core as mx  # noqa: E402  (must come after the preload and the kernel cache)
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


def resolve_dtype(name: str, model: str | None = None) -> str:
    """'auto' is float32 on CPU (MLX's fp16 CPU matmul is ~50x slower) and on a GPU the
    model's own half precision: float16 for SD3, bfloat16 for FLUX.1 (DiffusionKit's choices;
    FLUX.1's activations outgrow float16's range)."""
    if name != "auto":
        return name
    if not on_gpu():
        return "float32"
    if model is None:
        return "float16"
    from calibjob.families import model_info

    return model_info(model).gpu_dtype


def mx_dtype(name: str) -> mx.Dtype:
    return {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}[name]


def on_cuda() -> bool:
    """An NVIDIA GPU (MLX's CUDA backend), where the fused step's kernels run."""
    cuda = getattr(mx, "cuda", None)
    return on_gpu() and cuda is not None and cuda.is_available()


def resolve_compile(name: str) -> str:
    """'auto' is 'fused' on an NVIDIA GPU (compiled, with models/fused_block.py's blocks: the
    token passes MLX cannot fuse as single CUDA kernels, see README "Performance"), 'on'
    (`mx.compile` the Euler step) on Metal, 'off' on CPU. Measured (mlx
    0.32.4): on an H100 the paper job takes 2.9 min compiled against 3.1 eager once MLX's
    kernel cache is warm
    (3.6 against 3.4 on a fresh machine, which JIT-compiles ~10 fused kernels once); compiled
    results are deterministic but differ from the spec loop at fp16 rounding (eager is
    bit-identical to it). On CPU compiling gains nothing and costs a C++ compile."""
    if name != "auto":
        return name
    if on_cuda():
        return "fused"
    return "on" if on_gpu() else "off"


# ---- memory: what the device offers, what a job needs, the batch that fits --------------------

# Measured footprints (GB, float16, 256x256 i.e. 256 image tokens + 589 text tokens, CFG rows
# included; see README "Memory"): activations per trajectory in the batch on top of the MMDiT's
# weights (eager / compiled step). Other models and sizes scale with model rows, tokens and
# width; a model's parameters, width, text length and guidance are in calibjob.families.
REF_TOKENS, REF_WIDTH = 256 + 589, 1536
# per trajectory (2 model rows: CFG) at REF_TOKENS x REF_WIDTH, fp16, the step in 1-block
# segments (the worst of batches 4-26 on an H200, bench/memory.py: 0.335 eager and 0.335
# compiled, both at batch 13)
TRAJECTORY_GB = {"off": 0.34, "on": 0.34}
if os.environ.get("CALIBJOB_TRAJECTORY_GB"):  # "off:GB,on:GB", a benchmark's fresh figures
    TRAJECTORY_GB.update(
        {
            k: float(v)
            for k, v in (p.split(":") for p in os.environ["CALIBJOB_TRAJECTORY_GB"].split(","))
        }
    )
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


def _info(model: str):
    from calibjob.families import model_info

    return model_info(model)


def weights_gb(model: str, dtype: str) -> float:
    """The MMDiT's weights in memory (the built-in models: none worth counting)."""
    return _info(model).params * dtype_bytes(dtype) / 1e9


def encode_gb(model: str, dtype: str) -> float:
    """Peak memory of the encode phase, the text encoders loaded alone (the built-in models:
    none worth counting)."""
    return _info(model).encode_gb * dtype_bytes(dtype) / 2


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


def trajectory_gb(model: str, dtype: str, compile: str, latent_size=(32, 32)) -> float:
    """Activation memory one more trajectory in the batch costs (measured at the reference
    shape, scaled linearly in model rows, tokens, width and bytes per element)."""
    info = _info(model)
    tokens = (latent_size[0] // 2) * (latent_size[1] // 2) + info.text_tokens
    from calibjob.config import step_compiled

    per = TRAJECTORY_GB["on" if step_compiled(compile) else "off"]
    rows = info.branches / 2  # the reference is a CFG batch: two rows per trajectory
    scale = info.activation_scale * rows * tokens / REF_TOKENS * info.width / REF_WIDTH
    return per * scale * dtype_bytes(dtype) / 2


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
        # say only what can help: --max-memory lifts the budget only where it set it
        ways = ["raise --max-memory"] if 0 < max_memory < device_memory_gb() else []
        ways += ["run fewer workers on this device"] if share > 1 else []
        ways += ["use a smaller --latent-size or a machine with more memory",
                 "or pass --batch-size to run anyway"]  # fmt: skip
        raise ConfigError(
            f"{model} needs about {fixed + per:.1f} GB at batch 1 but {budget:.1f} GB are "
            f"available{who}; {', '.join(ways)}"
        )
    return b
