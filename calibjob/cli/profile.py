"""`calibjob profile` and `profile-report`: phase 2's job and its report. Imports are lazy, so
`calibjob --help` still answers at once. Failures raise CalibjobError: one line, exit 2."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from calibjob.cli.base import ProgressOpt, ShardOpt, app, out, print_result
from calibjob.cli.help import Command
from calibjob.config import PROFILE_UNIT_POINTS


@app.command("profile", cls=Command)
def profile(
    calib: Annotated[
        Path,
        typer.Argument(
            metavar="CALIB",
            help="A calibration .npz (`calibjob merge`'s output).",
            show_default=False,
        ),
    ],
    store: Annotated[
        str,
        typer.Option(
            "--store",
            metavar="STORE",
            help="Profile store to create or continue: a folder or s3://bucket/prefix.",
            show_default=False,
        ),
    ],
    shard: ShardOpt = "0/1",
    num_samples: Annotated[
        int,
        typer.Option(
            "--num-samples",
            metavar="N",
            help="Profile a seeded subset of this many points, spread over the "
            "timesteps in proportion; 0 = every point.",
        ),
    ] = 0,
    seed: Annotated[
        int, typer.Option("--seed", metavar="N", help="Seed of the --num-samples subset.")
    ] = 0,
    model_version: Annotated[
        str | None,
        typer.Option(
            "--model-version",
            metavar="NAME",
            help="The model that made the set; only for files that do not record it "
            "(made before calibjob did).",
        ),
    ] = None,
    local_ckpt: Annotated[
        str | None,
        typer.Option("--local-ckpt", metavar="FILE", help="Local MMDiT checkpoint (.safetensors)."),
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(
            "--dtype",
            metavar="NAME",
            help="Activation dtype (float32, float16, bfloat16); default: the set's, "
            "else float32 on CPU, float16 on a GPU.",
        ),
    ] = None,
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size",
            metavar="N",
            help="Points of one (timestep, prompt) per model call; 0 = auto for "
            "the device (a GPU: all of them, up to 32).",
        ),
    ] = 0,
    unit_points: Annotated[
        int,
        typer.Option(
            "--unit-points",
            metavar="N",
            help="Most points in one work unit (a unit is one timestep's batches; "
            "a kill loses at most one unit).",
        ),
    ] = PROFILE_UNIT_POINTS,
    compile: Annotated[
        bool | None,
        typer.Option(
            "--compile/--no-compile",
            help="mx.compile the profiled forward. (default: on a GPU only)",
        ),
    ] = None,
    progress: ProgressOpt = None,
) -> None:
    """Profile the MMDiT that made a calibration set: statistics of every linear layer's input
    per timestep (phase 2).

    For each joint block and stream (mm_00_img, mm_00_txt, ...; uni_00 ... where the model has
    unified blocks), the inputs of its four linear layers (qkv_in, o_in, fc1_in, fc2_in):
    count, per-channel sum, sum of squares, min and max, and a 512-bin histogram over [-8, 8].
    Points run as generation ran them (CFG batches of one prompt and timestep). Sharded and
    resumable like `run`: run the same command again to continue after a crash.

        calibjob profile out/dry_run_cali.npz --store out/profile.zarr
        calibjob profile paper.npz --store prof.zarr --shard 1/4 --num-samples 640
    """
    from calibjob import api
    from calibjob.core.locations import normalize
    from calibjob.core.shards import parse_shard
    from calibjob.jobs.profile import PROFILE

    sh = parse_shard(shard)
    store = normalize(store)
    res = api.profile(
        calib, store, sh, progress=progress, model_version=model_version, dtype=dtype,
        num_samples=num_samples, seed=seed, batch_size=batch_size, unit_points=unit_points,
        compile="auto" if compile is None else ("on" if compile else "off"),
        local_ckpt=local_ckpt,
    )  # fmt: skip
    print_result(res, store, str(sh), PROFILE)


def spec_from_args(args: list[str]):
    """`launch ... profile CALIB [flags]`: the profile job these arguments describe, parsed by
    this command's own parser (so the two take the same flags)."""
    from calibjob.data import read_set
    from calibjob.errors import ConfigError
    from calibjob.jobs.profile import PROFILE, build_spec

    cmd = typer.main.get_command(app).commands["profile"]  # type: ignore[attr-defined]
    with cmd.make_context("calibjob launch ... profile", [*args, "--store", "-"]) as ctx:
        p = dict(ctx.params)
    if p.pop("shard") != "0/1" or p.pop("store") != "-":
        raise ConfigError("launch sets --store and --shard of each shard itself")
    p.pop("progress", None)
    c = p.pop("compile")
    cal = read_set(p.pop("calib"))
    return PROFILE, build_spec(cal, compile="auto" if c is None else ("on" if c else "off"), **p)


@app.command("profile-report", cls=Command)
def profile_report(
    store: Annotated[
        Path, typer.Argument(metavar="STORE", help="A finished profile store.", show_default=False)
    ],
    output: Annotated[
        Path,
        typer.Option(
            "-o",
            "--output",
            metavar="DIR",
            help="Folder for the PNGs (created if missing).",
            show_default=False,
        ),
    ],
    layers: Annotated[
        str | None,
        typer.Option(
            "--layers",
            metavar="LAYERS",
            help="Comma-separated layers for the histogram and channel figures, e.g. "
            "mm_00_img,mm_12_txt (default: first, middle and last).",
        ),
    ] = None,
    timesteps: Annotated[
        int,
        typer.Option(
            "--timesteps", metavar="N", help="Timesteps shown in the post-GELU histograms."
        ),
    ] = 4,
    export: Annotated[
        Path | None,
        typer.Option(
            "--export",
            metavar="FILE",
            help="Also write every statistic as flat arrays to this .npz, keyed "
            "LAYER:INPUT::t=T::STAT (STAT: count, mean, std, min, max, histogram).",
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace existing outputs.")] = False,
) -> None:
    """Figures and a per-layer summary of a profile (TaQ-DiT Figs. 2d, 3a, 3d and heatmaps).

    Writes range_vs_timestep.png, post_gelu_hist.png, channel_ranges.png, heatmap_range.png
    and heatmap_negative.png into the folder, prints the summary table, and with --export
    the statistics as an .npz loadable without pickle.

        calibjob profile-report out/profile.zarr -o out/report --export stats.npz
    """
    import calibjob.profile.report as report
    from calibjob.errors import ConfigError
    from calibjob.profile import stats as pstats

    if timesteps < 1:
        raise ConfigError(f"--timesteps must be at least 1, got {timesteps}")
    report.check_outputs(output, export, force)
    prof = pstats.load(store)
    chosen = [x.strip() for x in layers.split(",") if x.strip()] if layers else None
    paths = report.write_figures(prof, output, layers=chosen, num_timesteps=timesteps)
    # a table this wide needs more than the 80 columns Rich assumes off a terminal
    Console(width=None if out.is_terminal else 132).print(report.summary_table(prof))
    for p in paths:
        out.print(f"wrote {p}", markup=False, highlight=False)
    if export is not None:
        export.parent.mkdir(parents=True, exist_ok=True)  # checked: it is the output folder
        pstats.export(prof, export, force=force)
        out.print(f"wrote {export}", markup=False, highlight=False)
    sys.stdout.flush()
