"""FLUX.1 in the hub fixture: Black Forest Labs' original checkpoint layout, run through
DiffusionKit's own `flux_state_dict_adjustments`, lands on the MMDiT calibjob's FLUX loader
builds (`calibjob.models.flux.mmdit_config`: FLUX_SCHNELL, or FLUX_DEV with its guidance
embedding), with its shapes, and `ae.safetensors` on DiffusionKit's VAE. Lazy at full size:
no array is ever evaluated. Then a small fixture, written for real, through calibjob's loader
and its CLI.

One thing DiffusionKit's MMDiT has no slot for: FLUX.1's attention key bias (its fused qkv and
linear1 carry biases; DiffusionKit builds `k_proj` with `bias=False`, and unlike its SD3 mapping
its FLUX mapping does not drop it): 76 tensors (2 x 19 joint + 38 unified). With qk-norm after
the projection the key bias changes the attention, so calibjob's loader gives the key
projections a bias (`calibjob.models.flux.with_key_bias`) and loads them."""

from __future__ import annotations

import hub_fixture as hf
import numpy as np
import pytest

import calibjob.diffusionkit_imports  # noqa: F401  (before MLX and DiffusionKit)

mx = pytest.importorskip("mlx.core")
from diffusionkit.mlx import model_io  # noqa: E402
from diffusionkit.mlx.mmdit import MMDiT  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from calibjob.errors import ModelUnavailable  # noqa: E402
from calibjob.families import model_info  # noqa: E402
from calibjob.models import flux  # noqa: E402

pytestmark = pytest.mark.model

KEYS = list(hf.FLUX_KEYS)
K_BIAS = ".attn.k_proj.bias"


def shapes(pairs) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in pairs}


def mapped(key: str, config, sizes: hf.Sizes = hf.FULL) -> dict:
    """The key's checkpoint table as lazy arrays, mapped by DiffusionKit's own adjustments
    with the config's widths (as calibjob's `checkpoint_weights` calls them)."""
    sd = hf.lazy_state_dict(hf.checkpoint_tensors(key, sizes))
    return model_io.flux_state_dict_adjustments(
        sd, prefix="", hidden_size=config.hidden_size, mlp_ratio=config.mlp_ratio
    )


@pytest.mark.parametrize("key", KEYS)
def test_flux_checkpoint_matches_calibjobs_mmdit(key):
    """Every parameter of the MMDiT calibjob builds for the key is in the mapped checkpoint,
    with its shape (the packed-patch `img_in` reshaped to a 1x1 conv, qkv and linear1 split,
    linear2 split with its bias on both o_proj and fc2, dev's guidance_in, the key biases), and
    nothing is left over: calibjob's own `fit_check` takes the checkpoint. DiffusionKit's MMDiT
    alone would leave exactly the 76 key biases over."""
    info = model_info(key)
    config = flux.mmdit_config(info)
    assert config.guidance_embed == (key == hf.FLUX_DEV)
    table = hf.checkpoint_tensors(key)
    assert len(table) == {hf.FLUX_SCHNELL: 776, hf.FLUX_DEV: 780}[key]
    assert {t.dtype for t in table} == {"BF16"}
    # FLUX.1-dev's 11.90 B parameters; schnell the same less the guidance embedding's 10.2 M
    n = sum(int(np.prod(t.shape)) for t in table)
    assert n == {hf.FLUX_SCHNELL: 11_891_178_560, hf.FLUX_DEV: 11_901_408_320}[key]

    loaded = mapped(key, config)
    model = flux.with_key_bias(MMDiT(config))
    want, got = shapes(tree_flatten(model.parameters())), shapes(loaded.items())
    assert sorted(set(want) - set(got)) == [], "parameters the fixture does not provide"
    assert sorted(set(got) - set(want)) == [], "left over"
    assert {k: got[k] for k in want if got[k] != want[k]} == {}
    assert got["x_embedder.proj.weight"] == (3072, 1, 1, 64)
    assert any(k.startswith("guidance_in.") for k in want) == (key == hf.FLUX_DEV)
    flux.fit_check(model, loaded, hf.CHECKPOINT[key])
    bare = shapes(tree_flatten(MMDiT(config).parameters()))  # DiffusionKit's, no key bias
    k_bias = sorted(k for k in got if k.endswith(K_BIAS))
    assert len(k_bias) == 2 * 19 + 38 and sorted(set(got) - set(bare)) == k_bias


def test_dev_checkpoint_under_the_schnell_config_is_refused():
    """DiffusionKit builds FLUX.1-dev with the schnell config (its guidance embedding silently
    dropped); calibjob's fit check names the guidance tensors as left over, and the other way
    round as missing."""
    assert model_io._CONFIG[hf.FLUX_DEV].guidance_embed is False  # DiffusionKit's mistake
    schnell = flux.mmdit_config(model_info(hf.FLUX_SCHNELL))
    dev = flux.mmdit_config(model_info(hf.FLUX_DEV))
    with pytest.raises(ModelUnavailable) as e:
        flux.fit_check(flux.with_key_bias(MMDiT(schnell)), mapped(hf.FLUX_DEV, schnell),
                       "flux1-dev.safetensors")  # fmt: skip
    msg = str(e.value)
    assert "flux1-dev.safetensors does not fit" in msg
    assert "left over: guidance_in.mlp.layers.0.bias, guidance_in.mlp.layers.0.weight, " in msg
    assert "missing" not in msg and "of another shape" not in msg
    with pytest.raises(ModelUnavailable) as e:
        weights = mapped(hf.FLUX_SCHNELL, dev)
        flux.fit_check(flux.with_key_bias(MMDiT(dev)), weights, "flux-schnell.safetensors")
    assert "missing: guidance_in.mlp.layers.0.bias" in str(e.value)
    assert "left over" not in str(e.value)


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("part", ["decoder", "encoder"])
def test_flux_ae_matches_diffusionkit(key, part):
    """`ae.safetensors` (no prefix, float32) through DiffusionKit's VAE adjustments with the
    FLUX key's prefix (`decoder.` / `encoder.`) is DiffusionKit's VAE, every parameter."""
    model = hf.vae_model(part)
    files = hf.weight_files([key])
    ae = files[(key, hf.FLUX_AE)]
    assert {t.dtype for t in ae} == {"F32"}
    assert {t.key.split(".")[0] for t in ae} == {"encoder", "decoder"}
    sd = hf.lazy_state_dict(ae)
    adjust = getattr(model_io, f"vae_{part}_state_dict_adjustments")
    prefix = model_io._PREFIX[key][f"vae_{part}"]
    assert prefix == f"{part}."
    want = shapes(tree_flatten(model.parameters()))
    got = shapes(adjust(sd, prefix=prefix).items())
    assert sorted(set(want) - set(got)) == [] and sorted(set(got) - set(want)) == []
    assert {k: got[k] for k in want if got[k] != want[k]} == {}


def test_flux_files_and_sizes():
    """What a FLUX.1 key writes, and how much: the MMDiT alone in its checkpoint (bfloat16),
    ae.safetensors beside it (float32), CLIP-L and T5 but not CLIP-G (FLUX.1 pools CLIP-L
    alone), a config.json per repository; the sizes those files have."""
    files = hf.weight_files(KEYS)
    assert sorted(files) == sorted(
        [
            (hf.FLUX_SCHNELL, "flux-schnell.safetensors"),
            (hf.FLUX_SCHNELL, "ae.safetensors"),
            (hf.FLUX_DEV, "flux1-dev.safetensors"),
            (hf.FLUX_DEV, "ae.safetensors"),
            (hf.TEXT_REPO, "clip_l/model.fp16.safetensors"),
            (hf.TEXT_REPO, "t5/t5xxl.safetensors"),
        ]
    )
    assert not any("first_stage_model" in t.key for ts in files.values() for t in ts)
    gb = {f: nbytes / 1e9 for f, _, _, nbytes in hf.table(KEYS)}
    assert 23.7 < gb[f"{hf.FLUX_SCHNELL}/flux-schnell.safetensors"] < 23.9
    assert 23.7 < gb[f"{hf.FLUX_DEV}/flux1-dev.safetensors"] < 23.9
    assert 0.33 < gb[f"{hf.FLUX_DEV}/ae.safetensors"] < 0.34  # 83.7 M float32 parameters
    texts = hf.text_files(KEYS)
    assert (hf.TEXT_REPO, "tokenizer_l/vocab.json") in texts
    assert not any(name.startswith(("clip_g", "tokenizer_g")) for _, name in texts)
    import json

    cfg = json.loads(texts[(hf.FLUX_DEV, "config.json")])
    assert cfg["guidance_embed"] is True and cfg["depth_single_blocks"] == 38
    assert "flux-dev" in hf.NAMES and hf.NAMES["flux-schnell"] == hf.FLUX_SCHNELL
    with pytest.raises(ValueError, match="no fixture"):
        hf.weight_files(["argmaxinc/mlx-FLUX.1-schnell-4bit-quantized"])


# ---- the small fixture, written ----------------------------------------------------------


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    """The small fixture of both FLUX.1 keys as a hub cache (about 0.7 GB: two full-size
    float32 autoencoders, DiffusionKit builds the VAE from its fixed config)."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    cache = tmp_path_factory.mktemp("flux-hub") / "hub"
    corpus = (root / "prompts" / "sample_prompts.txt").read_text()
    hf.write_cache(cache, KEYS, sizes=hf.small(), corpus=corpus, threads=2, progress=lambda _: 0)
    return cache


def small_configs(monkeypatch):
    """The small FLUX.1 configs where calibjob's loader takes them (as hub_driver.py does)."""
    monkeypatch.setattr(flux, "FLUX_SCHNELL", hf.small_flux_config(hf.FLUX_SCHNELL, mx.float32))
    monkeypatch.setattr(flux, "FLUX_DEV", hf.small_flux_config(hf.FLUX_DEV, mx.float32))


def small_checkpoint(cache, key: str) -> str:
    return str(hf.snapshot_dir(cache, key) / hf.CHECKPOINT[key])


def test_small_flux_configs_keep_the_real_features():
    """The small configs differ from DiffusionKit's in sizes only, and the small table maps
    onto them as the full one does onto the full configs."""
    for key in KEYS:
        small, full = hf.small_flux_config(key), flux.mmdit_config(model_info(key))
        for f in ("pos_embed_type", "patchify_via_reshape", "use_qk_norm", "guidance_embed",
                  "parallel_mlp_for_unified_blocks", "patch_size", "vae_latent_dim"):  # fmt: skip
            assert getattr(small, f) == getattr(full, f), f
        assert sum(small.rope_axes_dim) == small.hidden_size // small.num_heads
        want = shapes(tree_flatten(flux.with_key_bias(MMDiT(small)).parameters()))
        got = shapes(mapped(key, small, hf.small()).items())
        assert got == want


@pytest.mark.parametrize("key", KEYS)
def test_calibjobs_flux_loader_takes_the_real_layout(key, small_cache, monkeypatch):
    """calibjob's `load_mmdit` on the written checkpoint (--local-ckpt): every tensor in, the
    MMDiT holding the file's values."""
    small_configs(monkeypatch)
    path = small_checkpoint(small_cache, key)
    model = flux.load_mmdit(model_info(key), mx.float32, local_ckpt=path)
    file = mx.load(path)
    params = dict(tree_flatten(model.parameters()))
    same = [("context_embedder.weight", "txt_in.weight")]
    # the key bias: the last third of the fused qkv bias
    qkv = np.array(file["double_blocks.0.img_attn.qkv.bias"].astype(mx.float32))
    k = params["multimodal_transformer_blocks.0.image_transformer_block.attn.k_proj.bias"]
    assert np.array_equal(np.array(k), np.split(qkv, 3)[1])
    if key == hf.FLUX_DEV:
        same.append(("guidance_in.mlp.layers.0.weight", "guidance_in.in_layer.weight"))
    for ours, theirs in same:
        want = np.array(file[theirs].astype(mx.float32))
        assert np.array_equal(np.array(params[ours]), want), ours


def test_calibjobs_flux_loader_refuses_dev_as_schnell(small_cache, monkeypatch):
    """The real loader, on the written dev checkpoint asked for as flux-schnell: one line that
    names the guidance embedding as left over."""
    small_configs(monkeypatch)
    with pytest.raises(ModelUnavailable, match=r"left over: guidance_in\.mlp\.layers\.0\.bias"):
        flux.load_mmdit(
            model_info("flux-schnell"), mx.float32, small_checkpoint(small_cache, hf.FLUX_DEV)
        )


@pytest.mark.parametrize("name", ["flux-schnell", "flux-dev"])
def test_small_fixture_runs_the_real_flux_path(name, small_cache, tmp_path):
    """The small fixture as the hub cache, offline: `calibjob run` on the FLUX.1 key loads
    CLIP-L, T5 and their tokenizers (T5 padded to the model's 256 or 512 tokens), the MMDiT
    (dev with its guidance embedding, 3.5 by default) and for preview the autoencoder through
    DiffusionKit's loaders, and run -> merge -> inspect -> preview -> profile pass."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from calibjob.profile import load

    root = Path(__file__).resolve().parent.parent
    info = model_info(name)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(small_cache),
        "HF_HOME": str(tmp_path / "hf-home"),
        "TRANSFORMERS_OFFLINE": "1",
    }
    store, npz, prof = tmp_path / "s.zarr", tmp_path / "out.npz", tmp_path / "prof.zarr"
    # --batch-size: the auto batch plans for FLUX.1's real 11.9 B parameters in float32
    cmd = [
        sys.executable, str(root / "tests" / "hub_driver.py"),
        "run", "--job", "jobs/dry-run-flux.toml", "--model-version", name, "--cfg-scale", "0",
        "--shift", "1.0", "--num-fid-samples", "2", "--num-sampling-steps", "3",
        "--num-selected-steps", "2", "--latent-size", "16", "16", "--batch-size", "2",
        "--store", str(store), "--no-progress",
        "--", "merge", str(store), "-o", str(npz),
        "--", "inspect", str(npz),
        "--", "preview", str(store), "-o", str(tmp_path / "p.png"), "--n", "2",
        "--", "profile", str(npz), "--store", str(prof), "--batch-size", "2", "--no-progress",
    ]  # fmt: skip
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert f"{npz}: valid." in r.stdout
    with np.load(npz) as z:
        assert z["xs"].shape == (4, 16, 16, 16) and np.isfinite(z["xs"]).all()
        # FLUX.1's conditioning: T5 alone, padded to the model's length; CLIP-L's pooled width
        assert z["cs"].shape[-3:] == (1, info.t5_tokens, hf.small().t5.d_model)
        assert z["cs_pooled"].shape[-2:] == (1, hf.small().clip_l.projection)
        assert np.isfinite(z["cs"]).all() and np.isfinite(z["cs_pooled"]).all()
        assert str(z["model_version"]) == info.key
        assert str(z["guidance"]) == info.guidance
        assert float(z["guidance_scale"]) == info.default_guidance  # 0 schnell, 3.5 dev
    assert (tmp_path / "p.png").stat().st_size > 1000
    p = load(prof)
    assert p.layers == ["mm_00_img", "mm_00_txt", "mm_01_img", "mm_01_txt", "uni_00", "uni_01"]
    assert len(p.keys()) == 24 and len(p.timesteps) == 2
    fx = hf.small().flux[info.key]
    assert p["uni_00", "fc2_in"].channels == fx.mlp_ratio * fx.hidden
    assert all(int(s.nan.sum()) == 0 and int(s.count.min()) > 0 for s in p)
