"""Calibration on the validation split: each exit's confidence and accuracy, and the frontier of
operating points the server chooses from. The test split is scored beside every figure and never
used for a choice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort
from tqdm import tqdm

from branchserve.repo.certify import DEFAULT_TARGETS, Target
from branchserve.repo.frontier import (
    ExitScores,
    SearchSettings,
    cheapest_within,
    full_thresholds,
    operating_points,
    score,
    search,
)
from branchserve.repo.manifest import CalibrationBin, ConfidenceKind, CostProfile, OperatingPoint
from branchserve.training.data import Samples
from branchserve.training.export import ExportError
from branchserve.training.export.graphs import logits_name

FINAL, NEAR_FINAL = "final", "near-final"


def exit_scores(
    full: ort.InferenceSession,
    n: int,
    split: Samples,
    confidence: ConfidenceKind,
    desc: str,
    progress: bool,
    batch: int = 500,
) -> ExitScores:
    """Every exit's confidence and correctness on a whole split (the images that could be read),
    from the exported graph (what the server runs)."""
    logits: list[list[np.ndarray]] = [[] for _ in range(n)]
    labels = []
    name = full.get_inputs()[0].name
    for x, y in tqdm(split.batches(batch), desc=desc, unit="batch", leave=False, disable=not progress):
        for k, z in enumerate(full.run([logits_name(j) for j in range(n)], {name: x.numpy()})):
            logits[k].append(z)
        labels.append(y.numpy())
    return ExitScores.from_logits([np.concatenate(z) for z in logits], np.concatenate(labels), confidence)


def reliability(conf: np.ndarray, correct: np.ndarray, bins: int = 10) -> list[CalibrationBin]:
    """Accuracy per equal-width confidence bin on [0, 1] (the last bin includes 1)."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, bins - 1)
    return [
        CalibrationBin(
            lower=float(edges[b]),
            upper=float(edges[b + 1]),
            count=int((which == b).sum()),
            accuracy=float(correct[which == b].mean()) if (which == b).any() else None,
        )
        for b in range(bins)
    ]


@dataclass(frozen=True)
class ExportSettings:
    """Everything an export chooses besides the run and the data; recorded in provenance."""

    confidence: ConfidenceKind = "max_softmax"
    search: SearchSettings = field(default_factory=SearchSettings)
    default_tolerance: float = 0.003
    certify: tuple[Target, ...] = DEFAULT_TARGETS
    batch_sizes: tuple[int, ...] = (1, 8, 64)
    latency_runs: int = 2000
    numerics_batch: int = 256


def frontier_points(
    val: ExitScores, test: ExitScores, macs: list[float], cost: CostProfile, settings: ExportSettings
) -> tuple[list[OperatingPoint], str]:
    """The searched frontier plus the full-depth point, scored on val, held-out half and test; and the default."""
    found, half_b = search(val, macs, settings.search)
    found.append(("full", full_thresholds(val.confidence.shape[0])))
    rows = np.stack([t for _, t in found])
    order = np.argsort(score(val, rows)[1] @ np.cumsum(macs), kind="stable")  # cheapest first
    named = [
        (FINAL if found[i][0] == "full" else f"{found[i][0]}-{rank:02d}", found[i][0]) for rank, i in enumerate(order)
    ]
    points = operating_points(named, rows[order], val, test, macs, cost.at_batch(1), val.take(half_b))
    final_acc = float(val.correct[-1].mean())
    default = cheapest_within(points, final_acc, settings.default_tolerance)
    if default.name != FINAL:
        points = [p.model_copy(update={"name": NEAR_FINAL}) if p is default else p for p in points]
        return points, NEAR_FINAL
    return points, FINAL


def check_split(val: ExitScores, summary: dict[str, Any]) -> None:
    """The exits must score what they scored in training on the validation images training scored
    (the first `eval_limit`, or all), or this is not the split the run used."""
    scored = summary["data"].get("eval_limit") or val.correct.shape[1]
    measured, trained = val.correct[:, :scored].mean(axis=1), np.asarray(summary["val_accuracy"])
    if np.abs(measured - trained).max() > 2 / scored:  # a near-tie may flip between torch and ORT
        raise ExportError(
            f"exits score {np.round(measured, 4).tolist()} on this validation split but "
            f"{np.round(trained, 4).tolist()} in training: is it the split the run used (--split-seed)?"
        )
