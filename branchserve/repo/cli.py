"""`branchserve calibrate` and `branchserve inspect`: model-repository commands that need no torch."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from branchserve.repo.calibrate import calibrate
from branchserve.repo.loading import load_version
from branchserve.repo.manifest import RepositoryError
from branchserve.repo.plot import PlotUnavailable, plot
from branchserve.repo.report import print_summary


def _calibrate(args: argparse.Namespace) -> None:
    try:
        m = calibrate(args.version_dir, args.batch_sizes, args.runs)
    except (RepositoryError, ValueError) as e:
        sys.exit(f"branchserve calibrate: {e}")
    print_summary(m)


def _inspect(args: argparse.Namespace) -> None:
    try:
        m = load_version(args.version_dir)
    except RepositoryError as e:
        sys.exit(f"branchserve inspect: {e}")
    print_summary(m)
    if args.plot is None:
        print("\nplot: add --plot FILE.png for accuracy against cost")
        return
    try:
        plot(m, args.plot)
    except PlotUnavailable as e:
        print(f"\n{e}")
        return
    print(f"\nplot: {args.plot}")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    c = sub.add_parser(
        "calibrate", help="re-measure a model version's stage latency on this host (rewrites its manifest)"
    )
    c.add_argument("version_dir", type=Path, help="e.g. models/fmnist-resnet/3")
    c.add_argument(
        "--batch-sizes", type=_ints, default=[1, 8, 64], help="batch sizes to time, 1 required (default 1,8,64)"
    )
    c.add_argument(
        "--runs", type=int, default=2000, help="timed runs at batch 1, fewer for larger batches (default 2000)"
    )
    c.set_defaults(func=_calibrate)
    i = sub.add_parser("inspect", help="print a model version's exits, frontier and latency; plot the frontier")
    i.add_argument("version_dir", type=Path, help="e.g. models/fmnist-resnet/3")
    i.add_argument("--plot", type=Path, help="write accuracy against cost to this PNG (needs matplotlib)")
    i.set_defaults(func=_inspect)
