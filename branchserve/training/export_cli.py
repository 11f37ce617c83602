"""`branchserve export`: argument parsing only; torch is imported when the command runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _export(args: argparse.Namespace) -> None:
    from branchserve.repo.cli import print_summary
    from branchserve.repo.frontier import SearchSettings
    from branchserve.repo.loading import load_version
    from branchserve.repo.manifest import RepositoryError
    from branchserve.training.data import DataError, load_fashion_mnist, load_image_folder
    from branchserve.training.export import ExportError, ExportSettings, export_run

    settings = ExportSettings(
        confidence=args.confidence,
        search=SearchSettings(holdout_seed=args.holdout_seed),
        default_tolerance=args.tolerance_pp / 100,
        batch_sizes=tuple(args.batch_sizes),
        latency_runs=args.runs,
        split_seed=args.split_seed,
    )
    try:
        data = (
            load_image_folder(args.data_dir, split_seed=args.split_seed)
            if args.data_dir
            else load_fashion_mnist(args.fmnist_dir, split_seed=args.split_seed)
        )
        version_dir = export_run(args.run, args.repo, args.name, data, args.version, settings)
    except (DataError, ExportError, RepositoryError, FileNotFoundError) as e:
        sys.exit(f"branchserve export: {e}")
    print(f"exported {version_dir}")
    print_summary(load_version(version_dir))


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def register(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("export", help="export a trained run as staged ONNX with calibration into a model repository")
    e.add_argument("run", type=Path, help="run folder with checkpoint.pt and summary.json")
    e.add_argument("--repo", type=Path, default=Path("models"), help="model repository root")
    e.add_argument("--name", required=True, help="model name: the version goes to <repo>/<name>/<version>/")
    e.add_argument("--version", type=int, help="version number (default: the next free one)")
    e.add_argument("--data-dir", type=Path, help="the image folder the run was trained on (default: Fashion-MNIST)")
    e.add_argument(
        "--fmnist-dir", type=Path, help="Fashion-MNIST IDX files (default: $BRANCHSERVE_FMNIST_DIR or the system copy)"
    )
    e.add_argument("--split-seed", type=int, default=0, help="the train/validation split the run used")
    e.add_argument("--confidence", choices=["max_softmax", "entropy", "margin"], default="max_softmax")
    e.add_argument("--holdout-seed", type=int, default=0, help="seed of the validation halves (propose / keep)")
    e.add_argument(
        "--tolerance-pp",
        type=float,
        default=0.3,
        help="default operating point: the cheapest within this many points of the final exit's val accuracy",
    )
    e.add_argument("--batch-sizes", type=_ints, default=[1, 8, 64], help="batch sizes to time (1 is required)")
    e.add_argument("--runs", type=int, default=2000, help="timed runs at batch 1 (fewer for larger batches)")
    e.set_defaults(func=_export)
