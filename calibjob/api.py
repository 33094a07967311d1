"""One library call behind each command: the CLI parses, calls one of these, and renders.

Takes specs, store locations and shards; gives results (`RunResult`, `StatusReport`, merge
summaries, launch entries). Works for every job: the store's own record says which job it
holds, so `resume`, `status` and `launch` need nothing but the store.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from calibjob.config import LEASE_TTL_S
from calibjob.core import interrupts
from calibjob.core import launch as lz
from calibjob.core.job import Job
from calibjob.core.leases import Leases
from calibjob.core.runner import RunResult, run_shards
from calibjob.core.shards import ALL, Shard, parse_shard
from calibjob.core.spec import Spec
from calibjob.core.status import Status, shards_run_here, store_status
from calibjob.core.store import JobStore, OtherJob
from calibjob.core.words import plural
from calibjob.errors import StoreError
from calibjob.jobs import jobs, open_store, store_exists

MERGED = "merged.json"  # which output a completed store was merged to, once


def safe_line(location: str) -> tuple[str, bool]:
    """('N of M trajectories are safe in STORE', whether all are), for the interrupt message."""
    if not store_exists(location):
        raise FileNotFoundError(location)
    st = open_store(location, mode="r")
    mask, _ = st.read_markers()
    done, total = int(mask.sum()), len(mask)
    if done == total:
        return f"all {plural(total, st.job.row_word)} are safe in {location}", True
    return f"{done} of {plural(total, st.job.row_word)} are safe in {location}", False


def watch(location: str) -> None:
    interrupts.watch_store(location, safe_line)


def existing_spec(location: str, job: Job) -> Spec | None:
    """The spec of a store of `job` already at `location`, None where there is none; a store
    of another job is refused, naming what it is."""
    if not store_exists(location):
        return None
    st = open_store(location, mode="r")
    if st.job is not job:
        raise OtherJob(location, st.job.name, job.store_noun)
    return st.config


def run(job: Job, spec: Spec, location: str, shards: list[Shard], *, progress=None,
        share: int = 1, session=None) -> RunResult:  # fmt: skip
    """`calibjob run` / `profile`: resolve the spec against the store and device, then work."""
    watch(location)
    spec = job.resolve(spec, existing_spec(location, job), share)
    return run_shards(job, spec, location, shards, show_progress=progress, session=session,
                      lease_ttl_s=LEASE_TTL_S)  # fmt: skip


def profile(calib: str | Path, location: str, shard: Shard, *, progress=None, model=None,
            **options) -> RunResult:  # fmt: skip
    """`calibjob profile`: the spec from the set and the options, then `run`."""
    from calibjob.data import read_set
    from calibjob.jobs.profile import PROFILE, ProfileSession, build_spec, resolve

    cal = read_set(calib)
    spec = resolve(build_spec(cal, **options), cal, existing_spec(location, PROFILE))
    watch(location)
    session = ProfileSession(spec, cal, model)
    return run_shards(PROFILE, spec, location, [shard], show_progress=progress, session=session,
                      lease_ttl_s=LEASE_TTL_S)  # fmt: skip


def resume(location: str, shard: str | None = None, all_shards: bool = False,
           progress=None) -> tuple[RunResult, list[Shard]]:  # fmt: skip
    """Continue the store's own job with its own spec: the shards that ran on it (one store
    per machine), or `shard`, or every unit left (`all_shards`)."""
    watch(location)
    st = open_store(location)
    if shard:
        shards = [parse_shard(shard)]
    elif all_shards:
        shards = [ALL]
    else:
        shards = shards_run_here(st) or [ALL]
    res = run_shards(st.job, st.config, st.location, shards, show_progress=progress,
                     lease_ttl_s=LEASE_TTL_S)  # fmt: skip
    return res, shards


# ---- merge exactly once (`run -o`, `resume -o`, `launch -o`) ------------------------------


def merge_once(location: str, output: Path, force: bool) -> tuple[object | None, str]:
    """When the job is complete, merge it to `output`, exactly once: the worker that finds it
    complete takes the store's 'merge' lease, merges, and records the output in the store
    before it lets go; a worker after it finds the record and leaves the file alone. Returns
    (the merge summary or None, a line saying what happened)."""
    from calibjob.merge import merge

    st = open_store(location)
    left = int((~st.done_mask()).sum())
    if left:
        return None, (
            f"the job is not complete yet ({plural(left, st.job.row_word)} left elsewhere); "
            f"the worker that completes it writes {output}"
        )
    leases = Leases(st.loc, LEASE_TTL_S)
    other = leases.take("merge")
    if other is not None:
        return None, f"{other.describe()} is merging to {output}"
    try:
        done = json.loads(st.loc.read(MERGED) or b"{}").get("output")
        if output.exists() and (done == str(output.resolve()) or not force):
            return None, f"{output} was written by another worker"
        summary = merge([location], output, force=force)
        st.loc.write_atomic(MERGED, json.dumps({"output": str(output.resolve()),
                                                "time": time.time()}).encode())  # fmt: skip
    finally:
        leases.close()
    return summary, ""


# ---- status ---------------------------------------------------------------------------------


@dataclass
class StatusReport:
    location: str
    store: JobStore | None
    status: Status | None
    tasks: dict[str, dict] = field(default_factory=dict)  # launched shards (launch.json)
    states: dict[str, str] = field(default_factory=dict)  # shard -> launched task state
    failed: list[str] = field(default_factory=list)  # launched shards that failed
    interrupted: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Exit 0: complete, or complete for every shard that ran on this store."""
        s = self.status
        return s is not None and (s.complete or (s.complete_here and bool(s.elsewhere)))


def status(location: str, logs: str | None = None, verify: bool = False) -> StatusReport:
    """A store's status, with the states of the shards `launch` started on it."""
    loc = lz.location_of(location)
    record = lz.read_record(Path(logs) if logs else lz.default_log_dir(loc))
    tasks = record.get("tasks", {}) if record.get("store") in (None, loc) else {}
    states = lz.task_states({"tasks": tasks}) if tasks else {}
    if tasks and not store_exists(loc):  # every shard failed before creating the store
        failed = sorted(sh for sh, st in states.items() if st == "failed")
        return StatusReport(loc, None, None, tasks, states, failed)
    st = open_store(location, mode="r")
    s = store_status(st, shards=list(tasks), verify=verify, lease_ttl_s=LEASE_TTL_S)
    for r in s.rows:  # a launched shard's state: its task's, unless its work was finished since
        launched = states.get(r.shard)
        if launched:
            if launched == "failed" and _was_interrupted(tasks[r.shard], r.state):
                launched = "interrupted"
            if launched in ("failed", "interrupted") and r.done == r.total:
                launched = r.state  # e.g. stopped by Ctrl-C, then finished by `resume`
            r.state = launched
    incomplete = {r.shard for r in s.rows if r.done < r.total}
    interrupted = sorted({r.shard for r in s.rows if r.state == "interrupted"} & incomplete)
    failed = sorted({sh for sh, x in states.items() if x == "failed"} & incomplete)
    failed = [sh for sh in failed if sh not in interrupted]
    return StatusReport(loc, st, s, tasks, states, failed, interrupted)


def _was_interrupted(entry: dict, recorded: str) -> bool:
    """A launched shard that ended by Ctrl-C or SIGTERM: its record says so, or (stopped before
    its unit loop) the last line of its log."""
    if recorded == "interrupted":
        return True
    _, tail = lz.log_tail(entry, lines=1)
    return bool(tail) and tail[-1].startswith("calibjob: interrupted")


# ---- launch ---------------------------------------------------------------------------------


def pending_shards(job: Job, spec: Spec, location: str, count: int) -> list[int]:
    """Shards of `count` with a row not done yet (all of them for a new store). Refuses an
    existing store of another job before anything is submitted."""
    if not store_exists(location):
        return list(range(count))
    st = open_store(location, mode="r")
    if st.job is not job:
        raise OtherJob(location, st.job.name, job.store_noun)
    auto = spec.AUTO
    diff = [k for k in st.config.differing(spec) if getattr(spec, k) != auto.get(k, object())]
    if diff:
        empty = not st.prepared and not st.done_mask().any()
        hint = "; it holds no data yet: remove it to start this job there" if empty else ""
        raise StoreError(
            f"{location} holds {job.another} (differs in: {', '.join(diff)}){hint}"
        )
    units = job.plain_units(st.config, st.meta)
    done = st.done_mask()
    out = []
    for i in range(count):
        rows = [k for u in Shard(i, count).units(units) for k in u.rows]
        if not done[rows].all() or (not rows and job.prepared and not st.prepared):
            out.append(i)
    return out


def start_shards(
    job: Job, spec: Spec, location: str, count: int, todo: list[int], executor: str,
    log_dir: Path, slurm: lz.SlurmOptions,
) -> dict[str, dict]:
    """Submit the shards `todo` of `count`; each runs `run_task`."""
    from calibjob.device import kernel_cache_env

    share = lz.device_share(executor, count)
    job.check_share(spec, share)  # before anything is written
    fields = spec.to_dict()
    env = kernel_cache_env(location, log_dir)  # one kernel cache for all of a launch's tasks
    args = {str(Shard(i, count)): (job.name, fields, location, str(Shard(i, count)), share, env)
            for i in todo}  # fmt: skip
    return lz.submit(run_task, args, location, count, executor, log_dir, slurm)


def run_task(job_name: str, fields: dict, location: str, shard: str, share: int = 1,
             env: dict[str, str] | None = None) -> dict:  # fmt: skip
    """One shard, as the job's own command does it with --shard i/n; picklable, for submitit.
    `share`: workers on this shard's device, each planning for 1/share of its memory. `env`:
    set before MLX loads (the launch's shared kernel cache)."""
    os.environ.update(env or {})
    interrupts.install()  # Ctrl-C / SIGTERM: one line in the log, exit 130
    watch(location)
    sh = parse_shard(shard)
    print(
        f"calibjob shard {sh} on {socket.gethostname()} (pid {os.getpid()}, "
        f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}) -> {location}",
        flush=True,
    )
    try:
        job = jobs()[job_name]
        res = run(job, job.spec_class.from_dict(fields), location, [sh], share=share)
    except KeyboardInterrupt:  # one line in the log (status reads it), not a traceback
        print(interrupts.message(), file=sys.stderr, flush=True)
        os._exit(interrupts.EXIT_INTERRUPTED)
    print(
        f"shard {sh}: {plural(res.rows_run, job.row_word)} in {plural(res.units_run, 'unit')}, "
        f"wall time {res.seconds:.1f} s -> {location}",
        flush=True,
    )
    return {"shard": str(sh), "units_run": res.units_run, "rows_run": res.rows_run}
