"""The command line: `calibjob run | resume | launch | status | merge | inspect | preview |
profile | profile-report`.

Each command parses its options (Typer), calls one library function (calibjob.api and the
modules behind it) and renders its result. `--help`, `status` and `merge` never import MLX model
code, so they answer at once. Every expected failure is one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import sys

from calibjob.cli import data, jobs, profile, run, status  # noqa: F401  (they register commands)
from calibjob.cli.base import app, err, fail
from calibjob.core import interrupts
from calibjob.errors import CalibjobError

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry: run the app, turning expected failures into one-line errors."""
    interrupts.install()
    try:
        rc = app(standalone_mode=False, prog_name="calibjob")
    except CalibjobError as e:
        fail(str(e).replace("[", r"\["))
    except OSError as e:  # a full disk, a permission, a vanished file: the OS's own words
        where = f" ({_shown(e.filename)})" if e.filename else ""
        fail(f"{e.strerror or e}{where}")
    except KeyboardInterrupt:
        err.print(interrupts.message(), markup=False, highlight=False)
        sys.exit(interrupts.EXIT_INTERRUPTED)
    except Exception as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # `calibjob` alone: its help
            e.show()  # type: ignore[attr-defined]
            sys.exit(0)
        if hasattr(e, "format_message") and hasattr(e, "exit_code"):  # click's usage errors
            fail(usage_line(e))
        if type(e).__name__ == "Abort":  # click turns KeyboardInterrupt into Abort
            err.print(interrupts.message(), markup=False, highlight=False)
            sys.exit(interrupts.EXIT_INTERRUPTED)
        raise
    finally:
        # the command is over (its file written, its last line printed): a Ctrl-C from here
        # on has nothing to interrupt, and must not turn a finished run into exit 130
        interrupts.ignore()
    if rc == interrupts.EXIT_INTERRUPTED:  # Typer turns KeyboardInterrupt into exit 130
        err.print(interrupts.message(), markup=False, highlight=False)
    if isinstance(rc, int) and rc:
        sys.exit(rc)


def usage_line(e) -> str:
    """A usage error in the one-line form of every other error, with where to read more."""
    msg = e.format_message()
    if "--latent-size" in msg and "32 32" not in msg:
        msg += " (give H and W as two numbers: --latent-size 32 32)"
    cmd = e.ctx.command_path if getattr(e, "ctx", None) is not None else "calibjob"
    return f"{msg.rstrip('.')}; see `{cmd} -h`"


def _shown(filename: str) -> str:
    """The file the user named, for a temporary one beside it (.OUT.PID.partial[.SUFFIX])."""
    import re
    from pathlib import Path

    p = Path(filename)
    m = re.fullmatch(r"\.(.+)\.\d+\.partial(\..*)?", p.name)
    return str(p.with_name(m.group(1))) if m else filename
