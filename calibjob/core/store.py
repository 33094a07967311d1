"""A job's Zarr store: per-row arrays with durable writes, done markers, verification, repair.

Takes a Location and a job definition (calibjob.core.job.Job); gives `JobStore`. The only thing
workers share. Layout (Zarr v3, one store per job):

    job/        attrs["calibjob"]: format, job name, spec, fingerprint, versions and what the
                job resolved on the first run (a leaf group written in one write)
    <array>     (rows, ...) one per row array of the job's layout, one chunk per row, crc32c
    done        (rows,) uint8   1 once row k's chunks are durable (written after them)
    encoded/    a leaf group, created once the job's prepared arrays are durable
    <prepared>  arrays the job makes once per store (the run job's prompt conditioning)
    progress/<i>-of-<n>   attrs: one shard's progress record, for `status`
    claims/<unit>         leases (calibjob.core.leases)

Metadata lives only in leaf groups: Zarr rewrites a parent group's zarr.json, briefly with empty
attributes, whenever it creates a child, so a concurrent reader of the root's attributes could
find no record.

Crash safety: a chunk is whole or absent (a renamed temporary file, or one PUT); chunks are made
durable before their done markers, so a marker never points at data a power cut could lose; a
corrupt chunk fails its crc32c on read. Every read is checked: a file that does not parse or
fails its checksum is `StoreDamaged`, naming it, and `repair` mends what can be derived.
"""

from __future__ import annotations

import contextlib
import errno
import json
import time
from collections.abc import Callable, Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from calibjob.core.arrays import canonical_docs, ensure_arrays
from calibjob.core.job import Job, Layout
from calibjob.core.locations import Location, open_location
from calibjob.core.spec import Spec, describe_differences
from calibjob.errors import StoreDamaged, StoreError

FORMAT = "calibjob-store/1"
ATTR = "calibjob"
LEGACY_PROFILE_ATTR = "calibjob-profile"  # profile stores made before the job core
RECORD_KEY = "job/zarr.json"  # the job record; its presence makes a folder or prefix a store
PREPARED = "encoded"  # the flag group of the prepared arrays
CORE_ENTRIES = frozenset({"zarr.json", "job", "done", "progress", PREPARED, "claims"})
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)

# Every written row leaves its chunk on disk, even one equal to the fill value (Zarr skips
# those by default): a done row whose chunk is absent is damage, never "all zeros".
zarr.config.set({"array.write_empty_chunks": True})


def package_versions() -> dict[str, str]:
    out = {}
    for name in ("calibjob", "mlx", "diffusionkit", "zarr", "numpy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def why(e: BaseException) -> str:
    """A short reason for a failed read (for StoreDamaged)."""
    msg = str(e).splitlines()[0] if str(e) else ""
    if "checksum" in msg.lower():
        return "checksum mismatch"
    return f"{type(e).__name__}: {msg}"[:80] if msg else type(e).__name__


def chunk_key(name: str, spec_ndim: int, k: int) -> str:
    """Row k's one chunk of a per-row array (Zarr v3 default chunk keys)."""
    return f"{name}/c/{k}" + "/0" * spec_ndim


def read_record(root: zarr.Group, location: str) -> dict:
    """The job record, in today's form (a legacy profile record is read as one)."""
    try:
        attrs = dict(root["job"].attrs)
    except (KeyError, ValueError) as e:
        raise StoreError(
            f"{location}/{RECORD_KEY} (the job record) is damaged ({type(e).__name__}); the "
            f"job's spec is lost with it: start the job again in a new store"
        ) from None
    if ATTR in attrs:
        meta = dict(attrs[ATTR])
        if meta.get("format") != FORMAT:
            raise StoreError(
                f"{location} has store format {meta.get('format')!r}, expected {FORMAT}"
            )
        meta.setdefault("job", "run")
        return meta
    if LEGACY_PROFILE_ATTR in attrs:
        return {**attrs[LEGACY_PROFILE_ATTR], "format": FORMAT, "job": "profile"}
    raise StoreError(f"{location} is not a calibjob store (its job record names no job)")


class OtherJob(StoreError):
    """A store of a job kind other than those asked for."""

    def __init__(self, location: str, kind: str, wanted: str = "calibjob"):
        self.kind = kind
        reader = {"run": "calibjob merge", "profile": "calibjob profile-report"}.get(kind)
        hint = f"; read it with `{reader}`" if reader else ""
        super().__init__(
            f"{location} is not a {wanted} store: it was made by `calibjob {kind}`{hint}"
        )


class JobStore:
    """An opened store: its location, root group, job definition, spec and record."""

    def __init__(self, loc: Location, root: zarr.Group, job: Job, config: Spec, meta: dict):
        self.loc, self.root, self.job, self.config, self.meta = loc, root, job, config, meta
        self.layout: Layout = job.layout(config, meta)
        self.note = ""  # what the user should hear about how the store was opened

    @property
    def location(self) -> str:
        return self.loc.url

    @property
    def path(self) -> Path | str:
        """The folder (a Path) of a local store, the URL (a str) of a remote one."""
        return self.loc.path if self.loc.is_local else self.loc.url

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    # ---- opening ---------------------------------------------------------------------------

    @staticmethod
    def exists(location: str | Path | Location) -> bool:
        """Whether a calibjob store (its job record) is at `location`."""
        loc = open_location(location)
        return loc.exists(RECORD_KEY)

    @classmethod
    def open(
        cls, location: str | Path | Location, jobs: Mapping[str, Job], mode: str = "r+"
    ) -> JobStore:
        """Open an existing store of any of `jobs` (its spec comes from the store itself)."""
        loc = open_location(location)
        loc.check_kind()
        if not loc.exists(RECORD_KEY):
            raise StoreError(f"no calibjob store at {loc}")
        try:
            root = zarr.open_group(loc.zarr_store(read_only=mode == "r"), mode=mode)
        except (KeyError, ValueError) as e:  # the root's zarr.json does not parse
            if mode == "r":
                raise StoreDamaged(loc.url, "zarr.json", type(e).__name__) from None
            loc.write_atomic("zarr.json", _group_doc())
            root = zarr.open_group(loc.zarr_store(), mode=mode)
        meta = read_record(root, loc.url)
        job = jobs.get(meta["job"])
        if job is None:
            wanted = next(iter(jobs.values())).store_noun if len(jobs) == 1 else "calibjob"
            raise OtherJob(loc.url, meta["job"], wanted)
        return cls(loc, root, job, job.spec_class.from_record(meta["config"]), meta)

    @classmethod
    def create_or_open(
        cls, location: str | Path | Location, job: Job, spec: Spec,
        meta: Callable[[], dict] = dict,
    ) -> JobStore:
        """Create the store of `spec`, or open it if it holds the same job.

        Under the store's lock, so shards started at the same moment agree on one creator. A
        store of another job is refused, naming what differs. `meta`: what the record keeps
        beside the spec (called only for a new store, before the lock is taken)."""
        loc = open_location(location)
        loc.check_kind()
        extra = None if loc.exists(RECORD_KEY) else meta()
        loc.prepare_create(set(job.entries | CORE_ENTRIES), RECORD_KEY)
        with loc.lock():
            if loc.exists(RECORD_KEY):
                store = cls.open(loc, {job.name: job})
                diff = store.config.differing(spec)
                if not diff:
                    ensure_arrays(store.root, store.layout)  # a creation killed half-way
                    return store
                details = describe_differences(diff, store.config.to_dict(), spec.to_dict())
                if not store.holds_work():  # e.g. its first run failed to load the model
                    store.clear()
                    fresh = cls._create(loc, job, spec, extra if extra is not None else meta())
                    fresh.note = f"{loc} held no work yet ({details}); it now holds this job"
                    return fresh
                raise StoreError(
                    f"{loc} holds {job.another} ({details}); to continue that job run "
                    f"`calibjob resume {loc}`, or give this one another store"
                )
            return cls._create(loc, job, spec, extra if extra is not None else meta())

    @classmethod
    def _create(cls, loc: Location, job: Job, spec: Spec, extra: dict) -> JobStore:
        """The job record (a leaf group whose attrs are written in one write), then the arrays:
        a reader never sees a job without its spec; a creation killed before the arrays is
        finished by the next `create_or_open`. Under the lock."""
        record = {
            "format": FORMAT, "job": job.name, "config": spec.to_dict(),
            "fingerprint": spec.fingerprint(), "versions": package_versions(),
            "created": time.time(), **extra,
        }  # fmt: skip
        # mode "a", not "w": "w" empties the folder or prefix first, lock and logs included
        root = zarr.open_group(loc.zarr_store(), mode="a")
        root.create_group("job", attributes={ATTR: record}, overwrite=True)
        store = cls(loc, root, job, spec, record)
        ensure_arrays(root, store.layout)
        return store

    def holds_work(self) -> bool:
        """Whether anything of this store is worth keeping: prepared arrays, a done row, or a
        unit a live worker computes."""
        from calibjob.core.leases import DEFAULT_TTL_S, live_leases

        mask, damaged = self.read_markers()
        return self.prepared or bool(mask.any() or damaged) or bool(
            live_leases(self.loc, DEFAULT_TTL_S)
        )

    def clear(self) -> None:
        """Remove the job from a store that holds no work (its record last: a kill in between
        leaves a store the next `create_or_open` finishes). Under the lock."""
        names = [*self.layout.arrays, "done", "progress", PREPARED, *self.job.prepared]
        for name in names:
            self.loc.delete_tree(name)
        self.loc.delete_tree("job")

    def reload(self, mode: str = "r+") -> JobStore:
        return JobStore.open(self.loc, {self.job.name: self.job}, mode)

    # ---- nodes -----------------------------------------------------------------------------

    def node(self, name: str) -> Any:
        """The array or group `name`; a zarr.json that does not parse is StoreDamaged."""
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
            self.has(name)
        except StoreDamaged:
            return False
        return True

    # ---- prepared arrays (written once per store) ------------------------------------------

    @property
    def prepared(self) -> bool:
        return self.has(PREPARED)

    def write_prepared(
        self, arrays: dict[str, np.ndarray], row_chunked: set[str], what: str = ""
    ) -> None:
        """Write the prepared arrays, make them durable, then flag the store prepared. Arrays
        in `row_chunked` get one chunk per leading index (read a row at a time later)."""
        try:
            for name, arr in arrays.items():
                a = self.root.create_array(
                    name, shape=arr.shape, dtype=arr.dtype, compressors=[Crc32cCodec()],
                    chunks=(1, *arr.shape[1:]) if name in row_chunked else arr.shape,
                    overwrite=True,
                )  # fmt: skip
                a[...] = arr
                self.loc.fsync(name)
            self.root.create_group(PREPARED, overwrite=True)
        except OSError as e:
            if e.errno in DISK_FULL:
                raise StoreError(
                    f"disk full while writing {what or ', '.join(arrays)} to {self.path} "
                    f"({e.strerror}); nothing is marked done: free some space and run "
                    f"`calibjob resume {self.path}`"
                ) from None
            raise

    def read_prepared(self, name: str) -> np.ndarray:
        """A prepared array, every chunk checked; damage names the array's chunks."""
        arr = self.node(name)
        try:
            return arr[...]
        except Exception as e:  # noqa: BLE001  (a checksum, a truncated or missing chunk)
            raise StoreDamaged(self.location, f"{name}/c", why(e)) from None

    def prepared_rows(self, name: str) -> Iterator[np.ndarray]:
        """A row-chunked prepared array one row at a time (each (1, ...)), every chunk checked."""
        arr = self.node(name)
        for p in range(arr.shape[0]):
            try:
                yield arr[p : p + 1]
            except Exception as e:  # noqa: BLE001
                raise StoreDamaged(self.location, f"{name}/c/{p}", why(e)) from None

    def prepared_damage(self, verify: bool = True) -> str | None:
        """The first damaged file of the prepared arrays: metadata always, chunks (read whole,
        checksums checked) when `verify`; None when intact."""
        try:
            for name in self.job.prepared:
                self.node(name)
                if verify:
                    self.read_prepared(name)
        except StoreDamaged as e:
            return e.key
        except KeyError as e:
            return f"{e.args[0]} (missing)"
        return None

    def clear_prepared(self) -> None:
        """Unflag the prepared arrays (damaged: the next run prepares them again)."""
        self.loc.delete(f"{PREPARED}/zarr.json")
        if self.loc.is_local:
            with contextlib.suppress(OSError):
                (self.loc.path / PREPARED).rmdir()

    # ---- rows ------------------------------------------------------------------------------

    def read_markers(self) -> tuple[np.ndarray, list[int]]:
        """(done mask, rows whose marker is unreadable); unreadable ones are not done."""
        n = self.layout.rows
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

    def done_mask(self) -> np.ndarray:
        """Which rows are done; a damaged marker is StoreDamaged (`repair` mends it)."""
        mask, damaged = self.read_markers()
        if damaged:
            raise StoreDamaged(self.location, f"done/c/{damaged[0]}", "checksum or truncation")
        return mask

    def all_done(self, rows) -> bool:
        """Whether every row given is marked done (reads only their markers)."""
        if not self.has("done"):
            return False
        try:
            return bool(self.node("done").get_orthogonal_selection(list(rows)).all())
        except StoreDamaged:
            raise
        except Exception:  # noqa: BLE001  (a damaged marker: not done, to be safe)
            return False

    def read_row(self, name: str, k: int) -> np.ndarray:
        """Row k of a per-row array; StoreDamaged (naming the chunk) if missing or corrupt."""
        key = chunk_key(name, len(self.layout.arrays[name].shape), k)
        if not self.loc.exists(key):
            raise StoreDamaged(self.location, key, "missing, though marked done")
        try:
            return self.node(name)[k]
        except StoreDamaged:
            raise
        except Exception as e:  # noqa: BLE001  (crc32c mismatch, truncated chunk)
            raise StoreDamaged(self.location, key, why(e)) from None

    def row_ok(self, k: int) -> bool:
        """Whether row k reads back whole in every array and holds valid data."""
        try:
            return self.job.row_ok({n: self.read_row(n, k) for n in self.layout.arrays})
        except Exception:  # noqa: BLE001
            return False

    def write_rows(self, rows, arrays: dict[str, np.ndarray], lease_ttl_s: float) -> None:
        """Write one unit: its chunks, make them durable, then their done markers. A killed
        writer's temporary files older than a lease are removed first (a younger one may be a
        live writer's that took the unit over)."""
        for name, spec in self.layout.arrays.items():
            arr = self.node(name)
            for k, x in zip(rows, arrays[name], strict=True):
                self.loc.remove_stale_partials(chunk_key(name, len(spec.shape), k), lease_ttl_s)
                arr[k] = x
        for name in self.layout.arrays:
            for k in rows:
                self.loc.fsync(f"{name}/c/{k}")
        done = self.node("done")
        for k in rows:
            done[k] = 1
        for k in rows:
            self.loc.fsync(f"done/c/{k}", recurse=False)

    def bad_chunk_sizes(self, rows) -> list[int]:
        """The cheap check: rows whose chunk of some array is missing or not its size."""
        bad = []
        for k in rows:
            for name, spec in self.layout.arrays.items():
                if self.loc.size(chunk_key(name, len(spec.shape), k)) != spec.chunk_bytes():
                    bad.append(int(k))
                    break
        return bad

    def verify_rows(self, rows) -> list[int]:
        """Re-read done rows; clear and return those missing, corrupt or invalid."""
        mask = self.done_mask()
        bad = [k for k in rows if mask[k] and not self.row_ok(k)]
        if bad:
            done = self.node("done")
            for k in bad:
                done[k] = 0
        return bad

    # ---- repair (every worker, under the store's lock) -------------------------------------

    def repair(self) -> list[str]:
        """Mend what a crash or a damaged disk left: a zarr.json of a row array, done or
        progress that does not parse (rewritten: it follows from the layout), a damaged
        progress record or prepared flag (dropped), unreadable done markers (rewritten from
        their verified rows), prepared arrays that fail their checks (unflagged, so they are
        made again). Returns what was mended."""
        mended = []
        docs = canonical_docs(self.layout)
        for name, doc in docs.items():
            if not self._parses(name):
                self.loc.write_atomic(f"{name}/zarr.json", doc)
                mended.append(f"{name}/zarr.json")
        try:
            records = self.loc.list_dir("progress") if self.has("progress") else []
        except StoreDamaged:
            records = []
        for rec in records:
            if rec != "zarr.json" and not self._parses(f"progress/{rec}"):
                self.loc.delete(f"progress/{rec}/zarr.json")
                mended.append(f"progress/{rec}/zarr.json")
        if not self._parses(PREPARED):
            self.loc.delete(f"{PREPARED}/zarr.json")
            mended.append(f"{PREPARED}/zarr.json")
        self.root = zarr.open_group(self.loc.zarr_store(), mode="r+")
        _, damaged = self.read_markers()
        if damaged:
            done = self.node("done")
            for k in damaged:
                ok = self.row_ok(k)
                self.loc.delete(f"done/c/{k}")
                done[k] = 1 if ok else 0
                self.loc.fsync(f"done/c/{k}", recurse=False)
            mended += [f"done/c/{k}" for k in damaged]
        if self.job.prepared and self.prepared and self.prepared_damage() is not None:
            self.clear_prepared()
            mended.append(f"{', '.join(self.job.prepared)} (made again)")
        return mended

    # ---- progress records (one per shard; display only, never stops a job) -----------------

    def record_progress(self, shard: str, info: dict) -> None:
        """Replaced whole in one atomic write, never deleted and created again: a kill between
        the two would leave the shard with no record, and status would then take a store with
        missing rows for one whose shards are all elsewhere."""
        attrs = {**info, "shard": shard, "updated": time.time()}
        doc = {"attributes": attrs, "zarr_format": 3, "node_type": "group"}
        name = shard.replace("/", "-of-")
        self.loc.write_atomic(f"progress/{name}/zarr.json", json.dumps(doc).encode())

    def progress(self) -> dict[str, dict]:
        """shard -> its last record; a damaged record reads as {'damaged': True}, a damaged
        progress group as {}."""
        out: dict[str, dict] = {}
        try:
            if not self.has("progress"):
                return out
        except StoreDamaged:
            return out
        for name in self.loc.list_dir("progress"):
            if name == "zarr.json":
                continue
            try:
                attrs = dict(self.node(f"progress/{name}").attrs)
                out[attrs.get("shard", name.replace("-of-", "/"))] = attrs
            except (StoreDamaged, KeyError):
                out[name.replace("-of-", "/")] = {"damaged": True}
        return out


def _group_doc() -> bytes:
    return json.dumps({"attributes": {}, "zarr_format": 3, "node_type": "group"}).encode()
