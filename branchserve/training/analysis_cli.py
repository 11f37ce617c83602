"""`branchserve analyze` and `branchserve study`: argument parsing only; torch is imported when a command runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from branchserve.training.analysis import AnalysisSettings
    from branchserve.training.data import Dataset


def _data(args: argparse.Namespace, command: str) -> Dataset:
    from branchserve.training.data import DataError, load_fashion_mnist, load_image_folder

    try:
        return load_image_folder(args.data_dir) if args.data_dir else load_fashion_mnist(args.fmnist_dir)
    except DataError as e:
        sys.exit(f"branchserve {command}: {e}")


def _settings(args: argparse.Namespace) -> AnalysisSettings:
    from branchserve.training.analysis import AnalysisSettings

    return AnalysisSettings(probe_train=args.probe_train, probe_test=args.probe_test, pool=args.pool)


def _analyze(args: argparse.Namespace) -> None:
    import torch

    from branchserve.training.analysis import compare_runs
    from branchserve.training.report import write_analysis

    if args.threads:
        torch.set_num_threads(args.threads)
    data = _data(args, "analyze")
    try:
        analysis = compare_runs(args.run, data.val, _settings(args), args.against)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"branchserve analyze: {e}")
    print(write_analysis(analysis, args.out))


def _study(args: argparse.Namespace) -> None:
    from branchserve.training.report import write_study
    from branchserve.training.study import StudySpec, parse_grid, run_study

    try:
        spec = StudySpec(
            grid=parse_grid(args.grid),
            preset=args.preset,
            epochs=args.epochs,
            seed=args.seed,
            train_limit=args.train_limit,
            cost_budget=args.cost_budget,
            analysis=_settings(args),
        )
        data = _data(args, "study")
        results = run_study(
            spec, data, args.out, threads=args.threads, after_cell=lambda done: write_study(done, spec, args.out)
        )
    except ValueError as e:
        sys.exit(f"branchserve study: {e}")
    print(write_study(results, spec, args.out))


def _common(p: argparse.ArgumentParser, probe_default: int) -> None:
    p.add_argument("--out", type=Path, required=True, help="folder for the report, its JSON and PNG plots")
    p.add_argument(
        "--data-dir", type=Path, help="a folder of images, one sub-folder per class (default: Fashion-MNIST)"
    )
    p.add_argument(
        "--fmnist-dir", type=Path, help="Fashion-MNIST IDX files (default: $BRANCHSERVE_FMNIST_DIR or Debian's copy)"
    )
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    p.add_argument("--probe-train", type=int, default=probe_default, help="validation images that train each probe")
    p.add_argument("--probe-test", type=int, default=probe_default, help="further validation images that score it")
    p.add_argument("--pool", type=int, default=1, help="pool block outputs to N×N and flatten (1: global average)")


def register(sub: argparse._SubParsersAction) -> None:
    a = sub.add_parser("analyze", help="layer-wise probe accuracy, class separation and CKA of a trained run")
    a.add_argument("run", type=Path, help="run folder with checkpoint.pt")
    a.add_argument("--against", type=Path, help="a second run to compare with, e.g. the unbranched twin")
    _common(a, 5000)
    a.set_defaults(func=_analyze)

    s = sub.add_parser("study", help="train and score a grid of training regimes (resumable)")
    s.add_argument(
        "--grid",
        nargs="+",
        required=True,
        metavar="KEY=V1,V2",
        help="one axis per regime field, e.g. weighting=equal,seed schedule=joint,joint+finetune; "
        "list values join numbers with ':', e.g. positions=equidistant,1:3:5:7",
    )
    s.add_argument("--preset", default="progressive", choices=["progressive", "seed-weights", "joint", "unbranched"])
    s.add_argument("--epochs", type=int, default=6, help="epoch budget of every cell")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--train-limit", type=int, help="train every cell on the first N training images")
    s.add_argument("--cost-budget", type=float, default=0.5, help="expected cost as a share of the unbranched MACs")
    _common(s, 2500)
    s.set_defaults(func=_study)
