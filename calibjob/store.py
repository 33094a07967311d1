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
import errno
import json
import os
import threading
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
from calibjob.config import JobConfig, describe_differences, differing_fields, fingerprint
from calibjob.errors import ConfigError, StoreDamaged, StoreError

FORMAT = "calibjob-store/1"
LOCK_NAME = ".calibjob.lock"
JOB_KEY = "job/zarr.json"  # the job record; its presence makes a folder or prefix a store
# what a store folder may hold before its job record exists (a creation killed half-way,
# launch's logs, the lock)
STORE_ENTRIES = {
    LOCK_NAME, "logs", "zarr.json", "job", "xs", "done", "progress", "encoded", "claims",
    "cs", "cs_pooled", "sigmas", "ts",
}  # fmt: skip


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
    def _check_folder(location: str) -> None:
        """A store folder must be absent, empty or a calibjob store (or one whose creation was
        killed): never a folder of the user's own, which a store would be written into."""
        p = Path(location)
        if not p.is_dir() or (p / JOB_KEY).is_file():
            return
        foreign = sorted(set(os.listdir(p)) - STORE_ENTRIES)
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise StoreError(
                f"{location} is a folder holding other files ({shown}); a store path must be "
                f"absent, empty or a calibjob store: choose another --store"
            )

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
        except (KeyError, ValueError) as e:  # the root's zarr.json does not parse
            if mode == "r":
                raise StoreDamaged(loc, "zarr.json", type(e).__name__) from None
            _rewrite_meta(loc, "", _group_doc())
            root = zarr.open_group(cls._target(loc, mode), mode=mode)
        try:
            meta = root["job"].attrs["calibjob"]
        except (KeyError, ValueError) as e:
            raise StoreError(
                f"{loc}/{JOB_KEY} (the job record) is damaged ({type(e).__name__}); the job's "
                f"config is lost with it: start the job again in a new store"
            ) from None
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
            cls._check_folder(loc)
            try:
                Path(loc).mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StoreError(f"cannot create store folder {loc}: {e.strerror}") from None
        with cls.lock(loc):
            if cls.exists(loc):
                store = cls.open(loc)
                diff = differing_fields(store.config, config)
                if diff:
                    details = describe_differences(
                        diff, store.config.to_dict(), config.to_dict()
                    )
                    raise StoreError(
                        f"{loc} holds a different job ({details}); to continue that job run "
                        f"`calibjob resume {loc}`, or give this one another --store"
                    )
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

    def node(self, name: str) -> Any:
        """The array or group `name`; a zarr.json that does not parse is StoreDamaged, naming it."""
        try:
            return self.root[name]
        except KeyError:
            raise
        except ValueError as e:  # JSONDecodeError and Zarr's metadata errors are ValueErrors
            raise StoreDamaged(self.location, f"{name}/zarr.json", type(e).__name__) from None

    def has(self, name: str) -> bool:
        try:
            return name in self.root
        except ValueError as e:
            raise StoreDamaged(self.location, f"{name}/zarr.json", type(e).__name__) from None

    def _parses(self, name: str) -> bool:
        """False when `name`'s zarr.json is there but does not parse (absent is fine)."""
        try:
            self.has(name)  # Zarr parses a node's metadata to answer `in`
        except StoreDamaged:
            return False
        return True

    @property
    def encoded(self) -> bool:
        return self.has("encoded")

    def reload(self) -> Store:
        return Store.open(self.location)

    # ---- conditioning (written once) -----------------------------------------------------

    def write_conditioning(
        self, cs: np.ndarray, cs_pooled: np.ndarray, sigmas: np.ndarray, ts: np.ndarray
    ) -> None:
        """Write cs, cs_pooled, sigmas, ts, make them durable, then flag the store encoded."""
        try:
            for name, arr in (
                ("cs", cs), ("cs_pooled", cs_pooled), ("sigmas", sigmas), ("ts", ts)
            ):  # fmt: skip
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
        except OSError as e:
            if e.errno in DISK_FULL:
                raise StoreError(
                    f"disk full while writing the prompt conditioning to {self.path} "
                    f"({e.strerror}); nothing is marked encoded: free some space and run "
                    f"`calibjob resume {self.path}`"
                ) from None
            raise

    def conditioning(self) -> tuple[np.ndarray, np.ndarray]:
        return self._read_whole("cs"), self._read_whole("cs_pooled")

    def schedule(self) -> tuple[np.ndarray, np.ndarray]:
        return self._read_whole("sigmas"), self._read_whole("ts")

    def _read_whole(self, name: str) -> np.ndarray:
        """A conditioning array, every chunk checked; damage names the array's folder."""
        arr = self.node(name)
        try:
            return arr[...]
        except Exception as e:  # noqa: BLE001  (a checksum, a truncated or missing chunk)
            raise StoreDamaged(self.location, f"{name}/c", _why(e)) from None

    def prompt_rows(self, name: str) -> Iterator[np.ndarray]:
        """cs or cs_pooled one prompt at a time (each (1, ...)), every chunk checked."""
        arr = self.node(name)
        for p in range(arr.shape[0]):
            try:
                yield arr[p : p + 1]
            except Exception as e:  # noqa: BLE001
                raise StoreDamaged(self.location, f"{name}/c/{p}", _why(e)) from None

    def conditioning_intact(self) -> bool:
        """Whether cs, cs_pooled, sigmas and ts all read back whole."""
        try:
            self.conditioning()
            self.schedule()
        except (StoreDamaged, KeyError):
            return False
        return True

    def clear_encoded(self) -> None:
        """Unflag the conditioning (damaged: the next run re-encodes it). The flag goes first,
        so a kill during the repair leaves a store that re-encodes, never one that trusts it."""
        if self.is_local:
            d = Path(self.location) / "encoded"
            if d.exists():
                (d / "zarr.json").unlink(missing_ok=True)
                d.rmdir()
        else:
            sync(self.root.store.delete("encoded/zarr.json"))

    # ---- trajectories --------------------------------------------------------------------

    def done_mask(self) -> np.ndarray:
        """Which trajectories are done. A store killed before its arrays existed has none done;
        a damaged marker is StoreDamaged (naming the file): `repair_markers` mends it."""
        mask, damaged = self.read_markers()
        if damaged:
            raise StoreDamaged(self.location, f"done/c/{damaged[0]}", "checksum or truncation")
        return mask

    def all_done(self, trajectories) -> bool:
        """Whether every trajectory given is marked done (reads only their markers)."""
        if not self.has("done"):
            return False
        try:
            return bool(self.node("done").get_orthogonal_selection(list(trajectories)).all())
        except StoreDamaged:
            raise
        except Exception:  # noqa: BLE001  (a damaged marker: not done, to be safe)
            return False

    def read_markers(self) -> tuple[np.ndarray, list[int]]:
        """(done mask, trajectories whose marker is unreadable); unreadable ones count as not
        done in the mask."""
        n = self.config.num_fid_samples
        if not self.has("done"):
            return np.zeros(n, bool), []
        arr = self.node("done")
        try:
            return arr[...].astype(bool), []
        except Exception:  # noqa: BLE001  (one bad chunk: find which, one by one)
            pass
        mask, damaged = np.zeros(n, bool), []
        for k in range(n):
            try:
                mask[k] = bool(arr[k])
            except Exception:  # noqa: BLE001
                damaged.append(k)
        return mask, damaged

    def repair_markers(self) -> list[int]:
        """Rewrite unreadable done markers from their chunks: 1 where the chunk verifies, else 0.
        Returns the trajectories whose marker was rewritten."""
        _, damaged = self.read_markers()
        if not damaged:
            return []
        done = self.node("done")
        for k in damaged:
            ok = self.chunk_ok(k)
            self._remove_key(f"done/c/{k}")
            done[k] = 1 if ok else 0
            self._fsync_tree(f"done/c/{k}", recurse=False)
        return damaged

    def chunk_ok(self, k: int) -> bool:
        try:
            return bool(np.isfinite(self.read_trajectory(k)).all())
        except Exception:  # noqa: BLE001
            return False

    def _remove_key(self, key: str) -> None:
        if self.is_local:
            (Path(self.location) / key).unlink(missing_ok=True)
        else:
            sync(self.root.store.delete(key))

    def write_trajectories(self, trajectories: tuple[int, ...] | list[int], xs: np.ndarray) -> None:
        """Write one unit: its chunks, fsync them, then their done markers (in that order)."""
        arr = self.node("xs")
        for k, x in zip(trajectories, xs, strict=True):
            self._remove_stale_partials(k)
            arr[k] = x
        for k in trajectories:
            self._fsync_tree(f"xs/c/{k}")
        done = self.node("done")
        for k in trajectories:
            done[k] = 1
        for k in trajectories:
            self._fsync_tree(f"done/c/{k}", recurse=False)

    def read_trajectory(self, k: int) -> np.ndarray:
        """(S, H, W, C) float32; StoreDamaged (naming the chunk) if missing or corrupt."""
        key = _chunk_key(k)
        if not sync(self.root.store.exists(key)):
            raise StoreDamaged(self.location, key, "missing, though marked done")
        try:
            return self.node("xs")[k]
        except StoreDamaged:
            raise
        except Exception as e:  # noqa: BLE001  (crc32c mismatch, truncated chunk)
            raise StoreDamaged(self.location, key, _why(e)) from None

    def bad_chunk_sizes(self, trajectories) -> list[int]:
        """The cheap check: done trajectories whose chunk is missing or not its recorded size
        (every chunk of xs has one size: the raw latents plus a 4-byte crc32c)."""
        s, (h, w) = self.config.num_sampling_steps, self.config.latent_size
        want = s * h * w * 16 * 4 + 4
        bad = []
        for k in trajectories:
            if self.is_local:
                p = Path(self.location) / _chunk_key(k)
                size = p.stat().st_size if p.is_file() else -1
            else:
                size = _remote_size(self.root.store, _chunk_key(k))
            if size != want:
                bad.append(int(k))
        return bad

    def verify_done(self, trajectories: list[int]) -> list[int]:
        """Re-read done trajectories; clear and return those whose chunk is missing or corrupt."""
        bad = []
        mask = self.done_mask()
        for k in trajectories:
            if mask[k] and not self.chunk_ok(k):
                bad.append(k)
        if bad:
            done = self.node("done")
            for k in bad:
                done[k] = 0
        return bad

    def _remove_stale_partials(self, k: int) -> None:
        """Temporary files a killed writer left for trajectory k. Only stale ones (older than a
        claim's lease): a live writer of the same unit (a claim taken over from a stalled
        worker) may be renaming its own right now. Local only: a PUT leaves no partials."""
        if not self.is_local:
            return
        from calibjob.claims import LEASE_TTL_S

        d = (Path(self.location) / _chunk_key(k)).parent
        if d.is_dir():
            now = time.time()
            for f in d.glob("*.partial"):
                with contextlib.suppress(OSError):
                    if now - f.stat().st_mtime > LEASE_TTL_S:
                        f.unlink()

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

    # ---- repair (run and resume, under the store's lock) ----------------------------------

    def repair_metadata(self) -> list[str]:
        """Rewrite the zarr.json of xs, done and progress where it does not parse (their
        metadata follows from the job config alone), and drop a damaged `encoded` flag (the
        conditioning is then checked and re-flagged or re-encoded). Returns what was mended."""
        mended = []
        for name in ("xs", "done", "progress"):
            if not self._parses(name):
                _rewrite_meta(self.location, name, _canonical_docs(self.config)[name])
                mended.append(f"{name}/zarr.json")
        if self.has("progress"):
            for key in _child_group_keys(self, "progress"):
                if not self._parses(key):
                    self._remove_key(f"{key}/zarr.json")
                    mended.append(f"{key}/zarr.json")
        if not self._parses("encoded"):
            self._remove_key("encoded/zarr.json")
            mended.append("encoded/zarr.json")
        self.root = zarr.open_group(self._target(self.location, "r+"), mode="r+")
        return mended

    # ---- progress (one small group per shard) ---------------------------------------------

    def record_progress(self, shard: str, info: dict) -> None:
        """One shard's progress record (display only: it never stops a job).

        Replaced whole in one atomic write (a renamed temporary file, or one PUT), never
        deleted and created again: a kill between the two would leave the shard with no record,
        and status would then take a store with missing trajectories for one whose shards are
        all elsewhere. The write needs nothing of the progress group's own metadata (a damaged
        one is rewritten by `repair_metadata`, which every worker runs first)."""
        name = f"progress/{shard.replace('/', '-of-')}"
        attrs = {**info, "shard": shard, "updated": time.time()}
        doc = {"attributes": attrs, "zarr_format": 3, "node_type": "group"}
        _rewrite_meta(self.location, name, json.dumps(doc).encode())

    def progress(self) -> dict[str, dict]:
        """shard -> its last progress record; a damaged record reads as {'damaged': True}, a
        damaged progress group as {} (progress is display only)."""
        out: dict[str, dict] = {}
        try:
            if not self.has("progress"):
                return out
            keys = _child_group_keys(self, "progress")
        except StoreDamaged:
            return out
        for key in keys:
            name = key.rsplit("/", 1)[-1]
            try:
                grp = self.node(key)
                out[grp.attrs.get("shard", name)] = dict(grp.attrs)
            except (StoreDamaged, KeyError):
                out[name.replace("-of-", "/")] = {"damaged": True}
        return out


def _ensure_arrays(root: zarr.Group, config: JobConfig) -> None:
    """Create the trajectory arrays and the progress group where they are missing."""
    def present(name: str) -> bool:  # by its zarr.json's presence: a damaged one is repaired
        return bool(sync(root.store.exists(f"{name}/zarr.json")))  # by repair_metadata

    n, s = config.num_fid_samples, config.num_sampling_steps
    h, w = config.latent_size
    if not present("xs"):
        root.create_array(
            "xs",
            shape=(n, s, h, w, 16),
            chunks=(1, s, h, w, 16),
            dtype="float32",
            serializer=BytesCodec(),
            compressors=[Crc32cCodec()],
            fill_value=0.0,
        )
    if not present("done"):
        root.create_array(
            "done", shape=(n,), chunks=(1,), dtype="uint8", compressors=[Crc32cCodec()],
            fill_value=0,
        )
    if not present("progress"):
        root.create_group("progress")


DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _why(e: BaseException) -> str:
    msg = str(e).splitlines()[0] if str(e) else ""
    if "checksum" in msg.lower():
        return "checksum mismatch"
    return f"{type(e).__name__}: {msg}"[:80] if msg else type(e).__name__


def _canonical_docs(config: JobConfig) -> dict[str, bytes]:
    """The zarr.json bytes Zarr writes for xs, done and progress of this job's store
    (built in memory with the same calls as `_ensure_arrays`)."""
    mem = zarr.storage.MemoryStore()
    root = zarr.open_group(mem, mode="w")
    _ensure_arrays(root, config)
    from zarr.core.buffer import default_buffer_prototype

    def get(key: str) -> bytes:
        return sync(mem.get(key, prototype=default_buffer_prototype())).to_bytes()

    return {name: get(f"{name}/zarr.json") for name in ("xs", "done", "progress")}


def _group_doc() -> bytes:
    return json.dumps({"attributes": {}, "zarr_format": 3, "node_type": "group"}).encode()


def _rewrite_meta(location: str, name: str, doc: bytes) -> None:
    """Write or replace one zarr.json (atomically: a temporary file renamed, or one PUT)."""
    key = f"{name}/zarr.json" if name else "zarr.json"
    if not remote.is_url(location):
        p = Path(location) / key
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".zarr.json.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_bytes(doc)
        _fsync_path(tmp)
        os.replace(tmp, p)
        return
    from zarr.core.buffer import default_buffer_prototype

    st = remote.zarr_store(location, read_only=False)
    sync(st.set(key, default_buffer_prototype().buffer.from_bytes(doc)))


def _child_group_keys(store: Store, name: str) -> list[str]:
    """Keys (name/child) of the child folders or prefixes of `name`, without parsing them."""
    async def listing() -> list[str]:
        return [p async for p in store.root.store.list_dir(name)]

    kids = sync(listing())
    return sorted(f"{name}/{k.rstrip('/')}" for k in kids if k.rstrip("/") != "zarr.json")


def _remote_size(zstore, key: str) -> int:
    from zarr.core.buffer import default_buffer_prototype

    if not sync(zstore.exists(key)):
        return -1
    buf = sync(zstore.get(key, prototype=default_buffer_prototype()))
    return -1 if buf is None else len(buf)


def _chunk_key(k: int) -> str:
    """Trajectory k's one chunk of xs (Zarr v3 default chunk keys, '/' separated)."""
    return f"xs/c/{k}/0/0/0/0"


def check_same_job(stores: list[Store]) -> None:
    """Refuse a set of stores that are not the same job."""
    first = stores[0]
    for s in stores[1:]:
        if s.fingerprint != first.fingerprint:
            diff = differing_fields(first.config, s.config)
            raise ConfigError(
                f"{s.path} is a different job from {first.path} (differs in: {', '.join(diff)})"
            )
