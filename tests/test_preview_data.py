"""`calibjob preview` and `CalibrationSet` on a real store and merged file (tiny model): the
preview's final latent is the engine's, and a loader batch through MMDiT reproduces the step
the engine took."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from calibjob.errors import ConfigError
from calibjob.jobs import open_store

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def model(dry_run):
    from calibjob import models

    cfg = open_store(dry_run[0], mode="r").config
    return models.load(cfg.model_version, shift=cfg.shift, dtype=cfg.dtype, text_encoders=False)


def test_final_latent_is_the_engines(dry_run, model):
    """xs[k, S-1] + the last step (preview) == the final latent Engine.run_unit returns."""
    from calibjob.engine import Engine
    from calibjob.preview import final_latents

    st = open_store(dry_run[0], mode="r")
    cfg = st.config
    cs, cs_pooled = st.read_prepared("cs"), st.read_prepared("cs_pooled")
    ks = [0, 5, 7]
    ours = final_latents(st, model, ks)
    engine = Engine(model, num_steps=cfg.num_sampling_steps, cfg_scale=cfg.cfg_scale,
                    latent_size=cfg.latent_size, seed=cfg.seed)
    for k, mine in zip(ks, ours, strict=True):
        p = k % len(cfg.prompts)
        xs, final = engine.run_unit(p, [k], cs[p], cs_pooled[p])
        np.testing.assert_allclose(xs[0], st.read_row("xs", k), atol=1e-5)
        np.testing.assert_allclose(mine, final[0], atol=1e-5)
    engine.release_prompt()


def test_preview_writes_a_captioned_grid(dry_run, tmp_path):
    png = tmp_path / "grid.png"
    r = subprocess.run(
        [sys.executable, "-c", "from calibjob.cli import main; main()", "preview",
         str(dry_run[0]), "--trajectories", "0,5,7", "-o", str(png)],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "3 trajectories (0, 5, 7)" in r.stdout
    with Image.open(png) as im:
        assert im.format == "PNG"
        w, h = im.size
        assert w == 3 * (256 + 8) + 8 and h > 256 + 8  # 3 tiles of 8 x 32 px, captions below
        tile = im.convert("RGB").crop((8, 8, 264, 264))
        assert len(tile.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 100


def test_preview_refuses_trajectories_not_done(dry_run):
    from calibjob.preview import choose_trajectories

    st = open_store(dry_run[0], mode="r")
    with pytest.raises(ConfigError, match="outside 0..7"):
        choose_trajectories(st, "1,8", 16)
    assert choose_trajectories(st, None, 3) == [0, 1, 2]


def test_calibration_set_batches(dry_run):
    from calibjob.data import CalibrationSet

    _, npz = dry_run
    with np.load(npz) as f:
        a = {k: f[k] for k in f.files}
    one = CalibrationSet(npz)
    assert len(one) == one.num_points == 40
    x, t, cs, pooled = one[3]
    p = a["prompt_indices"][3]
    assert x.shape == (2, 32, 32, 16) and (x[0] == a["xs"][3]).all() and (x[1] == x[0]).all()
    assert (t == a["ts"][3]).all() and t.dtype == a["ts"].dtype
    assert cs.shape == (2, 109, 1, 64) and (cs[:, :, 0] == a["cs"][p]).all()
    assert (pooled == a["cs_pooled"][p]).all()

    four = CalibrationSet(npz, batch_size=4)
    seen = np.concatenate([four.indices(i) for i in range(len(four))])
    assert sorted(seen.tolist()) == list(range(40))
    for i, (x, t, cs, pooled) in enumerate(four):
        idx = four.indices(i)
        b = len(idx)
        assert len(np.unique(t)) == 1 and x.shape[0] == t.shape[0] == cs.shape[0] == 2 * b
        np.testing.assert_array_equal(cs[b:, :, 0], a["cs"][a["prompt_indices"][idx], 1])
        np.testing.assert_array_equal(pooled[:b], a["cs_pooled"][a["prompt_indices"][idx], 0])


def test_batch_through_mmdit_reproduces_the_engines_step(dry_run, model):
    """A loader batch (4 points of one step, 4 prompts) through the tiny MMDiT, then CFG and
    Euler: the next x of each point's trajectory, as the engine computed and stored it."""
    from calibjob.data import CalibrationSet, run_mmdit
    from calibjob.preview import euler_step

    store, npz = dry_run
    st = open_store(store, mode="r")
    cal = CalibrationSet(npz, batch_size=4)
    with np.load(npz) as f:
        steps, trajs, sigmas = f["step_indices"], f["trajectory_indices"], f["sigmas"]
    i = next(i for i in range(len(cal)) if 0 < steps[cal.indices(i)[0]] < 19)
    idx = cal.indices(i)
    s = int(steps[idx[0]])
    batch = cal[i]
    out = run_mmdit(model.mmdit, batch)
    assert out.shape == batch[0].shape
    x_next = np.array(euler_step(model, batch[0][: len(idx)], out, sigmas[s], sigmas[s + 1],
                                 st.config.cfg_scale))
    want = np.stack([st.read_row("xs", int(k))[s + 1] for k in trajs[idx]])
    np.testing.assert_allclose(x_next, want, atol=1e-5)
    # the weights are back: the same batch gives the same output again
    np.testing.assert_allclose(np.array(run_mmdit(model.mmdit, batch)), np.array(out), atol=1e-6)


def test_calibration_set_never_unpickles(dry_run, tmp_path):
    from calibjob.data import CalibrationSet

    with np.load(dry_run[1]) as f:
        a = {k: f[k] for k in f.files}
    a["prompts"] = a["prompts"].astype(object)
    np.savez(tmp_path / "pickled.npz", **a)
    with pytest.raises(ConfigError, match="pickled object array"):
        CalibrationSet(tmp_path / "pickled.npz")
