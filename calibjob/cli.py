"""The user's entry point: `calibjob run | resume | status | merge`.

Parses options (Typer), builds the job config (defaults <- job spec <- flags), and hands off to
worker / status / merge. `--help`, `status` and `merge` never import MLX model code, so they
answer at once. Every expected failure is one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from calibjob.config import JobConfig, load_job_file
from calibjob.errors import CalibjobError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Resumable, sharded TaQ-DiT calibration data for SD3 (DiffusionKit on MLX).",
)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

EXIT_ERROR = 2
EXIT_INCOMPLETE = 1

StoreArg = Annotated[Path, typer.Argument(help="The job's Zarr store (a folder).", show_default=False)]


def _fail(msg: str, code: int = EXIT_ERROR) -> None:
    err.print(f"[red]calibjob: error:[/red] {msg}", highlight=False, markup=True)
    sys.exit(code)


def build_config(job: Path | None, **flags) -> JobConfig:
    """Defaults (the paper's) <- job spec <- flags that were given."""
    fields = load_job_file(job) if job is not None else {}
    fields.update({k: v for k, v in flags.items() if v is not None})
    return JobConfig.from_dict(fields)


def _print_result(res, store: Path, shard: str) -> None:
    if res.units_run == 0:
        out.print(f"shard {shard}: nothing left to do in {store}")
    else:
        out.print(
            f"shard {shard}: {res.trajectories_run} trajectories in {res.units_run} units, "
            f"{res.seconds:.1f} s, {res.traj_steps_per_s:.1f} trajectory-steps/s -> {store}"
        )


@app.command()
def run(
    job: Annotated[
        Path | None, typer.Option(help="Job spec (TOML) in jobs/; flags override its fields.")
    ] = None,
    store: Annotated[Path, typer.Option(help="Zarr store to create or continue.")] = Path(
        "calib.zarr"
    ),
    shard: Annotated[
        str,
        typer.Option(help="This worker's share, i/n (0-based), or 'auto' inside a Slurm array."),
    ] = "0/1",
    model_version: Annotated[
        str | None,
        typer.Option(help="'tiny' (built in), 'sd3-medium' or a DiffusionKit SD3 key. [paper: sd3-medium]"),
    ] = None,
    num_fid_samples: Annotated[int | None, typer.Option(help="Trajectories. [paper: 256]")] = None,
    num_sampling_steps: Annotated[
        int | None, typer.Option(help="Euler steps per trajectory. [paper: 100]")
    ] = None,
    num_selected_steps: Annotated[
        int | None, typer.Option(help="Uniformly selected steps kept by merge. [paper: 25]")
    ] = None,
    latent_size: Annotated[
        tuple[int, int] | None,
        typer.Option(help="Latent H W (pixels / 8; even). [paper: 32 32 = 256x256]"),
    ] = None,
    cfg_scale: Annotated[float | None, typer.Option(help="Classifier-free guidance. [paper: 1.5]")] = None,
    prompt_file: Annotated[
        str | None, typer.Option(help="Prompts, one a line. [prompts/sample_prompts.txt]")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Job seed: noise of trajectory k and the merge shuffle. [0]")] = None,
    low_memory_mode: Annotated[
        bool | None,
        typer.Option(
            "--low-memory-mode/--no-low-memory-mode",
            help="Free the text encoders before denoising. [on]",
        ),
    ] = None,
    local_ckpt: Annotated[
        str | None, typer.Option(help="Local MMDiT/VAE checkpoint (.safetensors) instead of the hub.")
    ] = None,
    shift: Annotated[float | None, typer.Option(help="Schedule shift; SD3's own is 3.0. [3.0]")] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(help="Trajectories of one prompt per model call; 0 = auto for the device. [0]"),
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(help="auto, float32, float16 or bfloat16; auto = float32 on CPU, float16 on GPU."),
    ] = None,
    compile: Annotated[
        bool, typer.Option("--compile/--no-compile", help="mx.compile the Euler step (speed only).")
    ] = False,
    progress: Annotated[
        bool | None, typer.Option("--progress/--no-progress", help="Progress bar (default: on a terminal).")
    ] = None,
) -> None:
    """Generate trajectories of a job (or one shard of it) into a Zarr store.

    Creates the store or continues the existing one, encodes the prompts once, then works
    through this shard's units, skipping what is done. Example:

        calibjob run --job jobs/dry-run.toml --model-version tiny --store out/dry.zarr --shard 0/2
    """
    from calibjob.shards import parse_shard
    from calibjob.worker import resolve_config, run_shard

    cfg = build_config(
        job,
        model_version=model_version,
        num_fid_samples=num_fid_samples,
        num_sampling_steps=num_sampling_steps,
        num_selected_steps=num_selected_steps,
        latent_size=list(latent_size) if latent_size else None,
        cfg_scale=cfg_scale,
        prompt_file=prompt_file,
        seed=seed,
        low_memory_mode=low_memory_mode,
        local_ckpt=local_ckpt,
        shift=shift,
        batch_size=batch_size,
        dtype=dtype,
    )
    sh = parse_shard(shard)
    cfg = resolve_config(cfg, store)
    res = run_shard(cfg, store, sh, show_progress=progress, compile=compile)
    _print_result(res, store, str(sh))


@app.command()
def resume(
    store: StoreArg,
    shard: Annotated[
        str | None,
        typer.Option(help="Only this shard's units (i/n or 'auto'); default: everything left."),
    ] = None,
    compile: Annotated[bool, typer.Option("--compile/--no-compile", help="mx.compile the Euler step.")] = False,
    progress: Annotated[
        bool | None, typer.Option("--progress/--no-progress", help="Progress bar (default: on a terminal).")
    ] = None,
) -> None:
    """Continue a job from the config saved in its store; no options need repeating.

        calibjob resume out/dry.zarr
    """
    from calibjob.shards import ALL, parse_shard
    from calibjob.store import Store
    from calibjob.worker import run_shard

    cfg = Store.open(store).config
    sh = parse_shard(shard) if shard else ALL
    res = run_shard(cfg, store, sh, show_progress=progress, compile=compile)
    _print_result(res, store, str(sh))


@app.command()
def status(store: StoreArg) -> None:
    """Done / total per shard, missing trajectories, throughput and ETA.

    Exit 0 when the job is complete, 1 when it is not.

        calibjob status out/dry.zarr
    """
    from calibjob.status import store_status
    from calibjob.store import Store
    from calibjob.worker import fmt_ranges

    st = Store.open(store, mode="r")
    s = store_status(st)
    cfg = st.config
    table = Table(title=f"{store}  ({cfg.model_version}, {cfg.num_fid_samples} x {cfg.num_sampling_steps} steps)")
    table.add_column("shard")
    table.add_column("done", justify="right")
    table.add_column("total", justify="right")
    table.add_column("traj-steps/s", justify="right")
    table.add_column("last report", justify="right")
    for r in s.rows:
        table.add_row(
            r.shard,
            str(r.done),
            str(r.total),
            f"{r.traj_steps_per_s:.1f}" if r.traj_steps_per_s else "-",
            f"{r.last_seen_s:.0f} s ago" if r.last_seen_s is not None else "-",
        )
    table.add_row("all", str(s.done), str(s.total), f"{s.traj_steps_per_s:.1f}" if s.traj_steps_per_s else "-", "", style="bold")
    out.print(table)
    if s.complete:
        out.print("complete: ready for `calibjob merge`")
        return
    out.print(f"missing trajectories ({len(s.missing)}): {fmt_ranges(s.missing)}")
    if s.eta_s is not None:
        out.print(f"ETA at the current rate: {s.eta_s / 60:.1f} min")
    raise typer.Exit(EXIT_INCOMPLETE)


@app.command()
def merge(
    stores: Annotated[
        list[Path], typer.Argument(help="One or more stores of the same job (e.g. one per machine).")
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="The .npz to write.")] = Path(
        "DiT_cali_data.npz"
    ),
    step_selection: Annotated[
        str,
        typer.Option(help="linspace: np.linspace(0, S-1, K) (the spec); stride: range(0, S, S//K) (TaQ-DiT's code)."),
    ] = "linspace",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output file.")] = False,
) -> None:
    """Select steps, shuffle with the job seed and write the paper-format .npz (atomically).

        calibjob merge out/dry.zarr -o out/dry_run_cali.npz
    """
    from rich.progress import Progress

    from calibjob.merge import merge as do_merge
    from calibjob.selection import STEP_SELECTIONS
    from calibjob.store import Store

    if step_selection not in STEP_SELECTIONS:
        _fail(f"--step-selection must be one of {', '.join(STEP_SELECTIONS)}")
    n = Store.open(stores[0], mode="r").config.num_fid_samples
    with Progress(console=err, disable=not sys.stderr.isatty()) as prog:
        task = prog.add_task("reading trajectories", total=n)
        summary = do_merge(
            stores, output, step_selection=step_selection, force=force,
            on_trajectory=lambda: prog.advance(task),
        )
    out.print(
        f"wrote {summary.out}: {summary.points} points from {summary.trajectories} trajectories "
        f"at steps {summary.selected_steps} ({summary.bytes / 1e6:.1f} MB)"
    )


def main() -> None:
    """Console-script entry: run the app, turning expected failures into one-line errors."""
    try:
        rc = app(standalone_mode=False)
    except CalibjobError as e:
        _fail(str(e).replace("[", r"\["))
    except KeyboardInterrupt:
        err.print("calibjob: interrupted; finished units are kept, `calibjob resume STORE` continues")
        sys.exit(130)
    except Exception as e:
        # usage errors of Typer's bundled click: print its usage message, not a traceback
        if hasattr(e, "show") and hasattr(e, "exit_code"):
            e.show()
            sys.exit(e.exit_code)
        if type(e).__name__ == "Abort":
            sys.exit(130)
        raise
    if isinstance(rc, int) and rc:
        sys.exit(rc)


if __name__ == "__main__":
    main()
