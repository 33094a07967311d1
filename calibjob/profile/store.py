"""The profile job's Zarr store: one partial-statistics record per work unit, crash-safe.

Layout (Zarr v3, a local folder):

    job/     attrs["calibjob-profile"]: format, job config, fingerprint, versions, the taps
             [[layer, input, channels], ...], the timesteps and each unit's timestep (a leaf
             group written in one write, like the run store's)
    sum      (U, C)         float64   per-channel sums of every tap, taps side by side
    sumsq    (U, C)         float64
    min      (U, C)         float32
    max      (U, C)         float32
    hist     (U, taps, B+3) int64     [below, B bins, above, NaN] per tap
    rows     (U, taps)      int64     rows (tokens x CFG rows) each tap saw
    done     (U,)           uint8     1 once unit u's chunks are durable (written after them)
    progress/<i>-of-<n>     attrs: one shard's rate

Every array is chunked one unit per chunk and crc32c-checked. A unit's chunks are written
(Zarr's LocalStore writes a temporary file and renames it), fsynced, and only then its done
marker, so a killed worker loses at most the unit it was computing. The folder lock and the
fsync helper are the run store's (calibjob.store).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec

from calibjob.config import describe_differences
from calibjob.errors import StoreError
from calibjob.profile.plan import ProfileJob, differing_fields, fingerprint
from calibjob.store import JOB_KEY, Store, _fsync_path, package_versions

FORMAT = "calibjob-profile/1"
ATTR = "calibjob-profile"
ARRAYS = ("sum", "sumsq", "min", "max", "hist", "rows")


@dataclass(frozen=True)
class UnitStats:
    """One unit's partial statistics, every tap side by side (see the module docstring)."""

    sum: np.ndarray  # (C,) float64
    sumsq: np.ndarray  # (C,) float64
    min: np.ndarray  # (C,) float32
    max: np.ndarray  # (C,) float32
    hist: np.ndarray  # (taps, B+3) int64
    rows: np.ndarray  # (taps,) int64


@dataclass
class ProfileStore:
    path: Path
    root: zarr.Group
    job: ProfileJob
    meta: dict

    # ---- opening -------------------------------------------------------------------------

    @staticmethod
    def exists(path: str | Path) -> bool:
        return (Path(path) / JOB_KEY).is_file()

    @classmethod
    def open(cls, path: str | Path, mode: str = "r+") -> ProfileStore:
        p = Path(path)
        if p.exists() and not p.is_dir():
            raise StoreError(f"{p} is a file, not a profile store folder")
        if not cls.exists(p):
            raise StoreError(f"no profile store at {p}")
        try:
            root = zarr.open_group(str(p), mode=mode)
            attrs = dict(root["job"].attrs)
        except (KeyError, ValueError, json.JSONDecodeError) as e:
            raise StoreError(f"{p} is not a profile store ({type(e).__name__})") from None
        if ATTR not in attrs:
            if "calibjob" in attrs:
                raise StoreError(
                    f"{p} is a calibration-data store of `calibjob run`, not a profile store"
                )
            raise StoreError(f"{p} is not a profile store")
        meta = attrs[ATTR]
        if meta.get("format") != FORMAT:
            raise StoreError(f"{p} has profile format {meta.get('format')!r}, expected {FORMAT}")
        return cls(p, root, ProfileJob.from_dict(meta["config"]), meta)

    @classmethod
    def create_or_open(
        cls, path: str | Path, job: ProfileJob, taps: list[list], timesteps: np.ndarray,
        unit_timesteps: list[int],
    ) -> ProfileStore:
        """Create the store of `job`, or open it if it holds the same job (under the lock).
        A store of another job is refused, naming what differs."""
        p = Path(path)
        if p.exists() and not p.is_dir():
            raise StoreError(f"{p} is a file, not a profile store folder")
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create store folder {p}: {e.strerror}") from None
        with Store.lock(p):
            if cls.exists(p):
                store = cls.open(p)
                diff = differing_fields(store.job, job)
                if diff:
                    details = describe_differences(diff, store.job.to_dict(), job.to_dict())
                    raise StoreError(f"{p} holds another profile job ({details})")
                if store.meta["taps"] != taps:
                    raise StoreError(
                        f"{p} was profiled with another model structure (its layers differ)"
                    )
                store._ensure_arrays()  # a creation killed half-way
                return store
            meta = {
                "format": FORMAT,
                "config": job.to_dict(),
                "fingerprint": fingerprint(job),
                "versions": package_versions(),
                "created": time.time(),
                "taps": taps,
                "timesteps": [float(t) for t in timesteps],
                "unit_timesteps": [int(t) for t in unit_timesteps],
            }
            # mode "a", not "w": "w" would empty the folder, lock included
            root = zarr.open_group(str(p), mode="a")
            root.create_group("job", attributes={ATTR: meta}, overwrite=True)
            store = cls(p, root, job, meta)
            store._ensure_arrays()
            return store

    def _ensure_arrays(self) -> None:
        u = len(self.meta["unit_timesteps"])
        taps = self.meta["taps"]
        c = sum(int(t[2]) for t in taps)
        slots = self.job.hist_bins + 3
        specs = {
            "sum": ((u, c), "float64"),
            "sumsq": ((u, c), "float64"),
            "min": ((u, c), "float32"),
            "max": ((u, c), "float32"),
            "hist": ((u, len(taps), slots), "int64"),
            "rows": ((u, len(taps)), "int64"),
        }
        for name, (shape, dtype) in specs.items():
            if name not in self.root:
                self.root.create_array(
                    name, shape=shape, chunks=(1, *shape[1:]), dtype=dtype,
                    serializer=BytesCodec(), compressors=[Crc32cCodec()], fill_value=0,
                )
        if "done" not in self.root:
            self.root.create_array(
                "done", shape=(u,), chunks=(1,), dtype="uint8", compressors=[Crc32cCodec()],
                fill_value=0,
            )
        if "progress" not in self.root:
            self.root.create_group("progress")

    # ---- metadata ------------------------------------------------------------------------

    @property
    def num_units(self) -> int:
        return len(self.meta["unit_timesteps"])

    @property
    def timesteps(self) -> np.ndarray:
        return np.array(self.meta["timesteps"], dtype=np.float64)

    @property
    def unit_timesteps(self) -> np.ndarray:
        return np.array(self.meta["unit_timesteps"], dtype=np.int64)

    @property
    def taps(self) -> list[tuple[str, str, int]]:
        return [(str(a), str(b), int(c)) for a, b, c in self.meta["taps"]]

    # ---- units ---------------------------------------------------------------------------

    def done_mask(self) -> np.ndarray:
        return self.root["done"][...].astype(bool)

    def write_unit(self, u: int, stats: UnitStats) -> None:
        """Unit u's chunks, fsynced, then its done marker (fsynced too)."""
        for name in ARRAYS:
            self._remove_partials(name, u)
            self.root[name][u] = getattr(stats, name)
        for name in ARRAYS:
            self._fsync_tree(f"{name}/c/{u}")
        self.root["done"][u] = 1
        self._fsync_tree(f"done/c/{u}")

    def read_unit(self, u: int) -> UnitStats:
        """Unit u's statistics; raises (crc32c) if a chunk is damaged."""
        return UnitStats(**{name: self.root[name][u] for name in ARRAYS})

    def verify_done(self, units: list[int]) -> list[int]:
        """Re-read done units; clear and return those whose chunks are missing or corrupt."""
        bad = []
        mask = self.done_mask()
        for u in units:
            if not mask[u]:
                continue
            try:
                for name in ARRAYS:
                    if not (self.path / name / "c" / str(u)).exists():
                        raise StoreError(f"unit {u}: {name} missing")
                st = self.read_unit(u)
                if int(st.rows.min()) <= 0:
                    raise StoreError(f"unit {u} is empty")
            except Exception:  # noqa: BLE001  (any damage: recompute the unit)
                bad.append(u)
        for u in bad:
            self.root["done"][u] = 0
        return bad

    def _remove_partials(self, name: str, u: int) -> None:
        """Temporary files a killed writer left for unit u (only its shard writes there)."""
        d = self.path / name / "c"
        if d.is_dir():
            for f in d.glob(f"{u}.*.partial"):
                f.unlink(missing_ok=True)
            sub = d / str(u)
            if sub.is_dir():
                for f in sub.rglob("*.partial"):
                    f.unlink(missing_ok=True)

    def _fsync_tree(self, key: str) -> None:
        d = self.path / key
        if not d.exists():
            return
        if d.is_file():
            _fsync_path(d)
            _fsync_path(d.parent)
            return
        for f in d.rglob("*"):
            if f.is_file():
                _fsync_path(f)
        for sub in [d, *(x for x in d.rglob("*") if x.is_dir())]:
            _fsync_path(sub)
        _fsync_path(d.parent)

    # ---- progress ------------------------------------------------------------------------

    def record_progress(self, shard: str, info: dict) -> None:
        grp = self.root.require_group(f"progress/{shard.replace('/', '-of-')}")
        grp.attrs.update({**info, "shard": shard, "updated": time.time()})
