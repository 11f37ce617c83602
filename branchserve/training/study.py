"""Regime study: train one model per cell of a grid over regime knobs and score every cell alike.

Every cell shares the base regime (preset, epoch budget, fixed fields) and differs only in its own
values; each is trained once per seed. A run is scored by per-exit test accuracy, its layer metrics
(probe accuracy, class separation, CKA within the model and against the unbranched cell of the same
seed, if the study has one), and the test accuracy of early exiting at a fixed expected cost. Runs
live in their own folders (cells/<cell>/seed-<s>), so an interrupted study resumes mid-run and a
finished run (score.json present) is never retrained. Seeds go round one after another: after the
first pass every cell has one seed, so a study cut short is still balanced.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, Field
from tqdm import tqdm

from branchserve.repo.frontier import ExitScores, expected_cost, full_thresholds, score, search
from branchserve.training.analysis import ModelAnalysis, analyze_model, block_features, linear_cka, probe_subset
from branchserve.training.config import ArchConfig, GridValue, RegimeConfig, StudySpec, cell_name
from branchserve.training.data import Dataset, Split
from branchserve.training.model import BranchedNet
from branchserve.training.train import load_model, train

SPEC = "spec.json"
SCORE = "score.json"
RESULTS = "results.json"
LOG_VAL = 2000
"""Validation images a cell's per-epoch log is scored on: the log steers nothing, and scoring the full
split after every epoch would cost a study about a third of its time. Scoring a cell uses all of it."""


class FrontierPoint(BaseModel):
    """One operating point; costs are expected MACs per image as a share of the unbranched model's."""

    thresholds: list[float]
    val_cost: float
    val_accuracy: float
    cost: float
    accuracy: float
    exit_fractions: list[float] = Field(description="share of test images leaving at each exit")


class CellResult(BaseModel):
    """One trained run of a cell: the cell at one seed."""

    name: str
    cell: dict[str, GridValue]
    seed: int = 0
    config: dict[str, Any]
    test_accuracy: list[float]
    final_accuracy: float
    probe_auc: float
    analysis: ModelAnalysis
    at_budget: FrontierPoint | None = Field(description="most accurate point on validation within the cost budget")
    frontier: list[FrontierPoint]
    cka_to_unbranched: list[float] | None = Field(
        None, description="linear CKA of each block with the same block of the unbranched cell of the same seed"
    )
    wall_time_s: float = Field(description="seconds spent on the cell: its training epochs, then scoring it")


@torch.no_grad()
def exit_scores(model: BranchedNet, split: Split, batch_size: int = 1000) -> ExitScores:
    model.eval()
    logits = [model(split.x[i : i + batch_size]) for i in range(0, len(split), batch_size)]
    return ExitScores.from_logits([torch.cat(z).numpy() for z in zip(*logits, strict=True)], split.y.numpy())


def frontier(val: ExitScores, test: ExitScores, stage_costs: list[float], reference: float) -> list[FrontierPoint]:
    """The early-exit frontier export would serve: thresholds searched on validation by
    `branchserve.repo.frontier.search`, plus the full-depth point, each scored on validation and on test."""
    n_exits = val.confidence.shape[0]
    found = search(val, stage_costs)[0] if n_exits > 1 else []
    rows = np.stack([*(t for _, t in found), full_thresholds(n_exits)])
    val_acc, val_frac = score(val, rows)
    test_acc, test_frac = score(test, rows)
    points = [
        FrontierPoint(
            thresholds=rows[i].tolist(),
            val_cost=expected_cost(val_frac[i], stage_costs) / reference,
            val_accuracy=float(val_acc[i]),
            cost=expected_cost(test_frac[i], stage_costs) / reference,
            accuracy=float(test_acc[i]),
            exit_fractions=test_frac[i].tolist(),
        )
        for i in range(len(rows))
    ]
    return sorted(points, key=lambda p: p.val_cost)


def best_within(points: list[FrontierPoint], budget: float) -> FrontierPoint | None:
    """The point most accurate on validation whose validation cost fits the budget; test never chooses."""
    fits = [p for p in points if p.val_cost <= budget]
    return max(fits, key=lambda p: (p.val_accuracy, -p.val_cost)) if fits else None


def score_cell(
    name: str,
    cell: dict[str, GridValue],
    model: BranchedNet,
    summary: dict[str, Any],
    data: Dataset,
    spec: StudySpec,
    progress: bool = True,
    unbranched: BranchedNet | None = None,
) -> CellResult:
    """Probe the cell's blocks and search its early-exit frontier on validation, then score on test;
    with the unbranched model of the same seed, also the CKA of each block with its twin's."""
    started = time.perf_counter()
    subset = probe_subset(data.val, spec.analysis)
    analysis, feats = analyze_model(model, subset, spec.analysis, name, summary["test_accuracy"], progress)
    twin_cka = None
    if unbranched is not None and len(unbranched.blocks) == len(model.blocks):
        twin = block_features(unbranched, subset.x, spec.analysis.pool)
        twin_cka = [linear_cka(f, g) for f, g in zip(feats, twin, strict=True)]
    macs = summary["stage_macs"]
    stage_costs = [float(s["backbone_macs"] + s["head_macs"]) for s in macs]
    reference = float(sum(s["backbone_macs"] for s in macs) + macs[-1]["head_macs"])
    points = frontier(exit_scores(model, data.val), exit_scores(model, data.test), stage_costs, reference)
    return CellResult(
        name=name,
        cell=cell,
        seed=summary["config"]["seed"],
        config=summary["config"],
        test_accuracy=summary["test_accuracy"],
        final_accuracy=summary["test_accuracy"][-1],
        probe_auc=analysis.probe_auc,
        analysis=analysis,
        at_budget=best_within(points, spec.cost_budget),
        frontier=points,
        cka_to_unbranched=twin_cka,
        wall_time_s=summary["wall_time_s"] + time.perf_counter() - started,
    )


def check_spec(out: Path, spec: StudySpec) -> None:
    """A folder holds one study: cells and seeds may change between runs (finished runs are reused,
    new ones added), everything that decides a run's numbers may not."""
    path = out / SPEC
    cells = {"grid", "vary", "extra", "seeds"}
    if path.is_file():
        old = StudySpec.model_validate_json(path.read_text())
        if old.model_dump(exclude=cells) != spec.model_dump(exclude=cells):
            raise ValueError(f"{out} holds a study with other settings ({path}); use a new --out")
    path.write_text(spec.model_dump_json(indent=2) + "\n")


def rank(results: list[CellResult]) -> list[CellResult]:
    """Best accuracy at the cost budget first; final-exit accuracy breaks ties and ranks cells with no fit."""
    return sorted(
        results,
        key=lambda r: (r.at_budget is not None, r.at_budget.accuracy if r.at_budget else 0, r.final_accuracy),
        reverse=True,
    )


def study_runs(spec: StudySpec) -> list[tuple[str, dict[str, GridValue], RegimeConfig]]:
    """(cell name, cell, regime) of every run, seed by seed; within a seed the unbranched cells come
    first, so the branched ones can be compared with their twin as soon as they are scored."""
    cells = spec.cells()
    runs = []
    for seed in spec.seeds:
        configs = [(cell_name(c), c, spec.config(c, seed)) for c in cells]
        runs += sorted(configs, key=lambda run: run[2].branches > 1)
    return runs


def run_study(
    spec: StudySpec,
    data: Dataset,
    out: Path,
    base_arch: ArchConfig | None = None,
    threads: int | None = None,
    progress: bool = True,
    after_cell: Callable[[list[CellResult]], object] | None = None,
    train_missing: bool = True,
) -> list[CellResult]:
    """Train and score every unfinished run, then return all runs ranked (also written to results.json).

    `after_cell` receives the ranked runs finished so far after each newly scored one, so a long
    study shows partial results while it runs. Without `train_missing`, unfinished runs are left
    out: the results of a study cut short, as they stand.
    """
    out.mkdir(parents=True, exist_ok=True)
    check_spec(out, spec)
    runs = study_runs(spec)  # validates every cell's regime before spending time on any
    results: list[CellResult] = []
    twins: dict[int, Path] = {}
    for name, cell, cfg in tqdm(runs, desc="study", unit="run", disable=not progress):
        run_dir = out / "cells" / name / f"seed-{cfg.seed}"
        score_path = run_dir / SCORE
        if cfg.branches == 1:
            twins.setdefault(cfg.seed, run_dir)
        if score_path.is_file():
            done = CellResult.model_validate_json(score_path.read_text())
            if done.config == cfg.model_dump():
                results.append(done)
                continue
        if not train_missing:
            continue
        summary = train(
            cfg,
            replace(data, val=data.val.head(LOG_VAL)),
            run_dir,
            base_arch,
            resume=True,
            threads=threads,
            train_limit=spec.train_limit,
            progress=progress,
        )
        model, _ = load_model(run_dir)
        twin = load_model(twins[cfg.seed])[0] if cfg.branches > 1 and cfg.seed in twins else None
        result = score_cell(name, cell, model, summary, data, spec, progress, twin)
        score_path.write_text(result.model_dump_json(indent=2) + "\n")
        results.append(result)
        if after_cell:
            after_cell(rank(results))
    ranked = rank(results)
    (out / RESULTS).write_text(json.dumps([r.model_dump() for r in ranked], indent=2) + "\n")
    return ranked
