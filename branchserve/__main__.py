"""`python -m branchserve` is the `branchserve` command."""

from branchserve.cli import main

main()
