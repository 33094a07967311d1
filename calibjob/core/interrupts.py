"""Ctrl-C and SIGTERM (what Slurm sends before a kill): one line, exit 130, at any moment.

Before the unit loop runs (imports, model load, encoding) there is nothing to finish: the
handler says what is safe and exits at once (the store is crash-safe at every instant, so this
is as safe as a kill, and it never lands inside a half-done import). Inside the unit loop the
worker asks for a graceful stop: the signal raises KeyboardInterrupt there, the worker lets its
writer finish the unit it is writing and drops its claims, then the same line is printed. A
second signal during that stop exits at once.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable

EXIT_INTERRUPTED = 130
# how long the message may take to read the store: the signal may have stopped the main thread
# inside a library holding a lock the reading needs (Zarr's I/O loop, say), and waiting on it
# there would hang the process instead of ending it
MESSAGE_S = 5.0

_store: str | None = None
_safe_line: Callable[[str], tuple[str, bool]] | None = None
_graceful = False
_stopping = False


def watch_store(
    location: str | None, safe_line: Callable[[str], tuple[str, bool]] | None = None
) -> None:
    """The store the message should report on, and how to say what in it is safe (given the
    location: 'N of M trajectories are safe in STORE', and whether that is all of them), read
    when the signal comes."""
    global _store, _safe_line
    _store = location
    if safe_line is not None:
        _safe_line = safe_line


def set_graceful(on: bool) -> None:
    """On inside the unit loop: the signal becomes KeyboardInterrupt there."""
    global _graceful
    _graceful = on


def message() -> str:
    """'interrupted: N of M trajectories are safe in STORE; continue with ...'"""
    if _store is None:
        return "calibjob: interrupted"
    try:
        if _safe_line is None:
            raise LookupError
        safe, complete = _safe_line(_store)
        if complete:  # a signal as the command ends: nothing is left to continue
            return f"calibjob: interrupted after the work was done: {safe}"
    except FileNotFoundError:
        return f"calibjob: interrupted before the store {_store} was created; nothing written"
    except Exception:  # noqa: BLE001  (a damaged store: still one line)
        safe = f"finished units are safe in {_store}"
    return f"calibjob: interrupted: {safe}; continue with `calibjob resume {_store}`"


def _handler(signum, frame) -> None:
    global _stopping
    if _graceful and not _stopping:
        _stopping = True
        raise KeyboardInterrupt
    try:
        print(bounded_message(), file=sys.stderr, flush=True)
    finally:
        os._exit(EXIT_INTERRUPTED)


def bounded_message(seconds: float = MESSAGE_S) -> str:
    """`message()`, read in a thread and given `seconds`; else a line that reads nothing."""
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.append(message()), daemon=True)
    reader.start()
    reader.join(seconds)
    if out:
        return out[0]
    if _store is None:
        return "calibjob: interrupted"
    return f"calibjob: interrupted; see `calibjob status {_store}` for what is safe"


def ignore() -> None:
    """The command's work is over: later signals are ignored (the process is only exiting)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def install() -> None:
    """Handle SIGINT and SIGTERM from the first line of the CLI on."""
    signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGTERM, _handler)
