"""Which exit criterion buys the cheapest default point? Criteria compared on one exported version.

    nice -n 19 python bench/exit_criteria.py models/fmnist-resnet/3

For each criterion the guarded search `export` runs proposes thresholds on validation; the point
`export` would make the default (the cheapest whose validation accuracy is within --tolerance-pp of
the final exit's) is then scored on test, which no search sees. Criteria:
  max_softmax, margin, entropy   an exit answers when its confidence reaches its threshold
  agreement (+max_softmax)       exit k ≥ 1 answers when its prediction equals exit k−1's and its
                                 max-softmax reaches its threshold; exit 0 answers on max-softmax
                                 alone (it has no earlier exit to agree with)
  agreement only                 exit k ≥ 1 answers as soon as it agrees with exit k−1; exit 0 never
                                 (one point, no threshold: shown even when it is not within tolerance)
Costs are expected MACs and the version's batch-1 cost profile (× its full graph); the agreement
criteria pay for every exit an input passes, as the others do. Needs torch only to split the data.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from branchserve.repo.confidence import confidence, softmax
from branchserve.repo.frontier import ExitScores, expected_cost, full_thresholds, score, search
from branchserve.repo.loading import load_version
from branchserve.repo.manifest import Manifest
from branchserve.repo.sessions import load_session
from branchserve.training.data import load_fashion_mnist


def exit_probs(version_dir: Path, m: Manifest, x: np.ndarray) -> list[np.ndarray]:
    session = load_session(version_dir / m.full_graph.file)
    logits = [session.run(m.full_graph.logits_outputs, {m.input.name: x[i : i + 500]}) for i in range(0, len(x), 500)]
    return [softmax(np.concatenate(z).astype(np.float64)) for z in zip(*logits, strict=True)]


def criterion_scores(probs: list[np.ndarray], labels: np.ndarray, criterion: str) -> ExitScores:
    correct = np.stack([p.argmax(1) == labels for p in probs])
    if criterion in ("max_softmax", "margin", "entropy"):
        return ExitScores(np.stack([confidence(p, criterion) for p in probs]), correct)  # type: ignore[arg-type]
    agree = [np.zeros(len(labels), bool)] + [probs[k].argmax(1) == probs[k - 1].argmax(1) for k in range(1, len(probs))]
    if criterion == "agreement":
        conf = np.stack([np.where(a, p.max(1), 0.0) for a, p in zip(agree, probs, strict=True)])
        conf[0] = probs[0].max(1)
    else:  # agreement only: 1 when exit k agrees with exit k-1, 0 otherwise
        conf = np.stack([a.astype(np.float64) for a in agree])
    return ExitScores(conf, correct)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("version_dir", type=Path)
    parser.add_argument("--tolerance-pp", type=float, default=0.3)
    args = parser.parse_args()
    m = load_version(args.version_dir)
    data = load_fashion_mnist()
    val_p = exit_probs(args.version_dir, m, data.val.x.numpy())
    test_p = exit_probs(args.version_dir, m, data.test.x.numpy())
    macs = [s.backbone_macs + s.head_macs for s in m.stages]
    batch1 = m.cost.at_batch(1)
    n = len(macs)
    final_test = float((test_p[-1].argmax(1) == data.test.y.numpy()).mean())
    print(f"{m.name}/{m.version}: final exit test {100 * final_test:.2f} %, {sum(macs) / 1e6:.2f} MMACs")
    print("| criterion | default: val % | test % | Δtest pp | exit % (test) | MMACs (test) | × full (b=1) |")
    print("|---|--:|--:|--:|--:|--:|--:|")
    for criterion in ("max_softmax", "margin", "entropy", "agreement", "agreement only"):
        val = criterion_scores(val_p, data.val.y.numpy(), criterion)
        test = criterion_scores(test_p, data.test.y.numpy(), criterion)
        if criterion == "agreement only":
            rows = np.array([[2.0, *([0.5] * (n - 2)), 0.0], full_thresholds(n)])
        else:
            rows = np.vstack([*(t for _, t in search(val, macs)[0]), full_thresholds(n)])
        val_acc, val_frac = score(val, rows)
        final_val = val.correct[-1].mean()
        eligible = np.flatnonzero(val_acc >= final_val - args.tolerance_pp / 100 - 1e-12)
        best = eligible[np.argmin(val_frac[eligible] @ np.cumsum(macs))]
        if criterion == "agreement only":
            best = 0  # the rule has one point and no threshold: shown whatever its accuracy
        test_acc, test_frac = score(test, rows[best])
        ms = expected_cost(test_frac[0], batch1.stage_ms)
        print(
            f"| {criterion} | {100 * val_acc[best]:.2f} | {100 * test_acc[0]:.2f} | "
            f"{100 * (test_acc[0] - final_test):+.2f} | {'/'.join(f'{100 * f:.0f}' for f in test_frac[0])} | "
            f"{expected_cost(test_frac[0], macs) / 1e6:.2f} | {ms / batch1.full_graph_ms:.3f} |"
        )


if __name__ == "__main__":
    main()
