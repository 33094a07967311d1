"""FLUX.1 through the same jobs: the built-in `tiny-flux` against DiffusionKit's own FLUX loop,
`tiny-flux-dev` against a plain loop that applies the guidance embedding by the model's formula,
and the CLI end to end (shards, kill and resume, merge, inspect, preview, profile)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import PROMPTS, assert_same_npz, cli, job_flags, load_npz, popen
from spec_loop import guided_trajectory, spec_trajectory

STEPS, SEED, LATENT = 4, 5, (16, 16)


# ---- the model tier: in-process, the arithmetic against the references -----------------------


@pytest.fixture(scope="module")
def flux():
    from calibjob.models import load

    return {name: load(name, shift=1.0) for name in ("tiny-flux", "tiny-flux-dev")}


def _engine(model, **kw):
    from calibjob.engine import Engine

    g = model.info.default_guidance if model.info.guidance == "embedded" else None
    args = dict(num_steps=STEPS, cfg_scale=0.0, guidance_scale=g, latent_size=LATENT, seed=SEED)
    return Engine(model, **{**args, **kw})


@pytest.mark.model
def test_encoding_is_fluxpipelines_one_branch_t5_padded(flux):
    from diffusionkit.mlx import FluxPipeline

    for name, t5_len in (("tiny-flux", 32), ("tiny-flux-dev", 64)):
        m = flux[name]
        cs, pooled = m.encode(PROMPTS)
        assert cs.shape == (3, 1, t5_len, 64) and pooled.shape == (3, 1, 32)
        # DiffusionKit's own FluxPipeline.encode_text on the same encoders, prompt by prompt
        pipe = FluxPipeline.__new__(FluxPipeline)
        t = m.text
        pipe.clip_l, pipe.tokenizer_l, pipe.t5_encoder = t.clip_l, t.tokenizer_l, t.t5
        pipe.t5_tokenizer, pipe.model_version = t.t5_tokenizer, "argmaxinc/mlx-FLUX.1-schnell"
        import diffusionkit.mlx as dk

        saved = dict(dk.T5_MAX_LENGTH)
        dk.T5_MAX_LENGTH["argmaxinc/mlx-FLUX.1-schnell"] = t5_len
        try:
            for i, p in enumerate(PROMPTS):
                c, pl = pipe.encode_text(p, cfg_weight=0.0, negative_text="ugly")
                assert np.array_equal(np.array(c[0]), cs[i, 0])
                assert np.array_equal(np.array(pl[0]), pooled[i, 0])
        finally:
            dk.T5_MAX_LENGTH.clear()
            dk.T5_MAX_LENGTH.update(saved)


@pytest.mark.model
def test_tiny_flux_equals_diffusionkits_own_loop_to_the_bit(flux):
    m = flux["tiny-flux"]
    cs, pooled = m.encode(PROMPTS)
    e = _engine(m)
    trajs = [1, 4, 7]
    xs, _ = e.run_unit(1, trajs, cs[1], pooled[1])
    assert xs.shape == (3, STEPS, *LATENT, 16)
    for j, k in enumerate(trajs):
        ref, ts = spec_trajectory(m, cs[1], pooled[1], trajectory=k, seed=SEED,
                                  num_steps=STEPS, cfg_scale=0.0, latent_size=LATENT)
        assert np.array_equal(xs[j], ref), f"trajectory {k}"
        assert np.array_equal(ts, e.timesteps_np)
    # FluxSampler's schedule: S+1 sigmas from 1 to 0 (get_sigmas adds a step, no trailing 0)
    assert np.allclose(e.sigmas_np, np.linspace(1, 0, STEPS + 1))
    assert np.abs(xs[:, -1] - xs[:, 0]).mean() > 0.05


@pytest.mark.model
def test_tiny_flux_dev_equals_the_guidance_formula_to_the_bit(flux):
    m = flux["tiny-flux-dev"]
    cs, pooled = m.encode(PROMPTS)
    e = _engine(m)
    xs, _ = e.run_unit(2, [2, 5], cs[2], pooled[2])
    for j, k in enumerate([2, 5]):
        ref, _ = guided_trajectory(m, cs[2], pooled[2], trajectory=k, seed=SEED,
                                   num_steps=STEPS, guidance=3.5, latent_size=LATENT)
        assert np.array_equal(xs[j], ref), f"trajectory {k}"
    # the guidance term is really there: another scale gives other trajectories
    other, _ = _engine(m, guidance_scale=1.0).run_unit(2, [2, 5], cs[2], pooled[2])
    assert np.array_equal(other[:, 0], xs[:, 0]) and np.abs(other[:, -1] - xs[:, -1]).max() > 1e-3
    # and the model refuses to run without one
    with pytest.raises(ValueError, match="guidance"):
        _engine(m, guidance_scale=None).run_unit(2, [2], cs[2], pooled[2])


@pytest.mark.model
@pytest.mark.parametrize("segment", [0, 2])
def test_flux_step_in_other_segments_and_compiled_is_the_same(flux, segment):
    m = flux["tiny-flux-dev"]
    cs, pooled = m.encode(PROMPTS[:1])
    base, _ = _engine(m, segment=1).run_unit(0, [0, 3], cs[0], pooled[0])
    got, _ = _engine(m, segment=segment).run_unit(0, [0, 3], cs[0], pooled[0])
    assert np.array_equal(got, base)
    comp, _ = _engine(m, segment=segment, compile=True).run_unit(0, [0, 3], cs[0], pooled[0])
    np.testing.assert_allclose(comp, base, rtol=1e-5, atol=1e-5)


@pytest.mark.model
def test_unknown_and_misguided_flux_jobs_are_refused_in_one_line():
    from calibjob.config import JobConfig
    from calibjob.errors import ConfigError

    def check(**kw):
        JobConfig(**kw).with_model_defaults().validate()

    check(model_version="flux-dev", cfg_scale=0.0)  # guidance 3.5, the model's own
    dev = JobConfig(model_version="flux-dev", cfg_scale=0).with_model_defaults()
    assert dev.guidance_scale == 3.5 and dev.model_version == "argmaxinc/mlx-FLUX.1-dev"
    for kw, words in (
        (dict(model_version="flux-schnell"), "--cfg-scale 0"),
        (dict(model_version="flux-schnell", cfg_scale=0.0, guidance_scale=3.5), "no guidance"),
        (dict(model_version="sd3-medium", guidance_scale=2.0), "no guidance"),
        (dict(model_version="flux-pro", cfg_scale=0.0), "flux-schnell"),
    ):
        with pytest.raises(ConfigError, match=words):
            check(**kw)


# ---- the CLI end to end ----------------------------------------------------------------------

N = 6  # trajectories: 3 units of 2 (3 prompts)


def flux_flags(prompt_file: Path, model: str = "tiny-flux", **over) -> list[str]:
    opts = {"model-version": model, "num-sampling-steps": STEPS, "num-selected-steps": STEPS,
            "cfg-scale": 0, "shift": 1.0, "latent-size": [16, 16], **over}
    return job_flags(prompt_file, **opts)


@pytest.fixture(scope="module")
def flux_baseline(tmp_path_factory, prompt_file) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("flux")
    store = d / "one.zarr"
    cli("run", *flux_flags(prompt_file, "tiny-flux-dev"), "--store", str(store))
    out = d / "one.npz"
    cli("merge", str(store), "-o", str(out))
    return store, out


@pytest.mark.e2e
def test_a_flux_file_has_the_same_keys_and_says_its_guidance(flux_baseline):
    store, npz = flux_baseline
    d = load_npz(npz)
    assert str(d["model_version"]) == "tiny-flux-dev" and str(d["guidance"]) == "embedded"
    assert float(d["guidance_scale"]) == 3.5 and float(d["cfg_scale"]) == 0.0
    assert d["cs"].shape == (3, 1, 64, 64) and d["cs_pooled"].shape == (3, 1, 32)
    assert d["xs"].shape == (N * STEPS, 16, 16, 16)
    res = cli("inspect", str(npz))
    assert "valid" in res.stdout and "embedded guidance 3.5" in res.stdout
    # a file whose guidance keys contradict its model fails inspect, naming what
    bad = npz.with_name("bad.npz")
    np.savez(bad, **{**d, "guidance": np.array("cfg"), "guidance_scale": np.float32(0)})
    res = cli("inspect", str(bad), check=False)
    assert res.returncode != 0
    assert "expected (prompts, 2, L, D)" in res.stderr and "runs with embedded" in res.stderr


@pytest.mark.e2e
def test_flux_three_shards_and_kill_resume_equal_one(flux_baseline, prompt_file, tmp_path):
    store = tmp_path / "three.zarr"
    procs = [popen("run", *flux_flags(prompt_file, "tiny-flux-dev"), "--store", str(store),
                   "--shard", f"{i}/3") for i in range(3)]  # fmt: skip
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    three = tmp_path / "three.npz"
    cli("merge", str(store), "-o", str(three))
    assert_same_npz(three, flux_baseline[1])

    killed = tmp_path / "killed.zarr"
    p = popen("run", *flux_flags(prompt_file, "tiny-flux-dev"), "--store", str(killed))
    done = killed / "done" / "c"
    deadline = time.monotonic() + 120
    while (not done.is_dir() or len(list(done.iterdir())) < 2) and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert 2 <= len(list(done.iterdir())) < N
    cli("resume", str(killed))
    out = tmp_path / "killed.npz"
    cli("merge", str(killed), "-o", str(out))
    assert_same_npz(out, flux_baseline[1])


@pytest.mark.e2e
def test_flux_preview_status_and_profile(flux_baseline, tmp_path):
    store, npz = flux_baseline
    res = cli("status", str(store))
    assert "complete" in res.stdout
    png = tmp_path / "grid.png"
    cli("preview", str(store), "-o", str(png), "--n", "2")
    assert png.stat().st_size > 0
    prof = tmp_path / "p.zarr"
    cli("profile", str(npz), "--store", str(prof), "--no-progress")
    from calibjob.profile import load

    p = load(prof)
    assert p.layers == ["mm_00_img", "mm_00_txt", "mm_01_img", "mm_01_txt", "uni_00", "uni_01"]
    assert len(p.keys()) == 24  # four inputs a stream: FLUX's last joint block keeps its MLP
    # a set of another family is refused by the model it is not for, in one line
    res = cli("profile", str(npz), "--store", str(tmp_path / "q.zarr"), "--model-version",
              "tiny", check=False)
    assert res.returncode != 0 and "made with tiny-flux-dev" in res.stderr


@pytest.mark.model
def test_rope_tables_follow_the_resolution_whatever_the_module_cached(flux):
    """DiffusionKit's RoPE keeps its last tables on the module, where they count as a
    parameter: a save and restore of the MMDiT's parameters (the modulation-cache dance) leaves
    tables of one resolution marked as another's. The engine computes its own."""
    from mlx.utils import tree_flatten

    m = flux["tiny-flux"]
    cs, pooled = m.encode(PROMPTS[:1])
    fresh, _ = _engine(m, latent_size=(32, 32)).run_unit(0, [0], cs[0], pooled[0])
    rope = m.mmdit.pre_sdpa_rope
    rope(text_sequence_length=32, latent_image_resolution=(8, 8))
    kept = tree_flatten(m.mmdit.parameters())
    rope(text_sequence_length=32, latent_image_resolution=(16, 16))
    m.mmdit.load_weights(kept, strict=False)  # tables of 8x8, marked 16x16
    assert rope.last_image_resolution == (16, 16) and rope.rope_embeddings.shape[2] == 32 + 64
    got, _ = _engine(m, latent_size=(32, 32)).run_unit(0, [0], cs[0], pooled[0])
    assert np.array_equal(got, fresh)


@pytest.mark.model
def test_a_store_made_before_guidance_scale_existed_keeps_its_identity(prompt_file, tmp_path):
    """A record without `guidance_scale` (every store before FLUX.1) reads as 0, and the same
    job asked again is the same job: same fingerprint, nothing differs."""
    from calibjob.config import JobConfig
    from calibjob.jobs.run import prepare_config

    asked = prepare_config(JobConfig(model_version="tiny", prompt_file=str(prompt_file)))
    old = asked.to_dict()
    del old["guidance_scale"]
    recorded = JobConfig.from_record(old)
    assert recorded.guidance_scale == 0.0 and not recorded.differing(asked)
    assert recorded.fingerprint() == asked.fingerprint()
    assert "guidance_scale" not in asked.identity()  # at 0 it is left out, as before it existed


@pytest.mark.model
def test_the_key_bias_changes_flux_attention(flux):
    """FLUX.1's keys are RMS-normalised and rotated after their projection, so a key bias is not
    softmax-invariant as it is in SD3: the built-in FLUX carries one (as the real checkpoints
    do), and zeroing it changes the network's output."""
    import mlx.core as mx

    from calibjob.models.pieces import forward

    m = flux["tiny-flux"]
    attn = m.mmdit.multimodal_transformer_blocks[0].image_transformer_block.attn
    assert attn.k_proj.bias.shape == (64,) and float(mx.abs(attn.k_proj.bias).sum()) > 0
    cs, pooled = m.encode(PROMPTS[:1])
    x = mx.array(np.random.default_rng(0).standard_normal((1, 16, 16, 16)).astype(np.float32))
    args = (x, mx.expand_dims(mx.array(cs[0]), 2), mx.array(pooled[0]), mx.array([500.0]))
    with_bias = np.array(forward(m.mmdit, *args))
    kept = attn.k_proj.bias
    attn.k_proj.bias = mx.zeros_like(kept)
    try:
        without = np.array(forward(m.mmdit, *args))
    finally:
        attn.k_proj.bias = kept
    assert np.abs(with_bias - without).max() > 1e-4
