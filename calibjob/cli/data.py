"""`calibjob merge`, `inspect` and `preview`: what reads a run store or its calibration file."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from calibjob.cli.base import EXIT_ERROR, ForceOpt, StoreArg, app, err, fail, out, print_merged
from calibjob.cli.help import Command


@app.command(cls=Command)
def merge(
    stores: Annotated[
        list[Path],
        typer.Argument(
            metavar="STORE",
            help="One or more stores of the same job (e.g. one per machine).",
        ),
    ],
    output: Annotated[
        Path, typer.Option("-o", "--output", metavar="FILE", help="The .npz to write.")
    ] = Path("DiT_cali_data.npz"),
    step_selection: Annotated[
        str,
        typer.Option(
            "--step-selection",
            metavar="linspace|stride",
            help="linspace: np.linspace(0, S-1, K) (the spec); "
            "stride: range(0, S, S//K) (TaQ-DiT's code).",
        ),
    ] = "linspace",
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing output file.")
    ] = False,
) -> None:
    """Select steps and write the paper-format .npz (atomically), points in the spec's order.

    The order of the spec's script: selected steps stacked step-major, then shuffled by
    numpy.random.default_rng(seed).permutation(N*K); trajectory_indices and step_indices say
    where each point came from.

        calibjob merge out/dry.zarr -o out/dry_run_cali.npz
    """
    from rich.progress import Progress

    from calibjob.jobs import open_store
    from calibjob.merge import merge as do_merge
    from calibjob.selection import STEP_SELECTIONS

    if step_selection not in STEP_SELECTIONS:
        fail(f"--step-selection must be one of {', '.join(STEP_SELECTIONS)}")
    n = open_store(stores[0], mode="r").layout.rows
    with Progress(console=err, disable=not sys.stderr.isatty()) as prog:
        task = prog.add_task("reading trajectories", total=n)
        summary = do_merge(
            stores,
            output,
            step_selection=step_selection,
            force=force,
            on_trajectory=lambda: prog.advance(task),
        )
    print_merged(summary)


@app.command("inspect", cls=Command)
def inspect_cmd(
    path: Annotated[
        Path,
        typer.Argument(
            metavar="FILE|STORE",
            help="A calibration .npz, or a job's store (work in progress).",
        ),
    ],
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            metavar="FILE",
            help="Also plot the stats against the timestep (.png, .pdf or .svg).",
        ),
    ] = None,
    force: ForceOpt = False,
) -> None:
    """Validate a calibration file against the spec and print x_t statistics per timestep.

    Checks keys, shapes, dtypes, NaN/Inf, every (trajectory, step) pair exactly once, ts
    against the schedule and the prompt round-robin; exit 2 listing the problems if any fail.
    On a store: the same statistics per recorded step over the trajectories done so far.

        calibjob inspect out/dry_run_cali.npz --plot stats.png
    """
    from calibjob.inspect_data import inspect, plot_stats, stats_table
    from calibjob.outputs import PLOT_FORMATS, check_output

    if plot is not None:
        check_output(plot, force, PLOT_FORMATS)  # before the work, not after
    rep = inspect(path)
    if rep.problems:
        err.print(
            f"calibjob: error: {path} fails validation ({len(rep.problems)} problem(s)):",
            markup=False,
            highlight=False,
        )
        for p in rep.problems:
            err.print(f"  - {p}", markup=False, highlight=False)
        raise typer.Exit(EXIT_ERROR)
    for line in rep.summary:
        out.print(line, markup=False, highlight=False)
    out.print(stats_table(rep))
    if plot is not None:
        out.print(f"wrote {plot_stats(rep, plot, force)}", markup=False, highlight=False)


@app.command(cls=Command)
def preview(
    store: StoreArg,
    output: Annotated[
        Path,
        typer.Option(
            "-o", "--output", metavar="FILE", help="The image to write (.png, .jpg or .webp)."
        ),
    ] = Path("preview.png"),
    trajectories: Annotated[
        str | None,
        typer.Option(
            "--trajectories",
            metavar="K,K,...",
            help="Comma-separated trajectory indices, e.g. 0,5,9.",
        ),
    ] = None,
    n: Annotated[
        int, typer.Option("--n", metavar="N", help="Else the first N done trajectories.")
    ] = 16,
    force: ForceOpt = False,
) -> None:
    """Decode the final latents of done trajectories into one image grid, captioned.

    Finishes each trajectory's last Euler step (the store holds x before each model call),
    decodes with the model's VAE, and writes a grid with each image's prompt underneath.

        calibjob preview out/dry-run.zarr --trajectories 0,5,7 -o grid.png
    """
    from calibjob.preview import preview as do_preview

    path, ks = do_preview(store, output, trajectories=trajectories, n=n, force=force)
    out.print(f"wrote {path}: {len(ks)} trajectories ({', '.join(map(str, ks))})", highlight=False)


