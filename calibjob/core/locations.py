"""Where a store lives: a folder or an object store, behind one small interface.

Takes a location string (a path, or s3://bucket/prefix/job.zarr and the like); gives a
`Location` with what the job core needs of it: the inter-process lock, whole-object reads and
atomic writes, deletes, listings, sizes, durability (fsync) and the Zarr store object to open
groups on. Everything above this module is the same for both kinds.

- A folder leans on the file system: an OS file lock, atomic rename, fsync. Zarr's LocalStore
  writes each chunk to a temporary `.partial` file and renames it, so a chunk is whole or absent;
  a killed writer's temporary files are removed once they are older than a lease.
- An object store (calibjob/core/objects.py) gives whole-or-absent PUTs that are durable once
  they return, and a lock object created only if absent. Nothing to fsync, no partial files.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from calibjob.core import objects
from calibjob.errors import StoreError

LOCK_NAME = ".calibjob.lock"
is_url = objects.is_url
normalize = objects.normalize


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Location:
    """A store's place. Subclasses: `Folder`, `Objects`; `open_location` picks one."""

    def __init__(self, url: str):
        self.url = url
        self._zstore: Any = None

    def __str__(self) -> str:
        return self.url

    is_local = False

    # ---- what the kinds do differently ------------------------------------------------------

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        raise NotImplementedError

    def zarr_store(self, read_only: bool = False) -> Any:
        """What zarr.open_group takes for this location."""
        raise NotImplementedError

    def write_atomic(self, key: str, data: bytes) -> None:
        """Replace one object whole (a renamed temporary file, or one PUT)."""
        raise NotImplementedError

    def size(self, key: str) -> int:
        """Bytes of one object; -1 when absent."""
        raise NotImplementedError

    def fsync(self, key: str, recurse: bool = True) -> None:
        """Make what was written under `key` durable (a PUT already is)."""

    def remove_stale_partials(self, key: str, older_than_s: float) -> None:
        """Temporary files a killed writer left beside `key` (a PUT leaves none)."""

    def prepare_create(self, allowed: set[str], marker: str) -> None:
        """Before a store is created here: refuse what cannot hold one."""

    def check_kind(self) -> None:
        """A path that is a regular file is no store."""

    # ---- the same for both kinds -----------------------------------------------------------

    @property
    def zstore(self) -> Any:
        """One read-write Zarr store object for the small reads and writes below."""
        if self._zstore is None:
            self._zstore = self.zarr_store(read_only=False)
        return self._zstore

    def exists(self, key: str) -> bool:
        return bool(sync(self.zstore.exists(key)))

    def read(self, key: str) -> bytes | None:
        """One object's bytes, or None when absent."""
        try:
            buf = sync(self.zstore.get(key, prototype=default_buffer_prototype()))
        except FileNotFoundError:
            return None
        return None if buf is None else buf.to_bytes()

    def write(self, key: str, data: bytes) -> None:
        sync(self.zstore.set(key, default_buffer_prototype().buffer.from_bytes(data)))

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            sync(self.zstore.delete(key))

    def delete_tree(self, prefix: str) -> None:
        """Everything under `prefix` (a Zarr node and its chunks)."""
        sync(self.zstore.delete_dir(prefix))

    def list_dir(self, prefix: str) -> list[str]:
        """Names directly under `prefix` (children of a folder or prefix), without parsing."""

        async def names() -> list[str]:
            return [p.rstrip("/") async for p in self.zstore.list_dir(prefix)]

        try:
            return sorted(sync(names()))
        except (FileNotFoundError, OSError):
            return []


class Folder(Location):
    is_local = True

    def __init__(self, url: str):
        super().__init__(url)
        self.path = Path(url)

    def __truediv__(self, key: str) -> Path:
        return self.path / key

    def check_kind(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"store path {self.path} is a regular file, not a store folder")

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        from filelock import FileLock

        with FileLock(str(self.path / LOCK_NAME)):
            yield

    def zarr_store(self, read_only: bool = False) -> Any:
        import zarr.storage

        return zarr.storage.LocalStore(self.url, read_only=read_only)

    def exists(self, key: str) -> bool:
        return (self.path / key).exists()

    def write_atomic(self, key: str, data: bytes) -> None:
        p = self.path / key
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_bytes(data)
        fsync_path(tmp)
        os.replace(tmp, p)

    def delete(self, key: str) -> None:
        (self.path / key).unlink(missing_ok=True)

    def size(self, key: str) -> int:
        p = self.path / key
        return p.stat().st_size if p.is_file() else -1

    def fsync(self, key: str, recurse: bool = True) -> None:
        d = self.path / key
        if not d.exists():
            return
        if d.is_file():
            fsync_path(d)
            fsync_path(d.parent)
            return
        subs = [d, *(x for x in d.rglob("*") if x.is_dir())] if recurse else [d]
        for f in d.rglob("*") if recurse else d.iterdir():
            if f.is_file():
                fsync_path(f)
        for sub in subs:
            fsync_path(sub)

    def remove_stale_partials(self, key: str, older_than_s: float) -> None:
        """Only stale ones: a live writer of the same key (a lease taken over from a stalled
        worker) may be renaming its own right now."""
        d = (self.path / key).parent
        if not d.is_dir():
            return
        now = time.time()
        for f in d.glob("*.partial"):
            with contextlib.suppress(OSError):
                if now - f.stat().st_mtime > older_than_s:
                    f.unlink()

    def prepare_create(self, allowed: set[str], marker: str) -> None:
        """A store folder must be absent, empty or a calibjob store (or one whose creation was
        killed): never a folder of the user's own, which a store would be written into."""
        p = self.path
        if p.is_dir() and not (p / marker).is_file():
            foreign = sorted(set(os.listdir(p)) - allowed - {LOCK_NAME, "logs"})
            if foreign:
                shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
                raise StoreError(
                    f"{self.url} is a folder holding other files ({shown}); a store path must "
                    f"be absent, empty or a calibjob store: choose another store path"
                )
        if not p.parent.is_dir():  # the rule of every output: its folder must exist
            raise StoreError(f"folder {p.parent} does not exist; create it or choose another store")
        try:
            p.mkdir(exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create store folder {p}: {e.strerror}") from None


class Objects(Location):
    @property
    def zstore(self) -> Any:
        """Read-write where the scheme can be written (s3, gs, az), else read-only."""
        if self._zstore is None:
            writable = objects.object_store(self.url) is not None
            self._zstore = self.zarr_store(read_only=not writable)
        return self._zstore

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        with objects.ObjectLock(self.url, LOCK_NAME):
            yield

    def zarr_store(self, read_only: bool = False) -> Any:
        return objects.zarr_store(self.url, read_only=read_only)

    def exists(self, key: str) -> bool:
        try:
            return super().exists(key)
        except StoreError:
            raise
        except Exception as e:  # noqa: BLE001  (no bucket, no credentials, no network...)
            raise StoreError(objects.explain(self.url, e)) from None

    def write_atomic(self, key: str, data: bytes) -> None:
        self.write(key, data)

    def size(self, key: str) -> int:
        data = self.read(key) if self.exists(key) else None
        return -1 if data is None else len(data)


def open_location(location: str | os.PathLike | Location) -> Location:
    """The Location of a path or URL (pathlib's folding of 's3://' undone)."""
    if isinstance(location, Location):
        return location
    url = normalize(location)
    return Objects(url) if is_url(url) else Folder(url)
