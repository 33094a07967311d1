"""Launching a job's shards: N local worker processes or one Slurm job array, for any job.

Built on submitit, which pickles a call of a task function (for every job, the same work as its
command with `--shard i/n`) into a log folder and runs it in a process it starts (`local`) or in
a Slurm array task (`slurm`). Nothing here talks to the workers: the store is the only shared
state, so launching again on a store submits only the shards that still have work, and each of
those skips what is done. What was launched, and where its logs are, goes to
LOGDIR/launch.json, from which `calibjob status` tells finished, running and failed shards
apart with no scheduler accounting (sacct is often missing): a result file means the task ended
in Python; no result file and no live process (local) or squeue entry (Slurm) means it died,
e.g. killed or out of memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from calibjob.core.leases import pid_alive
from calibjob.core.locations import is_url, normalize
from calibjob.core.shards import parse_shard
from calibjob.errors import ConfigError

RECORD = "launch.json"
EXECUTORS = ("local", "slurm")
POLL_S = 2.0
LIVE = ("running", "pending")
_JOBS: dict = {}  # submitit jobs this process started: polling a local one reaps its process


@dataclass
class SlurmOptions:
    partition: str | None = None
    gpus_per_task: int | None = None
    cpus_per_task: int | None = None
    time_min: int = 24 * 60


def parse_time(spec: str) -> int:
    """Slurm-style time limit -> whole minutes: 'MM', 'MM:SS', 'HH:MM:SS', 'D-HH[:MM[:SS]]'."""
    days, _, clock = spec.strip().rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if days:
        parts += [0] * (3 - len(parts))  # after a day count the clock starts with hours
    elif len(parts) < 3:
        parts = [0, *parts] if len(parts) == 2 else [0, parts[0], 0]  # MM:SS, or MM
    if len(parts) != 3 or min(parts) < 0:
        raise ValueError(spec)
    h, m, sec = parts
    seconds = ((int(days or 0) * 24 + h) * 60 + m) * 60 + sec
    return max(1, -(-seconds // 60))


def location_of(store: str | Path) -> str:
    """A store location as workers elsewhere must see it: URLs as given, folders absolute."""
    loc = normalize(store)
    return loc if is_url(loc) else str(Path(loc).resolve())


def default_log_dir(location: str) -> Path:
    """STORE/logs for a folder; for a URL, ./calibjob-logs/<bucket_prefix> (submitit needs a
    shared file system for its files, which a bucket is not)."""
    if not is_url(location):
        return Path(location) / "logs"
    u = urlsplit(location)
    name = f"{u.netloc}{u.path}".strip("/").replace("/", "_") or u.scheme
    return Path("calibjob-logs") / name


def visible_gpus() -> list[int]:
    """The GPUs this machine lets us use: CUDA_VISIBLE_DEVICES if set, else nvidia-smi's."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [int(x) for x in env.split(",") if x.strip().isdigit()]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        res = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        )
    except (subprocess.SubprocessError, OSError):
        return []
    return [int(x) for x in res.stdout.split() if x.isdigit()]


def gpu_for_shard(shard: int, gpus: list[int]) -> list[int]:
    """The GPU a local shard is pinned to: one each while there are enough, distinct, in the
    order CUDA_VISIBLE_DEVICES (or nvidia-smi) lists them; round robin beyond; none on a CPU
    machine or a Mac."""
    return [gpus[shard % len(gpus)]] if gpus else []


def device_share(executor: str, shards: int) -> int:
    """How many of this launch's workers share one device: local shards go round robin over
    the visible GPUs (all on one device on a Mac or a CPU machine); Slurm tasks get their own."""
    if executor != "local":
        return 1
    gpus = visible_gpus()
    return -(-shards // len(gpus)) if gpus else shards


# ---- submission ------------------------------------------------------------------------------


def submit(
    task: Callable,
    args: dict[str, tuple],
    location: str,
    count: int,
    executor: str,
    log_dir: Path,
    slurm: SlurmOptions,
) -> dict[str, dict]:
    """Start `task(*args[shard])` for each shard named in `args` (i/count); return their
    launch entries (also added to launch.json)."""
    import submitit

    names = list(args)
    if executor == "slurm" and shutil.which("sbatch") is None:  # before anything is written
        raise ConfigError("--executor slurm needs Slurm's sbatch here (run on a login node)")
    if executor not in EXECUTORS:
        raise ConfigError(f"--executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    log_dir.mkdir(parents=True, exist_ok=True)
    if executor == "local":
        ex = submitit.LocalExecutor(folder=log_dir)
        gpus = visible_gpus()
        jobs = []
        # submitit's controller processes start with SIGINT ignored (inherited), so a Ctrl-C in
        # the terminal reaches the workers (which handle it) and not the controllers (which
        # would print a traceback and SIGKILL their worker a second later)
        sigint = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for name in names:
                pin = gpu_for_shard(parse_shard(name).index, gpus)
                ex.update_parameters(
                    timeout_min=slurm.time_min, gpus_per_node=len(pin), visible_gpus=pin
                )
                jobs.append(ex.submit(task, *args[name]))
        finally:
            signal.signal(signal.SIGINT, sigint)
    else:
        ex = submitit.SlurmExecutor(folder=log_dir)
        params = {
            "job_name": "calibjob",
            "time": slurm.time_min,
            "array_parallelism": len(names),
            "partition": slurm.partition,
            "gpus_per_task": slurm.gpus_per_task,
            "cpus_per_task": slurm.cpus_per_task,
        }
        ex.update_parameters(**{k: v for k, v in params.items() if v is not None})
        columns = list(zip(*(args[n] for n in names), strict=True))
        jobs = ex.map_array(task, *columns)
    host = socket.gethostname()
    entries = {
        name: {
            "executor": executor,
            "job_id": str(job.job_id),
            "host": host,
            "stdout": str(job.paths.stdout),
            "stderr": str(job.paths.stderr),
            "result": str(job.paths.result_pickle),
            "submitted": time.time(),
        }
        for name, job in zip(names, jobs, strict=True)
    }
    _JOBS.update({e["job_id"]: job for e, job in zip(entries.values(), jobs, strict=True)})
    from filelock import FileLock

    with FileLock(str(log_dir / f".{RECORD}.lock")):  # two launches at once keep both
        record = read_record(log_dir)
        if record.get("store") != location or record.get("shards") != count:
            record = {"store": location, "shards": count, "tasks": {}}
        record["tasks"].update(entries)
        write_record(log_dir, record)
    return entries


def live_shards(log_dir: Path, location: str, count: int) -> dict[str, str]:
    """Shards of this launch (same store, same count) whose task still runs: shard -> job id.
    Launching again starts none of them twice."""
    record = read_record(log_dir)
    if record.get("store") != location or record.get("shards") != count:
        return {}
    states = task_states(record)
    return {sh: record["tasks"][sh]["job_id"] for sh, st in states.items() if st in LIVE}


def write_record(log_dir: Path, record: dict) -> None:
    tmp = log_dir / f".{RECORD}.{os.getpid()}"
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, log_dir / RECORD)


def read_record(log_dir: Path) -> dict:
    """The launch record of a log folder ({} if none or unreadable)."""
    try:
        return json.loads((Path(log_dir) / RECORD).read_text())
    except (OSError, ValueError):
        return {}


# ---- state of launched tasks -----------------------------------------------------------------


def _result(entry: dict) -> str | None:
    """'success' or 'error' from submitit's result file, None while there is none."""
    p = Path(entry["result"])
    if not p.exists():
        return None
    try:
        from submitit.core.utils import pickle_load

        return str(pickle_load(p)[0])
    except Exception:  # noqa: BLE001  (being written right now)
        return None


def _squeue_states(job_ids: list[str]) -> dict[str, str] | None:
    """job id (ARRAY_TASK) -> Slurm state for jobs squeue still lists; None if squeue fails."""
    arrays = sorted({j.split("_")[0] for j in job_ids})
    try:
        res = subprocess.run(
            ["squeue", "-h", "-r", "-o", "%i %T", "-j", ",".join(arrays)],
            capture_output=True, text=True, timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if res.returncode != 0:
        # squeue refuses ids it no longer knows ("Invalid job id"): all of them have ended
        return {} if "Invalid job id" in res.stderr else None
    out = {}
    for line in res.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            out[parts[0]] = parts[1].lower()
    return out


def task_states(record: dict) -> dict[str, str]:
    """shard -> finished | failed | running | pending | unknown, for a launch record."""
    tasks: dict[str, dict] = record.get("tasks", {})
    states: dict[str, str] = {}
    slurm_ids = [e["job_id"] for e in tasks.values() if e["executor"] == "slurm"]
    queue = _squeue_states(slurm_ids) if slurm_ids else {}
    for shard, e in tasks.items():
        job = _JOBS.get(e["job_id"])
        if job is not None and e["executor"] == "local":
            job.done()  # polls (and reaps) the controller process we started
        res = _result(e)
        if res is not None:
            states[shard] = "finished" if res == "success" else "failed"
            continue
        if e["executor"] == "local":
            if e.get("host") != socket.gethostname():
                states[shard] = "unknown"
            else:
                states[shard] = "running" if pid_alive(int(e["job_id"])) else "failed"
        elif queue is None:
            states[shard] = "unknown"
        else:
            st = queue.get(e["job_id"])
            if st is None:  # left the queue: ended; its result file may be a moment late
                time.sleep(0.5)
                st = "failed" if _result(e) is None else "finished"
            states[shard] = {"running": "running", "completing": "running"}.get(st, st)
    return states


def wait(
    record: dict,
    on_change: Callable[[str, str], None] | None = None,
    on_poll: Callable[[], None] | None = None,
) -> dict[str, str]:
    """Poll the record's tasks until none is pending or running; return their final states.
    `on_change(shard, state)` on each change of a task's state, `on_poll()` on every poll."""
    last: dict[str, str] = {}
    while True:
        states = task_states(record)
        for shard, st in states.items():
            if st != last.get(shard) and on_change is not None:
                on_change(shard, st)
        last = states
        if on_poll is not None:
            on_poll()
        if not any(st in LIVE for st in states.values()):
            return states
        time.sleep(POLL_S)


def stop_local(record: dict, grace_s: float = 60.0) -> list[str]:
    """After Ctrl-C or SIGTERM on `launch`: stop this host's live local tasks and wait up to
    `grace_s` for them (each finishes the unit it is writing and records itself interrupted).
    A terminal's Ctrl-C has reached the workers already; where it has not (a SIGTERM to the
    launcher alone) their controllers get SIGTERM, which they forward. Returns the job ids of
    Slurm tasks, which are left running."""
    tasks = record.get("tasks", {})
    pids = [
        int(e["job_id"])
        for e in tasks.values()
        if e["executor"] == "local" and e.get("host") == socket.gethostname()
    ]

    def reap_and_wait(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
            for e in tasks.values():  # polling a job this process started reaps it
                job = _JOBS.get(e["job_id"])
                if job is not None:
                    with contextlib.suppress(Exception):
                        job.done()
            time.sleep(0.1)

    reap_and_wait(3.0)
    for pid in pids:
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    reap_and_wait(grace_s)
    return [e["job_id"] for e in tasks.values() if e["executor"] == "slurm"]


def log_tail(entry: dict, lines: int = 12) -> tuple[str, list[str]]:
    """The last lines of a task's log: stderr where it has any, else stdout."""
    for key in ("stderr", "stdout"):
        p = Path(entry.get(key, ""))
        try:
            text = p.read_text(errors="replace").rstrip("\n")
        except OSError:
            continue
        if text.strip():
            return str(p), text.splitlines()[-lines:]
    return entry.get("stderr", "?"), []
