"""`calibjob inspect`: the validator on a real merged file and on broken copies of it, the
per-step stats (npz and store agree), the plot. The store comes from the real worker."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from calibjob.inspect_data import RunningStats, inspect_npz, inspect_store
from calibjob.jobs import open_store

pytestmark = pytest.mark.e2e

CLI = [sys.executable, "-c", "from calibjob.cli import main; main()"]


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=120)


def rewrite(src: Path, dst: Path, **changes) -> Path:
    """A copy of an npz with some members replaced (None drops the member)."""
    with np.load(src) as f:
        arrays = {k: f[k] for k in f.files}
    for k, v in changes.items():
        if v is None:
            del arrays[k]
        else:
            arrays[k] = v
    np.savez(dst, **arrays)
    return dst


def test_running_stats_equal_numpy_on_pieces():
    rng = np.random.default_rng(0)
    pieces = [rng.standard_normal(n).astype(np.float32) * 3 for n in (1, 700, 5000, 13)]
    whole = np.concatenate(pieces)
    acc = RunningStats(whole.size)
    for p in pieces:
        acc.add(p)
    assert acc.percentile == pytest.approx(np.percentile(np.abs(whole), 99.9), rel=1e-6)
    assert acc.mean == pytest.approx(whole.mean(dtype=np.float64), abs=1e-9)
    assert acc.std == pytest.approx(whole.astype(np.float64).std(), rel=1e-9)
    assert (acc.min, acc.max) == (whole.min(), whole.max())


def test_inspect_passes_on_merged_file_and_plots(dry_run, tmp_path):
    _, npz = dry_run
    png = tmp_path / "stats.png"
    r = cli("inspect", npz, "--plot", png)
    assert r.returncode == 0, r.stderr
    assert "valid. 40 points = 8 trajectories x 5 of 20 steps" in r.stdout
    assert "p99.9 |x|" in r.stdout
    with np.load(npz) as f:
        for t in np.unique(f["ts"]):
            assert f"{t:.2f}" in r.stdout
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (900, 550)
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 20


def test_stats_rows_are_the_points_of_each_step(dry_run):
    _, npz = dry_run
    rep = inspect_npz(npz)
    with np.load(npz) as f:
        xs, steps, sigmas = f["xs"], f["step_indices"], f["sigmas"]
    assert [r.step for r in rep.rows] == sorted(set(steps.tolist()))
    for r in rep.rows:
        x = xs[steps == r.step]
        assert r.points == 8 and r.sigma == pytest.approx(float(sigmas[r.step]))
        assert r.mean == pytest.approx(float(x.mean(dtype=np.float64)), abs=1e-6)
        assert r.std == pytest.approx(float(x.std(dtype=np.float64)), rel=1e-6)
        assert (r.min, r.max) == (x.min(), x.max())
        assert r.p999 == pytest.approx(float(np.percentile(np.abs(x), 99.9)), rel=1e-6)


def broken_files(npz: Path, d: Path) -> list[tuple[Path, str]]:
    """(file, words the problem line must contain), one defect each."""
    with np.load(npz) as f:
        a = {k: f[k] for k in f.files}
    nan = a["xs"].copy()
    nan[3, 5, 7, 1] = np.nan
    dup = {k: a[k].copy() for k in ("xs", "ts", "prompt_indices", "trajectory_indices",
                                    "step_indices")}
    for v in dup.values():
        v[1] = v[0]
    ts = a["ts"].copy()
    i = int(np.flatnonzero(a["step_indices"] == a["step_indices"].max())[0])
    ts[i] = a["ts"][a["step_indices"] == 0][0]
    return [
        (rewrite(npz, d / "no_cs_pooled.npz", cs_pooled=None), "missing key: cs_pooled"),
        (rewrite(npz, d / "shape.npz", xs=a["xs"][..., :8]), "xs has shape 40x32x32x8"),
        (rewrite(npz, d / "nan.npz", xs=nan), "xs holds NaN or Inf in 1 point(s): 3"),
        (rewrite(npz, d / "dup.npz", **dup), "pairs stored more than once"),
        (rewrite(npz, d / "ts.npz", ts=ts), "ts differ from the schedule"),
    ]


def test_inspect_fails_naming_each_problem(dry_run, tmp_path):
    _, npz = dry_run
    for path, words in broken_files(npz, tmp_path):
        r = cli("inspect", path)
        assert r.returncode == 2, (path.name, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr
        lines = r.stderr.strip().splitlines()
        assert lines[0].startswith(f"calibjob: error: {path} fails validation")
        assert any(words in line for line in lines[1:]), (path.name, r.stderr)
        assert r.stdout == ""


def test_duplicate_point_also_shows_as_a_missing_pair_and_identical_rows(dry_run, tmp_path):
    _, npz = dry_run
    path = dict((p.name, p) for p, _ in broken_files(npz, tmp_path))["dup.npz"]
    problems = inspect_npz(path).problems
    assert any("pairs missing" in p for p in problems)
    assert any("identical xs rows" in p and "points 0 and 1" in p for p in problems)


def test_inspect_store_so_far(dry_run, tmp_path):
    """A store in progress (two trajectories not done): stats over the done ones, per recorded
    step; on the full store the selected steps give the npz's numbers."""
    store, npz = dry_run
    full = inspect_store(store)
    assert len(full.rows) == 20 and all(r.points == 8 for r in full.rows)
    by_step = {r.step: r for r in full.rows}
    for r in inspect_npz(npz).rows:
        s = by_step[r.step]
        assert s.selected and s.t == r.t
        assert (s.mean, s.std, s.min, s.max) == pytest.approx((r.mean, r.std, r.min, r.max))
        assert s.p999 == pytest.approx(r.p999)

    part = tmp_path / "part.zarr"
    shutil.copytree(store, part)
    st = open_store(part)
    st.root["done"][2] = 0
    st.root["done"][6] = 0
    rep = inspect_store(part)
    assert not rep.problems and "6 of 8 trajectories done" in rep.summary[0]
    x = np.stack([st.read_row("xs", k)[10] for k in (0, 1, 3, 4, 5, 7)])
    row = rep.rows[10]
    assert row.points == 6 and row.max == x.max()
    assert row.p999 == pytest.approx(float(np.percentile(np.abs(x), 99.9)), rel=1e-6)

    bad = np.array(st.read_row("xs", 4))
    bad[13, 0, 0, 0] = np.inf
    st.root["xs"][4] = bad
    r = cli("inspect", part)
    assert r.returncode == 2 and "trajectory 4 holds NaN or Inf at step(s) 13" in r.stderr


def test_a_stores_plot_marks_the_steps_merge_selects(dry_run, tmp_path):
    import matplotlib

    from calibjob.inspect_data import plot_stats

    rep = inspect_store(dry_run[0])
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # text as text, to be read back
        out = plot_stats(rep, tmp_path / "s.svg")
    assert "selected by merge" in out.read_text()
    assert sum(r.selected for r in rep.rows) == 5  # the dry run's 5 of 20 steps
