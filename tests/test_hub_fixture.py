"""The hub fixture has DiffusionKit's real layout: every tensor of every file, run through
DiffusionKit's own state-dict adjustments, lands on a parameter of the model DiffusionKit builds
for that key, with its shape; none missing, none left over. Lazy: no array is ever evaluated."""

from __future__ import annotations

import dataclasses

import hub_fixture as hf
import pytest

import calibjob.diffusionkit_imports  # noqa: F401  (before MLX and DiffusionKit)

mx = pytest.importorskip("mlx.core")
from diffusionkit.mlx import model_io  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

pytestmark = pytest.mark.model

KEYS = [hf.SD3_MEDIUM, hf.SD35_LARGE]


def shapes(pairs) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in pairs}


def assert_same_tree(loaded: dict, model) -> None:
    want = shapes(tree_flatten(model.parameters()))
    got = shapes(loaded.items())
    assert sorted(set(want) - set(got)) == [], "parameters the fixture does not provide"
    assert sorted(set(got) - set(want)) == [], "fixture tensors no parameter takes"
    bad = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    assert bad == {}


@pytest.mark.parametrize("key", KEYS)
def test_mmdit_checkpoint_matches_diffusionkit(key):
    from diffusionkit.mlx.mmdit import MMDiT

    sd = hf.lazy_state_dict(hf.checkpoint_tensors(key))
    loaded = model_io.mmdit_state_dict_adjustments(sd, prefix="model.diffusion_model.")
    model = MMDiT(dataclasses.replace(model_io._CONFIG[key], low_memory_mode=False))
    assert_same_tree(loaded, model)
    n = sum(v.size for _, v in tree_flatten(model.parameters()))
    assert n == {hf.SD3_MEDIUM: 2_084_877_376, hf.SD35_LARGE: 8_146_095_936}[key]


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("part", ["decoder", "encoder"])
def test_vae_in_checkpoint_matches_diffusionkit(key, part):
    model = hf.vae_model(part)
    sd = hf.lazy_state_dict(hf.checkpoint_tensors(key))
    adjust = getattr(model_io, f"vae_{part}_state_dict_adjustments")
    assert_same_tree(adjust(sd, prefix=model_io._PREFIX[key][f"vae_{part}"]), model)


@pytest.mark.parametrize("which", ["clip_l", "clip_g"])
def test_clip_matches_diffusionkit(which):
    from diffusionkit.mlx.clip import CLIPTextModel
    from diffusionkit.mlx.config import CLIPTextModelConfig

    size = getattr(hf.FULL, which)
    c = hf.clip_config(size)
    model = CLIPTextModel(
        CLIPTextModelConfig(
            num_layers=c["num_hidden_layers"],
            model_dims=c["hidden_size"],
            num_heads=c["num_attention_heads"],
            max_length=c["max_position_embeddings"],
            vocab_size=c["vocab_size"],
            projection_dim=c["projection_dim"],
            hidden_act=c["hidden_act"],
        )
    )
    sd = hf.lazy_state_dict(hf.clip_tensors(size))
    loaded = dict(
        model_io._flatten([model_io.map_clip_text_encoder_weights(k, v) for k, v in sd.items()])
    )
    assert_same_tree(loaded, model)


def test_t5_matches_diffusionkit():
    from diffusionkit.mlx.t5 import SD3T5Encoder
    from transformers import T5Config

    model = SD3T5Encoder(T5Config(**hf.t5_config(hf.FULL.t5)), low_memory_mode=False)
    sd = hf.lazy_state_dict(hf.t5_tensors(hf.FULL.t5))
    assert_same_tree(model_io.t5_encoder_state_dict_adjustments(sd, prefix=""), model)


def test_full_table_sizes():
    """The fixture's files weigh what the real ones do (fp16/bf16: 2 bytes a parameter)."""
    rows = {f: (params, nbytes) for f, _, params, nbytes in hf.table(KEYS)}
    gb = {f.split("/")[-1]: nbytes / 1e9 for f, (_, nbytes) in rows.items()}
    assert 4.1 < gb["sd3_medium.safetensors"] < 4.4
    assert 16.0 < gb["sd3.5_large.safetensors"] < 16.6
    assert 9.7 < gb["t5xxl.safetensors"] < 9.8  # encoder + the (unused) shared table
    assert 0.2 < rows[f"{hf.TEXT_REPO}/clip_l/model.fp16.safetensors"][1] / 1e9 < 0.3
    assert 1.3 < rows[f"{hf.TEXT_REPO}/clip_g/model.fp16.safetensors"][1] / 1e9 < 1.5


def test_written_file_reads_back(tmp_path):
    """The streamed safetensors file is what MLX reads: names, shapes, dtypes and the bits."""
    import numpy as np

    ts = [
        hf.Tensor("a.weight", (3, 4)),
        hf.Tensor("b", (5,), "BF16"),
        hf.Tensor("n", (2,), init="ones"),
        hf.Tensor("f.weight", (6, 8), "F32"),  # FLUX.1's ae.safetensors
    ]
    p = tmp_path / "x.safetensors"
    hf.write_safetensors(p, ts, seed=7, threads=2)
    got = mx.load(str(p))
    assert {k: (tuple(v.shape), v.dtype) for k, v in got.items()} == {
        "a.weight": ((3, 4), mx.float16),
        "b": ((5,), mx.bfloat16),
        "n": ((2,), mx.float16),
        "f.weight": ((6, 8), mx.float32),
    }
    a = np.array(got["a.weight"]).view(np.uint16).ravel()
    assert np.array_equal(a, hf.tensor_bits(ts[0], 7))
    assert np.array(got["n"]).tolist() == [1.0, 1.0]
    assert np.array(got["b"].astype(mx.float32)).std() > 0
    f = np.array(got["f.weight"])
    assert np.array_equal(f.ravel(), hf.tensor_data(ts[3], 7)) and 0 < np.abs(f).max() < 1
    assert len(np.unique(f)) > 40  # random, not a fill
    # seeded by the seed and the name alone
    assert np.array_equal(hf.tensor_bits(ts[0], 7), hf.tensor_bits(ts[0], 7))
    assert not np.array_equal(hf.tensor_bits(ts[0], 7), hf.tensor_bits(ts[0], 8))


def test_small_fixture_runs_the_real_sd3_path(tmp_path):
    """A small fixture (real names, toy sizes) as the hub cache, offline: `calibjob run` on the
    sd3-medium key loads CLIP-L, CLIP-G, T5 and their tokenizers, the MMDiT and (for preview)
    the VAE decoder through DiffusionKit's loaders, and run -> merge -> inspect -> preview pass."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np

    root = Path(__file__).resolve().parent.parent
    cache = tmp_path / "hub"
    corpus = (root / "prompts" / "sample_prompts.txt").read_text()
    hf.write_cache(
        cache, [hf.SD3_MEDIUM], sizes=hf.small(), corpus=corpus, threads=2, progress=lambda _: None
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(cache),
        "HF_HOME": str(tmp_path / "hf-home"),
        "TRANSFORMERS_OFFLINE": "1",
    }
    store, npz = tmp_path / "s.zarr", tmp_path / "out.npz"
    cmd = [
        sys.executable,
        str(root / "tests" / "hub_driver.py"),
        "run",
        "--job",
        "jobs/dry-run.toml",
        "--model-version",
        "sd3-medium",
        "--num-fid-samples",
        "2",
        "--num-sampling-steps",
        "4",
        "--num-selected-steps",
        "2",
        "--store",
        str(store),
        "--no-progress",
        "--",
        "merge",
        str(store),
        "-o",
        str(npz),
        "--",
        "inspect",
        str(npz),
        "--",
        "preview",
        str(store),
        "-o",
        str(tmp_path / "p.png"),
        "--n",
        "2",
    ]
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    with np.load(npz) as z:
        assert z["xs"].shape[0] == 4 and np.isfinite(z["xs"]).all()
        # real conditioning widths: 77 CLIP tokens + 512 T5 tokens, T5's width
        assert z["cs"].shape[-2:] == (77 + 512, hf.small().t5.d_model)
    assert (tmp_path / "p.png").stat().st_size > 1000
