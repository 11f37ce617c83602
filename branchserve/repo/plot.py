"""The frontier as a PNG: accuracy against expected latency, and where images leave at each point.

matplotlib is optional (the `plot` extra, part of `train`): `plot` raises PlotUnavailable with
the install command when it is missing, so `inspect` still prints its tables on a serve-only install.
"""

from __future__ import annotations

from pathlib import Path

from branchserve.repo.manifest import Manifest

INSTALL_HINT = "pip install 'branchserve[plot]' (matplotlib)"


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def plot(m: Manifest, path: Path) -> None:
    """Accuracy against expected latency (relative to the full graph); beneath, each point's exit shares."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotUnavailable(f"no plot: matplotlib is not installed; {INSTALL_HINT}") from None

    points = sorted(m.frontier, key=lambda p: p.expected_macs)
    x = [p.relative_cost for p in points]
    fig = Figure(figsize=(8, 8))
    top, bottom = fig.subplots(2, 1, height_ratios=(3, 2))
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
