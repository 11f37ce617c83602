"""Plain-text tables of a model version: its exits, its frontier and its latency profile.

Markdown-compatible, so the docs quote them as `branchserve inspect` prints them.
"""

from __future__ import annotations

from collections.abc import Sequence

from branchserve.repo.frontier import NEVER
from branchserve.repo.manifest import Manifest, OperatingPoint


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Right-aligned plain-text columns (Markdown-compatible, so the docs can quote it)."""
    cells = [list(map(str, headers)), *([str(c) for c in row] for row in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}"


def exits_table(m: Manifest) -> str:
    b1 = m.cost.at_batch(1)
    rows, macs, ms = [], 0, 0.0
    for stage, ex, stage_ms in zip(m.stages, m.exits, b1.stage_ms, strict=True):
        macs, ms = macs + stage.backbone_macs + stage.head_macs, ms + stage_ms
        rows.append(
            [
                ex.index,
                ex.after_block,
                _pct(ex.val_accuracy),
                _pct(ex.test_accuracy),
                f"{ex.mean_confidence:.3f}",
                f"{macs / 1e6:.2f}",
                f"{stage_ms:.3f}",
                f"{ms:.3f}",
                f"{ms / b1.full_graph_ms:.2f}",
            ]
        )
    headers = ["exit", "after block", "val %", "test %", "mean conf", "cum. MMACs", "stage ms", "cum. ms", "× full"]
    return table(headers, rows)


def frontier_table(m: Manifest, points: Sequence[OperatingPoint] | None = None) -> str:
    """The frontier's points (or `points`), cheapest first as stored."""
    final_test = m.exits[-1].test_accuracy
    rows = []
    for p in m.frontier if points is None else points:
        early = "/".join("never" if t >= NEVER else f"{t:.4f}" for t in p.thresholds[:-1])
        rows.append(
            [
                p.name + (" *" if p.name == m.default_operating_point else ""),
                p.search,
                early,
                _pct(p.val_accuracy),
                _pct(p.holdout_accuracy),
                _pct(p.test_accuracy),
                f"{100 * (p.test_accuracy - final_test):+.2f}",
                "/".join(f"{100 * f:.0f}" for f in p.exit_fractions),
                f"{p.expected_macs / 1e6:.2f}",
                f"{p.expected_latency_ms:.3f}",
                f"{p.relative_cost:.2f}",
            ]
        )
    headers = ["point", "search", "early thresholds", "val %", "holdout %", "test %", "Δtest pp", "exit % (val)"]
    return table([*headers, "MMACs", "ms (b=1)", "× full"], rows)


def latency_table(m: Manifest) -> str:
    rows = [
        [
            r.batch_size,
            " / ".join(f"{s:.3f}" for s in r.stage_ms),
            f"{r.chain_ms:.3f}",
            f"{r.full_graph_ms:.3f}",
            f"{r.chain_ms / r.full_graph_ms:.3f}",
            r.runs or "—",
        ]
        for r in m.cost.latency
    ]
    return table(["batch", "stage ms", "chain ms", "full ms", "chain / full", "runs"], rows)


def certification_table(m: Manifest) -> str:
    assert m.certification is not None
    macs = {p.name: p.expected_macs for p in m.frontier + m.certification.points}
    rows = [
        [c.risk, f"{c.epsilon:g}", f"{c.delta:g}", c.point, f"{c.bound:.4f}", f"{macs[c.point] / 1e6:.2f}"]
        for c in m.certification.certificates
    ]
    return table(["risk", "ε", "δ", "cheapest certified point", "its bound", "MMACs"], rows)


def print_summary(m: Manifest) -> None:
    c = m.cost
    load = "" if c.load_average is None else f", load average {c.load_average[0]:.2f}"
    print(f"{m.name}/{m.version}: {len(m.exits)} exits, confidence {m.confidence}, default {m.default_operating_point}")
    print(f"\nExits (accuracy on validation and test; cost at batch 1):\n{exits_table(m)}")
    print(f"\nFrontier (* default; test never chose anything):\n{frontier_table(m)}")
    print(f"\nLatency, median ms, on {c.host} ({c.cpu_count} CPUs{load}), measured {c.measured_at}:")
    print(latency_table(m))
    cert = m.certification
    if cert is None:
        print("\nNot certified: `branchserve calibrate --certify` adds risk bounds (docs/export.md).")
        return
    print(f"\nCertified ({len(cert.candidates)} candidates counted on {cert.sample}):")
    print(certification_table(m))
    print(f"Method: {cert.method}.")
    if cert.points:
        print("\nCertification's own points (not on the frontier; certified policies may choose them):")
        print(frontier_table(m, cert.points))
