# ruff: noqa: I001  (calibjob.device must load OpenBLAS before anything imports MLX)
"""Runs calibjob's CLI commands in one process on the small hub fixture (see
test_hub_fixture.py): DiffusionKit's SD3 Medium config is swapped for the fixture's small one
(the only thing changed; every loader, tokenizer and file lookup is DiffusionKit's and the hub's),
then each argument list (separated by '--') runs as `calibjob ARGS`."""

from __future__ import annotations

import sys

import calibjob.diffusionkit_imports  # noqa: F401  (before MLX and DiffusionKit)
import mlx.core as mx
from diffusionkit.mlx import model_io

import hub_fixture as hf

for key in (hf.SD3_MEDIUM, hf.SD35_LARGE):
    model_io._CONFIG[key] = hf.small_mmdit_config(key, mx.float32)

from calibjob.cli import main  # noqa: E402

args, cmds = sys.argv[1:], [[]]
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
