"""Unit claims: which live worker is computing which work unit, so no unit is computed twice.

Takes a store; gives `Claims`, a worker's leases on work units. A claim is a small JSON object
`claims/<unit>` next to the store's arrays (a file, or an object on S3): its owner (host, pid,
a random id) and a heartbeat time, rewritten every HEARTBEAT_S while the unit is computed and
written. Claims are taken and taken over only under the store's lock, so two workers never
both take one unit. A claim is alive while its heartbeat is younger than LEASE_TTL_S and, on
this host, its process still runs (so a SIGKILLed worker's units are free at once for a
`resume` on the same machine; on another machine after LEASE_TTL_S). A claim is dropped once
its unit's done markers are durable.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

LEASE_TTL_S = float(os.environ.get("CALIBJOB_LEASE_TTL_S", "300"))
HEARTBEAT_S = min(30.0, LEASE_TTL_S / 6)
PREFIX = "claims"


@dataclass(frozen=True)
class Claim:
    owner: str
    host: str
    pid: int
    time: float

    def alive(self, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        if now - self.time > LEASE_TTL_S:
            return False
        return self.host != socket.gethostname() or pid_alive(self.pid)

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}"


def pid_alive(pid: int) -> bool:
    """Whether process `pid` of this host runs (a zombie has ended: it only awaits reaping)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


class Claims:
    """One worker's claims on one store."""

    def __init__(self, store):
        self.store = store
        self.zstore = store.root.store
        self.host = socket.gethostname()
        self.owner = f"{self.host}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.held: set[int | str] = set()
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- reading and writing one claim ---------------------------------------------------

    def read(self, unit: int | str) -> Claim | None:
        return read_claim(self.zstore, unit)

    def _write(self, unit: int | str) -> None:
        body = json.dumps(
            {"owner": self.owner, "host": self.host, "pid": os.getpid(), "time": time.time()}
        ).encode()
        buf = default_buffer_prototype().buffer.from_bytes(body)
        sync(self.zstore.set(f"{PREFIX}/{unit}", buf))

    # ---- taking and dropping -------------------------------------------------------------

    def take(self, unit: int | str) -> Claim | None:
        """Claim `unit`: None when it is now ours, else the live claim of another worker."""
        from calibjob.store import Store

        with Store.lock(self.store.location):
            cur = self.read(unit)
            if cur is not None and cur.owner != self.owner and cur.alive():
                return cur
            self._write(unit)
        with self._mutex:
            self.held.add(unit)
        self._start_heartbeat()
        return None

    def release(self, unit: int | str) -> None:
        """Drop our claim on `unit` (after its done markers are durable)."""
        with self._mutex:
            self.held.discard(unit)
            cur = self.read(unit)
            if cur is not None and cur.owner == self.owner:
                with contextlib.suppress(FileNotFoundError):
                    sync(self.zstore.delete(f"{PREFIX}/{unit}"))

    def live(self, units) -> dict[int, Claim]:
        """Units among `units` held by a live worker other than this one."""
        out = {}
        for u in units:
            c = self.read(u)
            if c is not None and c.owner != self.owner and c.alive():
                out[u] = c
        return out

    # ---- heartbeat -----------------------------------------------------------------------

    def _start_heartbeat(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._beat, daemon=True)
            self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with self._mutex:
                for unit in list(self.held):
                    cur = self.read(unit)
                    if cur is None or cur.owner == self.owner:
                        with contextlib.suppress(Exception):  # a blip: the next beat retries
                            self._write(unit)

    def close(self) -> None:
        """Stop the heartbeat and drop every claim still held (a worker that stops early)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for unit in list(self.held):
            with contextlib.suppress(Exception):
                self.release(unit)


def read_claim(zstore, unit: int | str) -> Claim | None:
    """The claim on `unit` in a Zarr store object, or None (none, or unreadable: a claim
    half-written by a killed worker is as good as none)."""
    try:
        buf = sync(zstore.get(f"{PREFIX}/{unit}", prototype=default_buffer_prototype()))
        if buf is None:
            return None
        d = json.loads(buf.to_bytes())
        return Claim(str(d["owner"]), str(d["host"]), int(d["pid"]), float(d["time"]))
    except (ValueError, KeyError, TypeError, FileNotFoundError):
        return None


def _claim_names(store) -> list[str]:
    async def keys() -> list[str]:
        return [k async for k in store.root.store.list_dir(PREFIX)]

    try:
        return sync(keys())
    except (FileNotFoundError, OSError):
        return []


def sweep_dead(store) -> int:
    """Remove the claims of workers that have died (call under the store's lock); returns how
    many. A dead worker's claim blocks nothing, this only keeps the store tidy."""
    n = 0
    for name in _claim_names(store):
        c = read_claim(store.root.store, name)
        if c is None or not c.alive():
            with contextlib.suppress(FileNotFoundError):
                sync(store.root.store.delete(f"{PREFIX}/{name}"))
            n += 1
    return n


def live_claims(store) -> dict[int, Claim]:
    """Every live claim on a store (for `status` and `launch`), without taking any."""
    names = _claim_names(store)
    claims = ((int(n), read_claim(store.root.store, int(n))) for n in names if n.isdigit())
    return {u: c for u, c in claims if c is not None and c.alive()}
