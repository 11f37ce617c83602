"""Does certification hold? Random splits of the 20k validation + test images into calibration and
evaluation halves, and how often the chosen point breaks its target on the half it never saw.

    nice -n 19 python bench/certify_splits.py models/fmnist-resnet/3 --splits 200

Per split, on the calibration half (10k), everything export does: the guarded search (propose on
its half A, keep on half B) gives the frontier, and
  certified   the cheapest point that fixed-sequence testing certifies for (risk, ε, δ)
              (branchserve/repo/certify.py, on the same halves: the frontier's points and
              certification's own);
  today's     the cheapest frontier point whose calibration-half risk is ≤ ε: today's guarded
              selection (for accuracy drop, `cheapest_within` with tolerance ε, as the default rule).
Each is scored on the evaluation half (10k). The target holds for a method when its evaluation
risk exceeds ε in at most δ of the splits. Prints a table and exits 1 if certification misses.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from branchserve.fmnist import read_split, read_validation
from branchserve.repo.certify import certify, cheapest_certified
from branchserve.repo.frontier import ExitScores, SearchSettings, exits_taken, full_thresholds, score, search
from branchserve.repo.loading import load_version
from branchserve.repo.manifest import Manifest, OperatingPoint, RiskKind
from branchserve.repo.scoring import exit_scores


def split_frontier(cal: ExitScores, macs: list[float], settings: SearchSettings) -> list[OperatingPoint]:
    """The frontier export would record from this calibration half: kept points, then full depth."""
    found, _ = search(cal, macs, settings)
    rows = np.vstack([*(t for _, t in found), full_thresholds(len(macs))])
    accuracy, fractions = score(cal, rows)
    cumulative = np.cumsum(macs)
    return [
        OperatingPoint(
            name=f"p{i:02d}",
            search="full" if i == len(rows) - 1 else "per-exit",
            thresholds=[float(t) for t in row],
            val_accuracy=float(a),
            test_accuracy=float(a),
            exit_fractions=[float(f) for f in frac],
            expected_macs=float(frac @ cumulative),
            expected_latency_ms=0.0,
            relative_cost=0.0,
        )
        for i, (row, a, frac) in enumerate(zip(rows, accuracy, fractions, strict=True))
    ]


def todays(points: list[OperatingPoint], cal: ExitScores, risk: RiskKind, epsilon: float) -> OperatingPoint:
    """The cheapest point whose calibration-half risk is within ε (full depth always is)."""
    index = 0 if risk == "disagreement" else 1
    ok = [p for p in points if evaluate(cal, p)[index] <= epsilon + 1e-12]
    return min(ok, key=lambda p: p.expected_macs)


def evaluate(scores: ExitScores, point: OperatingPoint) -> tuple[float, float]:
    """(disagreement with the final exit, accuracy drop against it) of a point on `scores`."""
    assert scores.agrees is not None
    samples = np.arange(len(scores))
    exits = exits_taken(scores.confidence, np.atleast_2d(point.thresholds))[0]
    disagreement = float((~scores.agrees[exits, samples]).mean())
    return disagreement, float(scores.correct[-1].mean() - scores.correct[exits, samples].mean())


def one_split(
    pool: ExitScores, m: Manifest, macs: list[float], seed: int, epsilon: float, delta: float
) -> dict[str, dict[str, float]]:
    order = np.random.default_rng(seed).permutation(len(pool))
    cal, held = pool.take(order[: len(pool) // 2]), pool.take(order[len(pool) // 2 :])
    settings = SearchSettings(holdout_seed=seed)
    points = split_frontier(cal, macs, settings)
    cert = certify(cal, cal, macs, settings, points, m.cost.at_batch(1), ())  # its test figures go unread
    split_manifest = m.model_copy(update={"frontier": points, "certification": cert})
    full = sum(macs)
    out = {}
    for risk, index in (("disagreement", 0), ("accuracy_drop", 1)):
        chosen = {
            "certified": cheapest_certified(split_manifest, risk, epsilon, delta)[0],
            "today": todays(points, cal, risk, epsilon),
        }
        for method, point in chosen.items():
            _, fractions = score(held, point.thresholds)
            out[f"{risk}/{method}"] = {
                "risk": evaluate(held, point)[index],
                "compute": float(fractions[0] @ np.cumsum(macs)) / full,
                "full_depth": float(point.search == "full"),
            }
    return out


def pooled_scores(version_dir: Path, m: Manifest) -> ExitScores:
    data = m.provenance["data"]
    assert isinstance(data, dict)
    val = read_validation(None, int(data["val"]), int(data.get("split_seed", 0)))
    test = read_split("test")
    images, labels = np.concatenate([val[0], test[0]]), np.concatenate([val[1], test[1]])
    return exit_scores(version_dir, m, images, labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("version_dir", type=Path)
    parser.add_argument("--splits", type=int, default=200)
    parser.add_argument("--epsilon", type=float, default=0.01)
    parser.add_argument("--delta", type=float, default=0.05)
    parser.add_argument("--out", type=Path, help="write every split's figures here as JSON")
    args = parser.parse_args()
    m = load_version(args.version_dir)
    pool = pooled_scores(args.version_dir, m)
    macs = [float(s.backbone_macs + s.head_macs) for s in m.stages]
    runs = []
    for seed in range(args.splits):
        runs.append(one_split(pool, m, macs, seed, args.epsilon, args.delta))
        print(f"\rsplit {seed + 1}/{args.splits}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    if args.out:
        args.out.write_text(json.dumps(runs))
    print(f"{args.splits} splits of {len(pool)} images, ε = {args.epsilon}, δ = {args.delta}")
    print(
        "| target | method | splits with evaluation risk > ε | mean risk | max risk | mean compute × full | full depth chosen |"
    )
    print("|---|---|--:|--:|--:|--:|--:|")
    failed = False
    for key in runs[0]:
        risk = np.array([r[key]["risk"] for r in runs])
        compute = np.array([r[key]["compute"] for r in runs])
        over = float((risk > args.epsilon).mean())
        failed |= key.endswith("certified") and over > args.delta
        target, method = key.split("/")
        print(
            f"| {target} ≤ {args.epsilon:g} | {method} | {100 * over:.1f} % | {100 * risk.mean():.2f} % | "
            f"{100 * risk.max():.2f} % | {compute.mean():.3f} | "
            f"{100 * np.mean([r[key]['full_depth'] for r in runs]):.0f} % |"
        )
    print("certification: " + ("MISSED" if failed else f"held (≤ {100 * args.delta:g} % of splits over ε)"))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
