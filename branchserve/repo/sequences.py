"""Anytime-valid bounds on a rate from a stream of 0/1 outcomes (a confidence sequence).

A fixed-n confidence interval checked after every sample raises a false alarm far more often
than its level says; a confidence sequence holds at every sample size at once, so it can be
checked continuously. Construction (Robbins' method of mixtures, by Ville's inequality): for a
rate p, the likelihood ratio of the outcomes under a rate θ against p, averaged over a fixed grid
of θ values, is a nonnegative supermartingale whenever the true rate is at most p (θ > p), or at
least p (θ < p). Such a process ever reaching 1/α has probability at most α. So:

* `above(p)`: evidence that the rate exceeds p, with a false-alarm probability ≤ α over the
  whole stream; `lower()` is the largest p with such evidence (P(ever lower() > rate) ≤ α);
* `below(p)` and `upper()` mirror them.

The grid is θ = p·r^j (above) or p/r^j (below), j = 1..J: a geometric spread covers alternatives
from a few percent off p to many times it, at a cost of log J in the threshold.
"""

from __future__ import annotations

import math

import numpy as np

RATIO = 1.25
COMPONENTS = 24  # θ from 1.25 p to 210 p (above), or down to p / 210 (below)
BISECTIONS = 32  # 1e-9 of [0, 1], or 2^-32 of the 12 decades a lower bound is searched in


class RateSequence:
    """Events out of trials so far, and anytime-valid one-sided tests and bounds on their rate at level α."""

    def __init__(self, alpha: float, ratio: float = RATIO, components: int = COMPONENTS) -> None:
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        self.alpha, self.events, self.trials = alpha, 0, 0
        self._threshold = math.log(1 / alpha)
        self._steps = ratio ** np.arange(1, components + 1)

    def add(self, events: int, trials: int) -> None:
        self.events += events
        self.trials += trials

    @property
    def mean(self) -> float:
        return self.events / self.trials if self.trials else math.nan

    def _log_evidence(self, p: float, thetas: np.ndarray) -> float:
        """log of the mixture likelihood ratio (uniform weights over the grid; θ outside (0, 1) weighs 0)."""
        thetas = thetas[(thetas > 0) & (thetas < 1)]
        if not len(thetas):
            return -math.inf
        s, f = self.events, self.trials - self.events
        logs = s * np.log(thetas / p) + f * (np.log1p(-thetas) - math.log1p(-p))
        top = float(logs.max())
        return top + math.log(float(np.exp(logs - top).sum()) / len(self._steps))

    def above(self, p: float) -> bool:
        """The rate exceeds p, on evidence that a stream with rate ≤ p shows with probability ≤ α."""
        return 0 < p < 1 and self._log_evidence(p, p * self._steps) >= self._threshold

    def below(self, p: float) -> bool:
        """The rate is under p, on evidence that a stream with rate ≥ p shows with probability ≤ α."""
        return 0 < p < 1 and self._log_evidence(p, p / self._steps) >= self._threshold

    def lower(self) -> float:
        """The largest p the stream is shown to exceed (0 if none); evidence falls as p rises."""
        if not self.events or not self.above(1e-12):
            return 0.0
        lo, hi = 1e-12, self.mean
        for _ in range(BISECTIONS):
            mid = math.sqrt(lo * hi)  # rates span orders of magnitude: bisect the logarithm
            lo, hi = (mid, hi) if self.above(mid) else (lo, mid)
        return lo

    def upper(self) -> float:
        """The smallest p the stream is shown to be under (1 if none); evidence rises with p."""
        if self.events == self.trials or not self.below(1 - 1e-12):
            return 1.0
        lo, hi = max(self.mean, 1e-12), 1 - 1e-12
        for _ in range(BISECTIONS):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if self.below(mid) else (mid, hi)
        return hi
