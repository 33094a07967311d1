"""`python -m calibjob.cli`: the same as the `calibjob` console script."""

from calibjob.cli import main

main()
