"""`calibjob inspect`: check a calibration file against the spec, and look at its numbers.

A file that phase 2 trusts blindly must be checked once: every key, shape and dtype, no NaN or
Inf, every (trajectory, step) pair exactly once, `ts` the schedule's timesteps at the points'
steps, prompts the round-robin of the trajectories. The per-timestep statistics of x_t (mean,
std, min, max of x_t and the 99.9th percentile of |x_t|) are what time-aware quantization is
about: how the input range moves with t.

Everything streams: `xs` is read in row blocks from a memory map (npz) or one trajectory chunk
at a time (store), and the 99.9th percentile is exact without holding a step's values, by
keeping only the largest 0.1% of |x_t| seen so far (see `RunningStats`).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from calibjob.data import open_npz
from calibjob.errors import StoreError
from calibjob.selection import STEP_SELECTIONS, select_steps

KEYS = (
    "xs", "ts", "prompt_indices", "cs", "cs_pooled", "prompts", "cfg_scale",
    "trajectory_indices", "step_indices", "sigmas",
)
QUANTILE = 99.9
ROWS_PER_READ = 256
MAX_LISTED = 5  # examples named in one problem line


class RunningStats:
    """Mean, std, min, max of x and the exact q-th percentile of |x|, fed in pieces.

    The percentile is np.percentile's default (linear interpolation between order statistics
    at position h = (n-1) q/100), so it needs only the values ranked floor(h) and above: with
    n known up front, the largest n - floor(h) values seen so far are all we keep.
    """

    def __init__(self, total: int, q: float = QUANTILE):
        self.total = total
        h = (total - 1) * q / 100.0
        self.lo = int(np.floor(h))
        self.frac = h - self.lo
        self.keep = total - self.lo
        self.top = np.empty(0, dtype=np.float32)
        self.n = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.min = np.inf
        self.max = -np.inf

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32).ravel()
        if x.size == 0:
            return
        nb = x.size
        mb = float(x.mean(dtype=np.float64))
        m2b = float(np.square(x.astype(np.float64) - mb).sum())
        delta = mb - self.mean
        tot = self.n + nb
        self.mean += delta * nb / tot
        self.m2 += m2b + delta * delta * self.n * nb / tot
        self.n = tot
        self.min = min(self.min, float(x.min()))
        self.max = max(self.max, float(x.max()))
        cand = np.concatenate([self.top, np.abs(x)])
        if cand.size > self.keep:
            cand = np.partition(cand, cand.size - self.keep)[cand.size - self.keep :]
        self.top = cand

    @property
    def std(self) -> float:
        return float(np.sqrt(self.m2 / self.n)) if self.n else float("nan")

    @property
    def percentile(self) -> float:
        if self.n != self.total:
            raise ValueError(f"saw {self.n} values, expected {self.total}")
        s = np.sort(self.top.astype(np.float64))
        return float(s[0] if s.size == 1 else s[0] + self.frac * (s[1] - s[0]))


@dataclass
class StepRow:
    """The statistics of x_t at one step."""

    step: int
    t: float
    sigma: float
    points: int
    mean: float
    std: float
    min: float
    max: float
    p999: float
    selected: bool = True


@dataclass
class Report:
    """What `inspect` found: a title, summary lines, per-step rows, or the problems."""

    path: Path
    kind: str  # "npz" or "store"
    summary: list[str] = field(default_factory=list)
    rows: list[StepRow] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _listed(items, fmt=str, sep: str = ", ") -> str:
    """The first few items, and how many there are in all."""
    items = list(items)
    more = f"{sep}... ({len(items)} in all)" if len(items) > MAX_LISTED else ""
    return sep.join(fmt(i) for i in items[:MAX_LISTED]) + more


# ---- the npz -------------------------------------------------------------------------------


def _check_shapes(a: dict[str, np.ndarray]) -> list[str]:
    """Keys, dtypes and shapes; later checks run only when these hold."""
    bad = [f"missing key: {k}" for k in KEYS if k not in a]
    if bad:
        return bad

    def shape(k):
        return "x".join(map(str, a[k].shape)) or "scalar"

    xs, cs = a["xs"], a["cs"]
    if xs.ndim != 4 or xs.shape[-1] != 16 or xs.shape[1] % 2 or xs.shape[2] % 2:
        bad.append(f"xs has shape {shape('xs')}, expected (points, H, W, 16) with H, W even")
    if xs.dtype != np.float32:
        bad.append(f"xs has dtype {xs.dtype}, expected float32")
    m = xs.shape[0] if xs.ndim else 0
    for k, kind in (("ts", "f"), ("prompt_indices", "iu"), ("trajectory_indices", "iu"),
                    ("step_indices", "iu")):
        if a[k].shape != (m,):
            bad.append(f"{k} has shape {shape(k)}, expected ({m},) like xs")
        if a[k].dtype.kind not in kind:
            bad.append(f"{k} has dtype {a[k].dtype}, expected {'float' if kind == 'f' else 'int'}")
    bad += _check_model(a)
    guidance = _guidance(a)
    nb = 2 if guidance == "cfg" else 1
    what = f"the prompt and the empty prompt (guidance {guidance})" if nb == 2 else (
        f"the prompt (guidance {guidance})")
    if cs.ndim != 4 or cs.shape[1] != nb:
        bad.append(f"cs has shape {shape('cs')}, expected (prompts, {nb}, L, D): {what}")
    p = cs.shape[0] if cs.ndim else -1
    if a["cs_pooled"].ndim != 3 or a["cs_pooled"].shape[:2] != (p, nb):
        bad.append(f"cs_pooled has shape {shape('cs_pooled')}, expected ({p}, {nb}, Dp) like cs")
    if a["prompts"].shape != (p,) or a["prompts"].dtype.kind not in "US":
        bad.append(f"prompts is {a['prompts'].dtype} of shape {shape('prompts')}, "
                   f"expected {p} strings like cs")
    if a["cfg_scale"].size != 1 or a["cfg_scale"].dtype.kind not in "fi":
        bad.append(f"cfg_scale is {a['cfg_scale'].dtype} of shape {shape('cfg_scale')}, "
                   "expected one number")
    sg = a["sigmas"]
    if sg.ndim != 1 or sg.size < 2 or sg.dtype.kind != "f":
        bad.append(f"sigmas is {sg.dtype} of shape {shape('sigmas')}, expected S+1 floats")
    return bad


def _guidance(a: dict[str, np.ndarray]) -> str:
    """The file's guidance mode; files made before FLUX.1 came have none and are CFG (SD3)."""
    return str(a["guidance"]) if "guidance" in a else "cfg"


def _check_model(a: dict[str, np.ndarray]) -> list[str]:
    """The guidance keys against their contract and against the model that made the file: the
    branch axis, cfg_scale and guidance_scale must be what that model's guidance uses."""
    from calibjob.errors import ConfigError
    from calibjob.families import GUIDANCE_MODES, model_info

    guidance, bad = _guidance(a), []
    if guidance not in GUIDANCE_MODES:
        return [f"guidance is {guidance!r}, expected one of {', '.join(GUIDANCE_MODES)}"]
    if "model_version" in a:
        try:
            info = model_info(str(a["model_version"]))
        except ConfigError:
            bad.append(f"model_version {str(a['model_version'])!r} is not a model calibjob knows")
        else:
            if info.guidance != guidance:
                bad.append(f"guidance is {guidance}, but {info.name} runs with {info.guidance}")
    cfg = a["cfg_scale"]
    if cfg.size == 1 and cfg.dtype.kind in "fi" and np.isfinite(cfg):
        c = float(cfg)
        if guidance == "cfg" and c <= 1:
            bad.append(f"cfg_scale is {c:g}: classifier-free guidance needs a scale above 1")
        if guidance != "cfg" and c != 0:
            bad.append(f"cfg_scale is {c:g}, but guidance {guidance} has no CFG (expected 0)")
    g = a.get("guidance_scale")
    if g is not None:
        if g.size != 1 or g.dtype.kind not in "fi" or not np.isfinite(g).all():
            bad.append(f"guidance_scale is {g.dtype} of shape {g.shape}, expected one number")
        elif guidance != "embedded" and float(g) != 0:
            bad.append(f"guidance_scale is {float(g):g}, but guidance {guidance} embeds none")
        elif guidance == "embedded" and float(g) < 0:
            bad.append(f"guidance_scale is {float(g):g}, expected a scale >= 0")
    elif guidance == "embedded":
        bad.append("missing key: guidance_scale (guidance embedded needs its scale)")
    return bad


def _check_small(a: dict[str, np.ndarray]) -> list[str]:
    """Finiteness of the small arrays, the schedule, indices, coverage, ts."""
    bad = []
    for k in ("ts", "cs", "cs_pooled", "sigmas", "cfg_scale"):
        if not np.isfinite(np.asarray(a[k])).all():
            bad.append(f"{k} holds NaN or Inf")
    sigmas = np.asarray(a["sigmas"])
    s_steps = sigmas.size - 1
    if np.isfinite(sigmas).all() and (sigmas[-1] != 0 or np.any(np.diff(sigmas) >= 0)):
        bad.append("sigmas is not a schedule: must decrease strictly and end at 0")
    p = a["cs"].shape[0]
    ti, si = np.asarray(a["trajectory_indices"]), np.asarray(a["step_indices"])
    pi = np.asarray(a["prompt_indices"])
    ranges = [("prompt_indices", pi, p), ("step_indices", si, s_steps),
              ("trajectory_indices", ti, None)]
    for k, v, hi in ranges:
        out = np.flatnonzero((v < 0) | (v >= hi if hi is not None else False))
        if out.size:
            limit = f"0..{hi - 1}" if hi is not None else ">= 0"
            bad.append(f"{k} out of range ({limit}) at point(s) {_listed(out)}")
    if bad:
        return bad

    wrong = np.flatnonzero(pi != ti % p)
    if wrong.size:
        bad.append(f"prompt_indices != trajectory_indices % {p} at point(s) {_listed(wrong)}")

    pairs = Counter(zip(ti.tolist(), si.tolist(), strict=True))
    dup = [(k, c) for k, c in pairs.items() if c > 1]
    if dup:
        bad.append(
            "(trajectory, step) pairs stored more than once: "
            + _listed(dup, lambda kc: f"({kc[0][0]}, {kc[0][1]}) x{kc[1]}")
        )
    trajs, steps = np.unique(ti), np.unique(si)
    n, k_sel = int(ti.max()) + 1 if ti.size else 0, steps.size
    absent = sorted(set(range(n)) - set(trajs.tolist()))
    if absent:
        bad.append(f"trajectories with no points: {_listed(absent)}")
    missing = [(t, s) for t in range(n) for s in steps.tolist() if (t, s) not in pairs]
    if missing:
        bad.append(
            "(trajectory, step) pairs missing: " + _listed(missing, lambda q: f"({q[0]}, {q[1]})")
        )
    per_step = Counter(si.tolist())
    off = [(s, c) for s, c in sorted(per_step.items()) if c != n]
    if off:
        bad.append(f"points per selected step should be {n} (one per trajectory): "
                   + _listed(off, lambda sc: f"step {sc[0]} has {sc[1]}", "; "))
    want = np.bincount(np.arange(n) % p, minlength=p) * k_sel
    got = np.bincount(pi, minlength=p)
    off_p = np.flatnonzero(want != got)
    if off_p.size:
        bad.append("points per prompt differ from the round-robin: "
                   + _listed(off_p, lambda q: f"prompt {q} has {got[q]}, expected {want[q]}", "; "))
    if not any(np.array_equal(steps, select_steps(s_steps, k_sel, m)) for m in STEP_SELECTIONS):
        bad.append(f"selected steps {steps.tolist()} are not a uniform selection "
                   f"({'/'.join(STEP_SELECTIONS)}) of {k_sel} of {s_steps} steps")

    ts = np.asarray(a["ts"])
    expected = schedule_timesteps(sigmas, ts.dtype)[si]
    # equal, or one unit in the last place apart (MLX and numpy may round a cast differently)
    off_t = np.flatnonzero(np.abs(ts - expected) > np.spacing(np.abs(expected)))
    if off_t.size:
        bad.append(
            f"ts differ from the schedule (sigmas*1000 at step_indices, as {ts.dtype}) at "
            f"{off_t.size} point(s): "
            + _listed(off_t, lambda i: f"point {i} (step {si[i]}) has {ts[i]:g}, "
                      f"not {expected[i]:g}", "; ")
        )
    return bad


def schedule_timesteps(sigmas: np.ndarray, dtype) -> np.ndarray:
    """The model timesteps of a schedule: DiffusionKit's `sampler.timestep` (sigma * 1000, in
    float32) cast to the dtype the model saw."""
    return (np.asarray(sigmas, dtype=np.float32) * np.float32(1000)).astype(dtype)


def _scan_xs(xs: np.ndarray, steps: np.ndarray | None, hwc: int):
    """One pass over xs in row blocks: rows with NaN/Inf, identical rows, per-step stats."""
    nonfinite: list[int] = []
    seen: dict[bytes, int] = {}
    same: list[tuple[int, int]] = []
    acc: dict[int, RunningStats] = {}
    if steps is not None:
        for s, c in Counter(steps.tolist()).items():
            acc[s] = RunningStats(c * hwc)
    for start in range(0, xs.shape[0], ROWS_PER_READ):
        block = np.asarray(xs[start : start + ROWS_PER_READ])
        flat = block.reshape(block.shape[0], -1)
        finite = np.isfinite(flat).all(axis=1)
        nonfinite += (np.flatnonzero(~finite) + start).tolist()
        for j, row in enumerate(flat):
            h = hashlib.blake2b(row.tobytes(), digest_size=16).digest()
            if h in seen:
                same.append((seen[h], start + j))
            else:
                seen[h] = start + j
        if steps is not None and finite.all():
            bs = steps[start : start + block.shape[0]]
            for s in np.unique(bs):
                acc[int(s)].add(block[bs == s])
    return nonfinite, same, acc


def inspect_npz(path: str | Path) -> Report:
    """Validate a calibration `.npz` and, when it is valid, compute its per-step stats."""
    a = open_npz(path)
    rep = Report(Path(path), "npz")
    rep.problems = _check_shapes(a)
    if rep.problems:
        return rep
    rep.problems = _check_small(a)
    xs = a["xs"]
    hwc = int(np.prod(xs.shape[1:]))
    steps = np.asarray(a["step_indices"]) if not rep.problems else None
    nonfinite, same, acc = _scan_xs(xs, steps, hwc)
    if nonfinite:
        rep.problems.append(
            f"xs holds NaN or Inf in {len(nonfinite)} point(s): {_listed(nonfinite)}"
        )
    if same:
        rep.problems.append(
            "identical xs rows (a point stored twice?): "
            + _listed(same, lambda q: f"points {q[0]} and {q[1]}")
        )
    if rep.problems:
        return rep

    sigmas, ts = np.asarray(a["sigmas"]), np.asarray(a["ts"])
    first = {int(s): i for i, s in reversed(list(enumerate(steps)))}
    rep.rows = [_row(s, float(ts[first[s]]), float(sigmas[s]), acc[s], hwc) for s in sorted(acc)]
    n, p = int(np.asarray(a["trajectory_indices"]).max()) + 1, a["cs"].shape[0]
    rep.summary = [
        f"{rep.path}: valid. {xs.shape[0]} points = {n} trajectories x {len(acc)} of "
        f"{sigmas.size - 1} steps; {p} prompts; latent {xs.shape[1]}x{xs.shape[2]}x16; "
        f"{_guidance_words(a)}; ts {ts.dtype}"
    ]
    return rep


def _guidance_words(a: dict[str, np.ndarray]) -> str:
    guidance = _guidance(a)
    if guidance == "cfg":
        return f"cfg {float(a['cfg_scale']):g}"
    if guidance == "embedded":
        return f"embedded guidance {float(a['guidance_scale']):g}"
    return "no guidance"


def _row(step: int, t: float, sigma: float, acc: RunningStats, hwc: int, selected=True) -> StepRow:
    return StepRow(step, t, sigma, acc.n // hwc, acc.mean, acc.std, acc.min, acc.max,
                   acc.percentile, selected)


# ---- a store (work in progress) ----------------------------------------------------------------


def inspect_store(path: str | Path) -> Report:
    """Per recorded step, over the trajectories done so far, one chunk at a time."""
    from calibjob.families import LATENT_CHANNELS
    from calibjob.jobs.run import open_run_store

    st = open_run_store(path)
    cfg = st.config
    if not st.prepared:
        raise StoreError(f"{path} has no trajectories yet (its run never started)")
    done = np.flatnonzero(st.done_mask())
    if done.size == 0:
        raise StoreError(f"{path} has no trajectories done yet")
    sigmas, ts = st.read_prepared("sigmas"), st.read_prepared("ts")
    s_steps = cfg.num_sampling_steps
    h, w = cfg.latent_size
    hwc = h * w * LATENT_CHANNELS
    acc = [RunningStats(done.size * hwc) for _ in range(s_steps)]
    rep = Report(Path(path), "store")
    for k in done.tolist():
        try:
            x = st.read_row("xs", int(k))
        except Exception as e:  # noqa: BLE001  (a missing or corrupt chunk is a finding)
            rep.problems.append(f"trajectory {k} is unreadable ({type(e).__name__})")
            continue
        if not np.isfinite(x).all():
            bad = np.flatnonzero(~np.isfinite(x.reshape(s_steps, -1)).all(axis=1))
            rep.problems.append(f"trajectory {k} holds NaN or Inf at step(s) {_listed(bad)}")
            continue
        for s in range(s_steps):
            acc[s].add(x[s])
    if rep.problems:
        return rep
    sel = set(select_steps(s_steps, cfg.num_selected_steps).tolist())
    rep.rows = [
        _row(s, float(ts[s]), float(sigmas[s]), acc[s], hwc, s in sel) for s in range(s_steps)
    ]
    rep.summary = [
        f"{rep.path}: {done.size} of {cfg.num_fid_samples} trajectories done "
        f"({cfg.model_version}, {s_steps} steps, latent {h}x{w}x16); stats over those, "
        f"per recorded step; * = a step merge selects (linspace)"
    ]
    return rep


def inspect(path: str | Path) -> Report:
    """A store folder or a calibration `.npz`."""
    return inspect_store(path) if Path(path).is_dir() else inspect_npz(path)


# ---- output ---------------------------------------------------------------------------------


def stats_table(rep: Report):
    """A Rich table, one row per step (fits 80 columns: the point count is in the title)."""
    from rich.table import Table

    store = rep.kind == "store"
    points = rep.rows[0].points if rep.rows else 0
    table = Table(
        title=f"x_t per {'recorded' if store else 'selected'} step: {rep.path.name} "
        f"({points} latents per step)"
    )
    for name in ("step", "t", "sigma", "mean", "std", "min", "max", "p99.9 |x|"):
        table.add_column(name, justify="right", no_wrap=True)
    for r in rep.rows:
        table.add_row(
            f"{r.step}{'*' if store and r.selected else ''}",
            f"{r.t:.2f}",
            f"{r.sigma:.4f}",
            *(f"{v:.4f}" for v in (r.mean, r.std, r.min, r.max, r.p999)),
        )
    return table


def plot_stats(rep: Report, out: str | Path, force: bool = False) -> Path:
    """A plot (900 x 550 px; PNG, PDF or SVG by suffix) of the stats against the timestep,
    one line per statistic."""
    from calibjob.outputs import PLOT_FORMATS, check_output, write_whole

    fmt = check_output(out, force, PLOT_FORMATS)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.array([r.t for r in rep.rows])
    series = [
        ("p99.9 |x_t|", [r.p999 for r in rep.rows], "tab:red", "-"),
        ("max", [r.max for r in rep.rows], "tab:orange", "--"),
        ("std", [r.std for r in rep.rows], "tab:green", "-"),
        ("mean", [r.mean for r in rep.rows], "tab:blue", "-"),
        ("min", [r.min for r in rep.rows], "tab:purple", "--"),
    ]
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=100)
    many = len(t) > 30
    for label, v, color, ls in series:
        ax.plot(t, v, ls, color=color, label=label, marker=None if many else "o", markersize=4)
    ax.axhline(0, color="0.6", linewidth=0.8)
    if rep.kind == "store":  # the steps merge will keep, as the table's stars mark them
        kept = [r.t for r in rep.rows if r.selected]
        for j, tk in enumerate(kept):
            ax.axvline(tk, color="0.7", lw=0.9, zorder=0,
                       label="selected by merge" if j == 0 else None)  # fmt: skip
    ax.invert_xaxis()  # t = 1000 (pure noise) on the left: denoising reads left to right
    ax.set_xlabel("timestep t  (1000 = noise  ->  0 = image)")
    ax.set_ylabel("value of x_t")
    what = "recorded step, done trajectories" if rep.kind == "store" else "selected step"
    points = rep.rows[0].points if rep.rows else 0
    ax.set_title(f"x_t statistics per {what}: {rep.path.name} ({points} latents per step)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    try:
        out = write_whole(out, lambda tmp: fig.savefig(tmp, dpi=100, format=fmt), force)
    finally:
        plt.close(fig)
    return out


__all__ = ["KEYS", "Report", "RunningStats", "StepRow", "inspect", "inspect_npz",
           "inspect_store", "plot_stats", "schedule_timesteps", "stats_table"]
