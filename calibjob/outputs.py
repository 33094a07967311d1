"""One rule for every file calibjob writes for the user (merge's and `run -o`'s .npz, preview's
image, inspect's plot, profile-report's export): the folder must exist and be writable, an
existing file is replaced only with --force, the format is the one the suffix names, all of it
checked before the work; the file appears whole or not at all (written to a temporary name
beside it, then renamed); a temporary file a killed writer left is removed by the next writer;
and errors name the file the user asked for, never the temporary one."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from calibjob.errors import CalibjobError, ConfigError

NPZ_FORMATS = {".npz": "npz"}
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
PLOT_FORMATS = {".png": "png", ".pdf": "pdf", ".svg": "svg"}


def check_output(path: str | Path, force: bool, formats: dict[str, str] | None = None) -> str:
    """Refuse an output that cannot or should not be written; return its format (by suffix)."""
    p = Path(path)
    fmt = ""
    if formats is not None:
        fmt = formats.get(p.suffix.lower(), "")
        if not fmt:
            raise ConfigError(
                f"{p}: cannot write a {p.suffix or 'suffix-less'} file; use one of "
                f"{', '.join(sorted(formats))}"
            )
    if p.is_dir():
        raise ConfigError(f"{p} is a folder")
    if not p.parent.is_dir():
        raise ConfigError(f"output folder {p.parent} does not exist")
    if p.exists() and not force:
        raise ConfigError(f"{p} exists; pass --force to replace it")
    check_writable(p.parent)
    return fmt


def check_writable(folder: Path) -> None:
    """A folder a file can be created in (a read-only mount, a folder of another user, a full
    disk are refused now, not after hours of work)."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".calibjob-probe-"):
            pass
    except OSError as e:
        raise ConfigError(
            f"cannot write in {folder} ({e.strerror}); choose another output"
        ) from None


def remove_stale_partials(out: Path) -> None:
    """Temporary files of earlier writers of `out` whose process has ended (a SIGKILLed one
    leaves `.OUT.PID.partial[.SUFFIX]`); a running writer's file is left alone."""
    from calibjob.core.leases import pid_alive

    if not out.parent.is_dir():
        return
    for f in out.parent.glob(f".{out.name}.*.partial*"):
        pid = f.name[len(out.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            f.unlink(missing_ok=True)


def partial_path(out: Path) -> Path:
    """Where `out` is written before it is moved into place."""
    return out.with_name(f".{out.name}.{os.getpid()}.partial{out.suffix}")


def write_failed(out: Path, e: OSError) -> CalibjobError:
    """One line for a failed write, naming the output (not the temporary file)."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return CalibjobError(
            f"disk full while writing {out} ({e.strerror}); nothing of it was kept and its "
            f"inputs are untouched: free some space and run the command again"
        )
    return CalibjobError(f"cannot write {out} ({e.strerror}); nothing of it was kept")


def write_whole(path: str | Path, write: Callable[[Path], None], force: bool) -> Path:
    """Call write(tmp) on a temporary file beside `path`, then move it into place: with
    `force` replacing what is there, else only if nothing appeared there meanwhile."""
    p = Path(path)
    remove_stale_partials(p)
    tmp = partial_path(p)
    try:
        try:
            write(tmp)
        except OSError as e:
            raise write_failed(p, e) from None
        if force:
            os.replace(tmp, p)
        else:
            try:
                os.link(tmp, p)
            except FileExistsError:
                raise ConfigError(f"{p} exists; pass --force to replace it") from None
            tmp.unlink()
    finally:
        tmp.unlink(missing_ok=True)
    return p
