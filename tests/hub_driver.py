# ruff: noqa: I001  (calibjob.device must load OpenBLAS before anything imports MLX)
"""Runs calibjob's CLI commands in one process on the small hub fixture (see
test_hub_fixture.py and test_hub_fixture_flux.py): the MMDiT configs are swapped for the
fixture's small ones, DiffusionKit's SD3 configs (`model_io._CONFIG`) and the FLUX.1 configs
calibjob's FLUX loader builds from (`calibjob.models.flux.FLUX_SCHNELL` / `FLUX_DEV`); that is
the only thing changed (every loader, tokenizer and file lookup is DiffusionKit's, calibjob's
and the hub's), then each argument list (separated by '--') runs as `calibjob ARGS`.

    python tests/hub_driver.py [--drop-flux-k-bias] run ... -- merge ... -- inspect ...

`--drop-flux-k-bias` (before the first command) adds one step to calibjob's FLUX checkpoint
mapping: the attention key biases that DiffusionKit's `flux_state_dict_adjustments` splits
out of FLUX.1's fused qkv (and linear1) biases are dropped, as DiffusionKit's own SD3 mapping
drops them and its `load_flux` did under MLX's old lenient `Module.update`; DiffusionKit's
`MMDiT` has no key bias (`k_proj` is built with `bias=False`). calibjob's loader keeps them
and then refuses the real layout as "left over" (test_hub_fixture_flux.py's xfail says so):
the flag lets the rest of the FLUX path run on the fixture meanwhile, and says how many it
dropped on stderr."""

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
if args[:1] == ["--drop-flux-k-bias"]:
    args = args[1:]
    mapped = flux.checkpoint_weights

    def checkpoint_weights(path, config, quantized):
        weights = mapped(path, config, quantized)
        k_bias = {k for k in weights if k.endswith("attn.k_proj.bias")}
        print(f"hub_driver: dropped {len(k_bias)} attention key biases", file=sys.stderr)
        return {k: v for k, v in weights.items() if k not in k_bias}

    flux.checkpoint_weights = checkpoint_weights

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
