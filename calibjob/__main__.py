"""`calibjob` (the console script) and `python -m calibjob`: Ctrl-C and SIGTERM are handled
from the first line on, before the command-line modules import (see interrupts.py)."""

from calibjob.core import interrupts

interrupts.install()


def main() -> None:
    from calibjob.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
