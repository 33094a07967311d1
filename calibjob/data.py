"""Reading a calibration `.npz` without loading it: the loader phase 2 (profiling) needs.

`open_npz` maps each large member of the file straight from disk (merge writes the zip
uncompressed), so the paper's 420 MB `xs` and 390 MB `cs` cost no memory until indexed, and no
member is ever unpickled (`allow_pickle` stays off).

`CalibrationSet` serves batches shaped for one call of DiffusionKit's MMDiT, exactly as the
engine called it while sampling: B points become a CFG batch of 2B rows ordered
[pos_1..pos_B, neg_1..neg_B], with x doubled and the timestep repeated. DiffusionKit's MMDiT
reads its adaLN modulation from a cache keyed by ONE timestep per call (`timestep[0]`), so a
batch of more than one point only holds points of one selected step; `run_mmdit` fills that
cache for the batch, calls the network and puts the adaLN weights back.
"""

from __future__ import annotations

import struct
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calibjob.errors import ConfigError

MMAP_MIN_BYTES = 1 << 20  # smaller members are simply read; a mapping is not worth a handle
_LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # a zip local file header, 30 bytes


def _member_offset(f, info: zipfile.ZipInfo) -> int:
    """Where a stored member's bytes start: after its local header, name and extra field."""
    f.seek(info.header_offset)
    raw = f.read(_LOCAL_HEADER.size)
    fields = _LOCAL_HEADER.unpack(raw)
    if fields[0] != b"PK\x03\x04":
        raise ValueError(f"bad local header for {info.filename}")
    return info.header_offset + _LOCAL_HEADER.size + fields[-2] + fields[-1]


def _npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f"unsupported .npy version {version}")


def open_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Every array of an `.npz`, large stored members as read-only memory maps.

    Compressed members (e.g. from `np.savez_compressed`) cannot be mapped and are read whole.
    Raises ConfigError for a missing file, a file that is not an npz, or a pickled member.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"no such file: {p}")
    try:
        zf = zipfile.ZipFile(p)
    except (zipfile.BadZipFile, OSError) as e:
        raise ConfigError(f"{p} is not an .npz file ({e})") from None
    arrays: dict[str, np.ndarray] = {}
    with zf, open(p, "rb") as f:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            name = info.filename[: -len(".npy")]
            try:
                arrays[name] = _read_member(p, f, zf, info)
            except ConfigError:
                raise
            except Exception as e:  # noqa: BLE001  (any damage: one line naming the member)
                raise ConfigError(f"{p}: member {name} is unreadable ({e})") from None
    return arrays


def _read_member(p: Path, f, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    if info.compress_type == zipfile.ZIP_STORED:
        f.seek(_member_offset(f, info))
        shape, fortran, dtype = _npy_header(f)
        if dtype.hasobject:
            raise ConfigError(
                f"{p}: {info.filename} is a pickled object array; calibjob reads npz files "
                f"without allow_pickle (store strings as a unicode array)"
            )
        count = int(np.prod(shape, dtype=np.int64))
        if count * dtype.itemsize >= MMAP_MIN_BYTES:
            order = "F" if fortran else "C"
            return np.memmap(p, dtype=dtype, mode="r", offset=f.tell(), shape=shape, order=order)
    with zf.open(info) as m:
        try:
            return np.lib.format.read_array(m, allow_pickle=False)
        except ValueError as e:
            if "allow_pickle" in str(e):
                raise ConfigError(
                    f"{p}: {info.filename} is a pickled object array; calibjob reads npz files "
                    f"without allow_pickle (store strings as a unicode array)"
                ) from None
            raise


REQUIRED = ("xs", "ts", "prompt_indices", "cs", "cs_pooled")


@dataclass
class CalibSet:
    """The arrays of a calibration file that profiling reads (large ones memory-mapped)."""

    path: Path
    xs: np.ndarray
    ts: np.ndarray
    prompt_indices: np.ndarray
    cs: np.ndarray
    cs_pooled: np.ndarray
    model_version: str | None
    dtype: str | None
    prompts: list[str]
    cfg_scale: float | None
    guidance: str = "cfg"  # files made before FLUX.1 came are all CFG (SD3)
    guidance_scale: float | None = None  # the embedded guidance scale (FLUX.1-dev)

    @property
    def branches(self) -> int:
        """Rows of conditioning per prompt: 2 under CFG, else 1."""
        return int(self.cs.shape[1])


def read_set(path: str | Path) -> CalibSet:
    """A calibration `.npz` (merge's output); one line for anything else."""
    p = Path(path)
    try:
        arrays = open_npz(p)
    except ConfigError as e:
        raise ConfigError(f"{p} is not a calibration file ({e})") from None
    missing = [k for k in REQUIRED if k not in arrays]
    if missing:
        raise ConfigError(
            f"{p} is not a calibration file (no {', '.join(missing)}; make one with "
            f"`calibjob merge`)"
        )
    xs, ts = arrays["xs"], np.asarray(arrays["ts"])
    pi = np.asarray(arrays["prompt_indices"])
    cs, pooled = arrays["cs"], arrays["cs_pooled"]
    n = len(ts)
    if (
        xs.ndim != 4 or xs.shape[0] != n or pi.shape != (n,) or cs.ndim != 4
        or cs.shape[1] not in (1, 2) or pooled.ndim != 3 or pooled.shape[:2] != cs.shape[:2]
        or n == 0
    ):
        raise ConfigError(f"{p} is not a calibration file (its arrays' shapes do not fit)")
    if pi.min() < 0 or pi.max() >= cs.shape[0]:
        raise ConfigError(f"{p} is not a calibration file (prompt indices out of range)")
    mv = str(arrays["model_version"]) if "model_version" in arrays else None
    dt = str(arrays["dtype"]) if "dtype" in arrays else None
    prompts = [str(s) for s in arrays["prompts"]] if "prompts" in arrays else []
    cfg_scale = float(arrays["cfg_scale"]) if "cfg_scale" in arrays else None
    guidance = str(arrays["guidance"]) if "guidance" in arrays else "cfg"
    g = float(arrays["guidance_scale"]) if "guidance_scale" in arrays else None
    if (guidance == "cfg") != (cs.shape[1] == 2):
        raise ConfigError(
            f"{p} is not a calibration file (guidance {guidance} with {cs.shape[1]} "
            f"conditioning branch(es))"
        )
    return CalibSet(p, xs, ts, pi, cs, pooled, mv, dt, prompts, cfg_scale, guidance, g)


Batch = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


class CalibrationSet:
    """Batches of a calibration `.npz`, ready for DiffusionKit's MMDiT.

    `cal[i]` is batch i: `(xs, ts, cs, cs_pooled)` for B points as the engine fed MMDiT while
    sampling: under CFG (SD3) a batch of 2B rows `[pos_1..pos_B, neg_1..neg_B]`, without it
    (FLUX.1) B rows (R below):

        xs        (R, H, W, 16)  float32  the points' x_t (twice under CFG)
        ts        (R,)           the file's ts dtype (the model's)
        cs        (R, L, 1, D)   token-level conditioning: the B prompts (then B empty prompts)
        cs_pooled (R, Dp)        pooled conditioning in the same order

    With batch_size=1 (the default) batches follow the file's shuffled order, one point each.
    With batch_size=B > 1 every batch holds points of one selected step only (DiffusionKit's
    MMDiT takes one timestep per call): steps in denoising order, and within a step the
    file's order; a step's last batch may be smaller.
    """

    def __init__(self, path: str | Path, batch_size: int = 1):
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        s = read_set(path)
        self.path = s.path
        self.xs, self.ts, self.prompt_indices = s.xs, s.ts, s.prompt_indices
        self.cs, self.cs_pooled = s.cs, s.cs_pooled
        self.prompts, self.cfg_scale = s.prompts, s.cfg_scale
        self.guidance, self.guidance_scale = s.guidance, s.guidance_scale
        self.batch_size = batch_size
        self._batches = self._plan(batch_size)

    def _plan(self, batch_size: int) -> list[np.ndarray]:
        """Point indices of each batch (see the class docstring for the order)."""
        n = len(self.ts)
        if batch_size == 1:
            return [np.array([i]) for i in range(n)]
        batches = []
        for t in sorted(np.unique(self.ts), reverse=True):
            idx = np.flatnonzero(self.ts == t)
            batches += [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
        return batches

    @property
    def num_points(self) -> int:
        return len(self.ts)

    def __len__(self) -> int:
        """The number of batches."""
        return len(self._batches)

    def indices(self, i: int) -> np.ndarray:
        """The file's point indices in batch i."""
        return self._batches[i]

    def __getitem__(self, i: int) -> Batch:
        if not -len(self) <= i < len(self):
            raise IndexError(f"batch {i} of {len(self)}")
        return self.gather(self._batches[i])

    def __iter__(self) -> Iterator[Batch]:
        for idx in self._batches:
            yield self.gather(idx)

    def gather(self, points: np.ndarray) -> Batch:
        """The CFG batch of any points: only their rows and their prompts' rows are read."""
        points = np.asarray(points, dtype=np.int64)
        return cfg_batch(
            np.asarray(self.xs[points]), self.ts[points], self.cs, self.cs_pooled,
            self.prompt_indices[points],
        )


def cfg_batch(x: np.ndarray, t: np.ndarray, cs, cs_pooled, prompts: np.ndarray) -> Batch:
    """B points -> the batch of B x branches rows the engine feeds MMDiT: under CFG
    [pos_1..pos_B, neg_1..neg_B], x twice, t twice, each point's prompt then the empty prompt;
    with one branch (FLUX.1) the B rows as they are.

    `cs` (P, branches, L, D) and `cs_pooled` (P, branches, Dp) may be memory maps: rows are
    copied straight into the batch, once (for SD3 a row of cs is 9.6 MB, so copies are what a
    batch costs)."""
    prompts = np.asarray(prompts)
    b, nb = len(prompts), cs.shape[1]
    cond = np.empty((nb * b, cs.shape[2], 1, cs.shape[3]), dtype=cs.dtype)
    pooled = np.empty((nb * b, cs_pooled.shape[2]), dtype=cs_pooled.dtype)
    for i, p in enumerate(prompts.tolist()):
        for half in range(nb):  # under CFG 0: the prompt, 1: the empty negative prompt
            cond[half * b + i, :, 0] = cs[p, half]
            pooled[half * b + i] = cs_pooled[p, half]
    return np.concatenate([x] * nb), np.concatenate([t] * nb), cond, pooled


def run_mmdit(mmdit, batch: Batch, dtype=None):
    """MMDiT's output (R, H, W, 16) for a batch of `CalibrationSet`, as the engine computes it.

    Caches the modulation parameters for the batch's pooled conditioning and its one timestep
    (DiffusionKit's way: the cache empties the adaLN weights), calls the network, then clears
    the cache and puts the weights back, so the model can take the next batch. `dtype` is the
    activation dtype (default: the dtype of the MMDiT's weights).
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten

    x, t, cs, pooled = batch
    if getattr(mmdit.config, "guidance_embed", False):
        raise ConfigError(
            "run_mmdit takes models without a guidance embedding (DiffusionKit's forward would "
            "embed the timestep as the guidance); for FLUX.1-dev use calibjob.models.pieces"
        )
    if len(np.unique(t)) != 1:
        raise ConfigError("a batch for DiffusionKit's MMDiT must hold one timestep")
    if dtype is None:
        dtype = mmdit.x_embedder.proj.weight.dtype
    # only the adaLN weights (the cache empties them): restoring every parameter would also
    # restore the RoPE module's cached tables, stale under another resolution
    kept = [(k, v) for k, v in tree_flatten(mmdit.parameters()) if "adaLN" in k]
    timestep = mx.array(t)
    mmdit.cache_modulation_params(mx.array(pooled).astype(dtype), timestep[:1])
    try:
        out = mmdit(
            latent_image_embeddings=mx.array(x).astype(dtype),
            token_level_text_embeddings=mx.array(cs).astype(dtype),
            timestep=timestep,
        )
        mx.eval(out)
    finally:
        mmdit.clear_modulation_params_cache()
        mmdit.load_weights(kept, strict=False)
        if hasattr(mmdit, "to_offload"):
            del mmdit.to_offload
    return out


__all__ = ["CalibrationSet", "cfg_batch", "open_npz", "run_mmdit"]
