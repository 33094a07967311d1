"""The fused step (`compile = "fused"`, models/fused_block.py), the path the step takes on an
NVIDIA GPU, against DiffusionKit's own blocks on every kind of block calibjob runs: SD3
(learned positions, image first), qk-norm (SD3.5), FLUX.1 (RoPE, text first, key bias, unified
blocks) and FLUX.1-dev (guidance embedding). Off CUDA its token passes are DiffusionKit's own
ops, so on CPU float32 the two paths agree to the bit; on CUDA the kernels are checked by
bench/cuda_ops_check.py (against the ops) and bench/gpu.py --drift (100 steps against the eager
spec loop)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from diffusionkit.mlx.mmdit import MMDiT

from calibjob.config import JobConfig, step_compiled
from calibjob.device import mx, resolve_compile
from calibjob.engine import Engine
from calibjob.errors import ConfigError
from calibjob.models import cuda_ops, fused_block, load, tiny
from calibjob.models.flux import with_key_bias
from calibjob.models.pieces import forward, modulation_params, prepare

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


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("kind", sorted(BUILDS))
def test_fused_blocks_equal_diffusionkits_blocks(kind, rows):
    """Rows 1 included: DiffusionKit normalises a single row by another formula, which the
    fused path keeps."""
    mmdit = BUILDS[kind]()
    prepare(mmdit)
    g = 3.5 if kind == "flux-dev" else None
    x, cond, pooled, t = _inputs(mmdit, rows=rows)
    generic = np.array(forward(mmdit, x, cond, pooled, t, g))
    fused = np.array(forward(mmdit, x, cond, pooled, t, g, fused=True))
    assert np.abs(generic).max() > 0.1  # a real output, not a degenerate one
    assert np.array_equal(fused, generic), kind


def test_the_comparison_sees_a_misrouted_modulation():
    """The equality above can fail: the image stream given the text stream's modulation rows
    moves the output."""
    mmdit = tiny.build_mmdit()
    x, cond, pooled, t = _inputs(mmdit)
    block = mmdit.multimodal_transformer_blocks[0]
    mods = modulation_params(mmdit, pooled, t)[0]
    h = mmdit.x_embedder(x).reshape(3, -1, 1, mmdit.config.hidden_size)
    c = mmdit.context_embedder(cond)
    right, _ = fused_block.joint_block(block, h, c, mods[0], mods[1])
    wrong, _ = fused_block.joint_block(block, h, c, mods[1], mods[1])
    assert np.abs(np.array(right) - np.array(wrong)).max() > 1e-3


def test_joint_tokens_are_token_major_first_stream_first():
    """The join's layout, which the attention's split and the gated norm's token-major y rely
    on: row (t, b) is model row b's token t, the first stream's tokens first; `batch_major`
    undoes it."""
    rng = np.random.default_rng(2)
    first = tuple(mx.array(rng.standard_normal((2, 3, 1, 8), dtype=np.float32)) for _ in "qkv")
    second = tuple(mx.array(rng.standard_normal((2, 5, 1, 8), dtype=np.float32)) for _ in "qkv")
    joined = cuda_ops.joint_tokens(first, second)
    for j, f, s in zip(joined, first, second, strict=True):
        j, f, s = np.array(j), np.array(f), np.array(s)
        assert j.shape == (8, 2, 1, 8)
        assert np.array_equal(j[:3], f.transpose(1, 0, 2, 3))
        assert np.array_equal(j[3:], s.transpose(1, 0, 2, 3))
    rows = joined[0].reshape(-1, 8)  # as the attention output comes: (L * B, C)
    back = np.array(cuda_ops.batch_major(rows, 2))
    assert np.array_equal(back, np.concatenate([np.array(first[0]), np.array(second[0])], axis=1))


@pytest.mark.parametrize("kind", ["sd3", "flux-dev"])
def test_batched_modulation_is_each_steps_own(kind):
    """A compiled step on a GPU takes every step's modulation from one product per module
    (`batched`): each step's rows must be that step's parameters (row order step-major, the
    guidance term included), within the product's float32 rounding."""
    mmdit = BUILDS[kind]()
    g = 3.5 if kind == "flux-dev" else None
    pooled = mx.array(np.random.default_rng(1).standard_normal(
        (2, mmdit.config.pooled_text_embed_dim), dtype=np.float32))  # fmt: skip
    ts = mx.array(np.linspace(1000.0, 10.0, 7, dtype=np.float32))
    per_step = modulation_params(mmdit, pooled, ts, g)
    batched = modulation_params(mmdit, pooled, ts, g, batched=True)
    assert len(batched) == len(per_step) == 7
    for a, b in zip(per_step, batched, strict=True):
        assert [m.shape for m in a] == [m.shape for m in b]
        for x, y in zip(a, b, strict=True):
            x, y = np.array(x), np.array(y)
            assert np.abs(x - y).max() <= 1e-6 * np.abs(x).max()
    # and the comparison sees a step's parameters handed to another step
    assert np.abs(np.array(per_step[0][0]) - np.array(batched[1][0])).max() > 1e-3


@pytest.mark.parametrize("name", ["tiny", "tiny-flux-dev"])
def test_engine_fused_unit_equals_the_generic_unit(name):
    model = load(name, shift=1.0) if "flux" in name else load(name)
    cs, pooled = model.encode(["a red fox", "a blue lake"])
    cfg = 1.5 if model.info.guidance == "cfg" else 0.0
    g = model.info.default_guidance if model.info.guidance == "embedded" else None
    runs = {}
    for compile, fused in ((False, False), (False, True), (True, True)):
        eng = Engine(model, num_steps=6, cfg_scale=cfg, guidance_scale=g, latent_size=(32, 32),
                     seed=5, compile=compile, fused=fused)  # fmt: skip
        runs[compile, fused] = eng.run_unit(1, [1, 3, 5], cs[1], pooled[1])[0]
        eng.release_prompt()
    generic = runs[False, False]
    assert generic.shape == (3, 6, 32, 32, 16)
    assert np.array_equal(runs[False, True], generic)
    # compiled: float32 rounding at most (mx.compile may reorder elementwise float math)
    assert np.abs(runs[True, True] - generic).max() <= 1e-5 * np.abs(generic).max()


def test_compile_fused_is_a_job_choice_and_cpu_stays_eager():
    assert resolve_compile("auto") == "off"  # this machine: CPU, the generic eager path
    assert step_compiled("fused") and step_compiled("on") and not step_compiled("off")
    JobConfig(compile="fused").validate()
    with pytest.raises(ConfigError, match="auto, on, off or fused"):
        JobConfig(compile="turbo").validate()


def test_a_fused_job_records_its_path_and_equals_the_eager_one(baseline, prompt_file, tmp_path):
    """`compile = "fused"` from a job file, through the CLI: the store records the path (a
    store's shards never mix paths), and on CPU the merged file equals the eager job's to the
    bit."""
    from conftest import assert_same_npz, cli, job_flags

    from calibjob.jobs import open_store

    job = tmp_path / "fused.toml"
    job.write_text('compile = "fused"\n')
    store, out = tmp_path / "fused.zarr", tmp_path / "fused.npz"
    flags = job_flags(prompt_file, **{"num-sampling-steps": 20, "num-selected-steps": 5})
    cli("run", "--job", str(job), *flags, "--store", str(store))
    assert open_store(store, mode="r").config.compile == "fused"
    assert open_store(baseline[0], mode="r").config.compile == "off"  # CPU's auto
    cli("merge", str(store), "-o", str(out))
    assert_same_npz(out, baseline[1])
