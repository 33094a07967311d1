"""`calibjob launch`: a job's shards as N local worker processes or one Slurm job array.

Built on submitit, which pickles a call of `run_task` (the same work as `calibjob run --shard
i/n`) into a log folder and runs it in a process it starts (`local`) or in a Slurm array task
(`slurm`). Nothing here talks to the workers: the store is the only shared state, so launching
again on a store submits only the shards that still have work, and each of those skips what
is done. What was launched, and where its logs are, goes to LOGDIR/launch.json, from which
`calibjob status` tells finished, running and failed shards apart with no scheduler accounting
(sacct is often missing): a result file means the task ended in Python; no result file and no
live process (local) or squeue entry (Slurm) means it died, e.g. killed or out of memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from calibjob import remote
from calibjob.claims import pid_alive
from calibjob.config import AUTO_FIELDS, JobConfig, canonical_model, differing_fields
from calibjob.errors import ConfigError, StoreError
from calibjob.prompts import read_prompts
from calibjob.shards import Shard, parse_shard, work_units
from calibjob.store import Store

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
    loc = remote.normalize(store)
    return loc if remote.is_url(loc) else str(Path(loc).resolve())


def default_log_dir(location: str) -> Path:
    """STORE/logs for a folder; for a URL, ./calibjob-logs/<bucket_prefix> (submitit needs a
    shared file system for its files, which a bucket is not)."""
    if not remote.is_url(location):
        return Path(location) / "logs"
    u = urlsplit(location)
    name = f"{u.netloc}{u.path}".strip("/").replace("/", "_") or u.scheme
    return Path("calibjob-logs") / name


def with_store_choices(cfg: JobConfig, location: str) -> JobConfig:
    """Take the 'auto' fields from an existing store, so a relaunched job keeps its
    data-defining choices (the login node may not be the kind of machine that made them)."""
    if not Store.exists(location):
        return cfg
    return cfg.with_choices_of(Store.open(location, mode="r").config)


def prepare_config(cfg: JobConfig) -> JobConfig:
    """Resolve what needs no device (model key, prompts) and validate, before any submission.
    The 'auto' fields are left to the workers: the login node is not a GPU node."""
    cfg = cfg.replace(model_version=canonical_model(cfg.model_version))
    if not cfg.prompts:
        cfg = cfg.replace(
            prompts=read_prompts(cfg.prompt_file, cfg.prompt_column, cfg.num_prompts)
        )
    return cfg.validate()


def pending_shards(cfg: JobConfig, location: str, count: int) -> list[int]:
    """Shards of `count` with a trajectory not done yet (all of them for a new store).
    Refuses an existing store of another job before anything is submitted."""
    if not Store.exists(location):
        return list(range(count))
    store = Store.open(location, mode="r")
    diff = differing_fields(store.config, cfg)
    diff = [k for k in diff if getattr(cfg, k) != AUTO_FIELDS.get(k, object())]
    if diff:
        empty = not store.encoded and not store.done_mask().any()
        hint = "; it holds no data yet: remove it to start this job there" if empty else ""
        raise StoreError(
            f"{location} holds a different job (differs in: {', '.join(diff)}){hint}"
        )
    have = store.config
    units = work_units(have.num_fid_samples, len(have.prompts), have.batch_size)
    done = store.done_mask()
    out = []
    for i in range(count):
        trajs = [k for u in Shard(i, count).units(units) for k in u.trajectories]
        if not done[trajs].all() or (not trajs and not store.encoded):
            out.append(i)
    return out


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


# ---- the task: what each worker process runs ------------------------------------------------


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


def check_share(cfg: JobConfig, share: int) -> None:
    """Refuse, in one line, a launch whose workers cannot each fit their share of the device
    (only where this machine is the one that runs them, and the batch is not fixed yet)."""
    if share <= 1:
        return
    from calibjob import device

    dtype = device.resolve_dtype(cfg.dtype)
    per_prompt = -(-cfg.num_fid_samples // len(cfg.prompts))
    device.resolve_batch_size(
        cfg.batch_size if cfg.batch_size else 0,
        per_prompt,
        model=cfg.model_version,
        dtype=dtype,
        compile=device.resolve_compile(cfg.compile),
        latent_size=cfg.latent_size,
        max_memory=cfg.max_memory,
        share=share,
    )


def run_task(fields: dict, location: str, shard: str, share: int = 1) -> dict:
    """One shard, as `calibjob run --shard i/n` does it; picklable, for submitit. `share`:
    workers on this shard's device, each planning its batch for 1/share of the memory."""
    from calibjob import interrupts

    interrupts.install()  # Ctrl-C / SIGTERM: one line in the log, exit 130 (interrupts.py)
    interrupts.watch_store(location)
    sh = parse_shard(shard)
    print(
        f"calibjob shard {sh} on {socket.gethostname()} (pid {os.getpid()}, "
        f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}) -> {location}",
        flush=True,
    )
    try:
        return _run_task(fields, location, sh, share)
    except KeyboardInterrupt:  # one line in the log (status reads it), not a traceback
        print(interrupts.message(), file=sys.stderr, flush=True)
        os._exit(interrupts.EXIT_INTERRUPTED)


def _run_task(fields: dict, location: str, sh: Shard, share: int) -> dict:
    from calibjob.progress import plural
    from calibjob.worker import resolve_config, run_shard

    cfg = resolve_config(
        with_store_choices(JobConfig.from_dict(fields), location), location, share=share
    )
    res = run_shard(cfg, location, sh, show_progress=None)  # a log file: one line per unit
    print(
        f"shard {sh}: {plural(res.trajectories_run, 'trajectory')} in "
        f"{plural(res.units_run, 'unit')}, wall time {res.seconds:.1f} s -> {location}",
        flush=True,
    )
    return {"shard": str(sh), "units_run": res.units_run, "trajectories_run": res.trajectories_run}


# ---- submission ------------------------------------------------------------------------------


def submit(
    cfg: JobConfig,
    location: str,
    count: int,
    shards: list[int],
    executor: str,
    log_dir: Path,
    slurm: SlurmOptions,
) -> dict[str, dict]:
    """Start the given shards; return their launch entries (also written to launch.json)."""
    import submitit

    share = device_share(executor, count)
    check_share(cfg, share)  # before anything is written
    log_dir.mkdir(parents=True, exist_ok=True)
    fields = cfg.to_dict()
    names = [str(Shard(i, count)) for i in shards]
    if executor == "local":
        ex = submitit.LocalExecutor(folder=log_dir)
        gpus = visible_gpus()
        jobs = []
        # submitit's controller processes start with SIGINT ignored (inherited), so a Ctrl-C in
        # the terminal reaches the workers (which handle it) and not the controllers (which
        # would print a traceback and SIGKILL their worker a second later)
        sigint = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for i, name in zip(shards, names, strict=True):
                pin = gpu_for_shard(i, gpus)
                ex.update_parameters(
                    timeout_min=slurm.time_min, gpus_per_node=len(pin), visible_gpus=pin
                )
                jobs.append(ex.submit(run_task, fields, location, name, share))
        finally:
            signal.signal(signal.SIGINT, sigint)
    elif executor == "slurm":
        if shutil.which("sbatch") is None:
            raise ConfigError("--executor slurm needs Slurm's sbatch here (run on a login node)")
        ex = submitit.SlurmExecutor(folder=log_dir)
        params = {
            "job_name": "calibjob",
            "time": slurm.time_min,
            "array_parallelism": len(shards),
            "partition": slurm.partition,
            "gpus_per_task": slurm.gpus_per_task,
            "cpus_per_task": slurm.cpus_per_task,
        }
        ex.update_parameters(**{k: v for k, v in params.items() if v is not None})
        k = len(shards)
        jobs = ex.map_array(run_task, [fields] * k, [location] * k, names)
    else:
        raise ConfigError(f"--executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
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


def wait(record: dict, on_change: Callable[[str, str], None] | None = None) -> dict[str, str]:
    """Poll the record's tasks until none is pending or running; return their final states."""
    last: dict[str, str] = {}
    while True:
        states = task_states(record)
        for shard, st in states.items():
            if st != last.get(shard) and on_change is not None:
                on_change(shard, st)
        last = states
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


__all__ = [
    "SlurmOptions", "default_log_dir", "location_of", "pending_shards", "prepare_config",
    "read_record", "run_task", "submit", "task_states", "wait", "log_tail", "with_store_choices",
]
