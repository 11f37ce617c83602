"""The side-by-side table of a load test and the verdict against its budgets and baseline claims."""

from __future__ import annotations

from collections.abc import Callable

from branchserve.loadtest.analysis import RunSummary, missed_budgets
from branchserve.loadtest.plan import Plan
from branchserve.loadtest.runner import TargetResult

BRANCHSERVE, FULL_DEPTH, BASELINE = "branchserve", "branchserve-full-depth", "baseline"


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or not b else f"{a / b:.2f}×"


def table(results: list[TargetResult], p99_ms: float | None) -> str:
    """One column per server; a last column of branchserve / baseline when both ran."""
    by_name = {r.name: r for r in results}
    base, ours = by_name.get(BASELINE), by_name.get(BRANCHSERVE)
    exits = sorted({e for r in results for e in r.judged.exit_shares})

    capacity = f"highest req/s holding p99 ≤ {p99_ms:g} ms" if p99_ms else "highest req/s (step load)"
    rows: list[tuple[str, Callable[[TargetResult], float | None], str, bool]] = [  # label, value, format, ratio
        ("throughput, judged run (req/s)", lambda r: r.judged.rps, ".0f", True),
        ("p50 (ms)", lambda r: r.judged.p50_ms, ".1f", True),
        ("p95 (ms)", lambda r: r.judged.p95_ms, ".1f", True),
        ("p99 (ms)", lambda r: r.judged.p99_ms, ".1f", True),
        ("server CPU per request (ms)", lambda r: r.judged.server_cpu_ms_per_request, ".3f", True),
        (capacity, lambda r: r.capacity_rps, ".0f", True),
        ("accuracy, no-budget requests (%)", lambda r: r.judged.accuracy and 100 * r.judged.accuracy, ".2f", False),
        ("errors", lambda r: r.judged.errors, "d", False),
        ("overload answers (503/429)", lambda r: r.judged.overloads, "d", False),
    ]
    rows += [
        (f"answers at {e} (%)", lambda r, e=e: 100 * r.judged.exit_shares.get(e, 0.0), ".1f", False) for e in exits
    ]
    header = ["", *(r.name for r in results)] + (["branchserve / baseline"] if base and ours else [])
    lines = [header]
    for label, get, spec, with_ratio in rows:
        line = [label, *(fmt(get(r), spec) for r in results)]
        if base and ours:
            line.append(ratio(get(ours), get(base)) if with_ratio else "")
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines)


def steps_table(result: TargetResult) -> str:
    lines = [f"[{result.name}] step load: users, offered req/s, served req/s, p99 ms, overloads, errors, holds"]
    for s in result.steps:
        m = s.summary
        lines.append(
            f"  {s.users:4d} {s.offered_rps:8.0f} {m.rps:8.0f} {m.p99_ms:8.1f} {m.overloads:6d} {m.errors:6d}  {'yes' if s.holds else 'no'}"
        )
    return "\n".join(lines)


def verdict(plan: Plan, results: list[TargetResult]) -> list[str]:
    """Every missed budget (branchserve's judged run) and missed claim against the baseline."""
    by_name = {r.name: r for r in results}
    ours = by_name[BRANCHSERVE]
    missed = missed_budgets(ours.judged, plan.budgets)
    base, full = by_name.get(BASELINE), by_name.get(FULL_DEPTH)
    claims = plan.versus_baseline
    if base and claims.max_cpu_ratio is not None:
        missed += cpu_claim(ours.judged, base.judged, claims.max_cpu_ratio)
    if base and claims.min_capacity_ratio is not None:
        a, b = ours.capacity_rps, base.capacity_rps
        if a is None or b is None or a < claims.min_capacity_ratio * b:
            missed.append(
                f"capacity at the p99 budget {ratio(a, b)} the baseline's ({fmt(a, '.0f')} vs {fmt(b, '.0f')} req/s) "
                f"< claim {claims.min_capacity_ratio:g}×"
            )
    if full and claims.max_accuracy_drop_pp is not None:
        a, b = ours.judged.accuracy, full.judged.accuracy
        if a is None or b is None or 100 * (b - a) > claims.max_accuracy_drop_pp:
            missed.append(
                f"accuracy {fmt(a and 100 * a, '.2f')}% vs full depth {fmt(b and 100 * b, '.2f')}%: "
                f"drop > claim {claims.max_accuracy_drop_pp:g} pp"
            )
    return missed


def cpu_claim(ours: RunSummary, base: RunSummary, max_ratio: float) -> list[str]:
    a, b = ours.server_cpu_ms_per_request, base.server_cpu_ms_per_request
    if a is None or b is None:
        return ["server CPU per request: not measured (servers started elsewhere)"]
    if a > max_ratio * b:
        return [f"server CPU per request {a:.3f} ms = {a / b:.2f}× the baseline's {b:.3f} ms > claim {max_ratio:g}×"]
    return []
