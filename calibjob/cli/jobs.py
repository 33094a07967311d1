"""`calibjob resume` and `calibjob launch`: continue a store's job, or start its shards as local
processes or a Slurm array. Both work on a store of any job."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from calibjob.cli.base import (
    EXIT_INCOMPLETE,
    ForceOpt,
    LocationArg,
    LogsOpt,
    OutputOpt,
    ProgressOpt,
    app,
    check_output,
    err,
    fail,
    merge_if_complete,
    out,
    print_result,
)
from calibjob.cli.help import Command, option_rows


class _LaunchCommand(Command):
    """launch's help also lists the job flags it takes through `run`'s parser."""

    def extra_sections(self, ctx: typer.Context) -> list[tuple[str, list[tuple[str, str]]]]:
        run_cmd = typer.main.get_command(app).commands["run"]  # type: ignore[attr-defined]
        skip = ("store", "shard", "progress", "help")
        return [("Job flags (as for `calibjob run`)", option_rows(run_cmd.params, ctx, skip))]


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
    progress: ProgressOpt = None,
    output: OutputOpt = None,
    force: ForceOpt = False,
) -> None:
    """Continue a store's job (run or profile) from the spec saved in it; no options need
    repeating.

    Repairs what a crash or a damaged disk left (markers, metadata, prepared arrays, chunks),
    skips units other live workers hold, and computes the rest.

        calibjob resume out/dry.zarr
    """
    from calibjob import api
    from calibjob.core.locations import normalize

    store = normalize(store)
    api.watch(store)
    check_output(output, force)
    res, shards = api.resume(store, shard, all_shards, progress)
    name = ", ".join(str(s) for s in shards)
    print_result(res, store, name, _job_of(store))
    merge_if_complete(store, output, force, name)


def _job_of(store: str):
    from calibjob.jobs import open_store

    return open_store(store, mode="r").job


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

    Takes the job flags of `calibjob run` (--job, --model-version, --num-fid-samples...);
    `profile CALIB [flags of calibjob profile]` launches a profile job instead; with no job
    flags, an existing store's own job. Launching again on a store starts only the shards that
    still have work. Logs and the launch record go to STORE/logs/; `calibjob status STORE`
    shows failed shards' logs.

        calibjob launch --job dry-run --model-version tiny \\
            --store out/dry.zarr --shards 2
        calibjob launch --store out/prof.zarr --shards 3 \\
            profile out/dry_run_cali.npz
        calibjob launch --job paper --store /shared/paper.zarr \\
            --shards 8 --executor slurm --slurm-partition gpu \\
            --slurm-gpus-per-task 1 --time 4:00:00
    """
    from calibjob import api
    from calibjob.core import launch as lz
    from calibjob.errors import ConfigError

    loc = lz.location_of(store)
    api.watch(loc)
    if shards < 1:
        fail("--shards must be at least 1")
    if executor not in lz.EXECUTORS:
        fail(f"--executor must be one of {', '.join(lz.EXECUTORS)}, got {executor!r}")
    try:
        minutes = lz.parse_time(time)
    except ValueError:
        fail(f"--time must be minutes, HH:MM:SS or D-HH:MM:SS, got {time!r}")
    job, spec, output, force = _launch_spec(ctx.args, loc)
    if output is not None and not wait:
        fail("-o needs --wait: the launcher merges once the shards are done")
    check_output(output, force)
    log_dir = Path(logs) if logs else lz.default_log_dir(loc)
    todo = api.pending_shards(job, spec, loc, shards)
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
            entries = api.start_shards(job, spec, loc, shards, todo, executor, log_dir, slurm)
        except ConfigError:
            raise
        except Exception as e:  # sbatch refusing the job, a folder we cannot write...
            fail(f"submission failed: {type(e).__name__}: {e}")
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

        _wait_or_stop({"tasks": entries}, on_change, _progress_lines(loc))
    if live and not wait:
        out.print(f"follow with `calibjob status {loc}`", markup=False)
        return
    if live:
        _wait_or_stop({"tasks": lz.read_record(log_dir)["tasks"]}, None, _progress_lines(loc))
    from calibjob.cli.status import print_status

    if not print_status(loc, str(log_dir)):
        raise typer.Exit(EXIT_INCOMPLETE)
    merge_if_complete(loc, output, force, "launch")


def _launch_spec(args: list[str], loc: str):
    """(job, spec, -o, --force) of what to launch: `profile CALIB ...` a profile job; no job
    flags and an existing store, the store's own job; else `run`'s job flags."""
    from calibjob import api
    from calibjob.jobs import open_store, store_exists
    from calibjob.jobs.run import RUN, prepare_config

    if args and args[0] == "profile":
        from calibjob.cli.profile import spec_from_args

        job, spec = spec_from_args(args[1:])
        return job, spec, None, False
    if not args and store_exists(loc):
        st = open_store(loc, mode="r")
        return st.job, st.config, None, False
    from calibjob.cli.run import job_flags_config

    cfg, output, force = job_flags_config(args)
    cfg = prepare_config(cfg)
    existing = api.existing_spec(loc, RUN)
    return RUN, cfg if existing is None else cfg.with_choices_of(existing), output, force


def _progress_lines(loc: str):
    """While `launch --wait` waits (hours on a real job): a line per shard whenever its count
    of done rows changes, as a worker's own log lines say it."""
    from calibjob.core.status import store_status
    from calibjob.core.words import fmt_eta, plural
    from calibjob.jobs import open_store, store_exists

    seen: dict[str, int] = {}

    def poll() -> None:
        if not store_exists(loc):
            return
        try:
            st = open_store(loc, mode="r")
            s = store_status(st)
        except Exception:  # noqa: BLE001  (a store being created or repaired: next poll)
            return
        job = st.job
        for r in s.rows:
            if r.state != "not run here" and seen.get(r.shard, 0) != r.done:
                seen[r.shard] = r.done
                rate = f"{r.rate:.1f} {job.throughput}" if r.rate else "-"
                out.print(
                    f"shard {r.shard}: {r.done}/{plural(r.total, job.row_word)}, {rate}, "
                    f"ETA {fmt_eta(s.eta_s)}",
                    markup=False,
                )

    return poll


def _wait_or_stop(record: dict, on_change=None, on_poll=None) -> None:
    """Wait for launched shards; on Ctrl-C or SIGTERM stop the local ones (each finishes the
    unit it is writing and records itself interrupted), then exit 130 with the one line."""
    from calibjob.core import interrupts
    from calibjob.core import launch as lz

    interrupts.set_graceful(True)
    try:
        lz.wait(record, on_change, on_poll)
    except KeyboardInterrupt:
        interrupts.set_graceful(False)
        left = lz.stop_local(record)
        if left:
            err.print(f"calibjob: Slurm tasks keep running: scancel {' '.join(left)} stops "
                      f"them", markup=False)  # fmt: skip
        raise typer.Exit(interrupts.EXIT_INTERRUPTED) from None
    finally:
        interrupts.set_graceful(False)


