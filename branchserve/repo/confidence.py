"""Confidence of an exit's prediction, the quantity thresholds are compared against.

Calibration (at export) and the server (at run time) both call these, so a threshold means the
same number in both places. Every measure is in [0, 1], higher is surer.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import numpy.typing as npt

from branchserve.repo.manifest import ConfidenceKind
from branchserve.repo.tensors import Float64Array, FloatT


def softmax(logits: npt.NDArray[FloatT]) -> npt.NDArray[FloatT]:
    z: npt.NDArray[FloatT] = logits - logits.max(axis=1, keepdims=True)
    e: npt.NDArray[FloatT] = np.exp(z)
    p: npt.NDArray[FloatT] = e / e.sum(axis=1, keepdims=True)
    return p


def max_softmax(p: npt.NDArray[FloatT]) -> npt.NDArray[FloatT]:
    top: npt.NDArray[FloatT] = p.max(axis=1)
    return top


def entropy(p: npt.NDArray[FloatT]) -> npt.NDArray[FloatT] | Float64Array:
    """One minus the entropy normalised by its maximum, log(classes). float64 for a float32 `p`:
    numpy's log(classes) is a float64 scalar, which promotes the array."""
    h: npt.NDArray[FloatT] = -(p * np.log(np.clip(p, 1e-12, 1.0))).sum(axis=1)
    score: npt.NDArray[FloatT] | Float64Array = 1.0 - h / np.log(p.shape[1])
    return score


def margin(p: npt.NDArray[FloatT]) -> npt.NDArray[FloatT]:
    """Top probability minus the runner-up."""
    top2 = np.partition(p, -2, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


class Measure(Protocol):
    """(samples, classes) probabilities → (samples,) confidences."""

    def __call__(self, p: npt.NDArray[FloatT], /) -> npt.NDArray[FloatT] | Float64Array: ...


MEASURES: dict[ConfidenceKind, Measure] = {
    "max_softmax": max_softmax,
    "entropy": entropy,
    "margin": margin,
}


def exit_confidence(
    logits: npt.NDArray[FloatT], kind: ConfidenceKind = "max_softmax"
) -> npt.NDArray[FloatT] | Float64Array:
    """`confidence(softmax(logits), kind)`, bit for bit, without the full softmax where a measure
    needs less: the top probability is exp(0)/Σexp(z − max) = 1/Σexp(z − max), one division per
    row instead of one per class. What the server computes at every stage for every input."""
    if kind != "max_softmax":
        return confidence(softmax(logits), kind)
    # The ufuncs' own reductions: `ndarray.max` and `.sum` reach them through a Python wrapper.
    e: npt.NDArray[FloatT] = np.exp(logits - np.maximum.reduce(logits, axis=1, keepdims=True))
    top: npt.NDArray[FloatT] = 1.0 / np.add.reduce(e, axis=1)
    return top


def confidence(probs: npt.NDArray[FloatT], kind: ConfidenceKind = "max_softmax") -> npt.NDArray[FloatT] | Float64Array:
    return MEASURES[kind](probs)
