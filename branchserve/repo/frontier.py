"""Operating points: per-exit confidence thresholds, what they cost and what they are worth.

Each sample pays for every stage up to the exit it leaves at. The threshold search is pure numpy
(no torch, no dataset): export runs it on validation logits, and the server, `calibrate` and
`inspect` use the same cost arithmetic.

Over-fitting guard: thresholds are only ever *proposed* on one seeded half of the validation
split (A) and only ever *kept* for how they do on the other half (B). Proposals come from a coarse
grid (quantiles of half A's early-exit confidences), and the per-exit search has little freedom:
a shared threshold moved by −1, 0 or +1 in log-odds at each early exit, not an independent grid
per exit (which, grid-searched on 5k images in a trial, did worse on test than one shared threshold).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import product
from typing import Literal

import numpy as np
import numpy.typing as npt

from branchserve.repo.confidence import confidence, softmax
from branchserve.repo.manifest import ConfidenceKind, OperatingPoint, StageLatency
from branchserve.repo.tensors import BoolArray, Float64Array, FloatArray, IntArray

NEVER = 2.0
"""A threshold above every confidence (all measures are in [0, 1]): that exit never answers."""

SearchKind = Literal["shared", "per-exit", "full"]


def expected_cost(exit_fractions: Sequence[float], stage_costs: Sequence[float]) -> float:
    """Σ_k f_k · Σ_{j≤k} c_j, for fractions f leaving at each exit and per-stage costs c (ms or MACs)."""
    total, cumulative = 0.0, 0.0
    for fraction, cost in zip(exit_fractions, stage_costs, strict=True):
        cumulative += cost
        total += fraction * cumulative
    return total


@dataclass(frozen=True)
class ExitScores:
    """Every exit's confidence and correctness on one split, each shaped (exits, samples); `agrees`
    (same shape) says whether each exit's answer is the final exit's, which certification counts."""

    confidence: Float64Array
    correct: BoolArray
    agrees: BoolArray | None = None

    @classmethod
    def from_logits(
        cls, logits: Sequence[FloatArray], labels: IntArray, kind: ConfidenceKind = "max_softmax"
    ) -> ExitScores:
        probs = [softmax(z.astype(np.float64)) for z in logits]
        answers = np.stack([p.argmax(axis=1) for p in probs])
        return cls(np.stack([confidence(p, kind) for p in probs]), answers == labels, answers == answers[-1])

    def take(self, index: IntArray) -> ExitScores:
        agrees = None if self.agrees is None else self.agrees[:, index]
        return ExitScores(self.confidence[:, index], self.correct[:, index], agrees)

    def __len__(self) -> int:
        samples: int = self.confidence.shape[1]
        return samples


def exits_taken(conf: Float64Array, thresholds: Float64Array) -> IntArray:
    """(points, samples) index of the exit each sample leaves at: the first whose confidence reaches
    its threshold; the last exit always answers, whatever its threshold."""
    reached = conf[None, :-1, :] >= thresholds[:, :-1, None]
    always = np.ones((len(thresholds), 1, conf.shape[1]), dtype=bool)
    taken: IntArray = np.concatenate([reached, always], axis=1).argmax(axis=1)
    return taken


def score(scores: ExitScores, thresholds: npt.ArrayLike, chunk: int = 256) -> tuple[Float64Array, Float64Array]:
    """Accuracy (points,) and fraction leaving at each exit (points, exits) of every threshold row."""
    thresholds = np.atleast_2d(np.asarray(thresholds, dtype=np.float64))
    n_exits, n = scores.confidence.shape
    accuracy, fractions = np.empty(len(thresholds)), np.empty((len(thresholds), n_exits))
    for start in range(0, len(thresholds), chunk):
        taken = exits_taken(scores.confidence, thresholds[start : start + chunk])
        accuracy[start : start + chunk] = scores.correct[taken, np.arange(n)].mean(axis=1)
        fractions[start : start + chunk] = (taken[:, :, None] == np.arange(n_exits)).mean(axis=1)
    return accuracy, fractions


def agreement(scores: ExitScores, thresholds: npt.ArrayLike, chunk: int = 256) -> Float64Array:
    """(points,) share of samples each threshold row answers as the final exit does (needs `scores.agrees`)."""
    assert scores.agrees is not None, "agreement needs each exit's agreement with the final exit"
    thresholds = np.atleast_2d(np.asarray(thresholds, dtype=np.float64))
    samples, out = np.arange(len(scores)), np.empty(len(thresholds))
    for start in range(0, len(thresholds), chunk):
        taken = exits_taken(scores.confidence, thresholds[start : start + chunk])
        out[start : start + chunk] = scores.agrees[taken, samples].mean(axis=1)
    return out


def pareto(cost: Float64Array, accuracy: Float64Array) -> IntArray:
    """Indices of the points no other point beats, cheapest first: each is more accurate than every cheaper one."""
    best, keep = -np.inf, []
    for i in np.lexsort((-accuracy, cost)):
        if accuracy[i] > best:
            keep.append(i)
            best = accuracy[i]
    return np.asarray(keep, dtype=int)


def _logit(p: Float64Array) -> Float64Array:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    logit: Float64Array = np.log(p) - np.log1p(-p)
    return logit


def candidates(conf: Float64Array, levels: int, offsets: Sequence[float]) -> tuple[Float64Array, list[SearchKind]]:
    """Threshold rows to try: a shared threshold at each quantile of the pooled early-exit confidences,
    and the same thresholds moved at each early exit by every combination of log-odds `offsets`."""
    n_exits = conf.shape[0]
    grid = np.unique(np.quantile(conf[:-1].ravel(), np.linspace(0.0, 1.0, levels)))
    rows, kinds = [], []
    for shift in product(offsets, repeat=n_exits - 1):
        if len(set(shift)) == 1 and shift[0]:
            continue  # the same move at every exit is just another shared threshold
        kind: SearchKind = "shared" if not any(shift) else "per-exit"
        early = grid[:, None] if kind == "shared" else 1 / (1 + np.exp(-(_logit(grid)[:, None] + np.array(shift))))
        rows.append(np.hstack([np.broadcast_to(early, (len(grid), n_exits - 1)), np.zeros((len(grid), 1))]))
        kinds += [kind] * len(grid)
    return np.vstack(rows), kinds


@dataclass(frozen=True)
class SearchSettings:
    """How thresholds are proposed and kept; recorded in the manifest's provenance."""

    holdout_seed: int = 0
    levels: int = 64
    offsets: tuple[float, ...] = (-1.0, 0.0, 1.0)


def halves(n: int, seed: int) -> tuple[IntArray, IntArray]:
    """A seeded cut of n samples into half A (proposes thresholds) and half B (keeps and certifies them)."""
    order = np.random.default_rng(seed).permutation(n)
    return order[: n // 2], order[n // 2 :]


def propose(
    half_a: ExitScores, stage_macs: Sequence[float], settings: SearchSettings, agreeing: bool = False
) -> tuple[Float64Array, list[SearchKind]]:
    """The candidate thresholds that are Pareto-optimal on half A for accuracy against expected MACs, and
    with `agreeing` also those for agreement with the final exit against expected MACs; cheapest first."""
    cumulative = np.cumsum(np.asarray(stage_macs, dtype=np.float64))
    rows, kinds = candidates(half_a.confidence, settings.levels, settings.offsets)
    accuracy, fractions = score(half_a, rows)
    cost = fractions @ cumulative
    proposed = pareto(cost, accuracy)
    if agreeing:
        proposed = np.union1d(proposed, pareto(cost, agreement(half_a, rows)))
        proposed = proposed[np.argsort(cost[proposed], kind="stable")]
    return rows[proposed], [kinds[i] for i in proposed]


def search(
    scores: ExitScores, stage_macs: Sequence[float], settings: SearchSettings = SearchSettings()
) -> tuple[list[tuple[SearchKind, Float64Array]], IntArray]:
    """Frontier thresholds: proposed on validation half A (Pareto there), kept if Pareto on half B.

    Returns (kind, thresholds) rows cheapest first, plus half B's sample indices so the caller can
    report accuracy on the half no proposal saw. Cost is expected MACs, a property of the model and
    the same on every host, so the frontier does not move with timing noise.
    """
    half_a, half_b = halves(len(scores), settings.holdout_seed)
    rows, kinds = propose(scores.take(half_a), stage_macs, settings)
    accuracy, fractions = score(scores.take(half_b), rows)
    kept = pareto(fractions @ np.cumsum(np.asarray(stage_macs, dtype=np.float64)), accuracy)
    return [(kinds[i], rows[i]) for i in kept], half_b


def full_thresholds(n_exits: int) -> Float64Array:
    """The point that never leaves early: every sample runs to the final exit."""
    return np.array([NEVER] * (n_exits - 1) + [0.0])


def cheapest_within(points: Sequence[OperatingPoint], reference: float, tolerance: float) -> OperatingPoint:
    """The cheapest point (in MACs) whose validation accuracy is at most `tolerance` below `reference`."""
    eligible = [p for p in points if p.val_accuracy >= reference - tolerance - 1e-12]
    if not eligible:
        raise ValueError(f"no operating point within {tolerance} of accuracy {reference}")
    return min(eligible, key=lambda p: (p.expected_macs, -p.val_accuracy))


def operating_points(
    named: Sequence[tuple[str, SearchKind]],
    rows: Float64Array,
    val: ExitScores,
    test: ExitScores,
    stage_macs: Sequence[float],
    batch1: StageLatency,
    holdout: ExitScores | None = None,
) -> list[OperatingPoint]:
    """Operating points of threshold rows, one per (name, search kind): scored on validation (and its
    held-out half) and on test, priced in MACs and with the batch-1 stage latencies."""
    val_acc, val_frac = score(val, rows)
    hold_acc = score(holdout, rows)[0] if holdout is not None else [None] * len(rows)
    test_acc, test_frac = score(test, rows)
    points = []
    for (name, kind), row, va, vf, ha, ta, tf in zip(
        named, rows, val_acc, val_frac, hold_acc, test_acc, test_frac, strict=True
    ):
        latency = expected_cost(vf, batch1.stage_ms)
        points.append(
            OperatingPoint(
                name=name,
                search=kind,
                thresholds=[float(t) for t in row],
                val_accuracy=float(va),
                holdout_accuracy=None if ha is None else float(ha),
                test_accuracy=float(ta),
                exit_fractions=[float(f) for f in vf],
                test_exit_fractions=[float(f) for f in tf],
                expected_macs=expected_cost(vf, stage_macs),
                expected_latency_ms=latency,
                relative_cost=latency / batch1.full_graph_ms,
            )
        )
    return points


def priced(point: OperatingPoint, latency: StageLatency) -> OperatingPoint:
    """The point with its expected latency recomputed from a (new) batch-1 cost profile."""
    ms = expected_cost(point.exit_fractions, latency.stage_ms)
    return point.model_copy(update={"expected_latency_ms": ms, "relative_cost": ms / latency.full_graph_ms})
