"""`branchserve train`: argument parsing only; torch is imported when the command runs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _train(args: argparse.Namespace) -> None:
    from branchserve.training.data import DataError, load_fashion_mnist, load_image_folder
    from branchserve.training.regime import PRESETS, RegimeConfig
    from branchserve.training.train import train

    overrides = {k: v for k, v in vars(args).items() if k in RegimeConfig.model_fields and v is not None}
    try:
        cfg = RegimeConfig(**{**PRESETS[args.preset], **overrides})
        data = load_image_folder(args.data_dir) if args.data_dir else load_fashion_mnist(args.fmnist_dir)
    except (DataError, ValueError) as e:
        sys.exit(f"branchserve train: {e}")
    summary = train(
        cfg,
        data,
        args.out,
        widths=args.widths,
        resume=args.resume,
        threads=args.threads,
        train_limit=args.train_limit,
    )
    print(json.dumps({k: summary[k] for k in ("val_accuracy", "test_accuracy", "wall_time_s")}))


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def _weighting(text: str) -> str | list[float]:
    return _floats(text) if text[0].isdigit() or text[0] == "." else text


def _positions(text: str) -> str | list[int]:
    return text if text == "equidistant" else [int(v) for v in text.split(",")]


def register(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train a branched (or unbranched) classifier")
    t.add_argument("--preset", default="progressive", choices=["progressive", "seed-weights", "joint", "unbranched"])
    t.add_argument("--out", type=Path, required=True, help="run folder: checkpoint, summary.json, log.jsonl")
    t.add_argument(
        "--data-dir", type=Path, help="a folder of images, one sub-folder per class (default: Fashion-MNIST)"
    )
    t.add_argument(
        "--fmnist-dir", type=Path, help="Fashion-MNIST IDX files (default: $BRANCHSERVE_FMNIST_DIR or Debian's copy)"
    )
    t.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    t.add_argument("--threads", type=int, help="torch.set_num_threads")
    t.add_argument("--train-limit", type=int, help="train on the first N training images only (quick trials)")
    t.add_argument(
        "--widths",
        type=lambda text: [int(v) for v in text.split(",")],
        help="channels of each backbone block (default 24,24,48,48,96,96,96,96); multiples of 16 fill "
        "onnxruntime's blocked layout on AVX-512 CPUs, which computes 24 channels as 32",
    )
    t.add_argument("--branches", type=int)
    t.add_argument("--positions", type=_positions, help="'equidistant' or block indices, e.g. 1,3,5,7")
    t.add_argument("--weighting", type=_weighting, help="equal|seed|increasing|decreasing or weights, e.g. 1,1,1,2")
    t.add_argument("--objective", choices=["ce", "ce+distill"])
    t.add_argument("--distill-temperature", type=float)
    t.add_argument("--distill-alpha", type=float)
    t.add_argument("--schedule", choices=["joint", "backbone-first", "joint+finetune"])
    t.add_argument("--finetune-scope", choices=["after-last-branch", "all"])
    t.add_argument("--epochs", type=int)
    t.add_argument("--finetune-epochs", type=int)
    t.add_argument("--refit-epochs", type=int)
    t.add_argument("--backbone-epochs", type=int)
    t.add_argument("--optimizer", choices=["sgd", "adamw"])
    t.add_argument("--lr", type=float)
    t.add_argument("--finetune-lr", type=float)
    t.add_argument("--weight-decay", type=float)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--seed", type=int)
    t.set_defaults(func=_train)
