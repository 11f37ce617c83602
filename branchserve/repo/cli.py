"""`branchserve calibrate` and `branchserve inspect`: model-repository commands that need no torch."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from branchserve.repo.calibrate import calibrate
from branchserve.repo.certify import RISKS
from branchserve.repo.loading import load_version
from branchserve.repo.manifest import RepositoryError
from branchserve.repo.plot import PlotUnavailable, plot
from branchserve.repo.report import print_summary


def _calibrate(args: argparse.Namespace) -> None:
    if args.keep_latency and not args.certify:
        sys.exit("branchserve calibrate: --keep-latency leaves nothing to do without --certify")
    targets = [(risk, args.epsilon, args.delta) for risk in RISKS] if args.certify else None
    try:
        m = calibrate(
            args.version_dir,
            args.batch_sizes,
            args.runs,
            latency=not args.keep_latency,
            targets=targets,
            fmnist_root=args.fmnist_dir,
        )
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


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, exclusive; got {text}")
    return value


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
    c.add_argument(
        "--certify",
        action="store_true",
        help="also certify the frontier on the validation split (Fashion-MNIST runs; reads the dataset)",
    )
    c.add_argument("--epsilon", type=_fraction, default=0.01, help="risk to certify, for both risks (default 0.01)")
    c.add_argument("--delta", type=_fraction, default=0.05, help="δ the certificates hold at (default 0.05)")
    c.add_argument("--fmnist-dir", type=Path, help="Fashion-MNIST folder (default: BRANCHSERVE_FMNIST_DIR or Debian's)")
    c.add_argument("--keep-latency", action="store_true", help="keep the recorded cost profile; only certify")
    c.set_defaults(func=_calibrate)
    i = sub.add_parser("inspect", help="print a model version's exits, frontier and latency; plot the frontier")
    i.add_argument("version_dir", type=Path, help="e.g. models/fmnist-resnet/3")
    i.add_argument("--plot", type=Path, help="write accuracy against cost to this PNG (needs matplotlib)")
    i.set_defaults(func=_inspect)
