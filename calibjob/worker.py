"""One worker process: open or create the store, encode the prompts once, work through a shard.

Takes a resolved JobConfig, a store path and a Shard; gives a store where that shard's work
units are done. Units already done (and whose chunks verify) are skipped, so `run` after a
crash, `resume` and a second machine on the same store all do only what is left. The previous
unit is written by a background thread while the next one computes.
"""

from __future__ import annotations

import errno
import os
import queue
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from calibjob.config import JobConfig
from calibjob.errors import StoreError
from calibjob.prompts import read_prompts
from calibjob.shards import ALL, Shard, Unit, work_units
from calibjob.store import Store

err = Console(stderr=True)


@dataclass
class RunResult:
    units_total: int
    units_run: int
    trajectories_run: int
    recomputed: list[int]
    seconds: float
    traj_steps_per_s: float
    # phase -> (seconds, peak GB of MLX memory in it): load_text, encode, load_mmdit, denoise
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
        cfg = cfg.replace(prompts=read_prompts(cfg.prompt_file))
    cfg.validate()
    if store_path is not None and Store.exists(store_path):
        cfg = cfg.with_choices_of(Store.open(store_path, mode="r").config)
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
    return cfg


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
    """Writes finished units on a background thread (one in flight), so the model never waits
    on the disk; errors surface in the main thread on the next submit or at close."""

    def __init__(self, store: Store):
        self.store = store
        self.q: queue.Queue = queue.Queue(maxsize=1)
        self.error: BaseException | None = None
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

    def _check(self) -> None:
        if self.error is not None:
            e = self.error
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise StoreError(
                    f"disk full while writing {self.store.path} ({e.strerror}); the store is "
                    f"consistent: free some space and run `calibjob resume {self.store.path}`"
                ) from None
            raise e

    def submit(self, unit: Unit, xs: np.ndarray, after) -> None:
        self._check()
        self.q.put((unit, xs, after))

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()
        self._check()


def run_shard(
    cfg: JobConfig,
    store_path: str | Path,
    shard: Shard = ALL,
    *,
    show_progress: bool | None = None,
) -> RunResult:
    """Run shard `shard` of the job `cfg` (resolved) into the store at `store_path`."""
    t0 = time.perf_counter()
    fresh = not Store.exists(store_path)
    store = Store.create_or_open(store_path, cfg)
    all_units = units_for(store.config)
    todo, recomputed = pending_units(store, shard)
    if recomputed:
        err.print(
            f"calibjob: trajectories {fmt_ranges(recomputed)} failed verification; recomputing"
        )
    if not todo:
        if not store.encoded:  # a shard with no units still leaves the conditioning in place
            ensure_encoded(store, _load_model(store, mmdit=False))
        return RunResult(len(all_units), 0, 0, recomputed, time.perf_counter() - t0, 0.0)

    from calibjob.engine import Engine

    cfg = store.config
    try:
        model, phases = load_encoded(store)
    except BaseException:
        if fresh and not store.reload().encoded:  # leave no empty store behind
            shutil.rmtree(store.path, ignore_errors=True)
        raise
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
    steps_total = n_traj * cfg.num_sampling_steps
    shard_name = str(shard)
    stats = {"units_done": 0, "traj_done": 0, "t_start": time.perf_counter()}

    def after_write(unit: Unit) -> None:
        stats["units_done"] += 1
        stats["traj_done"] += len(unit.trajectories)
        elapsed = time.perf_counter() - stats["t_start"]
        store.record_progress(
            shard_name,
            {
                "traj_steps_per_s": stats["traj_done"]
                * cfg.num_sampling_steps
                / max(elapsed, 1e-9),
                "units_left": len(todo) - stats["units_done"],
                "pid": os.getpid(),
                "peak_memory_gb": round(peak_memory_gb(), 2),
            },
        )

    show = sys.stderr.isatty() if show_progress is None else show_progress
    progress = Progress(
        TextColumn("[bold]shard {task.fields[shard]}"),
        BarColumn(),
        TextColumn("{task.fields[traj]}/{task.fields[ntraj]} trajectories"),
        MofNCompleteColumn(),
        TextColumn("steps"),
        TextColumn("{task.fields[rate]} steps/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err,
        disable=not show,
    )
    writer = _Writer(store)
    with progress:
        task = progress.add_task(
            "run", total=steps_total, shard=shard_name, traj=0, ntraj=n_traj, rate="-"
        )
        t_loop = time.perf_counter()
        done_steps = 0
        try:
            for unit in todo:

                def on_step(b: int) -> None:
                    nonlocal done_steps
                    done_steps += b
                    rate = done_steps / max(time.perf_counter() - t_loop, 1e-9)
                    progress.update(task, advance=b, rate=f"{rate:.1f}")

                xs, _ = engine.run_unit(
                    unit.prompt, unit.trajectories, cs[unit.prompt], cs_pooled[unit.prompt], on_step
                )
                writer.submit(unit, xs, after_write)
                progress.update(task, traj=stats["traj_done"] + len(unit.trajectories))
        finally:
            writer.close()
        engine.release_prompt()
    seconds = time.perf_counter() - t0
    phases["denoise"] = (time.perf_counter() - t_loop, peak_memory_gb())
    return RunResult(
        len(all_units),
        len(todo),
        n_traj,
        recomputed,
        seconds,
        steps_total / max(seconds, 1e-9),
        phases,
    )


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


def peak_memory_gb() -> float:
    """MLX's peak memory in this process since the last reset (GB)."""
    from calibjob.device import mx

    return mx.get_peak_memory() / 1e9


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
