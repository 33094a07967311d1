"""`calibjob profile-report`: a profile's figures (PNG, matplotlib Agg) and summary table.

Figures (TaQ-DiT's, for this model):
    range_vs_timestep.png    per layer, the median channel range against the timestep (Fig. 2d)
    post_gelu_hist.png       fc2_in (post-GELU) histograms at a few timesteps (Fig. 3a)
    channel_ranges.png       per-channel ranges, the top 2% outlier channels marked (Fig. 3d)
    heatmap_range.png        layers x timesteps: median channel range, one panel per input
    heatmap_negative.png     layers x timesteps: fraction of negative post-GELU values

A channel's range at a timestep is max - min over every value it took there (all points,
tokens, CFG rows). Timestep axes run in denoising order (t = 1000 on the left).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.table import Table

from calibjob.errors import ConfigError
from calibjob.profile.plan import INPUTS
from calibjob.profile.stats import Profile, TapStats

FIGURES = (
    "range_vs_timestep.png",
    "post_gelu_hist.png",
    "channel_ranges.png",
    "heatmap_range.png",
    "heatmap_negative.png",
)
OUTLIER_SHARE = 0.02  # the top 2% of channels by range (TaQ-DiT Fig. 3d)
OUTLIER_FACTOR = 4.0  # the table counts channels whose range passes 4x the layer's median
DPI = 110


@dataclass
class Row:
    layer: str
    input: str
    median_range: float  # median over channels of the whole-profile range
    max_range: float
    negative_fraction: float
    outliers: int  # channels with range > OUTLIER_FACTOR x median
    top_channels: list[int]  # the top 2% by range, largest first
    drift: float  # max / min over timesteps of the median channel range


def overall_range(s: TapStats) -> np.ndarray:
    """(C,) each channel's range over the whole profile (all timesteps)."""
    return s.max.max(axis=0).astype(np.float64) - s.min.min(axis=0).astype(np.float64)


def top_channels(ranges: np.ndarray, share: float = OUTLIER_SHARE) -> np.ndarray:
    """The top `share` of channels by range (at least one), largest first."""
    k = max(1, int(round(share * len(ranges))))
    return np.argsort(-ranges, kind="stable")[:k]


def summary_rows(prof: Profile) -> list[Row]:
    rows = []
    for s in prof:
        r = overall_range(s)
        med = float(np.median(r))
        per_t = np.median(s.range, axis=1)
        neg = s.hist[:, : s.hist.shape[1] // 2].sum() + s.below.sum()
        total = s.hist.sum() + s.below.sum() + s.above.sum()
        rows.append(
            Row(
                s.layer, s.input, med, float(r.max()), float(neg / max(total, 1)),
                int((r > OUTLIER_FACTOR * med).sum()), top_channels(r).tolist(),
                float(per_t.max() / per_t.min()) if per_t.min() > 0 else float("inf"),
            )
        )
    return rows


def summary_table(prof: Profile, rows: list[Row] | None = None) -> Table:
    rows = rows if rows is not None else summary_rows(prof)
    t = Table(
        title=f"{prof.path}: {len(prof.layers)} layers x {len(prof.timesteps)} timesteps "
        f"({prof.job['model_version']})"
    )
    for name, just in (
        ("layer", "left"), ("input", "left"), ("median range", "right"), ("max range", "right"),
        ("neg. frac.", "right"), (f"ch. >{OUTLIER_FACTOR:g}x med.", "right"),
        ("top-2% channels", "left"), ("drift over t", "right"),
    ):
        t.add_column(name, justify=just)  # type: ignore[arg-type]
    for r in rows:
        top = ",".join(map(str, r.top_channels[:3])) + (",..." if len(r.top_channels) > 3 else "")
        t.add_row(
            r.layer, r.input, f"{r.median_range:.3g}", f"{r.max_range:.3g}",
            f"{r.negative_fraction:.3f}", str(r.outliers), top, f"{r.drift:.2f}x",
        )
    return t


def default_layers(prof: Profile) -> list[str]:
    """First, middle and last layers that have an MLP (for the per-layer figures)."""
    with_mlp = [layer for layer in prof.layers if (layer, "fc2_in") in prof.stats]
    if len(with_mlp) <= 3:
        return with_mlp
    return [with_mlp[0], with_mlp[len(with_mlp) // 2], with_mlp[-1]]


def pick_timesteps(timesteps: np.ndarray, n: int) -> list[int]:
    """n indices spread evenly over the timesteps (first and last included)."""
    n = max(1, min(n, len(timesteps)))
    return sorted(set(np.linspace(0, len(timesteps) - 1, n).round().astype(int).tolist()))


def targets(out_dir: Path, export: Path | None) -> list[Path]:
    paths = [out_dir / f for f in FIGURES]
    return paths + ([export] if export is not None else [])


def check_outputs(out_dir: Path, export: Path | None, force: bool) -> None:
    """The one rule for outputs (calibjob.outputs), for the figures and the export, before
    anything is written."""
    from calibjob.outputs import NPZ_FORMATS, check_writable

    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir} is a file, not a folder")
    if export is not None:
        if export.suffix.lower() not in NPZ_FORMATS:
            raise ConfigError(f"{export}: the export is an .npz file; name it with .npz")
        if not export.parent.is_dir() and export.parent != out_dir:
            raise ConfigError(f"output folder {export.parent} does not exist")
    if out_dir.is_dir():
        check_writable(out_dir)
    there = [p for p in targets(out_dir, export) if p.exists()]
    if there and not force:
        raise ConfigError(
            f"{there[0]} exists{f' (and {len(there) - 1} more outputs)' if len(there) > 1 else ''}"
            "; pass --force to replace"
        )


def write_figures(prof: Profile, out_dir: Path, *, layers: list[str] | None = None,
                  num_timesteps: int = 4) -> list[Path]:
    """Write the five PNGs into out_dir (created if missing); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = layers or default_layers(prof)
    unknown = [x for x in layers if x not in prof.layers]
    if unknown:
        raise ConfigError(
            f"unknown layer(s) {', '.join(unknown)}; this profile has {', '.join(prof.layers)}"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    ts = prof.timesteps
    written = []

    def save(fig, name: str) -> None:
        path = out_dir / name
        tmp = path.with_name(f".{name}.partial.png")
        fig.savefig(tmp, dpi=DPI, bbox_inches="tight")
        plt.close(fig)
        tmp.replace(path)
        written.append(path)

    all_layers = prof.layers
    viridis = plt.get_cmap("viridis")

    def cmap(x: float):  # viridis without its pale yellow end, which vanishes on white
        return viridis(0.85 * x)

    # 1. median channel range against the timestep, one line per layer, a panel per input
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.2), sharex=True)
    for ax, inp in zip(axes, INPUTS, strict=True):
        meds = []
        for i, layer in enumerate(all_layers):
            if (layer, inp) not in prof.stats:
                continue
            med = np.median(prof[layer, inp].range, axis=1)
            meds.append(med)
            style = "-" if layer.endswith("_img") or layer.startswith("uni") else "--"
            ax.plot(ts, med, style, color=cmap(i / max(1, len(all_layers) - 1)), lw=1.6,
                    label=layer, marker="o", ms=3)
        ax.set_title(inp)
        ax.set_xlabel("timestep t")
        spread = np.concatenate(meds) if meds else np.ones(1)
        if spread.min() > 0 and spread.max() / spread.min() > 10:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].invert_xaxis()  # shared: once for all panels (denoising order, t = 1000 first)
    axes[0].set_ylabel("median channel range (max - min)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=9,
               title="layer (solid: image, dashed: text)", title_fontsize=9,
               ncol=1 + len(labels) // 30)  # fmt: skip
    fig.suptitle("Median channel range of each linear layer's input across timesteps")
    fig.tight_layout()
    save(fig, FIGURES[0])

    # 2. post-GELU histograms at a few timesteps
    chosen_t = pick_timesteps(ts, num_timesteps)
    edges = prof.bin_edges
    centers = (edges[:-1] + edges[1:]) / 2
    fig, axes = plt.subplots(1, len(layers), figsize=(5 * len(layers), 3.8), squeeze=False)
    tcolors = plt.get_cmap("plasma")
    for ax, layer in zip(axes[0], layers, strict=True):
        s = prof[layer, "fc2_in"]
        for j, ti in enumerate(chosen_t):
            h = s.hist[ti].astype(np.float64)
            dens = h / max(h.sum(), 1) / np.diff(edges)
            ax.plot(centers, dens, color=tcolors(j / max(1, len(chosen_t) - 1)), lw=1.2,
                    label=f"t = {ts[ti]:.1f}", drawstyle="steps-mid")
        ax.set_yscale("log")
        ax.set_xlim(-1, min(8.0, max(2.0, float(s.max.max()))))
        ax.axvline(0, color="0.5", lw=0.8)
        ax.set_title(f"{layer} fc2_in (post-GELU)")
        ax.set_xlabel("activation")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("density")
    fig.tight_layout()
    save(fig, FIGURES[1])

    # 3. per-channel ranges with the top 2% marked, for each chosen layer's MLP input
    fig, axes = plt.subplots(len(layers), 1, figsize=(12, 2.6 * len(layers)), squeeze=False)
    for ax, layer in zip(axes[:, 0], layers, strict=True):
        inp = "fc1_in"
        s = prof[layer, inp]
        r = overall_range(s)
        top = top_channels(r)
        ch = np.arange(len(r))
        ax.bar(ch, r, width=1.0, color="0.6")
        word = "channel" if len(top) == 1 else "channels"
        ax.bar(top, r[top], width=max(1.0, len(r) / 300), color="crimson",
               label=f"top {OUTLIER_SHARE:.0%} ({len(top)} {word})")
        ax.plot(top, r[top], "v", color="crimson", ms=5, clip_on=False)  # findable when thin
        ax.axhline(np.median(r), color="k", lw=0.8, ls=":", label="median")
        ax.set_xlim(-0.5, len(r) - 0.5)
        ax.set_ylabel("range")
        ax.set_title(f"{layer} {inp}: per-channel range over all timesteps")
        # outside the axes: the top channels are the bars that matter, never under a legend
        ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.005, 1.0), frameon=False)
    axes[-1, 0].set_xlabel("channel")
    fig.tight_layout()
    save(fig, FIGURES[2])

    # 4. heatmap: layers x timesteps, median channel range, a panel per input
    fig, axes = plt.subplots(1, 4, figsize=(17, 0.3 * len(all_layers) + 2.4), sharey=True)
    magma = plt.get_cmap("magma").with_extremes(bad="0.85")  # grey: the layer has no such input
    missing = 0
    for ax, inp in zip(axes, INPUTS, strict=True):
        grid = np.full((len(all_layers), len(ts)), np.nan)
        for i, layer in enumerate(all_layers):
            if (layer, inp) in prof.stats:
                grid[i] = np.median(prof[layer, inp].range, axis=1)
            else:
                missing += 1
        im = ax.imshow(np.log10(grid), aspect="auto", cmap=magma, interpolation="nearest")
        ax.set_title(inp)
        _time_ticks(ax, ts)
        fig.colorbar(im, ax=ax, label="log10 median range", fraction=0.05)
    axes[0].set_yticks(range(len(all_layers)), all_layers, fontsize=9)
    note = " (grey: no such input, e.g. the last text block has no MLP)" if missing else ""
    fig.suptitle(f"Median channel range, layers x timesteps{note}")
    fig.tight_layout()
    save(fig, FIGURES[3])

    # 5. heatmap: fraction of negative post-GELU values
    mlp = [layer for layer in all_layers if (layer, "fc2_in") in prof.stats]
    grid = np.array([prof[layer, "fc2_in"].negative_fraction for layer in mlp])
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(mlp) + 2.4))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(mlp)), mlp, fontsize=9)
    _time_ticks(ax, ts)
    fig.colorbar(im, ax=ax, label="fraction of values < 0")
    ax.set_title("Negative post-GELU values (fc2_in), layers x timesteps")
    fig.tight_layout()
    save(fig, FIGURES[4])
    return written


def _time_ticks(ax, ts: np.ndarray) -> None:
    idx = pick_timesteps(ts, 6)
    ax.set_xticks(idx, [f"{ts[i]:.0f}" for i in idx], fontsize=9)
    ax.set_xlabel("timestep t")
