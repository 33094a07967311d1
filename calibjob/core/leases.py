"""Leases on work units: which live worker is computing which unit, so no unit runs twice.

Takes a Location and a lease time; gives `Leases`, one worker's leases. A lease is a small JSON
object `claims/<unit>` beside the store's arrays: its owner (host, pid, a random id) and a
heartbeat time, rewritten every ttl/6 while the unit is computed and written. Leases are taken,
renewed and dropped only under the store's lock, so two workers never both hold one unit and a
heartbeat never rewrites a lease another worker has taken over meanwhile. A lease is alive while
its heartbeat is younger than the lease time and, on this host, its process still runs (a
SIGKILLed worker's units are free at once for a `resume` on the same machine; elsewhere after
the lease time). A worker that finds its lease taken over (it was frozen past the lease: a
laptop asleep, SIGSTOP, an NFS stall) is told so through `lost`, and drops that unit's result.
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

from calibjob.core.locations import Location

PREFIX = "claims"
DEFAULT_TTL_S = 300.0


@dataclass(frozen=True)
class Lease:
    owner: str
    host: str
    pid: int
    time: float

    def alive(self, ttl_s: float, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        if now - self.time > ttl_s:
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


def read_lease(loc: Location, unit: int | str) -> Lease | None:
    """The lease on `unit`, or None (none, or unreadable: one half-written by a killed worker
    is as good as none)."""
    try:
        raw = loc.read(f"{PREFIX}/{unit}")
        if raw is None:
            return None
        d = json.loads(raw)
        return Lease(str(d["owner"]), str(d["host"]), int(d["pid"]), float(d["time"]))
    except (ValueError, KeyError, TypeError, FileNotFoundError):
        return None


class Leases:
    """One worker's leases on one store."""

    def __init__(self, loc: Location, ttl_s: float = DEFAULT_TTL_S):
        self.loc = loc
        self.ttl_s = ttl_s
        self.host = socket.gethostname()
        self.owner = f"{self.host}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.held: set[int | str] = set()
        self._lost: set[int | str] = set()
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self, unit: int | str) -> None:
        body = {"owner": self.owner, "host": self.host, "pid": os.getpid(), "time": time.time()}
        self.loc.write(f"{PREFIX}/{unit}", json.dumps(body).encode())

    def take(self, unit: int | str) -> Lease | None:
        """Lease `unit`: None when it is now ours, else the live lease of another worker."""
        with self.loc.lock():
            cur = read_lease(self.loc, unit)
            if cur is not None and cur.owner != self.owner and cur.alive(self.ttl_s):
                return cur
            self._write(unit)
        with self._mutex:
            self.held.add(unit)
            self._lost.discard(unit)
        self._start_heartbeat()
        return None

    def lost(self, unit: int | str) -> bool:
        """Whether another worker took `unit` over while we held it (we were frozen)."""
        with self._mutex:
            return unit in self._lost

    def release(self, unit: int | str) -> None:
        """Drop our lease on `unit` (after its done markers are durable)."""
        with self._mutex:
            self.held.discard(unit)
        with self.loc.lock():
            cur = read_lease(self.loc, unit)
            if cur is not None and cur.owner == self.owner:
                self.loc.delete(f"{PREFIX}/{unit}")

    def live(self, units) -> dict[int, Lease]:
        """Units among `units` held by a live worker other than this one."""
        out = {}
        for u in units:
            c = read_lease(self.loc, u)
            if c is not None and c.owner != self.owner and c.alive(self.ttl_s):
                out[u] = c
        return out

    def _start_heartbeat(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._beat, daemon=True)
            self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 6):
            with self._mutex:
                units = list(self.held)
            for unit in units:
                with contextlib.suppress(Exception):  # a blip: the next beat retries
                    self.renew(unit)

    def renew(self, unit: int | str) -> bool:
        """Rewrite our lease's heartbeat, under the lock; False (and `lost`) when another
        worker holds it now."""
        with self.loc.lock():
            cur = read_lease(self.loc, unit)
            if cur is not None and cur.owner != self.owner:
                with self._mutex:
                    self._lost.add(unit)
                    self.held.discard(unit)
                return False
            self._write(unit)
        return True

    def close(self) -> None:
        """Stop the heartbeat and drop every lease still held (a worker that stops early)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for unit in list(self.held):
            with contextlib.suppress(Exception):
                self.release(unit)


def sweep_dead(loc: Location, ttl_s: float) -> int:
    """Remove the leases of workers that have died (call under the store's lock); returns how
    many. A dead worker's lease blocks nothing, this only keeps the store tidy."""
    n = 0
    for name in loc.list_dir(PREFIX):
        c = read_lease(loc, name)
        if c is None or not c.alive(ttl_s):
            loc.delete(f"{PREFIX}/{name}")
            n += 1
    return n


def live_leases(loc: Location, ttl_s: float) -> dict[int, Lease]:
    """Every live lease on numbered units (for `status` and `launch`), without taking any."""
    leases = ((int(n), read_lease(loc, n)) for n in loc.list_dir(PREFIX) if n.isdigit())
    return {u: c for u, c in leases if c is not None and c.alive(ttl_s)}
