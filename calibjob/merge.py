"""Merge: one or more stores of a job -> the paper-format calibration `.npz`.

Checks the stores are the same job and together cover every trajectory exactly once, selects
the steps, shuffles the points with the job seed, and writes the file atomically (temporary
file in the same folder, fsync, rename). It holds only the selected points in memory (N*K
latents, 420 MB for the paper job), never the store (1.7 GB), and writes `xs` row by row in
shuffled order straight into the zip member.

Keys: xs, ts, prompt_indices, cs, cs_pooled, prompts, cfg_scale (the spec's), plus
trajectory_indices and step_indices (where each point came from) and sigmas (the schedule,
S+1 values; a point's sigma is sigmas[step_indices]), and model_version, shift and dtype (the
model that made the set, which `calibjob profile` loads again).
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calibjob.errors import ConfigError, StoreError
from calibjob.selection import select_steps, shuffle_order
from calibjob.store import Store, check_same_job

ROWS_PER_WRITE = 256


@dataclass
class MergeSummary:
    out: Path
    points: int
    trajectories: int
    selected_steps: list[int]
    bytes: int


def coverage(stores: list[Store]) -> np.ndarray:
    """Which store holds each trajectory; refuses overlaps and gaps, naming the trajectories."""
    from calibjob.worker import fmt_ranges

    n = stores[0].config.num_fid_samples
    owner = np.full(n, -1)
    overlap: list[int] = []
    for i, s in enumerate(stores):
        mask = s.done_mask()
        overlap += np.flatnonzero(mask & (owner >= 0)).tolist()
        owner[mask & (owner < 0)] = i
    if overlap:
        raise ConfigError(f"trajectories {fmt_ranges(overlap)} are done in more than one store")
    missing = np.flatnonzero(owner < 0)
    if missing.size:
        raise ConfigError(
            f"incomplete: {missing.size} of {n} trajectories missing ({fmt_ranges(missing)}); "
            f"finish them with `calibjob resume STORE`"
        )
    return owner


def _write_npy(zf: zipfile.ZipFile, name: str, arr: np.ndarray) -> None:
    with zf.open(name + ".npy", "w", force_zip64=True) as f:
        np.lib.format.write_array(f, np.asarray(arr, order="C"), allow_pickle=False)


def merge(
    paths: list[str | Path],
    out: str | Path,
    *,
    step_selection: str = "linspace",
    force: bool = False,
    on_trajectory=None,
) -> MergeSummary:
    """Merge the stores at `paths` into `out` (.npz). See the module docstring."""
    out = Path(out)
    if out.exists() and not force:
        raise ConfigError(f"{out} exists; pass --force to replace it")
    if out.is_dir():
        raise ConfigError(f"{out} is a folder")
    if not out.parent.is_dir():
        raise ConfigError(f"output folder {out.parent} does not exist")
    stores = [Store.open(p, mode="r") for p in paths]
    check_same_job(stores)
    cfg = stores[0].config
    if not all(s.encoded for s in stores):
        raise ConfigError("a store has no prompt conditioning yet (its run never started)")
    owner = coverage(stores)

    n, s_steps, k_sel = cfg.num_fid_samples, cfg.num_sampling_steps, cfg.num_selected_steps
    sel = select_steps(s_steps, k_sel, step_selection)
    k_sel = len(sel)
    h, w = cfg.latent_size
    selected = np.empty((n, k_sel, h, w, 16), dtype=np.float32)
    for k in range(n):
        try:
            selected[k] = stores[owner[k]].read_trajectory(k)[sel]
        except Exception as e:
            where = stores[owner[k]].path
            raise StoreError(
                f"trajectory {k} in {where} is unreadable or corrupt ({type(e).__name__}); "
                f"run `calibjob resume {where}` to recompute it"
            ) from None
        if on_trajectory is not None:
            on_trajectory()
    flat = selected.reshape(n * k_sel, h, w, 16)

    m = n * k_sel
    perm = shuffle_order(m, cfg.seed)
    traj_idx = (perm // k_sel).astype(np.int64)
    step_idx = sel[perm % k_sel].astype(np.int64)
    sigmas, ts_all = stores[0].schedule()
    cs, cs_pooled = stores[0].conditioning()

    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("xs.npy", "w", force_zip64=True) as f:
                header = {"descr": "<f4", "fortran_order": False, "shape": flat.shape}
                np.lib.format.write_array_header_2_0(f, header)
                for start in range(0, m, ROWS_PER_WRITE):
                    f.write(flat[perm[start : start + ROWS_PER_WRITE]].tobytes())
            _write_npy(zf, "ts", ts_all[step_idx])
            _write_npy(zf, "prompt_indices", traj_idx % len(cfg.prompts))
            _write_npy(zf, "cs", cs)
            _write_npy(zf, "cs_pooled", cs_pooled)
            _write_npy(zf, "prompts", np.array(cfg.prompts, dtype=str))
            _write_npy(zf, "cfg_scale", np.array(cfg.cfg_scale))
            _write_npy(zf, "trajectory_indices", traj_idx)
            _write_npy(zf, "step_indices", step_idx)
            _write_npy(zf, "sigmas", sigmas)
            # which model made the set, for `calibjob profile` (unicode / float: no pickle)
            _write_npy(zf, "model_version", np.array(cfg.model_version))
            _write_npy(zf, "shift", np.array(cfg.shift))
            _write_npy(zf, "dtype", np.array(cfg.dtype))
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return MergeSummary(out, m, n, sel.tolist(), out.stat().st_size)


__all__ = ["merge", "coverage", "MergeSummary"]
