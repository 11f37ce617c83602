"""Markdown reports with PNG plots for `analyze` and `study`.

Plots use matplotlib's object API (Figure, no pyplot), which renders with Agg and needs no display.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from branchserve.training.analysis import Analysis, ModelAnalysis, relative_change
from branchserve.training.config import StudySpec, cell_name
from branchserve.training.study import CellResult
from branchserve.training.study_stats import CellStats, Interval, cell_stats

DPI = 90


def _pct(x: float | None) -> str:
    return "–" if x is None or math.isnan(x) else f"{100 * x:.1f}"


def _change(x: float) -> str:
    return "–" if math.isnan(x) else f"{100 * x:+.1f} %"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])


def _mark_exits(ax: Axes, exits: Sequence[int]) -> None:
    for e in exits:
        ax.axvline(e, color="0.85", lw=0.8, zorder=0)


def plot_depth(analysis: Analysis, path: Path) -> None:
    """Probe accuracy, R² and CKA with the model's own last block, by depth, for both models."""
    models = [m for m in (analysis.model, analysis.reference) if m is not None]
    fig = Figure(figsize=(11, 3.2))
    axes = fig.subplots(1, 3)
    for m, style in zip(models, ("o-", "s--"), strict=False):
        depth = [layer.block for layer in m.layers]
        axes[0].plot(
            depth, [layer.probe_accuracy for layer in m.layers], style, label=f"{m.run} (AUC {m.probe_auc:.3f})"
        )
        axes[1].plot(depth, [layer.r2 for layer in m.layers], style, label=m.run)
        axes[2].plot(depth, [row[-1] for row in m.cka], style, label=f"{m.run}: vs own last block")
    if analysis.cross_cka is not None:
        diag = np.diag(np.array(analysis.cross_cka))
        axes[2].plot(range(len(diag)), diag, "^:", color="0.3", label="between models, same block")
    titles = ("linear-probe accuracy", "class separation R²", "linear CKA")
    for ax, title in zip(axes, titles, strict=True):
        _mark_exits(ax, analysis.model.exits)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("backbone block")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)


def plot_cka(analysis: Analysis, path: Path) -> None:
    """CKA between the blocks of each model, and between the blocks of the two models."""
    m = analysis.model.run
    panels = [(analysis.model.cka, f"{m}", m, m)]
    if analysis.reference is not None and analysis.cross_cka is not None:
        ref = analysis.reference.run
        panels += [(analysis.reference.cka, ref, ref, ref), (analysis.cross_cka, f"{m} vs {ref}", m, ref)]
    fig = Figure(figsize=(3.3 * len(panels) + 0.8, 3.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (matrix, title, rows, cols) in zip(axes, panels, strict=True):
        image = ax.imshow(np.array(matrix), vmin=0, vmax=1, cmap="viridis", origin="lower")
        ax.set(title=title, ylabel=f"{rows} block", xlabel=f"{cols} block")
        ax.title.set_fontsize(9)
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="linear CKA")
    fig.savefig(path, dpi=DPI)


def _accuracies(m: ModelAnalysis) -> str:
    return " / ".join(_pct(a) for a in m.test_accuracy) if m.test_accuracy else "–"


def analysis_markdown(analysis: Analysis) -> str:
    m, ref, s = analysis.model, analysis.reference, analysis.settings
    view = "global average pooling" if s.pool == 1 else f"average pooling to {s.pool}×{s.pool}, flattened"
    lines = [
        f"# Representation analysis: {m.run}" + (f" against {ref.run}" if ref else ""),
        "",
        f"Features after every backbone block ({view}) on the first {s.probe_train + s.probe_test} validation "
        f"images. Linear probes (L2-regularised logistic regression, λ={s.probe_l2:g}) train on the first "
        f"{s.probe_train} and are scored on the other {s.probe_test}; R² and CKA use all of them. "
        f"Exits of {m.run} sit after blocks {', '.join(map(str, m.exits))}.",
        "",
        _table(
            ["run", "exits after blocks", "test accuracy per exit (%)", "probe-accuracy AUC"],
            [[x.run, ", ".join(map(str, x.exits)), _accuracies(x), f"{x.probe_auc:.4f}"] for x in (m, ref) if x],
        ),
        "",
        "## Layer by layer",
        "",
    ]
    if ref is None:
        rows = [
            [str(a.block), f"{a.channels}×{a.resolution}²", _pct(a.probe_accuracy), f"{a.r2:.4f}"] for a in m.layers
        ]
        lines.append(_table(["block", "shape", "probe acc. (%)", "R²"], rows))
    else:
        lines += _comparison(analysis, ref)
    lines += ["", "![metrics by depth](depth.png)", "", "![CKA heat-maps](cka.png)", ""]
    return "\n".join(lines)


def _comparison(analysis: Analysis, ref: ModelAnalysis) -> list[str]:
    """Layer-by-layer table of the model against the reference, and the probe AUCs."""
    m = analysis.model
    cross = np.diag(np.array(analysis.cross_cka))
    rows = [
        [
            str(a.block) + (" (exit)" if a.block in m.exits else ""),
            f"{a.channels}×{a.resolution}²",
            _pct(a.probe_accuracy),
            _pct(b.probe_accuracy),
            _change(relative_change(a.probe_accuracy, b.probe_accuracy)),
            f"{a.r2:.4f}",
            f"{b.r2:.4f}",
            _change(relative_change(a.r2, b.r2)),
            f"{cross[a.block]:.3f}",
        ]
        for a, b in zip(m.layers, ref.layers, strict=True)
    ]
    header = [
        "block",
        "shape",
        f"probe {m.run} (%)",
        f"probe {ref.run} (%)",
        "Δ probe",
        f"R² {m.run}",
        f"R² {ref.run}",
        "Δ R²",
        "CKA between",
    ]
    return [
        _table(header, rows),
        "",
        "Δ is the relative change of the first model against the second, (a − b) / b. "
        "'CKA between' is linear CKA of the same block in the two models.",
        "",
        f"Probe-accuracy AUC (area under accuracy against normalised depth): {m.run} {m.probe_auc:.4f}, "
        f"{ref.run} {ref.probe_auc:.4f} ({_change(relative_change(m.probe_auc, ref.probe_auc))}).",
    ]


def write_analysis(analysis: Analysis, out: Path) -> Path:
    """analysis.json, depth.png, cka.png and report.md in `out`; returns the report's path."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "analysis.json").write_text(analysis.model_dump_json(indent=2) + "\n")
    plot_depth(analysis, out / "depth.png")
    plot_cka(analysis, out / "cka.png")
    report = out / "report.md"
    report.write_text(analysis_markdown(analysis))
    return report


def _iv(x: Interval | None, scale: float = 100.0, digits: int = 2, sign: str = "") -> str:
    """`mean ± half` (95 % t-interval), `*` when a difference's interval excludes zero."""
    if x is None or math.isnan(x.mean):
        return "–"
    text = f"{scale * x.mean:{sign}.{digits}f}"
    if math.isnan(x.half):
        return text
    return f"{text} ± {scale * x.half:.{digits}f}" + ("*" if sign and x.excludes_zero() else "")


def plot_study(stats: list[CellStats], path: Path) -> None:
    """Per cell, means over seeds: test accuracy per exit, probe accuracy and class separation by block."""
    fig = Figure(figsize=(13, 3.8))
    axes = fig.subplots(1, 3)
    for c in stats:
        style = "s--" if len(c.exits) == 1 else ".-"
        label = f"{c.name} ({len(c.seeds)} seed{'s' if len(c.seeds) > 1 else ''})"
        line = axes[0].plot(c.exits, [a.mean for a in c.test_accuracy], style, label=label)[0]
        axes[1].plot(range(len(c.probe)), [a.mean for a in c.probe], style, color=line.get_color())
        axes[2].plot(range(len(c.r2)), [a.mean for a in c.r2], style, color=line.get_color())
    axes[0].set(title="test accuracy per exit", xlabel="block the exit follows", ylabel="accuracy")
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[1].set(title="linear-probe accuracy", xlabel="backbone block", ylabel="accuracy")
    axes[2].set(title="class separation R²", xlabel="backbone block", ylabel="R²")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=min(len(stats), 4), fontsize=7)
    fig.tight_layout(rect=(0, 0.05 * math.ceil(len(stats) / 4), 1, 1))
    fig.savefig(path, dpi=DPI)


def study_table(stats: list[CellStats], budget: float) -> str:
    rows = [
        [
            c.name,
            ",".join(map(str, c.seeds)),
            " / ".join(_pct(a.mean) for a in c.test_accuracy),
            _iv(c.final),
            _iv(c.final_vs_base, sign="+"),
            "–" if c.at_budget is None else f"{_iv(c.at_budget)} ({_iv(c.budget_cost, 1.0)})",
            _iv(c.at_budget_vs_base, sign="+"),
            _iv(c.probe_auc, digits=1),
            f"{c.wall_time_s.mean / 60:.1f}",
        ]
        for c in stats
    ]
    header = [
        "cell",
        "seeds",
        "test acc. per exit (%, mean)",
        "final exit (%)",
        "Δ final vs base (pp)",
        f"acc. at cost ≤ {budget:g} (%) (cost)",
        "Δ at budget vs base (pp)",
        "probe AUC (%)",
        "min per run",
    ]
    return _table(header, rows)


def separation_table(stats: list[CellStats]) -> str:
    """Per branched cell and block: relative change of R² and of probe accuracy against the unbranched
    twin of the same seed, and CKA of the block with the twin's."""
    compared = [c for c in stats if c.r2_vs_unbranched]
    if not compared:
        return "No unbranched cell finished yet: nothing to compare with."
    blocks = range(len(compared[0].r2))
    rows = [
        [
            c.name,
            what,
            *(
                _iv(
                    values[b],
                    digits=0 if what != "CKA" else 2,
                    scale=100 if what != "CKA" else 1,
                    sign="+" if what != "CKA" else "",
                )
                for b in blocks
            ),
        ]
        for c in compared
        for what, values in (
            ("Δ R² %", c.r2_vs_unbranched),
            ("Δ probe %", c.probe_vs_unbranched),
            ("CKA", c.cka_to_unbranched),
        )
        if values
    ]
    return _table(["cell", "metric", *(f"block {b}" for b in blocks)], rows)


def study_markdown(results: list[CellResult], spec: StudySpec, out: Path) -> str:
    a = spec.analysis
    stats = cell_stats(results, [cell_name(c) for c in spec.cells()])
    lines = [
        "# Regime study",
        "",
        f"Reproduce: `{spec.command(out)}`",
        "",
        f"Base preset `{spec.preset}`"
        + (f" with {', '.join(f'{k}={v}' for k, v in spec.fixed.items())}" if spec.fixed else "")
        + f", {spec.epochs} epochs per run, seeds {', '.join(map(str, spec.seeds))}, "
        + (f"trained on the first {spec.train_limit} training images." if spec.train_limit else "full training split.")
        + " Figures are means over the seeds finished (column `seeds`) ± the half-width of a 95 % t-interval; "
        "Δ columns are paired by seed against the `base` cell (the preset itself), `*` where the interval "
        "excludes zero. Accuracy at a cost budget: the early-exit frontier is searched on validation with "
        "`branchserve.repo.frontier.search` (the search export uses), the most accurate point whose validation "
        f"cost is at most {spec.cost_budget:g} × the unbranched model's MACs is chosen, and it is scored on test "
        "(the realised test cost in brackets). Probe AUC: area under linear-probe accuracy against normalised "
        f"depth, probes trained on {a.probe_train} and scored on {a.probe_test} validation images. "
        "Min per run: training epochs plus scoring.",
        "",
        study_table(stats, spec.cost_budget),
        "",
        "## Against the unbranched twin, block by block",
        "",
        "Relative change (a − b) / b of class separation R² and of linear-probe accuracy against the "
        "unbranched cell of the same seed, and linear CKA of each block with the twin's same block.",
        "",
        separation_table(stats),
        "",
        "![study](study.png)",
        "",
    ]
    return "\n".join(lines)


def write_study(results: list[CellResult], spec: StudySpec, out: Path) -> Path:
    plot_study(cell_stats(results, [cell_name(c) for c in spec.cells()]), out / "study.png")
    report = out / "study.md"
    report.write_text(study_markdown(results, spec, out))
    return report
