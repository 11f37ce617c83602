"""Expected cost of an operating point: each sample pays for every stage up to the exit it leaves at."""

from __future__ import annotations

from collections.abc import Sequence


def expected_cost(exit_fractions: Sequence[float], stage_costs: Sequence[float]) -> float:
    """Σ_k f_k · Σ_{j≤k} c_j, for fractions f leaving at each exit and per-stage costs c (ms or MACs)."""
    total, cumulative = 0.0, 0.0
    for fraction, cost in zip(exit_fractions, stage_costs, strict=True):
        cumulative += cost
        total += fraction * cumulative
    return total
