"""`calibjob status`: a store of any job, its shards and their states, rendered."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from calibjob.cli.base import EXIT_INCOMPLETE, LocationArg, LogsOpt, app, out
from calibjob.cli.help import Command


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
    if not print_status(store, logs, verify):
        raise typer.Exit(EXIT_INCOMPLETE)


def print_status(store: str, logs: str | None, verify: bool = False) -> bool:
    """Print `status` for a store; True when it is complete (or complete for its shards)."""
    from calibjob import api
    from calibjob.core.words import fmt_ago, fmt_eta, fmt_ranges, plural

    rep = api.status(store, logs, verify)
    loc, tasks, s = rep.location, rep.tasks, rep.status
    if rep.store is None:  # every shard failed before creating the store
        out.print(f"no store at {loc} yet", markup=False)
        _print_failures(tasks, rep.failed)
        return False
    st, job = rep.store, rep.store.job
    table = Table(title=f"{st.path}  ({job.describe(st.config)})")
    for col, just in (
        ("shard", "left"), ("done", "right"), (job.throughput, "right"), ("peak GB", "right"),
        ("reported", "right"), ("state", "left"),
    ):  # fmt: skip
        table.add_column(col, justify=just)
    if rep.states:
        table.add_column("job", justify="right")
    for r in s.rows:
        job_id = [tasks[r.shard]["job_id"]] if r.shard in rep.states else ["-"] * bool(rep.states)
        table.add_row(
            r.shard, f"{r.done}/{r.total}", f"{r.rate:.1f}" if r.rate else "-",
            f"{r.peak_memory_gb:.2f}" if r.peak_memory_gb is not None else "-",
            fmt_ago(r.last_seen_s), r.state, *job_id,
        )  # fmt: skip
    peaks = [r.peak_memory_gb for r in s.rows if r.peak_memory_gb is not None]
    table.add_row(
        "all", f"{s.done}/{s.total}", f"{s.rate:.1f}" if s.rate else "-",
        f"{max(peaks):.2f}" if peaks else "", "", "", *([""] if rep.states else []), style="bold",
    )  # fmt: skip
    out.print(table)
    _print_failures(tasks, rep.failed)
    word = job.row_word
    if s.damaged:
        out.print(
            f"damaged: {plural(len(s.damaged), word)} marked done whose data is missing or "
            f"corrupt ({fmt_ranges(s.damaged)}); `calibjob resume {loc}` recomputes their units",
            markup=False,
        )
    if s.prepared_damaged:
        out.print(
            f"damaged: {', '.join(job.prepared)} ({loc}/{s.prepared_damaged}); "
            f"`calibjob resume {loc}` makes them again",
            markup=False,
        )
    if verify and not s.damaged and not s.prepared_damaged:
        out.print(f"verified: every done {word}'s checksums pass", markup=False)
    if s.complete:
        out.print(f"complete: ready for `{job.reader}`", markup=False)
        return True
    if rep.interrupted:
        out.print(f"shard {', '.join(rep.interrupted)} interrupted", markup=False)
    if s.complete_here and s.elsewhere:
        others = [r.shard for r in s.rows if r.state == "not run here"]
        out.print(
            f"complete here: every shard that ran on this store ({', '.join(s.ran_here)}) is "
            f"done; shard {', '.join(others)} ({plural(len(s.elsewhere), word)}) is "
            f"expected in other stores: merge them together (`calibjob merge {loc} OTHER...`)",
            markup=False,
        )
        return True
    missing = [k for k in s.missing if k not in set(s.damaged)]
    if missing:
        what = "pending" if s.live_workers else "missing"
        out.print(f"{what} {plural(2, word).split()[1]} ({len(missing)}): "
                  f"{fmt_ranges(missing)}", markup=False)  # fmt: skip
    if s.eta_s is not None:
        out.print(f"ETA at the current rate: {fmt_eta(s.eta_s)}", markup=False)
    elif not s.live_workers:
        out.print(f"no worker is running: continue with `calibjob resume {loc}`", markup=False)
    return False


def _print_failures(tasks: dict[str, dict], failed) -> None:
    """Each failed launched shard with the end of its log."""
    from calibjob.core.launch import log_tail

    for shard in sorted(failed):
        path, tail = log_tail(tasks[shard])
        job_id = tasks[shard]["job_id"]
        out.print(f"shard {shard} failed (job {job_id}); end of {path}:", markup=False)
        for line in tail or ["(empty: the process was killed before it wrote anything)"]:
            out.print(f"  | {line}", markup=False, highlight=False)
