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
from branchserve.training.config import StudySpec
from branchserve.training.study import CellResult

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


def plot_study(results: list[CellResult], budget: float, path: Path) -> None:
    """Test accuracy against expected cost for every cell; per-exit test accuracy; probe accuracy by depth."""
    fig = Figure(figsize=(13, 3.8))
    axes = fig.subplots(1, 3)
    for r in results:
        points = sorted(r.frontier, key=lambda p: p.cost)
        line = axes[0].plot([p.cost for p in points], [p.accuracy for p in points], ".-", lw=1.2, label=r.name)[0]
        if r.at_budget is not None:
            axes[0].plot([r.at_budget.cost], [r.at_budget.accuracy], "o", ms=8, mfc="none", color=line.get_color())
        axes[1].plot(range(len(r.test_accuracy)), r.test_accuracy, "o-", color=line.get_color())
        layers = r.analysis.layers
        axes[2].plot([x.block for x in layers], [x.probe_accuracy for x in layers], ".-", color=line.get_color())
    axes[0].axvline(budget, color="0.6", ls="--", lw=0.8)
    axes[0].set(title="early-exit frontier (test)", xlabel="expected cost / unbranched cost", ylabel="accuracy")
    axes[1].set(title="test accuracy per exit", xlabel="exit", ylabel="accuracy")
    axes[1].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[2].set(title="linear-probe accuracy", xlabel="backbone block", ylabel="accuracy")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=min(len(results), 3), fontsize=7)
    fig.tight_layout(rect=(0, 0.06 * math.ceil(len(results) / 3), 1, 1))
    fig.savefig(path, dpi=DPI)


def study_table(results: list[CellResult], budget: float) -> str:
    keys = list(results[0].cell) if results else []
    rows = [
        [
            str(i),
            *(str(r.cell[k]) for k in keys),
            " / ".join(_pct(a) for a in r.test_accuracy),
            _pct(r.final_accuracy),
            "–" if r.at_budget is None else f"{_pct(r.at_budget.accuracy)} ({r.at_budget.cost:.2f})",
            f"{r.probe_auc:.4f}",
            f"{r.wall_time_s:.0f}",
        ]
        for i, r in enumerate(results, 1)
    ]
    header = [
        "rank",
        *keys,
        "test acc. per exit (%)",
        "final exit (%)",
        f"acc. at cost ≤ {budget:g} (cost)",
        "probe AUC",
        "wall s",
    ]
    return _table(header, rows)


def study_markdown(results: list[CellResult], spec: StudySpec, out: Path) -> str:
    a = spec.analysis
    lines = [
        "# Regime study",
        "",
        f"Reproduce: `{spec.command(out)}`",
        "",
        f"Base preset `{spec.preset}`, {spec.epochs} epochs per cell, seed {spec.seed}, "
        + (f"trained on the first {spec.train_limit} training images." if spec.train_limit else "full training split.")
        + " Cells are ranked by test accuracy of early exiting at an expected cost of at most "
        f"{spec.cost_budget:g} × the unbranched model's MACs: the frontier is searched on validation with "
        "`branchserve.repo.frontier.search` (the search export uses), the most accurate point whose validation cost fits "
        "the budget is chosen, and it is scored on test (the realised test cost in brackets). "
        f"Probe AUC: area under linear-probe accuracy against normalised depth, probes trained on {a.probe_train} "
        f"and scored on {a.probe_test} validation images. Wall s: seconds a cell took to train (its epochs) "
        "and to score (probes and frontier).",
        "",
        study_table(results, spec.cost_budget),
        "",
        "![study](study.png)",
        "",
    ]
    return "\n".join(lines)


def write_study(results: list[CellResult], spec: StudySpec, out: Path) -> Path:
    plot_study(results, spec.cost_budget, out / "study.png")
    report = out / "study.md"
    report.write_text(study_markdown(results, spec, out))
    return report
