"""Model backends: the tiny model's encoders and MMDiT, and SD3's missing-weights error."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
from conftest import PROMPTS, cli

from calibjob.models import Model, load, tiny

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def model() -> Model:
    return load("tiny")


def test_load_gives_diffusionkits_own_classes(model):
    from diffusionkit.mlx.mmdit import MMDiT
    from diffusionkit.mlx.sampler import ModelSamplingDiscreteFlow

    assert isinstance(model.mmdit, MMDiT)
    assert isinstance(model.sampler, ModelSamplingDiscreteFlow)
    assert model.sampler.shift == 3.0
    assert model.dtype == "float32"  # CPU


def test_encode_shapes_and_negative_prompt(model):
    cs, pooled = model.encode(PROMPTS)
    assert cs.shape == (3, 2, tiny.CLIP_LEN + tiny.T5_LEN, tiny.TOKEN_DIM)
    assert pooled.shape == (3, 2, tiny.POOLED_DIM)
    assert cs.dtype == np.float32 and pooled.dtype == np.float32
    # index 1 is the empty negative prompt: the same for every prompt; index 0 differs
    assert np.array_equal(cs[0, 1], cs[2, 1]) and np.array_equal(pooled[0, 1], pooled[1, 1])
    assert not np.allclose(cs[0, 0], cs[1, 0])


def test_third_prompt_equals_a_fresh_encoder_alone(model):
    """Trap 1: DiffusionKit's T5 in low_memory_mode drops its layers after the first call,
    so later prompts silently get a wrong embedding. Prompt 2 after 0 and 1 must equal what
    a freshly built encoder gives for it alone, T5 part included."""
    cs, pooled = model.encode(PROMPTS)
    fresh = tiny.build_text_encoders()
    cs2, pooled2 = fresh.encode([PROMPTS[2]])
    assert np.array_equal(cs[2], cs2[0]) and np.array_equal(pooled[2], pooled2[0])
    t5_part = cs[2, 0, tiny.CLIP_LEN :]
    assert np.abs(t5_part).max() > 0  # the T5 tokens are really there


def test_tiny_weights_are_the_same_every_build():
    a, b = tiny.build_mmdit(), tiny.build_mmdit()
    from mlx.utils import tree_flatten

    for (ka, va), (kb, vb) in zip(
        tree_flatten(a.parameters()), tree_flatten(b.parameters()), strict=True
    ):
        assert ka == kb and np.array_equal(np.array(va), np.array(vb))


def test_schedule_is_diffusionkits(model):
    from diffusionkit.mlx import DiffusionPipeline

    sigmas, ts = model.schedule(10)
    ref = np.array(DiffusionPipeline.get_sigmas(None, model.sampler, 10))
    assert np.array_equal(sigmas, ref) and sigmas[-1] == 0 and sigmas[0] == 1.0
    assert np.allclose(ts, sigmas[:10] * 1000)


def test_sd3_without_weights_is_one_clear_error(tmp_path):
    store = tmp_path / "s.zarr"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = cli("run", "--job", "jobs/dry-run.toml", "--store", str(store), check=False, env=env)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("calibjob: error: cannot load")
    assert "--local-ckpt" in proc.stderr
    # the hub's own words, whole: its first sentence, never cut mid-word
    assert re.search(r"\(\w+: [^()]*[.!?]\) Log in", lines[-1]), lines[-1]
    # a store is never removed (another shard may share it): it is left clean and empty
    from calibjob.jobs import open_store

    st = open_store(store, mode="r")
    assert not st.prepared and not st.done_mask().any()


@pytest.mark.parametrize("ff", ["gated-gelu", "relu"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_safe_t5_stack_equals_diffusionkits_layers_called_whole(ff, dtype):
    """The encode phase's T5 is evaluated after the attention and after each MLP matmul (its
    memory peak); the result must be DiffusionKit's own layers called whole, to the bit. In
    float16 the residual stream is float32 and every MLP matmul casts its weight (the real
    SD3 case)."""
    import mlx.core as mx
    from diffusionkit.mlx.t5 import SD3T5Encoder

    from calibjob.models.text import make_t5_safe

    dt = getattr(mx, dtype)
    cfg = tiny.t5_config()
    cfg.feed_forward_proj = ff
    mx.random.seed(7)
    t5 = SD3T5Encoder(cfg, low_memory_mode=False)
    t5.set_dtype(dt)
    ids = mx.array(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 13)))
    x = t5.wte(ids)
    bias = t5.encoder.relative_attention_bias(13, 13)
    ref = x
    for layer in t5.encoder.layers:
        ref = layer(ref, mask=bias)
    ref = t5.encoder.ln(ref).astype(x.dtype)
    got = make_t5_safe(t5)(ids)
    assert got.dtype == dt
    assert np.array_equal(np.array(got.astype(mx.float32)), np.array(ref.astype(mx.float32)))


def test_a_max_memory_below_the_encode_phase_is_noted(tmp_path):
    """--max-memory steers only the batch: a cap the text encoders alone exceed gets one note
    before the run (here it then stops at the missing weights, as without the cap)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = ["run", "--job", "jobs/dry-run.toml", "--dtype", "float16", "--batch-size", "1"]
    low = cli(*args, "--store", str(tmp_path / "a.zarr"), "--max-memory", "10", check=False,
              env=env)
    notes = [ln for ln in low.stderr.splitlines() if "note:" in ln]
    assert len(notes) == 1 and "about 11.9 GB" in notes[0] and "--max-memory 10" in notes[0]
    assert low.stderr.strip().splitlines()[-1].startswith("calibjob: error: cannot load")
    high = cli(*args, "--store", str(tmp_path / "b.zarr"), "--max-memory", "12", check=False,
               env=env)
    assert "note:" not in high.stderr and high.returncode == 2
