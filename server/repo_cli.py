"""`branchserve calibrate` and `branchserve inspect`: model-repository commands that need no torch.

`calibrate` re-measures stage latency on this host and re-prices the frontier; which points exist
and which is the default were chosen at export on validation accuracy and MACs, which no host
changes. `inspect` prints a version's exits and frontier and plots accuracy against cost.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from server.frontier import NEVER, priced
from server.manifest import MANIFEST_FILE, Manifest, RepositoryError
from server.profiling import cost_profile
from server.repository import load_version


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


def frontier_table(m: Manifest) -> str:
    final_test = m.exits[-1].test_accuracy
    rows = []
    for p in m.frontier:
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


def print_summary(m: Manifest) -> None:
    c = m.cost
    load = "" if c.load_average is None else f", load average {c.load_average[0]:.2f}"
    print(f"{m.name}/{m.version}: {len(m.exits)} exits, confidence {m.confidence}, default {m.default_operating_point}")
    print(f"\nExits (accuracy on validation and test; cost at batch 1):\n{exits_table(m)}")
    print(f"\nFrontier (* default; test never chose anything):\n{frontier_table(m)}")
    print(f"\nLatency, median ms, on {c.host} ({c.cpu_count} CPUs{load}), measured {c.measured_at}:")
    print(latency_table(m))


def plot(m: Manifest, path: Path) -> None:
    """Accuracy against expected latency (relative to the full graph); beneath, each point's exit shares."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted(m.frontier, key=lambda p: p.expected_macs)
    x = [p.relative_cost for p in points]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 8), height_ratios=(3, 2))
    top.plot(x, [100 * p.val_accuracy for p in points], "o-", ms=3, label="validation")
    top.plot(x, [100 * p.test_accuracy for p in points], "s--", ms=3, label="test (reported only)")
    top.axhline(100 * m.exits[-1].test_accuracy, color="grey", lw=0.8, ls=":", label="final exit, test")
    default = m.operating_point(m.default_operating_point)
    top.annotate(
        f"default: {default.name}",
        (default.relative_cost, 100 * default.test_accuracy),
        xytext=(10, -25),
        textcoords="offset points",
        arrowprops={"arrowstyle": "->"},
    )
    top.set_xlabel("expected latency / full graph latency (batch 1)")
    top.set_ylabel("accuracy %")
    top.set_title(f"{m.name}/{m.version}: accuracy against expected cost")
    top.legend(loc="lower right")
    top.grid(alpha=0.3)
    bars, bottoms = range(len(points)), [0.0] * len(points)
    for k in range(len(m.exits)):
        share = [100 * p.exit_fractions[k] for p in points]
        bottom.bar(bars, share, bottom=bottoms, label=f"exit {k}")
        bottoms = [b + s for b, s in zip(bottoms, share, strict=True)]
    bottom.set_xticks(list(bars), [f"{p.name}\n{p.relative_cost:.2f}" for p in points], rotation=90, fontsize="x-small")
    bottom.set_ylabel("validation images leaving, %")
    bottom.set_title(
        "where images leave, per point (cheapest in MACs first; label: name, relative latency)", fontsize="medium"
    )
    bottom.set_ylim(0, 118)
    bottom.legend(loc="upper center", fontsize="small", ncols=len(m.exits), frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def calibrate(version_dir: Path, batch_sizes: Sequence[int], runs: int, progress: bool = True) -> Manifest:
    """Re-measure the cost profile on this host, re-price every point, rewrite manifest.json."""
    m = load_version(version_dir)
    cost = cost_profile(
        [version_dir / s.file for s in m.stages],
        version_dir / m.full_graph.file,
        m.input.shape,
        batch_sizes,
        runs,
        progress,
    )
    m = m.model_copy(update={"cost": cost, "frontier": [priced(p, cost.at_batch(1)) for p in m.frontier]})
    tmp = version_dir / (MANIFEST_FILE + ".tmp")
    tmp.write_text(m.model_dump_json(indent=2) + "\n")
    tmp.replace(version_dir / MANIFEST_FILE)
    return load_version(version_dir)


def _calibrate(args: argparse.Namespace) -> None:
    try:
        m = calibrate(args.version_dir, args.batch_sizes, args.runs)
    except (RepositoryError, ValueError) as e:
        sys.exit(f"branchserve calibrate: {e}")
    print_summary(m)


def _inspect(args: argparse.Namespace) -> None:
    try:
        m = load_version(args.version_dir)
    except RepositoryError as e:
        sys.exit(f"branchserve inspect: {e}")
    print_summary(m)
    out = args.plot or Path(f"{m.name}-{m.version}-frontier.png")
    plot(m, out)
    print(f"\nplot: {out}")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def register(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("calibrate", help="re-measure a model version's stage latency on this host")
    c.add_argument("version_dir", type=Path, help="e.g. models/fmnist-resnet/3")
    c.add_argument("--batch-sizes", type=_ints, default=[1, 8, 64], help="batch sizes to time (1 is required)")
    c.add_argument("--runs", type=int, default=2000, help="timed runs at batch 1 (fewer for larger batches)")
    c.set_defaults(func=_calibrate)
    i = sub.add_parser("inspect", help="print a model version's exits and frontier, plot the frontier")
    i.add_argument("version_dir", type=Path, help="e.g. models/fmnist-resnet/3")
    i.add_argument("--plot", type=Path, help="PNG to write (default: ./<name>-<version>-frontier.png)")
    i.set_defaults(func=_inspect)
