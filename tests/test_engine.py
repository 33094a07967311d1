"""The batched engine against the spec's plain loop (DiffusionKit's CFGDenoiser, batch 1)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import PROMPTS
from mlx.utils import tree_flatten
from spec_loop import spec_trajectory

from calibjob.engine import Engine
from calibjob.models import Model, load
from calibjob.selection import initial_noise

STEPS, SEED, CFG, LATENT = 8, 11, 1.5, (32, 32)


@pytest.fixture(scope="module")
def model() -> Model:
    return load("tiny")


@pytest.fixture(scope="module")
def cond(model):
    return model.encode(PROMPTS)


@pytest.fixture()
def engine(model):
    e = Engine(model, num_steps=STEPS, cfg_scale=CFG, latent_size=LATENT, seed=SEED)
    yield e
    e.release_prompt()


def test_batched_engine_equals_the_spec_loop(model, cond, engine):
    cs, pooled = cond
    trajs = [1, 4, 7]  # prompt 1 (k % 3)
    xs, _ = engine.run_unit(1, trajs, cs[1], pooled[1])
    engine.release_prompt()
    assert xs.shape == (3, STEPS, *LATENT, 16) and xs.dtype == np.float32
    for j, k in enumerate(trajs):
        ref, ts = spec_trajectory(
            model,
            cs[1],
            pooled[1],
            trajectory=k,
            seed=SEED,
            num_steps=STEPS,
            cfg_scale=CFG,
            latent_size=LATENT,
        )
        np.testing.assert_allclose(xs[j], ref, rtol=1e-5, atol=1e-5)
        assert np.array_equal(ts, engine.timesteps_np)
    # the trajectories really move: last recorded step differs from the noise
    assert np.abs(xs[:, -1] - xs[:, 0]).mean() > 0.05


def test_recorded_t_and_step_zero(cond, engine):
    cs, pooled = cond
    sigmas, ts = engine.sigmas_np, engine.timesteps_np
    assert ts.shape == (STEPS,) and np.array_equal(ts, (sigmas[:STEPS] * 1000).astype(ts.dtype))
    xs, _ = engine.run_unit(0, [0, 3], cs[0], pooled[0])
    for j, k in enumerate([0, 3]):
        assert np.array_equal(xs[j, 0], initial_noise(SEED, k, LATENT, 16))


def test_batch_composition_does_not_change_noise_or_result(cond, engine):
    cs, pooled = cond
    alone, _ = engine.run_unit(2, [5], cs[2], pooled[2])
    together, _ = engine.run_unit(2, [2, 5], cs[2], pooled[2])
    assert np.array_equal(alone[0, 0], together[1, 0])
    np.testing.assert_allclose(alone[0], together[1], rtol=1e-5, atol=1e-5)


def test_same_config_twice_is_bit_identical(cond, engine):
    cs, pooled = cond
    a, fa = engine.run_unit(0, [0, 3], cs[0], pooled[0])
    b, fb = engine.run_unit(0, [0, 3], cs[0], pooled[0])
    assert np.array_equal(a, b) and np.array_equal(fa, fb)


def test_prompt_switch_restores_adaln_weights(model, cond, engine):
    cs, pooled = cond
    before = {k: np.array(v) for k, v in tree_flatten(model.mmdit.parameters())}
    first, _ = engine.run_unit(0, [0], cs[0], pooled[0])
    engine.run_unit(1, [1], cs[1], pooled[1])
    again, _ = engine.run_unit(0, [0], cs[0], pooled[0])
    engine.release_prompt()
    assert np.array_equal(first, again)
    after = {k: np.array(v) for k, v in tree_flatten(model.mmdit.parameters())}
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert not hasattr(model.mmdit, "to_offload")


def test_final_latent_is_the_spec_loops(model, cond, engine):
    cs, pooled = cond
    _, final = engine.run_unit(1, [1, 4], cs[1], pooled[1])
    engine.release_prompt()
    assert final.shape == (2, *LATENT, 16)
    for j, k in enumerate([1, 4]):
        *_, ref_final = spec_trajectory(
            model, cs[1], pooled[1], trajectory=k, seed=SEED, num_steps=STEPS,
            cfg_scale=CFG, latent_size=LATENT, return_final=True,
        )  # fmt: skip
        np.testing.assert_allclose(final[j], ref_final, rtol=1e-5, atol=1e-5)


def test_compiled_step_equals_the_eager_one_across_prompts(model, cond):
    """One compiled function per batch size serves every step and prompt: the modulation
    parameters are inputs, not values captured at trace time, so nothing goes stale."""
    cs, pooled = cond
    eager = Engine(model, num_steps=STEPS, cfg_scale=CFG, latent_size=LATENT, seed=SEED)
    compiled = Engine(
        model, num_steps=STEPS, cfg_scale=CFG, latent_size=LATENT, seed=SEED, compile=True
    )
    for p, trajs in ((0, [0, 3]), (1, [1, 4]), (0, [6, 9])):
        a, fa = eager.run_unit(p, trajs, cs[p], pooled[p])
        b, fb = compiled.run_unit(p, trajs, cs[p], pooled[p])
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(fa, fb, rtol=1e-5, atol=1e-5)
    eager.release_prompt()
    compiled.release_prompt()


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("segment", [1, 2])
def test_segmented_step_equals_the_whole_step(model, cond, compile, segment):
    """The memory-bounded step (blocks as separate functions, host at most one segment ahead)
    gives the whole-step graph's numbers: to the bit eager, within float32 rounding compiled."""
    cs, pooled = cond
    kw = dict(num_steps=STEPS, cfg_scale=CFG, latent_size=LATENT, seed=SEED, compile=compile)
    whole = Engine(model, segment=0, **kw).run_unit(2, [2, 5], cs[2], pooled[2])[0]
    seg = Engine(model, segment=segment, **kw).run_unit(2, [2, 5], cs[2], pooled[2])[0]
    if compile:
        np.testing.assert_allclose(seg, whole, rtol=1e-5, atol=1e-5)
    else:
        assert np.array_equal(seg, whole)
    assert np.abs(seg[:, -1] - seg[:, 0]).mean() > 0.05
