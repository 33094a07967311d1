"""Import this before anything imports `diffusionkit`: it lets DiffusionKit's MLX code load
without torch, coremltools or argmaxtools.

Why: DiffusionKit 0.5.2's MLX modules (`diffusionkit.mlx` and its `mmdit`, `t5`, `tokenizer`,
`vae`) take four names from modules calibjob has no other use for, each of which imports a
large package at its top:

- `get_logger` from `argmaxtools.utils` (imports torch);
- `AppleSiliconContextMixin` and `InferenceContextSpec` from `argmaxtools.test_utils` (imports
  coremltools and torch): the bases of DiffusionKit's `DiffusionKitInferenceContext`, which only
  `DiffusionPipeline.generate_image(verbose=True)` instantiates, to print a Mac's specs;
- `bytes2gigabytes` from `diffusionkit.utils` (imports torch, for DiffusionKit's PyTorch code).

Importing them cost every process that loads a model 4-17 s (coremltools most of it) and put
torch (754 MB) and coremltools into a user's install, and calibjob never calls any of them.
So this module puts small stand-ins for those three modules into `sys.modules`, each only
where the real module cannot import because a package it needs is not installed; where the
user has the real packages, nothing is stood in and DiffusionKit imports them itself. The
installed DiffusionKit is never edited. It also imports `calibjob.device` first, since
DiffusionKit imports `mlx.core` (the OpenBLAS preload and the kernel cache come before that).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import os
import sys
import types
from collections.abc import Callable

import calibjob.device  # noqa: F401  (OpenBLAS and the kernel cache before DiffusionKit's MLX)

# what a real module imports at its top that a user's install does not have
NEEDS: dict[str, tuple[str, ...]] = {
    "argmaxtools.utils": ("argmaxtools", "torch"),
    "argmaxtools.test_utils": ("argmaxtools", "torch", "coremltools", "tqdm"),
    "diffusionkit.utils": ("diffusionkit", "torch", "safetensors", "PIL"),
}
STOOD_IN: list[str] = []  # the module names this process stands in for, in order


def get_logger(name: str, level: int | str = logging.INFO) -> logging.Logger:
    """argmaxtools' `get_logger` as DiffusionKit sees it: a named logger at `level` (or at the
    LOG_LEVEL environment variable), with the root logger's basic configuration in place, so
    logging looks the same with the stand-in as with the real package."""
    logging.basicConfig()
    logger = logging.getLogger(name)
    logger.setLevel(os.environ.get("LOG_LEVEL") or level)
    return logger


class InferenceContextSpec:
    """Base of DiffusionKit's `DiffusionKitInferenceContext` (argmaxtools' Core ML test
    schema). Nothing on calibjob's path builds one; the specs need the real argmaxtools."""

    def spec_dict(self) -> dict:
        return {
            "os_spec": self.os_spec(),
            "code_spec": self.code_spec(),
            "model_spec": self.model_spec(),
            "device_spec": self.device_spec(),
        }


class AppleSiliconContextMixin:
    """argmaxtools' Apple Silicon device description, which shells out to macOS tools; only
    `generate_image(verbose=True)` asks for it."""

    def os_spec(self) -> dict:
        raise _needs_argmaxtools("os_spec")

    def device_spec(self) -> dict:
        raise _needs_argmaxtools("device_spec")


def _needs_argmaxtools(what: str) -> RuntimeError:
    return RuntimeError(
        f"{what}: DiffusionKit's inference-context report needs argmaxtools with torch and "
        "coremltools (pip install argmaxtools); calibjob stands in for it without them"
    )


def bytes2gigabytes(n: int) -> float:
    """DiffusionKit's unit for its memory log lines (GiB, despite the name)."""
    return n / 1024**3


def _installed(name: str) -> bool:
    """Whether a top-level package can be found (or is already imported), without importing
    it: the stand-ins must cost nothing where the real packages are used."""
    if name in sys.modules:
        return True
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _module(name: str, package: bool = False, **names: object) -> types.ModuleType:
    """A module object registered under `name` (and bound on its parent, as an import does),
    with a spec so that `importlib.util.find_spec(name)` answers for it."""
    mod = types.ModuleType(name, __doc__)
    mod.__spec__ = importlib.machinery.ModuleSpec(
        name, None, origin="calibjob stand-in", is_package=package
    )
    if package:
        mod.__path__ = []
    mod.__dict__.update(names)
    sys.modules[name] = mod
    parent, _, child = name.rpartition(".")
    if parent and parent in sys.modules:
        setattr(sys.modules[parent], child, mod)
    STOOD_IN.append(name)
    return mod


def _stand_in(name: str, **names: object) -> None:
    if name in sys.modules or all(_installed(n) for n in NEEDS[name]):
        return  # imported already, or DiffusionKit will import the real one
    parent = name.partition(".")[0]
    if parent not in sys.modules:
        if _installed(parent):
            importlib.import_module(parent)  # the real package: its __init__ imports no more
        elif parent == "argmaxtools":
            _module(parent, package=True)  # not installed at all: the usual case
        else:
            return  # no DiffusionKit: its own import says so
    _module(name, **names)


class _NoTorchNotice(logging.Filter):
    """transformers says when it is imported without torch that "Models won't be available":
    true, and beside the point for calibjob, which takes only its configs and tokenizers (the
    models are DiffusionKit's MLX ones). One line of noise in every run, dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("PyTorch was not found")


def install() -> list[str]:
    """Register the stand-ins this process needs (idempotent); returns the names stood in."""
    if not _installed("torch") and not STOOD_IN:
        logging.getLogger("transformers").addFilter(_NoTorchNotice())
    entries: list[tuple[str, dict[str, Callable | type]]] = [
        ("argmaxtools.utils", {"get_logger": get_logger}),
        (
            "argmaxtools.test_utils",
            {
                "get_logger": get_logger,
                "AppleSiliconContextMixin": AppleSiliconContextMixin,
                "InferenceContextSpec": InferenceContextSpec,
            },
        ),
        ("diffusionkit.utils", {"get_logger": get_logger, "bytes2gigabytes": bytes2gigabytes}),
    ]
    for name, names in entries:
        _stand_in(name, **names)
    return list(STOOD_IN)


install()
