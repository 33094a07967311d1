"""Phase 2, `calibjob profile`: every statistic against a plain per-point reference, shard and
kill/resume invariance with real processes, one-line errors, the report and the export."""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import cli, popen

from calibjob.profile import load

pytestmark = pytest.mark.e2e

# 12 trajectories of 3 prompts x 6 steps, 3 selected: 36 points, 4 per (timestep, prompt).
# Batches of 3 give batches of 3 and 1; units of at most 7 points ([3, 1, 3], [1, 3, 1]) mix
# prompts and split each timestep in two, so the reader's reduction across units is exercised.
SET = dict(num_fid_samples=12, num_sampling_steps=6, num_selected_steps=3, latent_size=(16, 16),
           batch_size=4, seed=3)
PROFILE_FLAGS = ["--batch-size", "3", "--unit-points", "7", "--no-progress"]
UNITS = 6


@pytest.fixture(scope="module")
def calib_set(tmp_path_factory, prompt_file) -> Path:
    from calibjob import api
    from calibjob.config import JobConfig
    from calibjob.core.shards import ALL
    from calibjob.jobs.run import RUN
    from calibjob.merge import merge

    root = tmp_path_factory.mktemp("profile-set")
    store, npz = root / "set.zarr", root / "set.npz"
    cfg = JobConfig(model_version="tiny", prompt_file=str(prompt_file), **SET)
    api.run(RUN, cfg, str(store), [ALL], progress=False)
    merge([store], npz)
    return npz


@pytest.fixture(scope="module")
def one_shard(calib_set, tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("profile-one") / "one.zarr"
    cli("profile", str(calib_set), "--store", str(store), *PROFILE_FLAGS)
    return store


# ---- the reference: one point at a time, DiffusionKit's own modulation cache, numpy ---------


def reference_activations(mmdit, npz: Path) -> dict[tuple[float, str, str], np.ndarray]:
    """(timestep, layer, input) -> every value each linear layer's input took, (rows, C)
    float64, from calling the model once per point (CFG batch of 2) with the linear layers
    wrapped by a plain recorder and DiffusionKit's own cache_modulation_params."""
    import mlx.nn as nn

    from calibjob.data import CalibrationSet, run_mmdit

    sink: dict[str, list[np.ndarray]] = {}

    class Recorder(nn.Module):
        def __init__(self, inner, key):
            super().__init__()
            self.inner = inner
            object.__setattr__(self, "key", key)

        # DiffusionKit's unified block rewrites fc2's bias on every call: let it reach the layer
        def __getattr__(self, name):
            return self["inner"][name] if name in ("weight", "bias") else super().__getattr__(name)

        def __setattr__(self, name, value):
            if name in ("weight", "bias"):
                self["inner"][name] = value
            else:
                super().__setattr__(name, value)

        def __call__(self, x):
            sink.setdefault(self.key, []).append(np.array(x).reshape(-1, x.shape[-1]))
            return self.inner(x)

    streams = []
    for i, block in enumerate(mmdit.multimodal_transformer_blocks):
        streams += [(f"mm_{i:02d}_img", block.image_transformer_block),
                    (f"mm_{i:02d}_txt", block.text_transformer_block)]
    for i, block in enumerate(getattr(mmdit, "unified_transformer_blocks", None) or []):
        streams.append((f"uni_{i:02d}", block.transformer_block))
    wrapped = []
    for name, tb in streams:
        sites = [("qkv_in", tb.attn, "q_proj")]
        if not tb.skip_post_sdpa:
            sites += [("o_in", tb.attn, "o_proj"), ("fc1_in", tb.mlp, "fc1"),
                      ("fc2_in", tb.mlp, "fc2")]
        for inp, holder, attr in sites:
            wrapped.append((holder, attr, holder[attr]))
            holder[attr] = Recorder(holder[attr], f"{name}:{inp}")
    cal = CalibrationSet(npz)
    acts: dict[tuple[float, str, str], list[np.ndarray]] = {}
    try:
        for i in range(cal.num_points):
            sink.clear()
            run_mmdit(mmdit, cal[i])
            for key, chunks in sink.items():
                layer, inp = key.split(":")
                acts.setdefault((float(cal.ts[i]), layer, inp), []).extend(chunks)
    finally:
        for holder, attr, layer in wrapped:
            holder[attr] = layer
    return {k: np.concatenate(v).astype(np.float64) for k, v in acts.items()}


@pytest.fixture(scope="module")
def reference(calib_set):
    from calibjob.models import load as load_model

    return reference_activations(load_model("tiny", text_encoders=False).mmdit, calib_set)


def assert_matches_reference(prof_stats: dict, ref: dict, timesteps, sums_relative_to="sum"):
    """Every statistic of every (layer, input, timestep) against the reference."""
    for (layer, inp), s in prof_stats.items():
        for ti, t in enumerate(timesteps):
            a = ref[(float(t), layer, inp)]
            where = f"{layer}:{inp} t={t}"
            assert s.count[ti] == a.shape[0], where
            assert np.array_equal(s.min[ti], a.min(axis=0).astype(np.float32)), where
            assert np.array_equal(s.max[ti], a.max(axis=0).astype(np.float32)), where
            h, _ = np.histogram(a, bins=512, range=(-8.0, 8.0))
            assert np.array_equal(s.hist[ti], h), where
            assert s.below[ti] == (a < -8).sum() and s.above[ti] == (a > 8).sum(), where
            sq = (a * a).sum(axis=0)
            np.testing.assert_allclose(s.sumsq[ti], sq, rtol=1e-6, atol=0, err_msg=where)
            if sums_relative_to == "sum":
                np.testing.assert_allclose(s.sum[ti], a.sum(axis=0), rtol=1e-6, atol=0,
                                           err_msg=where)
            else:  # relative to the sum of magnitudes (float32 partial sums)
                err = np.abs(s.sum[ti] - a.sum(axis=0))
                assert (err <= 1e-6 * np.abs(a).sum(axis=0)).all(), where


def test_every_statistic_matches_a_per_point_reference(one_shard, reference):
    prof = load(one_shard)
    assert prof.layers == ["mm_00_img", "mm_00_txt", "mm_01_img", "mm_01_txt"]
    # the last joint block's text stream has no o_proj and no MLP (skip_post_sdpa)
    assert [i for (layer, i) in prof.keys() if layer == "mm_01_txt"] == ["qkv_in"]
    assert len(prof.keys()) == 13
    ts = prof.timesteps
    assert len(ts) == 3 and (np.diff(ts) < 0).all()  # denoising order
    assert prof.job["reduce_dtype"] == "float64" and prof.job["batch_size"] == 3
    s = prof["mm_00_img", "qkv_in"]
    assert s.sum.shape == (3, 64) and s.hist.shape == (3, 512)
    # 12 points per timestep x 2 CFG rows x 64 image tokens (16x16 latent, 2x2 patches)
    assert list(s.count) == [12 * 2 * 64] * 3
    assert (prof["mm_00_img", "fc2_in"].min > -0.2).all()  # post-GELU: GELU's minimum is -0.17
    assert_matches_reference(prof.stats, reference, ts)


def test_float32_partial_sums_stay_within_1e6_of_the_magnitudes(calib_set, reference):
    """The GPU's path (no float64 there): float32 per batch, float64 across batches."""
    from calibjob.data import read_set
    from calibjob.models import load as load_model
    from calibjob.profile.forward import Profiler
    from calibjob.profile.plan import plan_units, select_points
    from calibjob.profile.stats import TapStats

    cal = read_set(calib_set)
    model = load_model("tiny", text_encoders=False)
    prof = Profiler(model, reduce_dtype="float32", bins=512, limit=8.0)
    tvals, units = plan_units(cal.ts, cal.prompt_indices, select_points(cal.ts, 0, 0), 4, 7)
    per_t = {}
    for u in units:
        t = np.array([tvals[u.timestep]], dtype=cal.ts.dtype)
        per_t.setdefault(u.timestep, []).append(
            prof.run_unit(u, t, cal.xs, cal.cs, cal.cs_pooled))
    stats = {}
    for j, spec in enumerate(prof.specs):
        sl = slice(prof.offsets[j], prof.offsets[j + 1])

        def total(name, sl=sl, j=j):
            rows = []
            for ti in range(len(tvals)):
                parts = [getattr(st, name) for st in per_t[ti]]
                if name == "min":
                    rows.append(np.min([p[sl] for p in parts], axis=0))
                elif name == "max":
                    rows.append(np.max([p[sl] for p in parts], axis=0))
                elif name in ("hist", "rows"):
                    rows.append(np.sum([p[j] for p in parts], axis=0))
                else:
                    rows.append(np.sum([p[sl] for p in parts], axis=0))
            return np.array(rows)

        h = total("hist")
        stats[(spec.layer, spec.input)] = TapStats(
            spec.layer, spec.input, tvals, total("rows"), total("sum"), total("sumsq"),
            total("min"), total("max"), h[:, 1:513], h[:, 0], h[:, 513], h[:, 514])
    assert_matches_reference(stats, reference, tvals, sums_relative_to="magnitudes")


def test_unified_blocks_are_profiled_as_uni_layers(tmp_path, calib_set):
    """A model with a unified block (FLUX-style, parallel MLP): `uni_00` gets all four inputs,
    the joint blocks keep their text MLPs, and the statistics match the reference."""
    import mlx.core as mx
    from diffusionkit.mlx.mmdit import MMDiT
    from diffusionkit.mlx.sampler import ModelSamplingDiscreteFlow

    from calibjob import api
    from calibjob.core.shards import ALL
    from calibjob.data import read_set
    from calibjob.jobs import open_store
    from calibjob.models import Model
    from calibjob.models.tiny import _seeded, mmdit_config

    config = dataclasses.replace(mmdit_config(mx.float32, depth=1), depth_unified=1)
    mmdit = _seeded(lambda: MMDiT(config), 5, mx.float32)
    model = Model("tiny", mmdit, ModelSamplingDiscreteFlow(shift=3.0), None, "float32")
    cal = read_set(calib_set)
    api.profile(calib_set, str(tmp_path / "u.zarr"), ALL, progress=False, model=model,
                num_samples=6, batch_size=2)
    prof = load(tmp_path / "u.zarr")
    assert prof.layers == ["mm_00_img", "mm_00_txt", "uni_00"]
    assert len(prof.keys()) == 12
    assert open_store(tmp_path / "u.zarr").meta["taps"][-1] == ["uni_00", "fc2_in", 128]
    # the reference over the same 6 points
    sub = tmp_path / "sub.npz"
    points = np.sort(np.array([i for i in range(cal.ts.size)])[
        np.isin(np.arange(cal.ts.size), _subset(cal, 6))])
    with np.load(calib_set) as f:
        d = {k: f[k] for k in f.files}
    for k in ("xs", "ts", "prompt_indices", "trajectory_indices", "step_indices"):
        d[k] = d[k][points]
    np.savez(sub, **d)
    assert_matches_reference(prof.stats, reference_activations(mmdit, sub), prof.timesteps)


def _subset(cal, n):
    from calibjob.profile.plan import select_points

    return select_points(cal.ts, n, 0)


# ---- sharding, kill and resume -------------------------------------------------------------


def store_arrays(path: Path) -> dict[str, np.ndarray]:
    prof = load(path)
    out = {"timesteps": prof.timesteps}
    for s in prof:
        for f in ("count", "sum", "sumsq", "min", "max", "hist", "below", "above"):
            out[f"{s.layer}:{s.input}:{f}"] = getattr(s, f)
    return out


def assert_bit_identical(a: Path, b: Path) -> None:
    da, db = store_arrays(a), store_arrays(b)
    assert sorted(da) == sorted(db)
    for k in da:
        assert da[k].dtype == db[k].dtype and np.array_equal(da[k], db[k]), k


def done_units(store: Path) -> list[int]:
    d = store / "done" / "c"
    if not d.is_dir():
        return []
    from calibjob.jobs import open_store

    try:
        return np.flatnonzero(open_store(store, mode="r").done_mask()).tolist()
    except Exception:  # noqa: BLE001  (mid-creation)
        return []


def test_three_shards_give_the_same_bits_as_one(one_shard, calib_set, tmp_path):
    store = tmp_path / "three.zarr"
    procs = [
        popen("profile", str(calib_set), "--store", str(store), "--shard", f"{i}/3",
              *PROFILE_FLAGS)
        for i in range(3)
    ]
    for p in procs:
        out, errout = p.communicate(timeout=300)
        assert p.returncode == 0, errout
        assert "2 units" in out  # 6 units over 3 shards
    assert_bit_identical(store, one_shard)


def test_sigkill_mid_job_then_the_same_command_resumes_to_the_same_bits(
    one_shard, calib_set, tmp_path
):
    store = tmp_path / "killed.zarr"
    args = ("profile", str(calib_set), "--store", str(store), *PROFILE_FLAGS)
    p = popen(*args)
    deadline = time.monotonic() + 120
    while len(done_units(store)) < 2 and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.005)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    before = done_units(store)
    assert 2 <= len(before) < UNITS, "the kill should land mid-job"
    mtimes = {u: (store / "sum" / "c" / str(u) / "0").stat().st_mtime_ns for u in before}
    with pytest.raises(Exception, match="incomplete"):
        load(store)
    res = cli(*args)
    assert f"in {UNITS - len(before)} units" in res.stdout
    for u, m in mtimes.items():  # finished units were kept, not recomputed
        assert (store / "sum" / "c" / str(u) / "0").stat().st_mtime_ns == m
    assert_bit_identical(store, one_shard)
    again = cli(*args)
    assert "nothing left to do" in again.stdout


def test_corrupt_unit_is_recomputed(one_shard, calib_set, tmp_path):
    import shutil

    store = tmp_path / "corrupt.zarr"
    shutil.copytree(one_shard, store)
    chunk = store / "hist" / "c" / "4" / "0" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    res = cli("profile", str(calib_set), "--store", str(store), *PROFILE_FLAGS)
    assert "in 1 unit," in res.stdout and "(4)" in res.stderr
    assert_bit_identical(store, one_shard)


# ---- bad input: one line, exit 2, nothing left behind ----------------------------------------


def one_line_error(*args: str, words: str) -> str:
    res = cli(*args, check=False)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, res.stderr
    assert words in lines[0], lines[0]
    return lines[0]


def test_bad_inputs_get_one_line(one_shard, calib_set, tmp_path):
    st = str(tmp_path / "never.zarr")
    text = tmp_path / "notes.npz"
    text.write_text("not a zip\n")
    one_line_error("profile", str(text), "--store", st, words="is not a calibration file")
    other = tmp_path / "other.npz"
    np.savez(other, a=np.zeros(3))
    one_line_error("profile", str(other), "--store", st, words="is not a calibration file")
    one_line_error("profile", str(tmp_path / "missing.npz"), "--store", st,
                   words="not a calibration file")
    with np.load(calib_set) as f:
        d = {k: f[k] for k in f.files}
    # a set whose text conditioning is wider than the model takes
    wide = tmp_path / "wide.npz"
    np.savez(wide, **{**d, "cs": np.concatenate([d["cs"], d["cs"]], axis=-1)})
    one_line_error("profile", str(wide), "--store", st,
                   words="model tiny does not match")
    # an older file: no model_version (then --model-version makes it work)
    old = tmp_path / "old.npz"
    np.savez(old, **{k: v for k, v in d.items() if k not in ("model_version", "dtype", "shift")})
    one_line_error("profile", str(old), "--store", st, words="pass --model-version")
    one_line_error("profile", str(calib_set), "--store", st, "--model-version", "sd3-medium",
                   words="was made with tiny")
    assert not Path(st).exists()  # nothing half-written
    # a store of another profile job, and a store of the run job
    one_line_error("profile", str(calib_set), "--store", str(one_shard), "--num-samples", "6",
                   *PROFILE_FLAGS, words="holds another profile job (num_samples: store has 0")
    run_store = calib_set.parent / "set.zarr"
    one_line_error("profile", str(calib_set), "--store", str(run_store), *PROFILE_FLAGS,
                   words="not a profile store")
    one_line_error("profile-report", str(run_store), "-o", str(tmp_path / "r"),
                   words="not a profile store")
    one_line_error("profile", str(calib_set), "--store", st, "--num-samples", "99",
                   words="exceeds the set's 36 points")


def test_older_file_with_model_version_profiles_like_the_new_one(one_shard, calib_set, tmp_path):
    with np.load(calib_set) as f:
        d = {k: f[k] for k in f.files if k not in ("model_version", "dtype", "shift")}
    old = tmp_path / "old.npz"
    np.savez(old, **d)
    store = tmp_path / "old.zarr"
    cli("profile", str(old), "--store", str(store), "--model-version", "tiny", *PROFILE_FLAGS)
    assert_bit_identical(store, one_shard)


def test_num_samples_takes_a_seeded_subset_spread_over_timesteps(calib_set, tmp_path):
    from calibjob.data import read_set
    from calibjob.profile.plan import select_points

    ts = read_set(calib_set).ts
    a, b = select_points(ts, 10, 0), select_points(ts, 10, 0)
    assert np.array_equal(a, b) and len(np.unique(a)) == 10
    assert not np.array_equal(a, select_points(ts, 10, 1))
    per_t = sorted(np.unique(ts[a], return_counts=True)[1].tolist())
    assert per_t == [3, 3, 4]  # 10 of 3 x 12 points: every timestep keeps its share
    store = tmp_path / "sub.zarr"
    cli("profile", str(calib_set), "--store", str(store), "--num-samples", "10", *PROFILE_FLAGS)
    prof = load(store)
    counts = prof["mm_00_img", "qkv_in"].count // (2 * 64)  # points per timestep
    assert sorted(counts.tolist()) == [3, 3, 4]


# ---- report and export -----------------------------------------------------------------------


def test_report_pngs_table_and_export(one_shard, tmp_path):
    from PIL import Image

    from calibjob.profile.report import FIGURES

    out = tmp_path / "report"
    export = tmp_path / "stats.npz"
    res = cli("profile-report", str(one_shard), "-o", str(out), "--export", str(export))
    assert "mm_00_img" in res.stdout and "median range" in res.stdout
    for name in FIGURES:
        with Image.open(out / name) as im:
            assert im.format == "PNG"
            w, h = im.size
            assert w >= 600 and h >= 250, (name, im.size)
            px = np.asarray(im.convert("L"))
            assert px.std() > 5, f"{name} looks blank"
    # outputs are never overwritten without --force
    mtime = (out / FIGURES[0]).stat().st_mtime_ns
    again = cli("profile-report", str(one_shard), "-o", str(out), check=False)
    assert again.returncode == 2 and "--force" in again.stderr
    assert (out / FIGURES[0]).stat().st_mtime_ns == mtime
    only_export = cli("profile-report", str(one_shard), "-o", str(tmp_path / "r2"),
                      "--export", str(export), check=False)
    assert only_export.returncode == 2 and "stats.npz exists" in only_export.stderr
    assert not (tmp_path / "r2").exists()
    cli("profile-report", str(one_shard), "-o", str(out), "--export", str(export), "--force")

    prof = load(one_shard)
    with np.load(export, allow_pickle=False) as f:
        d = {k: f[k] for k in f.files}
    assert np.array_equal(d["timesteps"], prof.timesteps)
    assert np.array_equal(d["histogram_bin_edges"], np.linspace(-8, 8, 513))
    t = prof.timesteps[1]
    base = f"mm_01_img:fc2_in::t={t:.6f}::"
    s = prof["mm_01_img", "fc2_in"]
    assert int(d[base + "count"]) == s.count[1]
    assert np.array_equal(d[base + "mean"], s.sum[1] / s.count[1])
    assert np.array_equal(d[base + "min"], s.min[1]) and np.array_equal(d[base + "max"], s.max[1])
    assert np.array_equal(d[base + "histogram"], s.hist[1])
    var = s.sumsq[1] / s.count[1] - (s.sum[1] / s.count[1]) ** 2
    np.testing.assert_allclose(d[base + "std"] ** 2, var, rtol=1e-9)
    fields = {"count", "mean", "std", "min", "max", "histogram", "below", "above"}
    assert len(d) == 2 + 13 * 3 * len(fields)
    assert {k.rsplit("::", 1)[1] for k in d if "::" in k} == fields


@pytest.mark.parametrize("copies", [1, 64])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_histogram_slots_are_numpys_bins_at_the_edges(monkeypatch, copies, dtype):
    """Values on and next to every bin edge, +-8 exactly, out of range, inf and NaN land where
    numpy.histogram puts them; the spread histogram (the GPU's) sums to the same counts."""
    import mlx.core as mx

    from calibjob.profile import taps

    monkeypatch.setattr(taps, "HIST_COPIES", copies)
    edges = np.linspace(-8, 8, 513).astype(np.float32)
    vals = np.concatenate([
        edges, np.nextafter(edges, np.float32(-np.inf)), np.nextafter(edges, np.float32(np.inf)),
        np.array([-1e-30, 1e-30, 0.0, -0.0, 9.0, -9.0, 1e4, -1e4, np.inf, -np.inf, np.nan]),
        np.random.default_rng(0).standard_normal(4000).astype(np.float32) * 4,
    ]).astype(dtype)
    vals = vals[: len(vals) // 64 * 64]  # whole copies for the spread path
    x = mx.array(vals.reshape(2, -1, 1, 1))
    _, _, _, _, hist, rows = taps.batch_stats(x, mx.float32, 512, 8.0)
    hist = np.array(hist)
    v = vals.astype(np.float64)
    finite = v[~np.isnan(v)]
    h, _ = np.histogram(finite, bins=512, range=(-8.0, 8.0))
    assert np.array_equal(hist[1:513], h)
    assert hist[0] == (finite < -8).sum() and hist[513] == (finite > 8).sum()
    assert hist[514] == np.isnan(v).sum() and int(rows) == len(vals)


def test_compiled_forward_matches_the_reference_too(calib_set, reference, tmp_path):
    """`--compile` (the GPU default) traces the taps' statistics into the compiled forward."""
    store = tmp_path / "compiled.zarr"
    cli("profile", str(calib_set), "--store", str(store), "--compile", *PROFILE_FLAGS)
    prof = load(store)
    assert prof.job["compile"] == "on"
    assert_matches_reference(prof.stats, reference, prof.timesteps)


# ---- the job core's guarantees on a profile store (issue: one core for every job) ----------


FAULTS = Path(__file__).resolve().parent / "faults.py"


def faulty(*args: str, faults: tuple[str, ...] = ()):
    import subprocess
    import sys

    return subprocess.Popen(
        [sys.executable, str(FAULTS), *faults, "--", *args],
        cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def export_bytes(store: Path, out: Path) -> bytes:
    from calibjob.profile.stats import export

    export(load(store), out)
    return out.read_bytes()


def test_status_and_resume_take_a_profile_store_with_no_flags(one_shard, calib_set, tmp_path):
    st = cli("status", str(one_shard))
    assert st.returncode == 0 and "damaged" not in st.stdout + st.stderr
    assert "complete: ready for `calibjob profile-report`" in st.stdout
    assert "points/s" in st.stdout and f"{UNITS}/{UNITS}" in st.stdout
    assert "nothing left to do" in cli("resume", str(one_shard)).stdout
    # killed mid-job, then `resume STORE` alone finishes it with the options it started with
    store = tmp_path / "k.zarr"
    p = popen("profile", str(calib_set), "--store", str(store), *PROFILE_FLAGS)
    deadline = time.monotonic() + 120
    while len(done_units(store)) < 1 and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.005)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert len(done_units(store)) < UNITS
    mid = cli("status", str(store), check=False)
    assert mid.returncode == 1 and "no worker is running" in mid.stdout, mid.stdout
    res = cli("resume", str(store))
    assert "unit" in res.stdout and "points/s" in res.stdout
    assert export_bytes(store, tmp_path / "a.npz") == export_bytes(one_shard, tmp_path / "b.npz")


def test_two_profile_workers_of_one_shard_compute_each_unit_once(one_shard, calib_set, tmp_path):
    store, log = tmp_path / "twice.zarr", tmp_path / "units.log"
    args = ("profile", str(calib_set), "--store", str(store), *PROFILE_FLAGS)
    procs = [faulty(*args, faults=("--log-units", str(log))) for _ in range(3)]
    for p in procs:
        _, e = p.communicate(timeout=300)
        assert p.returncode == 0, e
    units = sorted(ln.split()[1] for ln in log.read_text().splitlines())
    assert units == sorted(f"u{u}" for u in range(UNITS)), units  # each unit exactly once
    assert_bit_identical(store, one_shard)


def test_a_deleted_chunk_is_found_and_recomputed_on_a_profile_store(one_shard, tmp_path):
    import shutil

    store = tmp_path / "lost.zarr"
    shutil.copytree(one_shard, store)
    (store / "sum" / "c" / "3" / "0").unlink()
    st = cli("status", str(store), check=False)
    assert st.returncode == 1 and "damaged: 1 unit" in st.stdout, st.stdout
    with pytest.raises(Exception, match="sum/c/3/0"):
        load(store)  # never an export with a unit's statistics missing
    res = cli("resume", str(store))
    assert "in 1 unit," in res.stdout and "(3)" in res.stderr
    assert_bit_identical(store, one_shard)


@pytest.mark.parametrize("damage", ["flip-done", "truncate-sum-meta", "half-created"])
def test_a_damaged_or_half_created_profile_store_is_repaired_by_resume(
    one_shard, calib_set, tmp_path, damage
):
    import shutil

    store = tmp_path / "d.zarr"
    shutil.copytree(one_shard, store)
    if damage == "flip-done":
        f = store / "done" / "c" / "2"
        raw = bytearray(f.read_bytes())
        raw[0] ^= 0xFF
        f.write_bytes(bytes(raw))
    elif damage == "truncate-sum-meta":
        f = store / "sum" / "zarr.json"
        f.write_bytes(f.read_bytes()[:20])
    else:  # killed after its record, before its arrays: only the record is there
        for name in ("sum", "sumsq", "min", "max", "hist", "rows", "done", "progress"):
            shutil.rmtree(store / name)
    st = cli("status", str(store), check=False)
    assert "Traceback" not in st.stderr
    res = cli("resume", str(store), check=False)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    if damage != "half-created":
        assert "repaired" in res.stderr, res.stderr
    assert_bit_identical(store, one_shard)


def test_a_profile_store_given_to_merge_or_inspect_says_what_it_is(one_shard, tmp_path):
    for args in (("merge", str(one_shard), "-o", str(tmp_path / "x.npz")),
                 ("inspect", str(one_shard))):  # fmt: skip
        line = one_line_error(*args, words="is not a calibration-data store")
        assert "made by `calibjob profile`" in line and "calibjob profile-report" in line


def test_launch_starts_a_profile_job(one_shard, calib_set, tmp_path):
    store = tmp_path / "launched.zarr"
    res = cli("launch", "--store", str(store), "--shards", "2", "profile", str(calib_set),
              *PROFILE_FLAGS)  # fmt: skip
    assert "launched shards 0/2, 1/2" in res.stdout and "complete" in res.stdout, res.stdout
    assert_bit_identical(store, one_shard)
    assert "nothing left to do" in cli("launch", "--store", str(store), "--shards", "2").stdout


def test_ctrl_c_in_a_profile_job_says_what_is_safe(calib_set, tmp_path):
    store = tmp_path / "c.zarr"
    p = faulty("profile", str(calib_set), "--store", str(store), *PROFILE_FLAGS,
               faults=("--slow-fsync", "0.3"))  # fmt: skip
    deadline = time.monotonic() + 120
    while len(done_units(store)) < 1 and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.005)
    p.send_signal(signal.SIGINT)
    _, errout = p.communicate(timeout=120)
    assert p.returncode == 130, errout
    assert f"of {UNITS} units are safe in {store}" in errout, errout
    assert f"continue with `calibjob resume {store}`" in errout


def test_report_figures_keep_what_matters_in_view(one_shard, tmp_path, monkeypatch):
    """channel_ranges: the legend sits beside the axes, never on the top-2% bars, and counts in
    words ('1 channel'); heatmaps: layer labels readable, missing rows said to be missing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from calibjob.profile import report

    figs = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: figs.append(fig))
    try:
        report.write_figures(load(one_shard), tmp_path / "rep")
    finally:
        monkeypatch.setattr(plt, "close", real_close)
    ranges, heat = figs[2], figs[3]
    ranges.canvas.draw()
    for ax in ranges.axes:
        leg = ax.get_legend()
        assert not leg.get_window_extent().overlaps(ax.get_window_extent())
        texts = [t.get_text() for t in leg.get_texts()]
        assert not any("(1 channels)" in t for t in texts), texts
    assert all(t.get_fontsize() >= 8 for t in heat.axes[0].get_yticklabels())
    assert "no such input" in heat._suptitle.get_text()  # the last text block has no MLP
