"""The `branchserve` command. A subcommand imports its heavy dependencies only when it runs, and
one that needs an extra the install lacks says which, in one line, instead of a traceback."""

from __future__ import annotations

import argparse
import sys

from branchserve import __version__
from branchserve.loadtest import cli as loadtest_cli
from branchserve.ray import cli as ray_cli
from branchserve.repo import cli as repo_cli
from branchserve.server import cli as server_cli
from branchserve.training import cli as training_cli

COMMANDS = (
    training_cli.register,
    repo_cli.register,
    server_cli.register,
    ray_cli.register,
    loadtest_cli.register,
)
EXTRAS = {
    "torch": "train",
    "onnx": "train",
    "onnxscript": "train",
    "matplotlib": "train",  # analyze and study plot; inspect handles its absence itself
    "locust": "loadtest",
    "httpx": "loadtest",
    "ray": "ray",
}
TORCH_PIN = "torch==2.13.0"  # the CPU build; an unpinned torch pulls a multi-GB CUDA build


def install_hint(missing: str) -> str:
    extra = EXTRAS[missing]
    pin = f"{TORCH_PIN} " if extra == "train" else ""
    return f"this command needs the '{extra}' extra: pip install {pin}'branchserve[{extra}]'"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="branchserve", description=__doc__)
    p.add_argument("--version", action="version", version=f"branchserve {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in COMMANDS:
        register(sub)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] not in EXTRAS:
            raise
        sys.exit(f"branchserve {args.command}: {install_hint(e.name.split('.')[0])}")


if __name__ == "__main__":
    main()
