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

_PAPER = JobConfig()  # the paper's defaults, shown in --help from their one home
_H, _W = _PAPER.latent_size
_LATENT = f"{_H} {_W} = {8 * _H}x{8 * _W} pixels"

EXIT_ERROR = 2
EXIT_INCOMPLETE = 1

StoreArg = Annotated[
    Path, typer.Argument(help="The job's Zarr store (a folder).", show_default=False)
]
LocationArg = Annotated[
    str,
    typer.Argument(
        help="The job's Zarr store: a folder or a URL (s3://bucket/job.zarr).", show_default=False
    ),
]


def _fail(msg: str, code: int = EXIT_ERROR) -> None:
    err.print(f"[red]calibjob: error:[/red] {msg}", highlight=False, markup=True)
    sys.exit(code)


def build_config(job: Path | None, **flags) -> JobConfig:
    """Defaults (the paper's) <- job spec <- flags that were given."""
    fields = load_job_file(job) if job is not None else {}
    fields.update({k: v for k, v in flags.items() if v is not None})
    return JobConfig.from_dict(fields)


def _print_result(res, store: Path | str, shard: str) -> None:
    if res.units_run == 0:
        out.print(f"shard {shard}: nothing left to do in {store}")
    else:
        out.print(
            f"shard {shard}: {res.trajectories_run} trajectories in {res.units_run} units, "
            f"{res.seconds:.1f} s, {res.traj_steps_per_s:.1f} trajectory-steps/s -> {store}"
        )
    if res.phases:  # seconds and peak memory of each phase (the benchmark reads this line)
        ph = ", ".join(f"{k} {s:.1f} s / {gb:.2f} GB" for k, (s, gb) in res.phases.items())
        out.print(f"phases: {ph}", highlight=False)


@app.command()
def run(
    job: Annotated[
        Path | None, typer.Option(help="Job spec (TOML) in jobs/; flags override its fields.")
    ] = None,
    store: Annotated[
        str, typer.Option(help="Zarr store to create or continue: a folder or s3://bucket/prefix.")
    ] = "calib.zarr",
    shard: Annotated[
        str,
        typer.Option(help="This worker's share, i/n (0-based), or 'auto' inside a Slurm array."),
    ] = "0/1",
    model_version: Annotated[
        str | None,
        typer.Option(
            help="'tiny' (built in), 'sd3-medium' or a DiffusionKit SD3 key. "
            f"(paper: {_PAPER.model_version})"
        ),
    ] = None,
    num_fid_samples: Annotated[
        int | None, typer.Option(help=f"Trajectories. (paper: {_PAPER.num_fid_samples})")
    ] = None,
    num_sampling_steps: Annotated[
        int | None,
        typer.Option(help=f"Euler steps per trajectory. (paper: {_PAPER.num_sampling_steps})"),
    ] = None,
    num_selected_steps: Annotated[
        int | None,
        typer.Option(
            help=f"Uniformly selected steps kept by merge. (paper: {_PAPER.num_selected_steps})"
        ),
    ] = None,
    latent_size: Annotated[
        tuple[int, int] | None,
        typer.Option(help=f"Latent H W (pixels / 8; even). (paper: {_LATENT})"),
    ] = None,
    cfg_scale: Annotated[
        float | None, typer.Option(help=f"Classifier-free guidance. (paper: {_PAPER.cfg_scale})")
    ] = None,
    prompt_file: Annotated[
        str | None, typer.Option(help=f"Prompts, one a line. (default: {_PAPER.prompt_file})")
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            help=f"Job seed: noise of trajectory k and the merge shuffle. (default: {_PAPER.seed})"
        ),
    ] = None,
    low_memory_mode: Annotated[
        bool | None,
        typer.Option(
            "--low-memory-mode/--no-low-memory-mode",
            help="Free the text encoders before denoising. (default: on)",
        ),
    ] = None,
    local_ckpt: Annotated[
        str | None,
        typer.Option(help="Local MMDiT/VAE checkpoint (.safetensors) instead of the hub."),
    ] = None,
    shift: Annotated[
        float | None,
        typer.Option(help=f"Schedule shift; SD3's own is 3.0. (default: {_PAPER.shift})"),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            help="Trajectories of one prompt per model call; 0 = auto for the device. (default: 0)"
        ),
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(
            help="auto, float32, float16 or bfloat16; auto = float32 on CPU, float16 on GPU."
        ),
    ] = None,
    max_memory: Annotated[
        float | None,
        typer.Option(
            help="GB the auto batch size may plan for (a machine shared with other work, e.g. "
            "12 on a 16 GB Mac); 0 = the device's own (Metal: recommended working set; CUDA: "
            "the card). (default: 0)"
        ),
    ] = None,
    compile: Annotated[
        bool | None,
        typer.Option(
            "--compile/--no-compile",
            help="mx.compile the Euler step; default: on a GPU only. Fixed per store (on a GPU "
            "compiled and eager steps differ in their last bits).",
        ),
    ] = None,
    progress: Annotated[
        bool | None,
        typer.Option("--progress/--no-progress", help="Progress bar (default: on a terminal)."),
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
        max_memory=max_memory,
        compile=None if compile is None else ("on" if compile else "off"),
    )
    from calibjob.remote import normalize

    sh = parse_shard(shard)
    store = normalize(store)
    cfg = resolve_config(cfg, store)
    res = run_shard(cfg, store, sh, show_progress=progress)
    _print_result(res, store, str(sh))


@app.command()
def resume(
    store: LocationArg,
    shard: Annotated[
        str | None,
        typer.Option(help="Only this shard's units (i/n or 'auto'); default: everything left."),
    ] = None,
    progress: Annotated[
        bool | None,
        typer.Option("--progress/--no-progress", help="Progress bar (default: on a terminal)."),
    ] = None,
) -> None:
    """Continue a job from the config saved in its store; no options need repeating.

    calibjob resume out/dry.zarr
    """
    from calibjob.remote import normalize
    from calibjob.shards import ALL, parse_shard
    from calibjob.store import Store
    from calibjob.worker import run_shard

    store = normalize(store)
    cfg = Store.open(store).config
    sh = parse_shard(shard) if shard else ALL
    res = run_shard(cfg, store, sh, show_progress=progress)
    _print_result(res, store, str(sh))


LogsOpt = Annotated[
    str | None,
    typer.Option(
        "--logs",
        help="Launch logs folder (default: STORE/logs; ./calibjob-logs/<bucket_prefix> for a URL).",
    ),
]


@app.command()
def status(store: LocationArg, logs: LogsOpt = None) -> None:
    """Done / total per shard, missing trajectories, throughput and ETA; for a launched job,
    each shard's job state, and the end of the log of every shard that failed.

    Exit 0 when the job is complete, 1 when it is not.

        calibjob status out/dry.zarr
    """
    if not _print_status(store, logs):
        raise typer.Exit(EXIT_INCOMPLETE)


def _print_status(store: str, logs: str | None) -> bool:
    """Print `status` for a store; True when the job is complete."""
    from calibjob import launch
    from calibjob.status import store_status
    from calibjob.store import Store
    from calibjob.worker import fmt_ranges

    loc = launch.location_of(store)
    record = launch.read_record(Path(logs) if logs else launch.default_log_dir(loc))
    tasks = record.get("tasks", {}) if record.get("store") in (None, loc) else {}
    states = launch.task_states({"tasks": tasks}) if tasks else {}
    if tasks and not Store.exists(loc):  # every shard failed before creating the store
        out.print(f"no store at {loc} yet", markup=False)
        _print_failures(tasks, {sh for sh, st in states.items() if st == "failed"})
        return False
    st = Store.open(store, mode="r")
    s = store_status(st, shards=list(tasks))
    cfg = st.config
    job = f"{cfg.model_version}, {cfg.num_fid_samples} x {cfg.num_sampling_steps} steps"
    table = Table(title=f"{st.path}  ({job})")
    table.add_column("shard")
    table.add_column("done", justify="right")
    table.add_column("total", justify="right")
    table.add_column("traj-steps/s", justify="right")
    table.add_column("peak GB", justify="right")
    table.add_column("last report", justify="right")
    if states:
        table.add_column("job")
    for r in s.rows:
        row = [
            r.shard,
            str(r.done),
            str(r.total),
            f"{r.traj_steps_per_s:.1f}" if r.traj_steps_per_s else "-",
            f"{r.peak_memory_gb:.1f}" if r.peak_memory_gb is not None else "-",
            f"{r.last_seen_s:.0f} s ago" if r.last_seen_s is not None else "-",
        ]
        if states:
            st_ = states.get(r.shard)
            row.append(f"{st_} ({tasks[r.shard]['job_id']})" if st_ else "-")
        table.add_row(*row)
    rate = f"{s.traj_steps_per_s:.1f}" if s.traj_steps_per_s else "-"
    peaks = [r.peak_memory_gb for r in s.rows if r.peak_memory_gb is not None]
    last = ["all", str(s.done), str(s.total), rate, f"{max(peaks):.1f}" if peaks else "", ""]
    table.add_row(*last, *([""] if states else []), style="bold")
    out.print(table)
    incomplete = {r.shard for r in s.rows if r.done < r.total}
    _print_failures(tasks, {sh for sh, st in states.items() if st == "failed"} & incomplete)
    if s.complete:
        out.print("complete: ready for `calibjob merge`")
        return True
    out.print(f"missing trajectories ({len(s.missing)}): {fmt_ranges(s.missing)}")
    if s.eta_s is not None:
        out.print(f"ETA at the current rate: {s.eta_s / 60:.1f} min")
    return False


def _print_failures(tasks: dict[str, dict], failed: set[str]) -> None:
    """Each failed launched shard with the end of its log."""
    from calibjob.launch import log_tail

    for shard in sorted(failed):
        path, tail = log_tail(tasks[shard])
        job_id = tasks[shard]["job_id"]
        out.print(f"shard {shard} failed (job {job_id}); end of {path}:", markup=False)
        for line in tail or ["(empty: the process was killed before it wrote anything)"]:
            out.print(f"  | {line}", markup=False, highlight=False)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def launch(
    ctx: typer.Context,
    store: Annotated[
        str, typer.Option(help="Zarr store shared by all shards: a folder or s3://bucket/prefix.")
    ],
    shards: Annotated[
        int, typer.Option(help="Number of shards (worker processes / array tasks).")
    ] = 1,
    executor: Annotated[
        str, typer.Option(help="local: N processes here, one GPU each; slurm: one job array.")
    ] = "local",
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="Wait for the shards, then print status.")
    ] = True,
    slurm_partition: Annotated[str | None, typer.Option(help="Slurm partition.")] = None,
    slurm_gpus_per_task: Annotated[int | None, typer.Option(help="GPUs per array task.")] = None,
    slurm_cpus_per_task: Annotated[int | None, typer.Option(help="CPUs per array task.")] = None,
    time: Annotated[
        str, typer.Option(help="Time limit per shard: minutes, HH:MM:SS or D-HH:MM:SS.")
    ] = "24:00:00",
    logs: LogsOpt = None,
) -> None:
    """Run a job as N shards at once: N local processes or one Slurm job array (submitit).

    Takes the job flags of `calibjob run` (--job, --model-version, --num-fid-samples...).
    Launching again on a store starts only the shards that still have work. Logs and the
    launch record go to STORE/logs/; `calibjob status STORE` shows failed shards' logs.

        calibjob launch --job jobs/dry-run.toml --model-version tiny --store out/dry.zarr --shards 2
        calibjob launch --job jobs/paper.toml --store /shared/paper.zarr --shards 8 \\
            --executor slurm --slurm-partition gpu --slurm-gpus-per-task 1 --time 4:00:00
    """
    from calibjob import launch as lz
    from calibjob.errors import ConfigError

    if shards < 1:
        _fail("--shards must be at least 1")
    if executor not in lz.EXECUTORS:
        _fail(f"--executor must be one of {', '.join(lz.EXECUTORS)}, got {executor!r}")
    try:
        minutes = lz.parse_time(time)
    except ValueError:
        _fail(f"--time must be minutes, HH:MM:SS or D-HH:MM:SS, got {time!r}")
    cfg = _job_flags_config(ctx.args)
    loc = lz.location_of(store)
    log_dir = Path(logs) if logs else lz.default_log_dir(loc)
    cfg = lz.with_store_choices(lz.prepare_config(cfg), loc)
    todo = lz.pending_shards(cfg, loc, shards)
    if not todo:
        out.print(f"nothing left to do in {loc}")
    else:
        slurm = lz.SlurmOptions(slurm_partition, slurm_gpus_per_task, slurm_cpus_per_task, minutes)
        try:
            entries = lz.submit(cfg, loc, shards, todo, executor, log_dir, slurm)
        except ConfigError:
            raise
        except Exception as e:  # sbatch refusing the job, a folder we cannot write...
            _fail(f"submission failed: {type(e).__name__}: {e}")
        first = next(iter(entries.values()))
        what = "job array " + first["job_id"].split("_")[0] if executor == "slurm" else "processes"
        out.print(
            f"launched shards {', '.join(entries)} of {shards} ({executor} {what}); "
            f"logs in {log_dir}",
            markup=False,
        )
        if not wait:
            out.print(f"follow with `calibjob status {loc}`", markup=False)
            return

        def on_change(shard: str, state: str) -> None:
            out.print(f"shard {shard}: {state}", markup=False)

        lz.wait({"tasks": entries}, on_change)
    if not _print_status(loc, str(log_dir)):
        raise typer.Exit(EXIT_INCOMPLETE)


def _job_flags_config(args: list[str]) -> JobConfig:
    """Parse `run`'s job flags (given to `launch`) with `run`'s own parser, so the two accept
    exactly the same flags, and build the job config from them."""
    from calibjob.errors import ConfigError

    run_cmd = typer.main.get_command(app).commands["run"]  # type: ignore[attr-defined]
    with run_cmd.make_context("calibjob launch", list(args)) as rctx:
        params = dict(rctx.params)
    for own in ("store", "shard"):
        if params.get(own) != next(p.default for p in run_cmd.params if p.name == own):
            raise ConfigError(f"launch sets --{own} of each shard itself (use --store, --shards)")
    job = params.pop("job", None)
    ls = params.get("latent_size")
    params["latent_size"] = list(ls) if ls else None
    for k in ("store", "shard", "progress"):
        params.pop(k, None)
    c = params.get("compile")
    params["compile"] = None if c is None else ("on" if c else "off")
    return build_config(Path(job) if job else None, **params)


@app.command()
def merge(
    stores: Annotated[
        list[Path],
        typer.Argument(help="One or more stores of the same job (e.g. one per machine)."),
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="The .npz to write.")] = Path(
        "DiT_cali_data.npz"
    ),
    step_selection: Annotated[
        str,
        typer.Option(
            help="linspace: np.linspace(0, S-1, K) (the spec); "
            "stride: range(0, S, S//K) (TaQ-DiT's code)."
        ),
    ] = "linspace",
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing output file.")
    ] = False,
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
            stores,
            output,
            step_selection=step_selection,
            force=force,
            on_trajectory=lambda: prog.advance(task),
        )
    out.print(
        f"wrote {summary.out}: {summary.points} points from {summary.trajectories} trajectories "
        f"at steps {summary.selected_steps} ({summary.bytes / 1e6:.1f} MB)"
    )


@app.command("inspect")
def inspect_cmd(
    path: Annotated[
        Path, typer.Argument(help="A calibration .npz, or a job's store (work in progress).")
    ],
    plot: Annotated[
        Path | None, typer.Option(help="Also write the stats against the timestep as a PNG.")
    ] = None,
) -> None:
    """Validate a calibration file against the spec and print x_t statistics per timestep.

    Checks keys, shapes, dtypes, NaN/Inf, every (trajectory, step) pair exactly once, ts
    against the schedule and the prompt round-robin; exit 2 listing the problems if any fail.
    On a store: the same statistics per recorded step over the trajectories done so far.

        calibjob inspect out/dry_run_cali.npz --plot stats.png
    """
    from calibjob.inspect_data import inspect, plot_stats, stats_table

    if plot is not None and not plot.parent.is_dir():
        _fail(f"--plot folder {plot.parent} does not exist")
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
        out.print(f"wrote {plot_stats(rep, plot)}", markup=False, highlight=False)


@app.command()
def preview(
    store: StoreArg,
    output: Annotated[Path, typer.Option("-o", "--output", help="The PNG to write.")] = Path(
        "preview.png"
    ),
    trajectories: Annotated[
        str | None, typer.Option(help="Comma-separated trajectory indices, e.g. 0,5,9.")
    ] = None,
    n: Annotated[int, typer.Option("--n", help="Else the first N done trajectories.")] = 16,
) -> None:
    """Decode the final latents of done trajectories into one image grid, captioned.

    Finishes each trajectory's last Euler step (the store holds x before each model call),
    decodes with the model's VAE, and writes a grid with each image's prompt underneath.

        calibjob preview out/dry-run.zarr --trajectories 0,5,7 -o grid.png
    """
    from calibjob.preview import preview as do_preview

    path, ks = do_preview(store, output, trajectories=trajectories, n=n)
    out.print(f"wrote {path}: {len(ks)} trajectories ({', '.join(map(str, ks))})", highlight=False)


def main() -> None:
    """Console-script entry: run the app, turning expected failures into one-line errors."""
    try:
        rc = app(standalone_mode=False)
    except CalibjobError as e:
        _fail(str(e).replace("[", r"\["))
    except OSError as e:  # a full disk, a permission, a vanished file: the OS's own words
        _fail(f"{e.strerror or e} ({e.filename})" if e.filename else str(e.strerror or e))
    except KeyboardInterrupt:
        err.print(
            "calibjob: interrupted; finished units are kept, `calibjob resume STORE` continues"
        )
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
