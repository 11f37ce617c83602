"""Does the frontier search's over-fitting guard earn its keep? Searches compared on the test set.

    nice -n 19 python bench/frontier_search.py models/fmnist-resnet/3

For each search, the point `export` would make the default (the cheapest whose validation accuracy
is within --tolerance-pp of the final exit's) is scored on the test set, which no search sees:
  guarded shared     one threshold, proposed on validation half A, kept on half B
  guarded per-exit   what `export` runs: shared ± log-odds moves per exit, proposed on A, kept on B
  unguarded per-exit an independent quantile grid per exit, chosen and scored on all of validation
"""

from __future__ import annotations

import argparse
from itertools import product
from pathlib import Path

import numpy as np

from branchserve.repo.frontier import ExitScores, SearchSettings, full_thresholds, pareto, score, search
from branchserve.repo.loading import load_version
from branchserve.repo.sessions import load_session
from branchserve.training.data import load_fashion_mnist


def exit_scores(version_dir: Path, split_x: np.ndarray, split_y: np.ndarray, kind: str) -> ExitScores:
    m = load_version(version_dir)
    session = load_session(version_dir / m.full_graph.file)
    logits = [
        session.run(m.full_graph.logits_outputs, {m.input.name: split_x[i : i + 500]})
        for i in range(0, len(split_x), 500)
    ]
    return ExitScores.from_logits([np.concatenate(z) for z in zip(*logits, strict=True)], split_y, kind)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("version_dir", type=Path)
    parser.add_argument("--tolerance-pp", type=float, default=0.3)
    parser.add_argument("--levels", type=int, default=16, help="quantiles per exit for the unguarded grid")
    args = parser.parse_args()
    m = load_version(args.version_dir)
    data = load_fashion_mnist()
    val = exit_scores(args.version_dir, data.val.x.numpy(), data.val.y.numpy(), m.confidence)
    test = exit_scores(args.version_dir, data.test.x.numpy(), data.test.y.numpy(), m.confidence)
    macs = [s.backbone_macs + s.head_macs for s in m.stages]
    cumulative, n = np.cumsum(macs), len(m.stages)

    grids = [np.unique(np.quantile(val.confidence[k], np.linspace(0, 1, args.levels))) for k in range(n - 1)]
    unguarded = np.array([[*t, 0.0] for t in product(*grids)])
    acc, frac = score(val, unguarded)
    searches = {
        "guarded shared": np.stack([t for _, t in search(val, macs, SearchSettings(offsets=(0.0,)))[0]]),
        "guarded per-exit": np.stack([t for _, t in search(val, macs)[0]]),
        f"unguarded per-exit ({len(unguarded)} candidates)": unguarded[pareto(frac @ cumulative, acc)],
    }
    final_val, final_test = val.correct[-1].mean(), test.correct[-1].mean()
    print(f"final exit: val {100 * final_val:.2f} %, test {100 * final_test:.2f} %, {cumulative[-1] / 1e6:.2f} MMACs")
    print("| search | frontier points | default: val % | test % | Δtest pp | MMACs (val) | MMACs (test) |")
    print("|---|--:|--:|--:|--:|--:|--:|")
    for name, found in searches.items():
        rows = np.vstack([found, full_thresholds(n)])
        val_acc, val_frac = score(val, rows)
        eligible = np.flatnonzero(val_acc >= final_val - args.tolerance_pp / 100 - 1e-12)
        best = eligible[np.argmin(val_frac[eligible] @ cumulative)]
        test_acc, test_frac = score(test, rows[best])
        print(
            f"| {name} | {len(rows)} | {100 * val_acc[best]:.2f} | {100 * test_acc[0]:.2f} | "
            f"{100 * (test_acc[0] - final_test):+.2f} | {val_frac[best] @ cumulative / 1e6:.2f} | "
            f"{test_frac[0] @ cumulative / 1e6:.2f} |"
        )


if __name__ == "__main__":
    main()
