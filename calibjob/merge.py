"""Merge: one or more stores of a job -> the paper-format calibration `.npz`.

Checks the stores are the same job and together cover every trajectory exactly once, selects
the steps, puts the points in the spec's order, and writes the file atomically (temporary file
in the same folder, fsync, rename). It holds only the selected points in memory (N*K latents,
420 MB for the paper job), never the store (1.7 GB): `xs` goes row by row in shuffled order
straight into the zip member, and `cs` / `cs_pooled` prompt by prompt (256 prompts of SD3's
conditioning would be 4.9 GB at once).

The spec's order (PHASE1.md, so that a file equals the spec script's array for array): the
selected steps stacked step-major, point `j * N + k` being selected step j of trajectory k,
then `numpy.random.default_rng(seed).permutation(N * K)` applied to every per-point array.

Keys: xs, ts, prompt_indices (int32), cs, cs_pooled, prompts, cfg_scale (float32 scalar), the
spec's; plus trajectory_indices and step_indices (where each point came from), sigmas (the
schedule, S+1 values; a point's sigma is sigmas[step_indices]), model_version, shift and dtype
(the model that made the set, which `calibjob profile` loads again), and guidance ('cfg',
'none' or 'embedded') with guidance_scale (float32; the embedded scale, 0 without one). The
branch axis of cs and cs_pooled holds what the model's guidance uses: under CFG (SD3) the
prompt and the empty prompt, otherwise (FLUX.1) the prompt alone.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calibjob.core.locations import fsync_path, is_url
from calibjob.core.shards import Shard
from calibjob.core.status import shards_run_here
from calibjob.core.store import JobStore
from calibjob.core.words import fmt_ranges
from calibjob.errors import ConfigError, StoreDamaged, StoreError
from calibjob.families import LATENT_CHANNELS
from calibjob.jobs.run import open_run_store, units_for
from calibjob.selection import point_order, select_steps

ROWS_PER_WRITE = 256


@dataclass
class MergeSummary:
    out: Path
    points: int
    trajectories: int
    selected_steps: list[int]
    bytes: int


def check_same_job(stores: list[JobStore]) -> None:
    """Refuse a set of stores that are not the same job."""
    first = stores[0]
    for s in stores[1:]:
        if s.job is not first.job or s.fingerprint != first.fingerprint:
            diff = first.config.differing(s.config) if s.job is first.job else ["job"]
            raise ConfigError(
                f"{s.path} is a different job from {first.path} (differs in: {', '.join(diff)})"
            )


def coverage(stores: list[JobStore]) -> np.ndarray:
    """Which store holds each trajectory; refuses overlaps and gaps, naming the trajectories."""
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
            + _where_missing(stores, missing)
        )
    return owner


def _where_missing(stores: list[JobStore], missing: np.ndarray) -> str:
    """Advice for a gap: the shards to bring (stores of one machine each), or `resume`."""
    units = units_for(stores[0].config)
    ran = [sh for s in stores for sh in shards_run_here(s)]
    counts = {sh.count for sh in ran}
    if ran and len(counts) == 1 and counts != {1}:
        n = counts.pop()
        lacking = {
            str(Shard(i, n))
            for i in range(n)
            for u in Shard(i, n).units(units)
            if set(u.trajectories) & set(missing.tolist())
        }
        absent = sorted(x for x in lacking if x not in {str(sh) for sh in ran})
        if absent:
            return (
                f"they belong to shard {', '.join(absent)}, which ran in no store given: add "
                f"its store to the merge (calibjob merge STORE... OTHER_STORE)"
            )
    where = stores[0].path if len(stores) == 1 else "STORE"
    return f"finish them with `calibjob resume {where}`"


def _write_npy(zf: zipfile.ZipFile, name: str, arr: np.ndarray) -> None:
    with zf.open(name + ".npy", "w", force_zip64=True) as f:
        np.lib.format.write_array(f, np.asarray(arr, order="C"), allow_pickle=False)


def _write_rows(zf: zipfile.ZipFile, name: str, shape, dtype, blocks) -> None:
    """An .npy member of `shape` written from consecutive row blocks, never whole in memory."""
    dtype = np.dtype(dtype)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
              "shape": tuple(int(d) for d in shape)}  # fmt: skip
    written = 0
    with zf.open(name + ".npy", "w", force_zip64=True) as f:
        np.lib.format.write_array_header_2_0(f, header)
        for block in blocks:
            block = np.ascontiguousarray(block, dtype=dtype)
            f.write(block.tobytes())
            written += block.shape[0]
    if written != shape[0]:
        raise StoreError(f"{name}: wrote {written} of {shape[0]} rows")


def merge(
    paths: list[str | Path],
    out: str | Path,
    *,
    step_selection: str = "linspace",
    force: bool = False,
    on_trajectory=None,
) -> MergeSummary:
    """Merge the stores at `paths` into `out` (.npz). See the module docstring."""
    from calibjob.outputs import NPZ_FORMATS, check_output, remove_stale_partials, write_failed

    out = Path(out)
    check_output(out, force, NPZ_FORMATS)
    remove_stale_partials(out)
    seen: dict[str, str] = {}
    for p in paths:
        key = str(Path(p).resolve()) if not is_url(str(p)) else str(p)
        if key in seen:
            raise ConfigError(f"the same store was given twice: {seen[key]} and {p}")
        seen[key] = str(p)
    stores = [open_run_store(p) for p in paths]
    check_same_job(stores)
    cfg = stores[0].config
    if not all(s.prepared for s in stores):
        raise ConfigError("a store has no prompt conditioning yet (its run never started)")
    owner = coverage(stores)

    n, s_steps, k_sel = cfg.num_fid_samples, cfg.num_sampling_steps, cfg.num_selected_steps
    sel = select_steps(s_steps, k_sel, step_selection)
    k_sel = len(sel)
    h, w = cfg.latent_size
    c = LATENT_CHANNELS
    selected = np.empty((n, k_sel, h, w, c), dtype=np.float32)
    for k in range(n):
        try:
            selected[k] = stores[owner[k]].read_row("xs", k)[sel]
        except StoreDamaged as e:
            raise StoreError(
                f"trajectory {k}: {e.location.rstrip('/')}/{e.key} is damaged ({e.why}); "
                f"`calibjob resume {e.location}` recomputes its unit"
            ) from None
        if on_trajectory is not None:
            on_trajectory()

    m = n * k_sel
    traj_idx, sel_idx = point_order(n, k_sel, cfg.seed)
    step_idx = sel[sel_idx].astype(np.int64)
    sigmas, ts_all = stores[0].read_prepared("sigmas"), stores[0].read_prepared("ts")

    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            _write_rows(
                zf, "xs", (m, h, w, c), np.float32,
                (selected[traj_idx[i : i + ROWS_PER_WRITE], sel_idx[i : i + ROWS_PER_WRITE]]
                 for i in range(0, m, ROWS_PER_WRITE)),
            )  # fmt: skip
            _write_npy(zf, "ts", ts_all[step_idx])
            _write_npy(zf, "prompt_indices", (traj_idx % len(cfg.prompts)).astype(np.int32))
            for name in ("cs", "cs_pooled"):
                arr = stores[0].node(name)  # chunked one prompt per chunk: read one at a time
                _write_rows(zf, name, arr.shape, arr.dtype, stores[0].prepared_rows(name))
            _write_npy(zf, "prompts", np.array(cfg.prompts, dtype=str))
            _write_npy(zf, "cfg_scale", np.array(cfg.cfg_scale, dtype=np.float32))
            _write_npy(zf, "guidance", np.array(cfg.model.guidance))
            _write_npy(zf, "guidance_scale", np.array(cfg.guidance_scale or 0.0, np.float32))
            _write_npy(zf, "trajectory_indices", traj_idx)
            _write_npy(zf, "step_indices", step_idx)
            _write_npy(zf, "sigmas", sigmas)
            # which model made the set, for `calibjob profile` (unicode / float: no pickle)
            _write_npy(zf, "model_version", np.array(cfg.model_version))
            _write_npy(zf, "shift", np.array(cfg.shift))
            _write_npy(zf, "dtype", np.array(cfg.dtype))
        fsync_path(tmp)
        if force:
            os.replace(tmp, out)
        else:
            try:  # create `out` only if absent: two merges never silently replace each other
                os.link(tmp, out)
            except FileExistsError:
                raise ConfigError(f"{out} exists; pass --force to replace it") from None
            tmp.unlink()
    except OSError as e:  # a full disk: named by the output, not the temporary file
        tmp.unlink(missing_ok=True)
        raise write_failed(out, e) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return MergeSummary(out, m, n, sel.tolist(), out.stat().st_size)


__all__ = ["merge", "coverage", "MergeSummary"]
