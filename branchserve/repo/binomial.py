"""Exact binomial tails and Clopper–Pearson bounds, in numpy (no scipy in a serving install).

A Clopper–Pearson bound inverts the binomial tail itself, so it holds at its stated level for
every sample size and every true rate: nothing here leans on a normal approximation. Bounds are
found by bisection on the rate and returned on the safe side of the bracket.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import numpy.typing as npt

BISECTIONS = 64  # halves [0, 1] to below 1e-19: far finer than any rate a sample can resolve


@lru_cache(maxsize=16)
def _log_factorials(n: int) -> npt.NDArray[np.float64]:
    """log k! for k = 0..n, kept for the few sample sizes a process sees (bisection calls it ~64 times a bound)."""
    table = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1, dtype=np.float64)))])
    table.flags.writeable = False
    return table


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X ≤ k) for X ~ Binomial(n, p), summed exactly in log space."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    i = np.arange(k + 1)
    lf = _log_factorials(n)
    log_pmf = lf[n] - lf[i] - lf[n - i] + i * math.log(p) + (n - i) * math.log1p(-p)
    top = log_pmf.max()
    return float(min(1.0, math.exp(top) * np.exp(log_pmf - top).sum()))


def upper_bound(k: int, n: int, delta: float) -> float:
    """One-sided Clopper–Pearson upper bound: P(rate ≤ bound) ≥ 1 − δ after k events in n trials."""
    _check(k, n, delta)
    if k == n:
        return 1.0
    lo, hi = k / n, 1.0  # P(X ≤ k; p) falls as p rises; find where it crosses δ
    for _ in range(BISECTIONS):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if binomial_cdf(k, n, mid) > delta else (lo, mid)
    return hi


def lower_bound(k: int, n: int, delta: float) -> float:
    """One-sided Clopper–Pearson lower bound: P(rate ≥ bound) ≥ 1 − δ after k events in n trials."""
    _check(k, n, delta)
    if k == 0:
        return 0.0
    lo, hi = 0.0, k / n  # P(X ≥ k; p) = 1 − P(X ≤ k − 1; p) rises with p; find where it crosses δ
    for _ in range(BISECTIONS):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if 1.0 - binomial_cdf(k - 1, n, mid) > delta else (mid, hi)
    return lo


def _check(k: int, n: int, delta: float) -> None:
    if not (0 <= k <= n and n > 0 and 0.0 < delta < 1.0):
        raise ValueError(f"need 0 ≤ k ≤ n, n > 0 and 0 < δ < 1; got k={k}, n={n}, δ={delta}")
