"""One worker process: open or create the store, encode the prompts once, work through a shard.

Takes a resolved JobConfig, a store path and a Shard; gives a store where that shard's work
units are done. Units already done (and whose chunks verify) are skipped, so `run` after a
crash, `resume` and a second machine on the same store all do only what is left. The previous
unit is written by a background thread while the next one computes.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console

import calibjob
from calibjob.config import JobConfig
from calibjob.errors import ConfigError, StoreError
from calibjob.progress import ShardProgress, announce_start, peak_memory_gb
from calibjob.prompts import read_prompts
from calibjob.shards import ALL, Shard, Unit, work_units
from calibjob.store import DISK_FULL, Store

err = Console(stderr=True)


@dataclass
class RunResult:
    units_total: int
    units_run: int
    trajectories_run: int
    recomputed: list[int]
    seconds: float  # wall time of the whole run (from the process start under the console entry)
    traj_steps_per_s: float  # denoising throughput (progress.py's one definition)
    denoise_seconds: float = 0.0
    units_elsewhere: list[int] = field(default_factory=list)  # held by other live workers
    held_by: dict[int, str] = field(default_factory=dict)
    # phase -> (seconds, peak GB of MLX memory in it): startup (the console entry's imports),
    # load_text, encode, load_mmdit, denoise
    phases: dict[str, tuple[float, float]] = field(default_factory=dict)


def resolve_config(
    cfg: JobConfig, store_path: str | Path | None = None, *, share: int = 1
) -> JobConfig:
    """Fill in what the command line leaves open: the prompts (from the prompt file), and
    'auto' dtype and batch size (the existing store's choice, else the device's: the batch
    that fits this worker's memory, its 1/`share` of the device when workers share one)."""
    from calibjob.config import canonical_model

    cfg = cfg.replace(model_version=canonical_model(cfg.model_version))
    if not cfg.prompts:
        cfg = cfg.replace(
            prompts=read_prompts(cfg.prompt_file, cfg.prompt_column, cfg.num_prompts)
        )
    cfg.validate()
    check_local_ckpt(cfg.local_ckpt)
    existing = None
    if store_path is not None and Store.exists(store_path):
        existing = Store.open(store_path, mode="r")
        cfg = cfg.with_choices_of(existing.config)
    if "auto" in (cfg.dtype, cfg.compile) or cfg.batch_size == 0:
        from calibjob import device

        per_prompt = -(-cfg.num_fid_samples // len(cfg.prompts))
        cfg = cfg.replace(
            dtype=device.resolve_dtype(cfg.dtype), compile=device.resolve_compile(cfg.compile)
        )
        cfg = cfg.replace(
            batch_size=device.resolve_batch_size(
                cfg.batch_size,
                per_prompt,
                model=cfg.model_version,
                dtype=cfg.dtype,
                compile=cfg.compile,
                latent_size=cfg.latent_size,
                max_memory=cfg.max_memory,
                share=share,
            )
        )
    if cfg.max_memory > 0 and not (existing is not None and existing.encoded):
        from calibjob import device

        device.note_encode_over(cfg.model_version, cfg.dtype, cfg.max_memory)
    return cfg


def check_local_ckpt(path: str | None) -> None:
    """A missing or unreadable --local-ckpt is named before anything loads (DiffusionKit would
    otherwise report a hub error about another file)."""
    if path is None:
        return
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"--local-ckpt {path}: no such file")
    try:
        with open(p, "rb") as f:
            f.read(8)
    except OSError as e:
        raise ConfigError(f"--local-ckpt {path}: cannot read it ({e.strerror})") from None


def units_for(cfg: JobConfig) -> list[Unit]:
    return work_units(cfg.num_fid_samples, len(cfg.prompts), cfg.batch_size)


def pending_units(store: Store, shard: Shard) -> tuple[list[Unit], list[int]]:
    """The shard's units with any trajectory not done; verifies done chunks (clearing bad ones)."""
    mine = shard.units(units_for(store.config))
    recomputed = store.verify_done([k for u in mine for k in u.trajectories])
    done = store.done_mask()
    return [u for u in mine if not done[list(u.trajectories)].all()], recomputed


def ensure_encoded(store: Store, model) -> None:
    """Encode all prompts once per store: the first process under the lock does it, the others
    wait on the lock and then find it done."""
    with Store.lock(store.path):
        fresh = store.reload()
        if fresh.encoded:
            return
        cfg = store.config
        cs, cs_pooled = model.encode(cfg.prompts)
        # stored as the model sees them (the engine casts to the activation dtype): float16 on
        # a GPU halves the paper's cs to 193 MB; numpy has no bfloat16, which stays float32
        dt = np.float16 if cfg.dtype == "float16" else np.float32
        sigmas, ts = model.schedule(cfg.num_sampling_steps)
        store.write_conditioning(cs.astype(dt), cs_pooled.astype(dt), sigmas, ts)


class _Writer:
    """Writes finished units on a background thread, so the model never waits on the disk.
    `settle` bounds what a kill can cost: the main thread starts a unit only once at most one
    finished unit is still being written. Errors surface in the main thread."""

    def __init__(self, store: Store):
        self.store = store
        self.q: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.pending = 0
        self.cv = threading.Condition()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            unit, xs, after = item
            if self.error is None:
                try:
                    self.store.write_trajectories(unit.trajectories, xs)
                    after(unit)
                except BaseException as e:  # noqa: BLE001  (re-raised in the main thread)
                    self.error = e
            with self.cv:
                self.pending -= 1
                self.cv.notify_all()

    def _check(self) -> None:
        if self.error is not None:
            e = self.error
            if isinstance(e, OSError) and e.errno in DISK_FULL:
                raise StoreError(
                    f"disk full while writing {self.store.path} ({e.strerror}); the store is "
                    f"consistent: free some space and run `calibjob resume {self.store.path}`"
                ) from None
            raise e

    def submit(self, unit: Unit, xs: np.ndarray, after) -> None:
        self._check()
        with self.cv:
            self.pending += 1
        self.q.put((unit, xs, after))

    def settle(self, at_most: int) -> None:
        """Wait until at most `at_most` submitted units are unwritten."""
        with self.cv:
            self.cv.wait_for(lambda: self.pending <= at_most)
        self._check()

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()
        self._check()


def prepare_store(store: Store) -> list[str]:
    """Repair what a crash or a damaged disk left (under the store's lock): metadata that does
    not parse, unreadable done markers (rewritten from their verified chunks), a conditioning
    that fails its checksums (unflagged, so it is encoded again). Returns what was mended."""
    from calibjob.claims import sweep_dead

    with Store.lock(store.location):
        sweep_dead(store)
        mended = store.repair_metadata()
        mended += [f"done/c/{k}" for k in store.repair_markers()]
        if store.encoded and not store.conditioning_intact():
            store.clear_encoded()
            mended.append("cs, cs_pooled, sigmas, ts (encoded again)")
    return mended


def run_shard(
    cfg: JobConfig,
    store_path: str | Path,
    shard: Shard = ALL,
    *,
    show_progress: bool | None = None,
    shards: list[Shard] | None = None,
) -> RunResult:
    """Run shard `shard` (or each of `shards`) of the job `cfg` (resolved) into the store.

    Never removes a store: a worker whose model fails to load leaves the store as it found it
    (or new and empty), so a shard failing beside healthy ones costs them nothing."""
    from calibjob import interrupts
    from calibjob.claims import Claims

    t0 = calibjob.process_start or time.perf_counter()  # the console entry's: imports count
    interrupts.watch_store(str(store_path))
    store = Store.create_or_open(store_path, cfg)
    mended = prepare_store(store)
    store = store.reload()
    if mended:
        err.print(f"calibjob: repaired {', '.join(mended)} in {store.path}", markup=False)
    my_shards = shards or [shard]
    shard_name = ", ".join(str(s) for s in my_shards)
    for sh in my_shards:
        store.record_progress(str(sh), {"state": "running", "pid": os.getpid(),
                                        "host": socket.gethostname()})
    all_units = units_for(store.config)
    pending: dict[int, Unit] = {}  # by index: shards of different counts may share units
    recomputed = []
    for sh in my_shards:
        units, bad = pending_units(store, sh)
        pending.update((u.index, u) for u in units)
        recomputed += bad
    todo = [pending[i] for i in sorted(pending)]
    if recomputed:
        err.print(
            f"calibjob: trajectories {fmt_ranges(recomputed)} failed verification; recomputing",
            markup=False,
        )
    claims = Claims(store)
    elsewhere = claims.live([u.index for u in todo])
    todo = [u for u in todo if u.index not in elsewhere]
    if not todo:
        if not store.encoded:  # a shard with no units still leaves the conditioning in place
            ensure_encoded(store, _load_model(store, mmdit=False))
        _finish_records(store, my_shards, "finished" if not elsewhere else "running elsewhere")
        return RunResult(
            len(all_units), 0, 0, recomputed, time.perf_counter() - t0, 0.0, 0.0,
            sorted(elsewhere), {u: c.describe() for u, c in elsewhere.items()},
        )  # fmt: skip

    announce_start(shard_name, sum(len(u.trajectories) for u in todo), len(todo),
                   store.config.model_version, show_progress, err)  # fmt: skip
    from calibjob.engine import Engine

    startup = {"startup": (time.perf_counter() - t0, peak_memory_gb())}
    cfg = store.config
    model, phases = load_encoded(store)
    phases = {**startup, **phases} if calibjob.process_start else phases
    store = store.reload()
    cs, cs_pooled = store.conditioning()
    engine = Engine(
        model,
        num_steps=cfg.num_sampling_steps,
        cfg_scale=cfg.cfg_scale,
        latent_size=cfg.latent_size,
        seed=cfg.seed,
        compile=cfg.compile == "on",
    )
    _, ts = store.schedule()
    if not np.array_equal(ts, engine.timesteps_np):
        raise StoreError("the store's timesteps differ from this DiffusionKit's schedule")

    n_traj = sum(len(u.trajectories) for u in todo)
    steps = cfg.num_sampling_steps
    prog = ShardProgress(shard_name, n_traj, steps, show_progress, err)
    written = 0

    def after_write(unit: Unit) -> None:
        nonlocal written
        claims.release(unit.index)
        written += 1
        info = {
            "traj_steps_per_s": prog.rate,
            "units_left": len(todo) - written,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "state": "running",
            "peak_memory_gb": round(peak_memory_gb(), 2),
        }
        for sh in my_shards:
            store.record_progress(str(sh), info)

    writer = _Writer(store)
    ran: list[Unit] = []
    skipped: dict[int, str] = {u: c.describe() for u, c in elsewhere.items()}
    interrupted = False
    with prog:
        prog.start()
        try:
            interrupts.set_graceful(True)
            for i, unit in enumerate(todo):
                other = claims.take(unit.index)
                if other is not None or store.all_done(unit.trajectories):
                    if other is not None:  # taken by a worker that started since
                        skipped[unit.index] = other.describe()
                    else:  # finished by one that has since ended
                        claims.release(unit.index)
                    prog.skip(len(unit.trajectories))
                    continue
                xs, _ = engine.run_unit(
                    unit.prompt, unit.trajectories, cs[unit.prompt], cs_pooled[unit.prompt],
                    prog.step,
                )  # fmt: skip
                writer.submit(unit, xs, after_write)
                ran.append(unit)
                prog.unit_done(len(unit.trajectories), last=i == len(todo) - 1)
                writer.settle(1)  # a kill costs this unit's write and the next unit, no more
        except KeyboardInterrupt:
            interrupted = True
        finally:
            interrupts.set_graceful(False)
            try:
                writer.close()
            finally:
                claims.close()
        engine.release_prompt()
    denoise_s = time.perf_counter() - prog.t0 if prog.t0 else 0.0
    phases["denoise"] = (denoise_s, peak_memory_gb())
    if interrupted:
        _finish_records(store, my_shards, "interrupted")
        raise Interrupted()
    _finish_records(store, my_shards, "finished" if not skipped else "running elsewhere")
    n_ran = sum(len(u.trajectories) for u in ran)
    return RunResult(
        len(all_units), len(ran), n_ran, recomputed, time.perf_counter() - t0,
        n_ran * steps / max(denoise_s, 1e-9) if ran else 0.0, denoise_s,
        sorted(skipped), skipped, phases,
    )  # fmt: skip


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM inside the unit loop, after the writer finished and claims dropped."""


def _finish_records(store: Store, shards: list[Shard], state: str) -> None:
    """The shards' last progress word: finished, interrupted, or running elsewhere."""
    records = store.progress()
    for sh in shards:
        info = records.get(str(sh), {})
        info = {k: v for k, v in info.items() if k not in ("shard", "updated", "damaged")}
        store.record_progress(str(sh), {**info, "state": state})


def _load_model(store: Store, *, text_encoders: bool | None = None, mmdit: bool = True):
    """The store's model; text encoders only while the prompts still need encoding."""
    from calibjob import models

    cfg = store.config
    return models.load(
        cfg.model_version,
        shift=cfg.shift,
        dtype=cfg.dtype,
        local_ckpt=cfg.local_ckpt,
        text_encoders=not store.encoded if text_encoders is None else text_encoders,
        mmdit=mmdit,
    )


def _materialized(model):
    """Evaluate the loaded weights now: DiffusionKit's loaders are lazy, so the checkpoint's
    read and dtype cast would otherwise happen (and peak) inside the first denoising step."""
    import gc

    from calibjob.device import mx

    t = model.text
    for part in (model.mmdit, *((t.clip_l, t.clip_g, t.t5) if t is not None else ())):
        if part is not None:
            mx.eval(part.parameters())
    gc.collect()
    mx.clear_cache()
    return model


def load_encoded(store: Store):
    """The model ready to denoise, the prompts encoded in the store; with phase timings.

    Text encoders and MMDiT are never in memory together (low_memory_mode, the default): the
    encoders load alone, encode, are freed, and only then does the MMDiT load. T5-XXL alone is
    ~9.8 GB in float16 against the MMDiT's 4.2 GB, so this sets the run's peak. Returns
    (model, {phase: (seconds, peak GB)})."""
    from calibjob.device import mx

    phases: dict[str, tuple[float, float]] = {}

    def phase(name: str, fn):
        mx.reset_peak_memory()
        t = time.perf_counter()
        out = fn()
        phases[name] = (time.perf_counter() - t, peak_memory_gb())
        return out

    if not store.config.low_memory_mode:
        model = phase("load", lambda: _load_model(store))
        if not store.encoded:
            phase("encode", lambda: ensure_encoded(store, model))
        return model, phases
    if not store.encoded:
        text = phase(
            "load_text",
            lambda: _materialized(_load_model(store, text_encoders=True, mmdit=False)),
        )
        phase("encode", lambda: ensure_encoded(store, text))
        text.free_text_encoders()
        del text
    model = phase("load_mmdit", lambda: _materialized(_load_model(store, text_encoders=False)))
    mx.reset_peak_memory()  # the denoise phase's peak starts here
    return model, phases


def fmt_ranges(ks) -> str:
    """[0,1,2,5,7,8] -> '0-2, 5, 7-8' (for messages about many trajectories)."""
    ks = sorted(int(k) for k in ks)
    out, i = [], 0
    while i < len(ks):
        j = i
        while j + 1 < len(ks) and ks[j + 1] == ks[j] + 1:
            j += 1
        out.append(str(ks[i]) if i == j else f"{ks[i]}-{ks[j]}")
        i = j + 1
    return ", ".join(out)


__all__ = ["RunResult", "resolve_config", "run_shard", "fmt_ranges", "pending_units"]
