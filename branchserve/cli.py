"""The `branchserve` command. Each subcommand imports its heavy dependencies only when it runs."""

from __future__ import annotations

import argparse

from loadtest import cli as loadtest_cli
from server import cli as server_cli
from server import repo_cli
from training import analysis_cli, export_cli
from training import cli as training_cli

COMMANDS = [training_cli.register, analysis_cli.register, export_cli.register, repo_cli.register, server_cli.register]
COMMANDS.append(loadtest_cli.register)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="branchserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for register in COMMANDS:
        register(sub)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
