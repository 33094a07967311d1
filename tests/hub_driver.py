# ruff: noqa: I001  (calibjob.device must load OpenBLAS before anything imports MLX)
"""Runs calibjob's CLI commands in one process on the small hub fixture (see
test_hub_fixture.py and test_hub_fixture_flux.py): the MMDiT configs are swapped for the
fixture's small ones, DiffusionKit's SD3 configs (`model_io._CONFIG`) and the FLUX.1 configs
calibjob's FLUX loader builds from (`calibjob.models.flux.FLUX_SCHNELL` / `FLUX_DEV`); that is
the only thing changed (every loader, tokenizer and file lookup is DiffusionKit's, calibjob's
and the hub's), then each argument list (separated by '--') runs as `calibjob ARGS`.

    python tests/hub_driver.py run ... -- merge ... -- inspect ...
"""

from __future__ import annotations

import sys

import calibjob.diffusionkit_imports  # noqa: F401  (before MLX and DiffusionKit)
import mlx.core as mx
from diffusionkit.mlx import model_io

import hub_fixture as hf

for key in hf.SD3_KEYS:
    model_io._CONFIG[key] = hf.small_mmdit_config(key, mx.float32)

import calibjob.models.flux as flux  # noqa: E402

flux.FLUX_SCHNELL = hf.small_flux_config(hf.FLUX_SCHNELL, mx.float32)
flux.FLUX_DEV = hf.small_flux_config(hf.FLUX_DEV, mx.float32)

args = sys.argv[1:]

from calibjob.cli import main  # noqa: E402

cmds: list[list[str]] = [[]]
for a in args:
    if a == "--":
        cmds.append([])
    else:
        cmds[-1].append(a)
for cmd in cmds:
    sys.argv = ["calibjob", *cmd]
    try:
        main()
    except SystemExit as e:
        if e.code:
            raise
