"""What every command module shares: the Typer app, the consoles, one-line failures, the
options several commands take, and the renderings of results more than one command prints."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from calibjob.cli.help import Group
from calibjob.config import JobConfig, load_job_file

app = typer.Typer(
    cls=Group,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # plain help: option names are never cut, at any width, on a terminal or in a pipe
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Resumable, sharded TaQ-DiT calibration data for SD3 and FLUX.1 (DiffusionKit on MLX).",
)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

EXIT_ERROR = 2
EXIT_INCOMPLETE = 1

StoreArg = Annotated[
    Path,
    typer.Argument(metavar="STORE", help="The job's Zarr store (a folder).", show_default=False),
]
LocationArg = Annotated[
    str,
    typer.Argument(
        metavar="STORE",
        help="The job's Zarr store: a folder or a URL (s3://bucket/job.zarr).",
        show_default=False,
    ),
]


def _version(value: bool) -> None:
    if value:
        from calibjob import __version__

        out.print(f"calibjob {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _main_options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", is_eager=True, callback=_version, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Resumable, sharded TaQ-DiT calibration data for SD3 and FLUX.1 (DiffusionKit on MLX)."""


def fail(msg: str, code: int = EXIT_ERROR) -> None:
    err.print(f"[red]calibjob: error:[/red] {msg}", highlight=False, markup=True)
    sys.exit(code)


def build_config(job: str | Path | None, **flags) -> JobConfig:
    """Defaults (the paper's) <- job spec <- flags that were given."""
    fields = load_job_file(job) if job is not None else {}
    fields.update({k: v for k, v in flags.items() if v is not None})
    return JobConfig.from_dict(fields)


ShardOpt = Annotated[
    str,
    typer.Option(
        "--shard",
        metavar="I/N",
        help="This worker's share, i/n (0-based), or 'auto' inside a Slurm array.",
    ),
]
ProgressOpt = Annotated[
    bool | None,
    typer.Option(
        "--progress/--no-progress",
        help="A progress bar; default: a bar on a terminal, else one log line per unit "
        "(at most one per 30 s).",
    ),
]


OutputOpt = Annotated[
    Path | None,
    typer.Option(
        "-o",
        "--output",
        metavar="FILE",
        help="When the job is complete, merge it to this .npz (as `calibjob merge`), once: "
        "the worker that completes the job merges (with launch: the launcher, after --wait).",
        show_default=False,
    ),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output file.")]


LogsOpt = Annotated[
    str | None,
    typer.Option(
        "--logs",
        metavar="DIR",
        help="Launch logs folder (default: STORE/logs; ./calibjob-logs/<bucket_prefix> for a URL).",
    ),
]




def print_result(res, store: Path | str, shard: str, job) -> None:
    """A worker's summary: rows and units done, throughput, wall time, phases."""
    from calibjob.core.words import fmt_ranges, plural

    if res.units_run == 0 and not res.units_elsewhere:
        out.print(f"shard {shard}: nothing left to do in {store}", markup=False)
    elif res.units_run:
        what = plural(res.work_done, job.work_word) if job.work_word else plural(
            res.rows_run, job.row_word
        )
        out.print(
            f"shard {shard}: {what} in "
            f"{plural(res.units_run, 'unit')}, {res.rate:.1f} {job.throughput}; "
            f"wall time {res.seconds:.1f} s -> {store}",
            markup=False,
        )
    if res.units_elsewhere:
        who = sorted(set(res.held_by.values()))
        out.print(
            f"shard {shard}: {plural(len(res.units_elsewhere), 'unit')} "
            f"({fmt_ranges(res.units_elsewhere)}) held by live workers ({', '.join(who)}); "
            f"they finish there: follow with `calibjob status {store}`",
            markup=False,
        )
    if res.phases:  # seconds and peak memory of each phase (the benchmark reads this line)
        ph = ", ".join(f"{k} {s:.1f} s / {gb:.2f} GB" for k, (s, gb) in res.phases.items())
        out.print(f"phases: {ph}", highlight=False)


def check_output(output: Path | None, force: bool) -> None:
    """`-o`: the output rule (calibjob.outputs) checked before hours of work, not after."""
    if output is not None:
        from calibjob.outputs import NPZ_FORMATS
        from calibjob.outputs import check_output as check

        check(output, force, NPZ_FORMATS)


def merge_if_complete(store: str, output: Path | None, force: bool, shard: str) -> None:
    """`run -o` / `resume -o` / `launch -o`: merge when the job is complete, exactly once."""
    if output is None:
        return
    from calibjob import api

    summary, note = api.merge_once(store, output, force)
    if summary is None:
        out.print(f"shard {shard}: {note}", markup=False)
    else:
        print_merged(summary)


def print_merged(summary) -> None:
    out.print(
        f"wrote {summary.out}: {summary.points} points from {summary.trajectories} trajectories "
        f"at steps {summary.selected_steps} ({summary.bytes / 1e6:.1f} MB)",
        markup=False,
    )
