"""A study's runs gathered per cell across seeds: means with 95 % intervals, and paired differences.

Runs of one seed share the backbone's initial weights, batch order and augmentation whatever the
cell (the heads are built after the backbone), so a cell is compared with the base cell and with the
unbranched cell seed by seed: the interval of a paired difference leaves out the seed-to-seed
spread that the two share.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from branchserve.training.analysis import relative_change
from branchserve.training.study import CellResult

_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)
"""Student's t quantile 0.975 for 1..10 degrees of freedom; past 10 the normal's 1.96 is close enough
for what these intervals are read for."""


@dataclass(frozen=True)
class Interval:
    """Mean of n values and the half-width of its 95 % t-interval (NaN for one value)."""

    mean: float
    half: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Interval:
        x = np.asarray(values, np.float64)
        if len(x) < 2:
            return cls(float(x.mean()) if len(x) else math.nan, math.nan, len(x))
        t = _T975[len(x) - 2] if len(x) - 1 <= len(_T975) else 1.96
        return cls(float(x.mean()), float(t * x.std(ddof=1) / math.sqrt(len(x))), len(x))

    def excludes_zero(self) -> bool:
        return not math.isnan(self.half) and abs(self.mean) > self.half


@dataclass(frozen=True)
class CellStats:
    """One cell over its seeds. Accuracies are fractions; `*_vs_base` are paired differences against
    the base cell (absolute), `*_vs_unbranched` per block are paired relative changes."""

    name: str
    exits: list[int]
    seeds: list[int]
    test_accuracy: list[Interval]
    final: Interval
    at_budget: Interval | None
    budget_cost: Interval | None
    probe_auc: Interval
    probe: list[Interval]
    r2: list[Interval]
    final_vs_base: Interval | None
    at_budget_vs_base: Interval | None
    probe_vs_unbranched: list[Interval] | None
    r2_vs_unbranched: list[Interval] | None
    cka_to_unbranched: list[Interval] | None
    wall_time_s: Interval


def _paired(
    runs: dict[int, CellResult], other: dict[int, CellResult], value: Callable[[CellResult], float | None]
) -> Interval | None:
    pairs = [(value(runs[s]), value(other[s])) for s in sorted(runs.keys() & other.keys())]
    diffs = [a - b for a, b in pairs if a is not None and b is not None]
    return Interval.of(diffs) if diffs else None


def _per_block(
    runs: dict[int, CellResult], twin: dict[int, CellResult], metric: Callable[[CellResult, int], float]
) -> list[Interval] | None:
    seeds = sorted(runs.keys() & twin.keys())
    if not seeds:
        return None
    blocks = range(len(runs[seeds[0]].analysis.layers))
    return [Interval.of([relative_change(metric(runs[s], b), metric(twin[s], b)) for s in seeds]) for b in blocks]


def _probe(r: CellResult, block: int) -> float:
    return r.analysis.layers[block].probe_accuracy


def _r2(r: CellResult, block: int) -> float:
    return r.analysis.layers[block].r2


def _budget(r: CellResult) -> float | None:
    return r.at_budget.accuracy if r.at_budget else None


def cell_stats(results: Sequence[CellResult], order: Sequence[str]) -> list[CellStats]:
    """Per cell in `order` (cells without runs are left out); `base` and the first unbranched cell
    are the references of the paired columns."""
    by_cell: dict[str, dict[int, CellResult]] = {}
    for r in results:
        by_cell.setdefault(r.name, {})[r.seed] = r
    base = by_cell.get("base", {})
    twin = next((runs for runs in by_cell.values() if next(iter(runs.values())).config["branches"] == 1), {})
    return [_one_cell(name, by_cell[name], base, twin) for name in order if name in by_cell]


def _one_cell(
    name: str, runs: dict[int, CellResult], base: dict[int, CellResult], twin: dict[int, CellResult]
) -> CellStats:
    rs = [runs[s] for s in sorted(runs)]
    branches = rs[0].config["branches"]
    budget = [r.at_budget for r in rs if r.at_budget]
    layers = range(len(rs[0].analysis.layers))
    compare = branches > 1 and runs is not twin
    ckas = [r.cka_to_unbranched for r in rs if r.cka_to_unbranched]
    return CellStats(
        name=name,
        exits=rs[0].analysis.exits,
        seeds=sorted(runs),
        test_accuracy=[Interval.of([r.test_accuracy[k] for r in rs]) for k in range(len(rs[0].test_accuracy))],
        final=Interval.of([r.final_accuracy for r in rs]),
        at_budget=Interval.of([p.accuracy for p in budget]) if budget else None,
        budget_cost=Interval.of([p.cost for p in budget]) if budget else None,
        probe_auc=Interval.of([r.probe_auc for r in rs]),
        probe=[Interval.of([_probe(r, b) for r in rs]) for b in layers],
        r2=[Interval.of([_r2(r, b) for r in rs]) for b in layers],
        final_vs_base=_paired(runs, base, lambda r: r.final_accuracy) if name != "base" else None,
        at_budget_vs_base=_paired(runs, base, _budget) if name != "base" else None,
        probe_vs_unbranched=_per_block(runs, twin, _probe) if compare else None,
        r2_vs_unbranched=_per_block(runs, twin, _r2) if compare else None,
        cka_to_unbranched=[Interval.of([c[b] for c in ckas]) for b in layers] if ckas else None,
        wall_time_s=Interval.of([r.wall_time_s for r in rs]),
    )
