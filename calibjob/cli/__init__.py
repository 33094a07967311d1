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
        rc = app(standalone_mode=False)
    except CalibjobError as e:
        fail(str(e).replace("[", r"\["))
    except OSError as e:  # a full disk, a permission, a vanished file: the OS's own words
        fail(f"{e.strerror or e} ({e.filename})" if e.filename else str(e.strerror or e))
    except KeyboardInterrupt:
        err.print(interrupts.message(), markup=False, highlight=False)
        sys.exit(interrupts.EXIT_INTERRUPTED)
    except Exception as e:
        # usage errors of Typer's bundled click: print its usage message, not a traceback
        if hasattr(e, "show") and hasattr(e, "exit_code"):
            e.show()
            sys.exit(e.exit_code)
        if type(e).__name__ == "Abort":  # click turns KeyboardInterrupt into Abort
            err.print(interrupts.message(), markup=False, highlight=False)
            sys.exit(interrupts.EXIT_INTERRUPTED)
        raise
    if rc == interrupts.EXIT_INTERRUPTED:  # Typer turns KeyboardInterrupt into exit 130
        err.print(interrupts.message(), markup=False, highlight=False)
    if isinstance(rc, int) and rc:
        sys.exit(rc)


