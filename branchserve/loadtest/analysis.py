"""From the locustfile's per-request records to figures: percentiles, throughput, exits, accuracy, steps.

Only successful answers count for latency and throughput; overload answers (503/429) and errors
are counted apart. Accuracy counts the requests without a budget (the server's operating point),
because a `max_exit` request trades accuracy on purpose, and weighs every sample image equally
(each image's share of correct answers, averaged), so the random choice of images per request
adds no noise and two runs compare on the same images.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from branchserve.loadtest.plan import Budgets, StepSearch

NO_BUDGET_TASKS = frozenset({"png", "json"})
FULL_GRAPH = "full graph"  # the baseline answers without an exit index


class Records(BaseModel):
    t: list[float]
    ms: list[float]
    outcome: list[str]
    task: list[str]
    sample: list[int]
    exit: list[int | None]
    correct: list[bool | None]


def read_records(path: Path) -> Records:
    return Records.model_validate(json.loads(path.read_bytes()))


class RunSummary(BaseModel):
    requests: int
    ok: int
    errors: int
    overloads: int
    duration_s: float
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    exit_shares: dict[str, float]
    accuracy: float | None
    server_cpu_ms_per_request: float | None = None

    @property
    def failure_ratio(self) -> float:
        return self.errors / max(self.requests, 1)

    @property
    def overload_ratio(self) -> float:
        return self.overloads / max(self.requests, 1)


def percentile(ms: np.ndarray, q: float) -> float:
    return float(np.percentile(ms, q)) if ms.size else float("nan")


def summarise(r: Records, window: tuple[float, float] | None = None) -> RunSummary:
    """Figures for all records, or for those that finished inside `window` (seconds from the start)."""
    t = np.asarray(r.t)
    start, end = window or (0.0, float(t.max(initial=0.0)) + 1e-9)
    keep = (t >= start) & (t < end)
    outcome = np.asarray(r.outcome)
    ok = np.flatnonzero(keep & (outcome == "ok"))
    ms = np.asarray(r.ms)[ok]
    duration = end - start
    exits = Counter(FULL_GRAPH if r.exit[i] is None else f"exit {r.exit[i]}" for i in ok)
    per_sample: dict[int, list[bool]] = {}
    for i in ok:
        if r.task[i] in NO_BUDGET_TASKS:
            per_sample.setdefault(r.sample[i], []).append(bool(r.correct[i]))
    return RunSummary(
        requests=int(keep.sum()),
        ok=ok.size,
        errors=int((keep & (outcome == "error")).sum()),
        overloads=int((keep & (outcome == "overload")).sum()),
        duration_s=duration,
        rps=ok.size / duration if duration > 0 else 0.0,
        p50_ms=percentile(ms, 50),
        p95_ms=percentile(ms, 95),
        p99_ms=percentile(ms, 99),
        exit_shares={name: n / ok.size for name, n in sorted(exits.items())},
        accuracy=float(np.mean([np.mean(c) for c in per_sample.values()])) if per_sample else None,
    )


class Step(BaseModel):
    users: int
    offered_rps: float
    summary: RunSummary
    holds: bool


def step_results(r: Records, search: StepSearch, max_failure_ratio: float) -> list[Step]:
    """Each step's figures, without its first second (users are still arriving)."""
    steps = []
    for k in range(search.steps):
        start, end = k * search.step_s, (k + 1) * search.step_s
        s = summarise(r, (start + 1, end))
        holds = s.ok > 0 and s.p99_ms <= search.p99_ms and (s.errors + s.overloads) / s.requests <= max_failure_ratio
        users = (k + 1) * search.users_per_step
        steps.append(Step(users=users, offered_rps=users * search.user_rps, summary=s, holds=holds))
    return steps


def best_step(steps: list[Step]) -> Step | None:
    """The step with the highest throughput among those that hold the p99 budget."""
    holding = [s for s in steps if s.holds]
    return max(holding, key=lambda s: s.summary.rps) if holding else None


def missed_budgets(s: RunSummary, b: Budgets) -> list[str]:
    """One line per missed budget: which, the measured value and by how much it missed."""
    if s.ok == 0:
        return [f"no successful answers ({s.errors} errors, {s.overloads} overload answers of {s.requests} requests)"]
    missed = []
    for name, budget in (("p50", b.p50_ms), ("p95", b.p95_ms), ("p99", b.p99_ms)):
        value = getattr(s, f"{name}_ms")
        if budget is not None and not value <= budget:
            missed.append(
                f"{name} latency {value:.1f} ms > budget {budget:g} ms (over by {value - budget:.1f} ms, {value / budget - 1:+.0%})"
            )
    if s.failure_ratio > b.max_failure_ratio:
        missed.append(
            f"failure ratio {s.failure_ratio:.4f} ({s.errors} of {s.requests}) > budget {b.max_failure_ratio:g} "
            f"(over by {s.failure_ratio - b.max_failure_ratio:.4f})"
        )
    if s.overload_ratio > b.max_overload_ratio:
        missed.append(
            f"overload ratio {s.overload_ratio:.4f} ({s.overloads} of {s.requests}) > budget {b.max_overload_ratio:g} "
            f"(over by {s.overload_ratio - b.max_overload_ratio:.4f})"
        )
    if b.min_rps is not None and s.rps < b.min_rps:
        missed.append(
            f"throughput {s.rps:.0f} req/s < budget {b.min_rps:g} req/s (short by {b.min_rps - s.rps:.0f}, {s.rps / b.min_rps - 1:+.0%})"
        )
    return missed
