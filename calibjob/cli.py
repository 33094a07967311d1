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

from calibjob.cli_help import Command, Group, option_rows
from calibjob.config import JobConfig, load_job_file
from calibjob.errors import CalibjobError

app = typer.Typer(
    cls=Group,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # plain help: option names are never cut, at any width, on a terminal or in a pipe
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
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


class _LaunchCommand(Command):
    """launch's help also lists the job flags it takes through `run`'s parser."""

    def extra_sections(self, ctx: typer.Context) -> list[tuple[str, list[tuple[str, str]]]]:
        run_cmd = typer.main.get_command(app).commands["run"]  # type: ignore[attr-defined]
        skip = ("store", "shard", "progress", "help")
        return [("Job flags (as for `calibjob run`)", option_rows(run_cmd.params, ctx, skip))]


def _latent_side(value: str) -> int:
    """One of --latent-size's two numbers; '32,32' gets told how to write them."""
    try:
        return int(value)
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is not a whole number; give H and W as two numbers: --latent-size 32 32"
        ) from None


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
    """Resumable, sharded TaQ-DiT calibration data for SD3 (DiffusionKit on MLX)."""


def _fail(msg: str, code: int = EXIT_ERROR) -> None:
    err.print(f"[red]calibjob: error:[/red] {msg}", highlight=False, markup=True)
    sys.exit(code)


def build_config(job: Path | None, **flags) -> JobConfig:
    """Defaults (the paper's) <- job spec <- flags that were given."""
    fields = load_job_file(job) if job is not None else {}
    fields.update({k: v for k, v in flags.items() if v is not None})
    return JobConfig.from_dict(fields)


def _print_result(res, store: Path | str, shard: str) -> None:
    from calibjob.progress import THROUGHPUT, plural
    from calibjob.worker import fmt_ranges

    if res.units_run == 0 and not res.units_elsewhere:
        out.print(f"shard {shard}: nothing left to do in {store}", markup=False)
    elif res.units_run:
        out.print(
            f"shard {shard}: {plural(res.trajectories_run, 'trajectory')} in "
            f"{plural(res.units_run, 'unit')}, {res.traj_steps_per_s:.1f} {THROUGHPUT} "
            f"denoising; wall time {res.seconds:.1f} s -> {store}",
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


def _check_output(output: Path | None, force: bool) -> None:
    """Refuse an output that exists (unless --force) before hours of work, not after."""
    if output is None:
        return
    if output.is_dir():
        _fail(f"{output} is a folder")
    if not output.parent.is_dir():
        _fail(f"output folder {output.parent} does not exist")
    if output.exists() and not force:
        _fail(f"{output} exists; pass --force to replace it")


def _merge_if_complete(store: str, output: Path | None, force: bool, shard: str) -> None:
    """`run -o` / `resume -o`: when the job is complete, merge it, once. The worker that finds
    it complete takes the store's 'merge' claim; one that finds the claim taken leaves it."""
    if output is None:
        return
    from calibjob.claims import Claims
    from calibjob.merge import merge as do_merge
    from calibjob.store import Store

    st = Store.open(store)
    left = int((~st.done_mask()).sum())
    if left:
        out.print(
            f"shard {shard}: the job is not complete yet ({left} trajectories left elsewhere); "
            f"the worker that completes it writes {output}",
            markup=False,
        )
        return
    claims = Claims(st)
    other = claims.take("merge")
    if other is not None:
        out.print(f"shard {shard}: {other.describe()} is merging to {output}", markup=False)
        return
    try:
        if output.exists() and not force:
            out.print(f"shard {shard}: {output} was written by another worker", markup=False)
            return
        summary = do_merge([store], output, force=force)
    finally:
        claims.close()
    _print_merged(summary)


def _print_merged(summary) -> None:
    out.print(
        f"wrote {summary.out}: {summary.points} points from {summary.trajectories} trajectories "
        f"at steps {summary.selected_steps} ({summary.bytes / 1e6:.1f} MB)",
        markup=False,
    )


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


@app.command(cls=Command)
def run(
    job: Annotated[
        Path | None,
        typer.Option(
            "--job", metavar="FILE", help="Job spec (TOML) in jobs/; flags override its fields."
        ),
    ] = None,
    store: Annotated[
        str,
        typer.Option(
            "--store",
            metavar="STORE",
            help="Zarr store to create or continue: a folder or s3://bucket/prefix.",
        ),
    ] = "calib.zarr",
    shard: Annotated[
        str,
        typer.Option(
            "--shard",
            metavar="I/N",
            help="This worker's share, i/n (0-based), or 'auto' inside a Slurm array.",
        ),
    ] = "0/1",
    model_version: Annotated[
        str | None,
        typer.Option(
            "--model-version",
            metavar="NAME",
            help="'tiny' (built in), 'sd3-medium' or a DiffusionKit SD3 key. "
            f"(paper: {_PAPER.model_version})",
        ),
    ] = None,
    num_fid_samples: Annotated[
        int | None,
        typer.Option(
            "--num-fid-samples",
            metavar="N",
            help=f"Trajectories. (paper: {_PAPER.num_fid_samples})",
        ),
    ] = None,
    num_sampling_steps: Annotated[
        int | None,
        typer.Option(
            "--num-sampling-steps",
            metavar="S",
            help=f"Euler steps per trajectory. (paper: {_PAPER.num_sampling_steps})",
        ),
    ] = None,
    num_selected_steps: Annotated[
        int | None,
        typer.Option(
            "--num-selected-steps",
            metavar="K",
            help=f"Uniformly selected steps kept by merge. (paper: {_PAPER.num_selected_steps})",
        ),
    ] = None,
    latent_size: Annotated[
        tuple[int, int] | None,
        typer.Option(
            "--latent-size",
            metavar="H W",
            parser=_latent_side,
            help="Latent height and width, two even numbers (pixels / 8), e.g. --latent-size "
            f"32 32. (paper: {_LATENT})",
        ),
    ] = None,
    cfg_scale: Annotated[
        float | None,
        typer.Option(
            "--cfg-scale",
            metavar="SCALE",
            help=f"Classifier-free guidance. (paper: {_PAPER.cfg_scale})",
        ),
    ] = None,
    prompt_file: Annotated[
        str | None,
        typer.Option(
            "--prompt-file",
            metavar="FILE",
            help="Prompts: .txt (one a line), .csv/.tsv (a column) or .jsonl (a key). "
            f"(default: {_PAPER.prompt_file})",
        ),
    ] = None,
    prompt_column: Annotated[
        str | None,
        typer.Option(
            "--prompt-column",
            metavar="NAME",
            help="The .csv/.tsv column or .jsonl key of the prompts. (default: a column named "
            "prompt, caption or text, else the only one)",
        ),
    ] = None,
    num_prompts: Annotated[
        int | None,
        typer.Option(
            "--num-prompts",
            metavar="N",
            help="Keep the first N prompts of the file; 0 = all. Trajectory k takes prompt "
            "k % N. (default: 0)",
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            "--seed",
            metavar="SEED",
            help=f"Job seed: noise of trajectory k and the merge shuffle. (default: {_PAPER.seed})",
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
        typer.Option(
            "--local-ckpt",
            metavar="FILE",
            help="Local MMDiT/VAE checkpoint (.safetensors) instead of the hub.",
        ),
    ] = None,
    shift: Annotated[
        float | None,
        typer.Option(
            "--shift",
            metavar="SHIFT",
            help=f"Schedule shift; SD3's own is 3.0. (default: {_PAPER.shift})",
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            metavar="B",
            help="Trajectories of one prompt per model call; 0 = auto for the device. (default: 0)",
        ),
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(
            "--dtype",
            metavar="DTYPE",
            help="auto, float32, float16 or bfloat16; auto = float32 on CPU, float16 on GPU.",
        ),
    ] = None,
    max_memory: Annotated[
        float | None,
        typer.Option(
            "--max-memory",
            metavar="GB",
            help="GB the auto batch size may plan for (a machine shared with other work, e.g. "
            "12 on a 16 GB Mac); 0 = the device's own (Metal: recommended working set; CUDA: "
            "the card). Encoding the prompts needs ~11.9 GB for SD3 (float16) whatever the "
            "cap; a smaller cap is noted. (default: 0)",
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
        typer.Option(
            "--progress/--no-progress",
            help="A progress bar; default: a bar on a terminal, else one log line per unit "
            "(at most one per 30 s).",
        ),
    ] = None,
    output: OutputOpt = None,
    force: ForceOpt = False,
) -> None:
    """Generate trajectories of a job (or one shard of it) into a Zarr store.

    Creates the store or continues the existing one, encodes the prompts once, then works
    through this shard's units, skipping what is done. Example:

        calibjob run --job jobs/dry-run.toml --model-version tiny \\
            --store out/dry.zarr --shard 0/2
    """
    from calibjob import interrupts
    from calibjob.remote import normalize

    interrupts.watch_store(normalize(store))
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
        prompt_column=prompt_column,
        num_prompts=num_prompts,
        seed=seed,
        low_memory_mode=low_memory_mode,
        local_ckpt=local_ckpt,
        shift=shift,
        batch_size=batch_size,
        dtype=dtype,
        max_memory=max_memory,
        compile=None if compile is None else ("on" if compile else "off"),
    )
    sh = parse_shard(shard)
    store = normalize(store)
    _check_output(output, force)
    cfg = resolve_config(cfg, store)
    res = run_shard(cfg, store, sh, show_progress=progress)
    _print_result(res, store, str(sh))
    _merge_if_complete(store, output, force, str(sh))


@app.command(cls=Command)
def resume(
    store: LocationArg,
    shard: Annotated[
        str | None,
        typer.Option(
            "--shard",
            metavar="I/N",
            help="Only this shard's units (i/n or 'auto'); default: the shards that ran on "
            "this store.",
        ),
    ] = None,
    all_shards: Annotated[
        bool,
        typer.Option(
            "--all",
            help="Every unit left, also those of shards that never ran on this store (by "
            "default a store where only some shards ran, one per machine, continues only those).",
        ),
    ] = False,
    progress: Annotated[
        bool | None,
        typer.Option(
            "--progress/--no-progress",
            help="A progress bar; default: a bar on a terminal, else one log line per unit.",
        ),
    ] = None,
    output: OutputOpt = None,
    force: ForceOpt = False,
) -> None:
    """Continue a job from the config saved in its store; no options need repeating.

    Repairs what a crash or a damaged disk left (markers, metadata, conditioning, chunks),
    skips units other live workers hold, and computes the rest.

        calibjob resume out/dry.zarr
    """
    from calibjob import interrupts
    from calibjob.remote import normalize
    from calibjob.shards import ALL, parse_shard
    from calibjob.status import shards_run_here
    from calibjob.store import Store
    from calibjob.worker import run_shard

    store = normalize(store)
    interrupts.watch_store(store)
    _check_output(output, force)
    st = Store.open(store)
    cfg = st.config
    if shard:
        shards = [parse_shard(shard)]
    elif all_shards:
        shards = [ALL]
    else:
        shards = shards_run_here(st) or [ALL]
    res = run_shard(cfg, store, shards[0], show_progress=progress, shards=shards)
    name = ", ".join(str(s) for s in shards)
    _print_result(res, store, name)
    _merge_if_complete(store, output, force, name)


LogsOpt = Annotated[
    str | None,
    typer.Option(
        "--logs",
        metavar="DIR",
        help="Launch logs folder (default: STORE/logs; ./calibjob-logs/<bucket_prefix> for a URL).",
    ),
]


@app.command(cls=Command)
def status(
    store: LocationArg,
    logs: LogsOpt = None,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="Also read every done chunk and check its checksum (reads the whole store); "
            "without it each chunk is checked for presence and size only.",
        ),
    ] = False,
) -> None:
    """Done / total per shard, damaged or missing trajectories, throughput and ETA; for a
    launched job each shard's state, and the end of the log of every shard that failed.

    Exit 0 when the job is complete, or when every shard that ran on this store is complete
    and the others are expected in other stores (one store per machine); 1 otherwise.

        calibjob status out/dry.zarr
    """
    if not _print_status(store, logs, verify):
        raise typer.Exit(EXIT_INCOMPLETE)


def _print_status(store: str, logs: str | None, verify: bool = False) -> bool:
    """Print `status` for a store; True when it is complete (or complete for its shards)."""
    from calibjob import launch
    from calibjob.progress import THROUGHPUT, fmt_eta, plural
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
    s = store_status(st, shards=list(tasks), verify=verify)
    cfg = st.config
    job = f"{cfg.model_version}, {cfg.num_fid_samples} x {cfg.num_sampling_steps} steps"
    table = Table(title=f"{st.path}  ({job})")
    for col, just in (
        ("shard", "left"), ("done", "right"), (THROUGHPUT, "right"), ("peak GB", "right"),
        ("reported", "right"), ("state", "left"),
    ):  # fmt: skip
        table.add_column(col, justify=just)
    if states:
        table.add_column("job", justify="right")
    for r in s.rows:
        state, job_id = r.state, []
        launched = states.get(r.shard)
        if launched:
            state = launched
            if launched == "failed" and _was_interrupted(tasks[r.shard], r.state):
                state = "interrupted"
            job_id = [tasks[r.shard]["job_id"]]
        elif states:
            job_id = ["-"]
        table.add_row(
            r.shard,
            f"{r.done}/{r.total}",
            f"{r.traj_steps_per_s:.1f}" if r.traj_steps_per_s else "-",
            f"{r.peak_memory_gb:.2f}" if r.peak_memory_gb is not None else "-",
            f"{r.last_seen_s:.0f} s ago" if r.last_seen_s is not None else "-",
            state,
            *job_id,
        )
    rate = f"{s.traj_steps_per_s:.1f}" if s.traj_steps_per_s else "-"
    peaks = [r.peak_memory_gb for r in s.rows if r.peak_memory_gb is not None]
    table.add_row(
        "all", f"{s.done}/{s.total}", rate, f"{max(peaks):.2f}" if peaks else "", "", "",
        *([""] if states else []), style="bold",
    )  # fmt: skip
    out.print(table)
    interrupted = {r.shard for r in s.rows if r.state == "interrupted"} | {
        sh for sh, x in states.items() if x == "failed" and _was_interrupted(tasks[sh], "")
    }
    incomplete = {r.shard for r in s.rows if r.done < r.total}
    failed = {sh for sh, x in states.items() if x == "failed"} & incomplete - interrupted
    _print_failures(tasks, failed)
    if s.damaged:
        out.print(
            f"damaged: {plural(len(s.damaged), 'trajectory')} marked done whose chunk is "
            f"missing or corrupt ({fmt_ranges(s.damaged)}); `calibjob resume {loc}` recomputes "
            f"their units",
            markup=False,
        )
    if s.conditioning_damaged:
        out.print(
            f"damaged: the prompt conditioning ({loc}/{s.conditioning_damaged}); "
            f"`calibjob resume {loc}` encodes the prompts again",
            markup=False,
        )
    if s.complete:
        out.print("complete: ready for `calibjob merge`", markup=False)
        return True
    if interrupted:
        out.print(
            f"shard {', '.join(sorted(interrupted))} interrupted; continue with "
            f"`calibjob resume {loc}`",
            markup=False,
        )
    if s.complete_here and s.elsewhere:
        others = [r.shard for r in s.rows if r.state == "not run here"]
        out.print(
            f"complete here: every shard that ran on this store ({', '.join(s.ran_here)}) is "
            f"done; shard {', '.join(others)} ({plural(len(s.elsewhere), 'trajectory')}) is "
            f"expected in other stores: merge them together (`calibjob merge {loc} OTHER...`)",
            markup=False,
        )
        return True
    missing = [k for k in s.missing if k not in set(s.damaged)]
    if missing:
        out.print(f"missing trajectories ({len(missing)}): {fmt_ranges(missing)}", markup=False)
    if s.eta_s is not None:
        out.print(f"ETA at the current rate: {fmt_eta(s.eta_s)}", markup=False)
    elif not s.live_workers:
        out.print(f"no worker is running: continue with `calibjob resume {loc}`", markup=False)
    return False


def _was_interrupted(entry: dict, recorded: str) -> bool:
    """A launched shard that ended by Ctrl-C or SIGTERM: its record says so, or (stopped before
    its unit loop) the last line of its log."""
    from calibjob.launch import log_tail

    if recorded == "interrupted":
        return True
    _, tail = log_tail(entry, lines=1)
    return bool(tail) and tail[-1].startswith("calibjob: interrupted")


def _print_failures(tasks: dict[str, dict], failed: set[str]) -> None:
    """Each failed launched shard with the end of its log."""
    from calibjob.launch import log_tail

    for shard in sorted(failed):
        path, tail = log_tail(tasks[shard])
        job_id = tasks[shard]["job_id"]
        out.print(f"shard {shard} failed (job {job_id}); end of {path}:", markup=False)
        for line in tail or ["(empty: the process was killed before it wrote anything)"]:
            out.print(f"  | {line}", markup=False, highlight=False)


@app.command(
    cls=_LaunchCommand,
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def launch(
    ctx: typer.Context,
    store: Annotated[
        str,
        typer.Option(
            "--store",
            metavar="STORE",
            help="Zarr store shared by all shards: a folder or s3://bucket/prefix.",
        ),
    ],
    shards: Annotated[
        int,
        typer.Option(
            "--shards", metavar="N", help="Number of shards (worker processes / array tasks)."
        ),
    ] = 1,
    executor: Annotated[
        str,
        typer.Option(
            "--executor",
            metavar="local|slurm",
            help="local: N processes here, one GPU each; slurm: one job array.",
        ),
    ] = "local",
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="Wait for the shards, then print status.")
    ] = True,
    slurm_partition: Annotated[
        str | None, typer.Option("--slurm-partition", metavar="NAME", help="Slurm partition.")
    ] = None,
    slurm_gpus_per_task: Annotated[
        int | None, typer.Option("--slurm-gpus-per-task", metavar="N", help="GPUs per array task.")
    ] = None,
    slurm_cpus_per_task: Annotated[
        int | None, typer.Option("--slurm-cpus-per-task", metavar="N", help="CPUs per array task.")
    ] = None,
    time: Annotated[
        str,
        typer.Option(
            "--time", metavar="LIMIT", help="Time limit per shard: minutes, HH:MM:SS or D-HH:MM:SS."
        ),
    ] = "24:00:00",
    logs: LogsOpt = None,
) -> None:
    """Run a job as N shards at once: N local processes or one Slurm job array (submitit).

    Takes the job flags of `calibjob run` (--job, --model-version, --num-fid-samples...).
    Launching again on a store starts only the shards that still have work. Logs and the
    launch record go to STORE/logs/; `calibjob status STORE` shows failed shards' logs.

        calibjob launch --job jobs/dry-run.toml --model-version tiny \\
            --store out/dry.zarr --shards 2
        calibjob launch --job jobs/paper.toml --store /shared/paper.zarr \\
            --shards 8 --executor slurm --slurm-partition gpu \\
            --slurm-gpus-per-task 1 --time 4:00:00
    """
    from calibjob import interrupts
    from calibjob import launch as lz
    from calibjob.errors import ConfigError

    interrupts.watch_store(lz.location_of(store))
    if shards < 1:
        _fail("--shards must be at least 1")
    if executor not in lz.EXECUTORS:
        _fail(f"--executor must be one of {', '.join(lz.EXECUTORS)}, got {executor!r}")
    try:
        minutes = lz.parse_time(time)
    except ValueError:
        _fail(f"--time must be minutes, HH:MM:SS or D-HH:MM:SS, got {time!r}")
    cfg, output, force = _job_flags_config(ctx.args)
    if output is not None and not wait:
        _fail("-o needs --wait: the launcher merges once the shards are done")
    _check_output(output, force)
    loc = lz.location_of(store)
    log_dir = Path(logs) if logs else lz.default_log_dir(loc)
    cfg = lz.with_store_choices(lz.prepare_config(cfg), loc)
    todo = lz.pending_shards(cfg, loc, shards)
    live = lz.live_shards(log_dir, loc, shards)
    for name, job_id in sorted(live.items()):
        out.print(f"shard {name} is already running (job {job_id}); not started again",
                  markup=False)  # fmt: skip
    todo = [i for i in todo if f"{i}/{shards}" not in live]
    if not todo and not live:
        out.print(f"nothing left to do in {loc}", markup=False)
    elif todo:
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

        _wait_or_stop({"tasks": entries}, on_change)
    if live and not wait:
        out.print(f"follow with `calibjob status {loc}`", markup=False)
        return
    if live:
        _wait_or_stop({"tasks": lz.read_record(log_dir)["tasks"]})
    if not _print_status(loc, str(log_dir)):
        raise typer.Exit(EXIT_INCOMPLETE)
    _merge_if_complete(loc, output, force, "launch")


def _wait_or_stop(record: dict, on_change=None) -> None:
    """Wait for launched shards; on Ctrl-C or SIGTERM stop the local ones (each finishes the
    unit it is writing and records itself interrupted), then exit 130 with the one line."""
    from calibjob import interrupts
    from calibjob import launch as lz

    interrupts.set_graceful(True)
    try:
        lz.wait(record, on_change)
    except KeyboardInterrupt:
        interrupts.set_graceful(False)
        left = lz.stop_local(record)
        if left:
            err.print(f"calibjob: Slurm tasks keep running: scancel {' '.join(left)} stops "
                      f"them", markup=False)  # fmt: skip
        raise typer.Exit(interrupts.EXIT_INTERRUPTED) from None
    finally:
        interrupts.set_graceful(False)


def _job_flags_config(args: list[str]) -> tuple[JobConfig, Path | None, bool]:
    """Parse `run`'s job flags (given to `launch`) with `run`'s own parser, so the two accept
    exactly the same flags; the job config built from them, and `-o`/`--force`."""
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
    output, force = params.pop("output", None), bool(params.pop("force", False))
    for k in ("store", "shard", "progress"):
        params.pop(k, None)
    c = params.get("compile")
    params["compile"] = None if c is None else ("on" if c else "off")
    return build_config(Path(job) if job else None, **params), output, force


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
    _print_merged(summary)


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


# phase 2 (activation profiles) lives in its own module; registered here
from calibjob.profile import commands as _profile_commands  # noqa: E402

app.command("profile", cls=Command)(_profile_commands.profile)
app.command("profile-report", cls=Command)(_profile_commands.profile_report)


def main() -> None:
    """Console-script entry: run the app, turning expected failures into one-line errors."""
    from calibjob import interrupts

    interrupts.install()
    try:
        rc = app(standalone_mode=False)
    except CalibjobError as e:
        _fail(str(e).replace("[", r"\["))
    except OSError as e:  # a full disk, a permission, a vanished file: the OS's own words
        _fail(f"{e.strerror or e} ({e.filename})" if e.filename else str(e.strerror or e))
    except KeyboardInterrupt:
        err.print(interrupts.message(), markup=False, highlight=False)
        sys.exit(interrupts.EXIT_INTERRUPTED)
    except Exception as e:
        # usage errors of Typer's bundled click: print its usage message, not a traceback
        if hasattr(e, "show") and hasattr(e, "exit_code"):
            e.show()
            sys.exit(e.exit_code)
        if type(e).__name__ == "Abort":  # click turns KeyboardInterrupt into Abort
            err.print(interrupts.message(), markup=False, highlight=False)
            sys.exit(interrupts.EXIT_INTERRUPTED)
        raise
    if rc == interrupts.EXIT_INTERRUPTED:  # Typer turns KeyboardInterrupt into exit 130
        err.print(interrupts.message(), markup=False, highlight=False)
    if isinstance(rc, int) and rc:
        sys.exit(rc)


if __name__ == "__main__":
    main()
