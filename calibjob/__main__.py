"""`calibjob` (the console script) and `python -m calibjob`: Ctrl-C and SIGTERM are handled
from the first line on, before the command-line modules import (see interrupts.py)."""

import time

_start = time.perf_counter()  # before any import of ours: run's "startup" phase begins here

import calibjob  # noqa: E402
from calibjob.core import interrupts  # noqa: E402

calibjob.process_start = _start
interrupts.install()


def main() -> None:
    from calibjob.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
