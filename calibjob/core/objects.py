"""Stores on object storage (s3://, gs://, az://, other fsspec URLs): opening and locking.

Why a separate module: a local store leans on the file system (atomic rename, fsync, an OS
file lock); an object store gives other guarantees, and store.py should not carry both.

- Crash safety: one PUT writes one whole object or nothing, and S3/GCS/Azure read back what
  was written (strong consistency), so a chunk is whole or absent with no fsync, and a done
  marker written after its chunk's PUT returned never points at missing data.
- The lock: a lock object created only if absent (S3 `If-None-Match: *`, through obstore's
  `put(mode="create")`). Its holder rewrites it every few seconds (a conditional put on its
  own ETag); a waiter that sees the same ETag for `LOCK_TTL_S` of its own clock takes the lock
  over by a conditional put on that ETag, so a SIGKILLed holder blocks nobody for long and two
  waiters cannot both take it. No clocks are compared across machines.

Endpoint and credentials come from the standard environment variables (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION; GOOGLE_* and AZURE_* likewise), which
obstore reads itself. Writing needs a scheme obstore serves (the lock needs conditional puts);
other fsspec URLs open read-only, through zarr.storage.FsspecStore, for `status` and `merge`.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

from calibjob.errors import StoreError

# Schemes served by obstore (S3 and look-alikes, Google Cloud Storage, Azure Blob Storage).
OBJECT_SCHEMES = ("s3", "s3a", "gs", "az", "azure", "abfs", "abfss")
LOCK_TTL_S = float(os.environ.get("CALIBJOB_LOCK_TTL_S", "60"))
LOCK_POLL_S = 0.5


def is_url(location: str) -> bool:
    """A store location with a scheme (s3://...); file:// counts as a local path."""
    return "://" in location and not location.startswith("file://")


def normalize(location: str | os.PathLike) -> str:
    """The location as a string; undoes pathlib's folding of 's3://b/x' into 's3:/b/x'."""
    s = os.fspath(location)
    if s.startswith("file:/"):  # file:///abs, or file:/abs as pathlib folds it
        return "/" + s[len("file:") :].lstrip("/")
    scheme, sep, rest = s.partition(":/")
    if sep and len(scheme) > 1 and scheme.isalnum() and not rest.startswith("/"):
        return f"{scheme}://{rest}"
    return s


def _scheme(url: str) -> str:
    return urlsplit(url).scheme.lower()


def _s3_options() -> dict[str, Any]:
    """obstore reads AWS_* itself; plain-http endpoints (a loopback test server) need opting in."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL", "")
    return {"client_options": {"allow_http": True}} if endpoint.startswith("http://") else {}


CREDENTIALS = {
    "s3": "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)",
    "gs": "GOOGLE_APPLICATION_CREDENTIALS (a service account's JSON key file)",
    "az": "AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY",
}


def explain(url: str, e: BaseException) -> str:
    """One line for an object-store failure (the client's own message runs to 25 lines)."""
    text = " ".join(str(e).split())
    aliases = {"s3a": "s3", "azure": "az", "abfs": "az", "abfss": "az"}
    scheme = aliases.get(_scheme(url), _scheme(url))
    if "169.254.169.254" in text or "token request" in text or "credential" in text.lower():
        need = CREDENTIALS.get(scheme, "the provider's credential variables")
        return f"{url}: no credentials found: set {need}"
    if "403" in text or "Forbidden" in text or "AccessDenied" in text:
        return f"{url}: access denied (the credentials found are not allowed to read it)"
    if "404" in text or "NoSuchBucket" in text or "not found" in text.lower():
        return f"{url}: no such bucket"
    if "error sending request" in text or "Connection refused" in text or "dns" in text:
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        where = endpoint or f"the {scheme}:// service"
        return f"{url}: cannot reach {where} (check the network and the endpoint)"
    return f"{url}: {type(e).__name__}: {text.split(' Debug source')[0][:200]}"


def object_store(url: str):
    """The obstore store for `url` (its path becomes the prefix), or None for other schemes."""
    if _scheme(url) not in OBJECT_SCHEMES:
        return None
    try:
        from obstore.store import from_url
    except ImportError:
        raise StoreError(
            f"{url}: object-store support is not installed (pip install 'calibjob[s3]')"
        ) from None
    opts = _s3_options() if _scheme(url) in ("s3", "s3a") else {}
    try:
        return from_url(url.rstrip("/"), **opts)
    except Exception as e:  # noqa: BLE001  (bad URL or configuration: one line for the user)
        raise StoreError(f"cannot open {url}: {e}") from None


def zarr_store(url: str, read_only: bool):
    """A Zarr store object for `url`: ObjectStore over obstore, else FsspecStore (read-only)."""
    import zarr.storage

    obj = object_store(url)
    if obj is not None:
        return zarr.storage.ObjectStore(obj, read_only=read_only)
    if not read_only:
        raise StoreError(
            f"{url}: writing a store needs s3://, gs:// or az:// (their conditional writes make "
            f"the store's lock); other URLs can be read by `status` and `merge`"
        )
    try:
        return zarr.storage.FsspecStore.from_url(url, read_only=True)
    except Exception as e:  # noqa: BLE001
        raise StoreError(f"cannot open {url}: {e}") from None


class ObjectLock:
    """An inter-machine lock made of one object created only if absent (see module doc)."""

    def __init__(self, url: str, key: str, ttl_s: float = LOCK_TTL_S):
        self.url, self.key, self.ttl_s = url, key, ttl_s
        store = object_store(url)
        if store is None:
            raise StoreError(f"{url}: no lock on this kind of URL; use s3://, gs:// or az://")
        self.store = store
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.etag: str | None = None
        self.lost = False
        self._stop = threading.Event()
        self._beat_thread: threading.Thread | None = None
        self._mutex = threading.Lock()

    def _body(self, beat: int) -> bytes:
        # the beat number changes the bytes, hence the ETag (an MD5 of them on S3)
        return json.dumps({"owner": self.owner, "beat": beat, "time": time.time()}).encode()

    def _try_put(self, mode) -> bool:
        import obstore
        from obstore.exceptions import AlreadyExistsError, NotFoundError, PreconditionError

        try:
            self.etag = obstore.put(self.store, self.key, self._body(0), mode=mode)["e_tag"]
            return True
        except (AlreadyExistsError, PreconditionError, NotFoundError):
            return False

    def acquire(self) -> None:
        import obstore

        seen: tuple[str | None, float] = (None, time.monotonic())
        while not self._try_put("create"):
            try:
                etag = obstore.head(self.store, self.key)["e_tag"]
            except FileNotFoundError:
                continue  # released in between: try to create it again at once
            now = time.monotonic()
            if etag != seen[0]:
                seen = (etag, now)
            elif now - seen[1] > self.ttl_s and self._try_put({"e_tag": etag}):
                break  # its holder stopped beating: taken over atomically
            time.sleep(LOCK_POLL_S)
        self._stop.clear()
        self._beat_thread = threading.Thread(target=self._beat, daemon=True)
        self._beat_thread.start()

    def _beat(self) -> None:
        import obstore
        from obstore.exceptions import PreconditionError

        beat = 0
        while not self._stop.wait(self.ttl_s / 6):
            beat += 1
            with self._mutex:
                try:
                    res = obstore.put(
                        self.store, self.key, self._body(beat), mode={"e_tag": self.etag}
                    )
                    self.etag = res["e_tag"]
                except (PreconditionError, FileNotFoundError):
                    self.lost = True
                    return
                except Exception:  # noqa: BLE001  (a network blip: try again next beat)
                    continue

    def release(self) -> None:
        import obstore

        self._stop.set()
        if self._beat_thread is not None:
            self._beat_thread.join()
        with self._mutex:
            try:
                if obstore.head(self.store, self.key)["e_tag"] == self.etag:
                    obstore.delete(self.store, self.key)
            except FileNotFoundError:
                pass
        if self.lost:
            raise StoreError(
                f"lost the lock of {self.url} (no heartbeat for {self.ttl_s:.0f} s); "
                f"check the store with `calibjob status {self.url}`"
            )

    def __enter__(self) -> ObjectLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
