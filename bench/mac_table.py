"""What fits on a Mac: the auto batch calibjob would choose on 16/32/64/128 GB of unified memory,
from the measured footprints in calibjob.device and calibjob.families (no model is loaded).

MLX plans for Metal's recommended working set, not the whole memory; this table takes it as two
thirds of the memory up to 32 GB and three quarters above (what Metal reports on such machines;
a real Mac's `mx.device_info()` is what calibjob uses). The encode phase (text encoders alone)
must fit too. Half precision: float16 for SD3, bfloat16 for FLUX.1, the step compiled.

    python bench/mac_table.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402,F401  (the checkout on sys.path, OpenBLAS before MLX)
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from calibjob import device  # noqa: E402
from calibjob.families import model_info  # noqa: E402

MACS = (16, 32, 64, 128)
ROWS = (
    ("sd3-medium", "paper: 256x256", (32, 32), 13),
    ("sd3.5-large", "1024x1024", (128, 128), 13),
    ("flux-schnell", "1024x1024", (128, 128), 13),
    ("flux-dev", "1024x1024", (128, 128), 13),
    ("argmaxinc/mlx-FLUX.1-schnell-4bit-quantized", "1024x1024", (128, 128), 13),
    ("flux-schnell", "512x512", (64, 64), 13),
    ("flux-schnell", "256x256", (32, 32), 13),
)


def working_set(gb: int) -> float:
    return gb * (2 / 3 if gb <= 32 else 3 / 4)


def cell(model: str, latent, cap: int, mac: int) -> str:
    info = model_info(model)
    dtype = info.gpu_dtype
    budget = working_set(mac)
    fixed = device.weights_gb(model, dtype) + device.RESERVE_GB
    per = device.trajectory_gb(model, dtype, "on", latent)
    b = device.fit_batch(budget, fixed, per, cap)
    if not b:
        return "does not fit"
    # the encode phase (text encoders alone) above the working set: needs --max-memory
    return f"{b}" + ("*" if device.encode_gb(model, dtype) > budget else "")


def main() -> None:
    t = Table(title="auto batch by unified memory (working set: 2/3 up to 32 GB, 3/4 above)",
              caption="*: encoding needs more than the working set (see README, Memory)")
    t.add_column("model")
    t.add_column("size")
    for mac in MACS:
        t.add_column(f"{mac} GB", justify="right")
    for model, size, latent, cap in ROWS:
        name = model_info(model).name.replace("argmaxinc/mlx-", "")
        t.add_row(name, size, *(cell(model, latent, cap, mac) for mac in MACS))
    Console(width=120).print(t)


if __name__ == "__main__":
    main()
