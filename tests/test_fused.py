"""The fused joint block (q/k/v as one product per stream, models/fused.py), the path the step
takes on an NVIDIA GPU, against DiffusionKit's own block on every kind of joint block calibjob
runs: SD3 (learned positions, no qk-norm), qk-norm (SD3.5), FLUX.1 (RoPE, text first, key
bias) and FLUX.1-dev (guidance embedding). On CPU float32 the products keep their summation
order, so the two agree to float32 rounding at most (here they are equal)."""

from __future__ import annotations

import dataclasses

import mlx.nn as nn
import numpy as np
import pytest
from diffusionkit.mlx.mmdit import MMDiT

from calibjob.config import JobConfig, step_compiled
from calibjob.device import mx, resolve_compile
from calibjob.engine import Engine
from calibjob.errors import ConfigError
from calibjob.models import load, tiny
from calibjob.models.flux import with_key_bias
from calibjob.models.fused import fusable, stack_projections
from calibjob.models.pieces import forward, prepare

pytestmark = pytest.mark.model


def _qk_norm_mmdit() -> MMDiT:
    mx.random.seed(3)
    m = MMDiT(dataclasses.replace(tiny.mmdit_config(mx.float32), use_qk_norm=True))
    mx.eval(m.parameters())
    return m


BUILDS = {
    "sd3": lambda: tiny.build_mmdit(),
    "qk-norm": _qk_norm_mmdit,
    "flux": lambda: tiny.build_flux_mmdit(adjust=with_key_bias),
    "flux-dev": lambda: tiny.build_flux_mmdit(guidance_embed=True, adjust=with_key_bias),
}


def _inputs(mmdit, rows: int = 3, tokens: int = 40, side: int = 16):
    rng = np.random.default_rng(0)
    c = mmdit.config
    x = mx.array(rng.standard_normal((rows, side, side, 16), dtype=np.float32))
    cond = mx.array(
        rng.standard_normal((rows, tokens, 1, c.token_level_text_embed_dim), dtype=np.float32)
    )
    pooled = mx.array(rng.standard_normal((rows, c.pooled_text_embed_dim), dtype=np.float32))
    return x, cond, pooled, mx.array([637.0])


@pytest.mark.parametrize("kind", sorted(BUILDS))
def test_fused_block_equals_diffusionkits_block(kind):
    mmdit = BUILDS[kind]()
    prepare(mmdit)
    g = 3.5 if kind == "flux-dev" else None
    x, cond, pooled, t = _inputs(mmdit)
    generic = np.array(forward(mmdit, x, cond, pooled, t, g))
    fused = np.array(forward(mmdit, x, cond, pooled, t, g, fused=True))
    again = np.array(forward(mmdit, x, cond, pooled, t, g))
    scale = np.abs(generic).max()
    assert scale > 0.1  # a real output, not a degenerate one
    assert np.abs(fused - generic).max() <= 1e-6 * scale, kind
    # the q/k/v weights became views of the stacked ones: the generic path sees the same model
    np.testing.assert_array_equal(again, generic)


def test_a_swapped_projection_is_seen():
    """The comparison above can fail: stacking k before q changes the output."""
    mmdit = tiny.build_mmdit()
    x, cond, pooled, t = _inputs(mmdit)
    generic = np.array(forward(mmdit, x, cond, pooled, t))
    stack_projections(mmdit)
    for block in mmdit.multimodal_transformer_blocks:
        for tb in (block.image_transformer_block, block.text_transformer_block):
            w, b = tb._fused_qkv
            d = w.shape[0] // 3
            tb._fused_qkv = (mx.concatenate([w[d : 2 * d], w[:d], w[2 * d :]]), b)
    fused = np.array(forward(mmdit, x, cond, pooled, t, fused=True))
    assert np.abs(fused - generic).max() > 1e-3


def test_engine_fused_unit_matches_the_generic_unit():
    model = load("tiny")
    cs, pooled = model.encode(["a red fox", "a blue lake"])
    runs = {}
    for fused in (False, True):
        eng = Engine(model, num_steps=6, cfg_scale=1.5, latent_size=(32, 32), seed=5,
                     compile=True, fused=fused)  # fmt: skip
        runs[fused] = eng.run_unit(1, [1, 3, 5], cs[1], pooled[1])[0]
        eng.release_prompt()
    assert runs[False].shape == (3, 6, 32, 32, 16)
    assert np.abs(runs[True] - runs[False]).max() <= 1e-5 * np.abs(runs[False]).max()


def test_a_quantized_model_keeps_the_generic_path():
    mmdit = tiny.build_mmdit()
    assert fusable(mmdit)
    nn.quantize(mmdit, group_size=32, bits=8, class_predicate=lambda p, m: p.endswith("q_proj"))
    assert not fusable(mmdit)
    x, cond, pooled, t = _inputs(mmdit)
    generic = np.array(forward(mmdit, x, cond, pooled, t))
    np.testing.assert_array_equal(np.array(forward(mmdit, x, cond, pooled, t, fused=True)), generic)


def test_compile_fused_is_a_job_choice_and_cpu_stays_generic():
    assert resolve_compile("auto") == "off"  # this machine: CPU, the generic eager path
    assert step_compiled("fused") and step_compiled("on") and not step_compiled("off")
    JobConfig(compile="fused").validate()
    with pytest.raises(ConfigError, match="auto, on, off or fused"):
        JobConfig(compile="turbo").validate()
