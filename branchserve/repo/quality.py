"""Exit quality on live traffic: does each certified point still disagree with the final exit no more
than its certificate says?

The server samples inputs at random and runs each sample to the final exit. A sample then has
every exit's confidence and class, so it says what *every* point would have answered, whichever
answered it: one uniform sample of traffic checks every monitored point at once, including
points not being served (so a point taken out of service can show that it recovered).

Each point with a certified ε gets a one-sided anytime-valid test (branchserve/repo/sequences.py)
at level α / (points checked), so continuous checking of all of them raises a false alarm with
probability ≤ α while traffic looks like the calibration data.

* **Alarm** when the sequence's lower bound passes ε (its disagreement is above ε, shown at that
  level). The sequence then starts afresh.
* While alarmed, the sequence starts afresh whenever it shows the disagreement still above ε, so
  recovery is judged on evidence gathered since the shift was last seen, not diluted by it.
* **Recovery** when the sequence's upper bound falls below ε (shown below ε at the same level).
  The sequence starts afresh again, ready for the next alarm.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from branchserve.repo.frontier import exits_taken
from branchserve.repo.sequences import RateSequence
from branchserve.repo.tensors import Float64Array, FloatArray, IntArray

Event = Literal["alarm", "recovered"]


def disagreements(confidence: FloatArray | Float64Array, classes: IntArray, thresholds: Float64Array) -> IntArray:
    """(points,) how many samples each threshold row would answer differently from the final exit;
    `confidence` and `classes` are (exits, samples), every exit scored."""
    taken = exits_taken(confidence.astype(np.float64), thresholds)
    answered = classes[taken, np.arange(classes.shape[1])]
    counts: IntArray = (answered != classes[-1]).sum(axis=1)
    return counts


@dataclass
class PointCheck:
    """One monitored point: its certified ε (None: watched, never alarmed) and its current sequence."""

    name: str
    thresholds: tuple[float, ...]
    epsilon: float | None
    alpha: float
    alarmed: bool = False
    sequence: RateSequence = field(init=False)
    evidence: RateSequence | None = None  # the sequence that raised the last alarm or recovery

    def __post_init__(self) -> None:
        self.sequence = RateSequence(self.alpha)

    def observe(self, events: int, trials: int) -> Event | None:
        """Add samples; say whether this crossed into an alarm or out of one."""
        self.sequence.add(events, trials)
        if self.epsilon is None:
            return None
        above = self.sequence.above(self.epsilon)
        if self.alarmed and above:  # still shifted: count again from here
            self.sequence = RateSequence(self.alpha)
        if not (self.sequence.below(self.epsilon) if self.alarmed else above):
            return None
        self.alarmed, self.evidence, self.sequence = not self.alarmed, self.sequence, RateSequence(self.alpha)
        return "alarm" if self.alarmed else "recovered"


class QualityCheck:
    """The points being watched, each tested at level α / (points with an ε)."""

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.points: list[PointCheck] = []

    def watch(self, points: Sequence[tuple[str, tuple[float, ...], float | None]]) -> None:
        """Watch these (name, thresholds, ε) points; a point already watched with the same thresholds and ε
        keeps its sequence and alarm."""
        tested = max(1, sum(eps is not None for _, _, eps in points))
        old = {(p.name, p.thresholds, p.epsilon): p for p in self.points}
        kept = []
        for name, thresholds, epsilon in points:
            same = old.get((name, thresholds, epsilon))
            kept.append(same if same and same.alpha == self.alpha / tested else None)
        self.points = [
            same or PointCheck(name, thresholds, epsilon, self.alpha / tested)
            for same, (name, thresholds, epsilon) in zip(kept, points, strict=True)
        ]

    def observe(self, confidence: FloatArray | Float64Array, classes: IntArray) -> list[tuple[PointCheck, Event]]:
        """Score fully traced samples against every watched point; the alarms and recoveries they caused."""
        if not self.points:
            return []
        rows = np.array([p.thresholds for p in self.points], dtype=np.float64)
        counts = disagreements(confidence, classes, rows)
        events = [(p, p.observe(int(c), classes.shape[1])) for p, c in zip(self.points, counts, strict=True)]
        return [(p, e) for p, e in events if e is not None]
