"""The job's Zarr store: the only thing workers share.

Layout (Zarr v3, one store per job):

    job/      attrs["calibjob"]: config, fingerprint, package versions (a leaf group)
    encoded/  a leaf group, created once cs, cs_pooled, sigmas and ts are durable
    cs        (P, 2, L, D)       text conditioning, [prompt, empty negative], written once
    cs_pooled (P, 2, Dp)
    sigmas    (S+1,)  float32    the Euler schedule (last is 0)
    ts        (S,)               model timesteps, in the dtype the model saw
    xs        (N, S, H, W, C)    float32, one chunk per trajectory, crc32c-checked
    done      (N,)    uint8      1 once trajectory k's chunk is durable (written after it)
    progress/<i>-of-<n>          attrs: one shard's throughput, for `status`

Metadata lives only in leaf groups: Zarr rewrites a parent group's zarr.json, briefly with
empty attributes, whenever it creates a child, so a concurrent reader of the root's attributes
could find no config.

Crash safety: Zarr's LocalStore writes each chunk to a temporary file and renames it, so a chunk
is whole or absent; we fsync the chunk files before writing their done markers, so a marker
never points at data a power cut could lose. A corrupt chunk fails its crc32c on read.

A store's location is a folder or a URL (s3://bucket/prefix/job.zarr, ...). Object stores
need no fsync (a PUT is whole or absent, and durable once it returns) and take their lock from
conditional writes: calibjob/remote.py. Everything else here is the same for both.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from filelock import FileLock
from zarr.codecs import BytesCodec, Crc32cCodec
from zarr.core.sync import sync

from calibjob import remote
from calibjob.config import JobConfig, differing_fields, fingerprint
from calibjob.errors import ConfigError, StoreError

FORMAT = "calibjob-store/1"
LOCK_NAME = ".calibjob.lock"
JOB_KEY = "job/zarr.json"  # the job record; its presence makes a folder or prefix a store


def package_versions() -> dict[str, str]:
    out = {}
    for name in ("calibjob", "mlx", "diffusionkit", "zarr", "numpy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Store:
    """An opened job store: its location (a folder or a URL), root group and job config."""

    location: str
    root: zarr.Group
    config: JobConfig

    @property
    def is_local(self) -> bool:
        return not remote.is_url(self.location)

    @property
    def path(self) -> Path | str:
        """The folder (a Path) for a local store, the URL (a str) for a remote one."""
        return Path(self.location) if self.is_local else self.location

    # ---- opening -------------------------------------------------------------------------

    @staticmethod
    def _check_path(location: str) -> None:
        p = Path(location)
        if not remote.is_url(location) and p.exists() and not p.is_dir():
            raise StoreError(f"store path {p} is a regular file, not a store folder")

    @staticmethod
    def _target(location: str, mode: str) -> Any:
        """What zarr.open_group takes: the folder, or a Zarr store object for a URL."""
        if remote.is_url(location):
            return remote.zarr_store(location, read_only=mode == "r")
        return location

    @classmethod
    def exists(cls, path: str | Path) -> bool:
        """Whether a calibjob store (its job record) is at `path`."""
        loc = remote.normalize(path)
        if not remote.is_url(loc):
            return (Path(loc) / JOB_KEY).is_file()
        try:
            return bool(sync(cls._target(loc, "r").exists(JOB_KEY)))
        except StoreError:
            raise
        except Exception as e:  # noqa: BLE001  (no bucket, no credentials, no network...)
            raise StoreError(f"cannot read {loc}: {type(e).__name__}: {e}") from None

    @classmethod
    def open(cls, path: str | Path, mode: str = "r+") -> Store:
        """Open an existing store (its config comes from the store itself)."""
        loc = remote.normalize(path)
        cls._check_path(loc)
        if not cls.exists(loc):
            raise StoreError(f"no calibjob store at {loc}")
        try:
            root = zarr.open_group(cls._target(loc, mode), mode=mode)
            meta = root["job"].attrs["calibjob"]
        except (KeyError, ValueError, json.JSONDecodeError) as e:
            raise StoreError(f"{loc} is not a calibjob store ({type(e).__name__})") from None
        if meta.get("format") != FORMAT:
            raise StoreError(f"{loc} has store format {meta.get('format')!r}, expected {FORMAT}")
        return cls(loc, root, JobConfig.from_dict(meta["config"]))

    @classmethod
    def create_or_open(cls, path: str | Path, config: JobConfig) -> Store:
        """Create the store for `config`, or open it if it holds the same job.

        Under the store's lock, so shards started at the same moment agree on one creator.
        A store of a different job is refused, naming the fields that differ.
        """
        loc = remote.normalize(path)
        cls._check_path(loc)
        if not remote.is_url(loc):
            try:
                Path(loc).mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StoreError(f"cannot create store folder {loc}: {e.strerror}") from None
        with cls.lock(loc):
            if cls.exists(loc):
                store = cls.open(loc)
                diff = differing_fields(store.config, config)
                if diff:
                    details = ", ".join(
                        f"{k}: store has {_short(store.config.to_dict()[k])}, "
                        f"asked {_short(config.to_dict()[k])}"
                        for k in diff
                    )
                    raise StoreError(f"{loc} holds a different job ({details})")
                _ensure_arrays(store.root, store.config)  # a creation killed half-way
                return store
            return cls._create(loc, config)

    @classmethod
    def _create(cls, loc: str, config: JobConfig) -> Store:
        """The job record (a leaf group whose attrs are written in one write), then the arrays.
        A reader never sees a job without its config; a creation killed before the arrays is
        finished by the next create_or_open."""
        meta = {
            "format": FORMAT,
            "config": config.to_dict(),
            "fingerprint": fingerprint(config),
            "versions": package_versions(),
            "created": time.time(),
        }
        # mode "a", not "w": "w" empties the folder or prefix first, lock and logs included
        root = zarr.open_group(cls._target(loc, "a"), mode="a")
        root.create_group("job", attributes={"calibjob": meta}, overwrite=True)
        _ensure_arrays(root, config)
        return cls(loc, root, config)

    @staticmethod
    @contextlib.contextmanager
    def lock(path: str | Path) -> Iterator[None]:
        """The store's inter-process lock: an OS file lock in the folder, or a lock object
        next to a remote store's objects (remote.ObjectLock)."""
        loc = remote.normalize(path)
        if remote.is_url(loc):
            with remote.ObjectLock(loc, LOCK_NAME):
                yield
        else:
            with FileLock(str(Path(loc) / LOCK_NAME)):
                yield

    # ---- metadata ------------------------------------------------------------------------

    @property
    def meta(self) -> dict:
        return self.root["job"].attrs["calibjob"]

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    @property
    def encoded(self) -> bool:
        return "encoded" in self.root

    def reload(self) -> Store:
        return Store.open(self.location)

    # ---- conditioning (written once) -----------------------------------------------------

    def write_conditioning(
        self, cs: np.ndarray, cs_pooled: np.ndarray, sigmas: np.ndarray, ts: np.ndarray
    ) -> None:
        """Write cs, cs_pooled, sigmas, ts, make them durable, then flag the store encoded."""
        for name, arr in (("cs", cs), ("cs_pooled", cs_pooled), ("sigmas", sigmas), ("ts", ts)):
            a = self.root.create_array(
                name,
                shape=arr.shape,
                chunks=(1, *arr.shape[1:]) if name.startswith("cs") else arr.shape,
                dtype=arr.dtype,
                compressors=[Crc32cCodec()],
                overwrite=True,
            )
            a[...] = arr
            self._fsync_tree(name)
        self.root.create_group("encoded", overwrite=True)

    def conditioning(self) -> tuple[np.ndarray, np.ndarray]:
        return self.root["cs"][...], self.root["cs_pooled"][...]

    def schedule(self) -> tuple[np.ndarray, np.ndarray]:
        return self.root["sigmas"][...], self.root["ts"][...]

    # ---- trajectories --------------------------------------------------------------------

    def done_mask(self) -> np.ndarray:
        return self.root["done"][...].astype(bool)

    def write_trajectories(self, trajectories: tuple[int, ...] | list[int], xs: np.ndarray) -> None:
        """Write one unit: its chunks, fsync them, then their done markers (in that order)."""
        arr = self.root["xs"]
        for k, x in zip(trajectories, xs, strict=True):
            self._remove_partials(k)
            arr[k] = x
        for k in trajectories:
            self._fsync_tree(f"xs/c/{k}")
        done = self.root["done"]
        for k in trajectories:
            done[k] = 1
        for k in trajectories:
            self._fsync_tree(f"done/c/{k}", recurse=False)

    def read_trajectory(self, k: int) -> np.ndarray:
        """(S, H, W, C) float32; raises if the chunk is missing or fails its checksum."""
        if not sync(self.root.store.exists(_chunk_key(k))):
            raise StoreError(f"trajectory {k} is marked done but its chunk is missing")
        return self.root["xs"][k]

    def verify_done(self, trajectories: list[int]) -> list[int]:
        """Re-read done trajectories; clear and return those whose chunk is missing or corrupt."""
        bad = []
        mask = self.done_mask()
        for k in trajectories:
            if not mask[k]:
                continue
            try:
                x = self.read_trajectory(k)
                if not np.isfinite(x).all():
                    raise StoreError(f"trajectory {k} holds NaN or Inf")
            except Exception:
                bad.append(k)
        if bad:
            done = self.root["done"]
            for k in bad:
                done[k] = 0
        return bad

    def _remove_partials(self, k: int) -> None:
        """Temporary files a killed writer left for trajectory k (only its shard writes there).
        Local only: an object store has no half-written objects."""
        if not self.is_local:
            return
        d = (Path(self.location) / _chunk_key(k)).parent
        if d.is_dir():
            for f in d.glob("*.partial"):
                f.unlink(missing_ok=True)

    def _fsync_tree(self, key: str, recurse: bool = True) -> None:
        """fsync the files and folders under `key` (local stores; a PUT is already durable)."""
        if not self.is_local:
            return
        d = Path(self.location) / key
        if not d.exists():
            return
        if d.is_file():
            _fsync_path(d)
            return
        for f in d.rglob("*") if recurse else d.iterdir():
            if f.is_file():
                _fsync_path(f)
        for sub in [d, *(x for x in d.rglob("*") if x.is_dir())] if recurse else [d]:
            _fsync_path(sub)

    # ---- progress (one small group per shard) ---------------------------------------------

    def record_progress(self, shard: str, info: dict) -> None:
        name = shard.replace("/", "-of-")
        grp = self.root.require_group(f"progress/{name}")
        grp.attrs.update({**info, "shard": shard, "updated": time.time()})

    def progress(self) -> dict[str, dict]:
        out = {}
        if "progress" not in self.root:
            return out
        for name, grp in self.root["progress"].groups():
            out[grp.attrs.get("shard", name)] = dict(grp.attrs)
        return out


def _ensure_arrays(root: zarr.Group, config: JobConfig) -> None:
    """Create the trajectory arrays and the progress group where they are missing."""
    n, s = config.num_fid_samples, config.num_sampling_steps
    h, w = config.latent_size
    if "xs" not in root:
        root.create_array(
            "xs",
            shape=(n, s, h, w, 16),
            chunks=(1, s, h, w, 16),
            dtype="float32",
            serializer=BytesCodec(),
            compressors=[Crc32cCodec()],
            fill_value=0.0,
        )
    if "done" not in root:
        root.create_array(
            "done", shape=(n,), chunks=(1,), dtype="uint8", compressors=[Crc32cCodec()],
            fill_value=0,
        )
    if "progress" not in root:
        root.create_group("progress")


def _chunk_key(k: int) -> str:
    """Trajectory k's one chunk of xs (Zarr v3 default chunk keys, '/' separated)."""
    return f"xs/c/{k}/0/0/0/0"


def _short(v) -> str:
    s = json.dumps(v)
    return s if len(s) <= 40 else s[:37] + "..."


def check_same_job(stores: list[Store]) -> None:
    """Refuse a set of stores that are not the same job."""
    first = stores[0]
    for s in stores[1:]:
        if s.fingerprint != first.fingerprint:
            diff = differing_fields(first.config, s.config)
            raise ConfigError(
                f"{s.path} is a different job from {first.path} (differs in: {', '.join(diff)})"
            )
