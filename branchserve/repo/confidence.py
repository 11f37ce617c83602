"""Confidence of an exit's prediction, the quantity thresholds are compared against.

Calibration (at export) and the server (at run time) both call these, so a threshold means the
same number in both places. Every measure is in [0, 1], higher is surer.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from branchserve.repo.manifest import ConfidenceKind


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def max_softmax(p: np.ndarray) -> np.ndarray:
    return p.max(axis=1)


def entropy(p: np.ndarray) -> np.ndarray:
    """One minus the entropy normalised by its maximum, log(classes)."""
    h = -(p * np.log(np.clip(p, 1e-12, 1.0))).sum(axis=1)
    return 1.0 - h / np.log(p.shape[1])


def margin(p: np.ndarray) -> np.ndarray:
    """Top probability minus the runner-up."""
    top2 = np.partition(p, -2, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


MEASURES: dict[ConfidenceKind, Callable[[np.ndarray], np.ndarray]] = {
    "max_softmax": max_softmax,
    "entropy": entropy,
    "margin": margin,
}


def confidence(probs: np.ndarray, kind: ConfidenceKind = "max_softmax") -> np.ndarray:
    return MEASURES[kind](probs)
