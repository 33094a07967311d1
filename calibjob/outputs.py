"""One rule for every file calibjob writes for the user (merge's .npz, preview's image,
inspect's plot): the folder must exist, an existing file is replaced only with --force, the
format is the one the suffix names, and the file appears whole or not at all (written to a
temporary name beside it, then renamed)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from calibjob.errors import ConfigError

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
    return fmt


def write_whole(path: str | Path, write: Callable[[Path], None], force: bool) -> Path:
    """Call write(tmp) on a temporary file beside `path`, then move it into place: with
    `force` replacing what is there, else only if nothing appeared there meanwhile."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.partial{p.suffix}")
    try:
        write(tmp)
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
