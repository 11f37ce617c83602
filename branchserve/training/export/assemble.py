"""A version's contents, assembled in a work folder: graphs, checks, scores, cost profile, manifest."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import onnx
import torch

from branchserve.repo.certify import certify
from branchserve.repo.frontier import ExitScores
from branchserve.repo.manifest import ExitSpec, FullGraphSpec, InputSpec, Manifest, StageSpec, input_from_v1, sha256_of
from branchserve.repo.profiling import cost_profile
from branchserve.repo.sessions import load_session
from branchserve.training.backbones.staged import StagedNet
from branchserve.training.data import Dataset
from branchserve.training.export import ExportError
from branchserve.training.export.calibration import (
    ExportSettings,
    check_split,
    exit_scores,
    frontier_points,
    reliability,
)
from branchserve.training.export.graphs import FULL_FILE, OPSET, boundary_name, logits_name, stage_file, write_graphs
from branchserve.training.export.numerics import verify_numerics
from branchserve.training.model import BranchedNet, stage_macs
from branchserve.training.provenance import checkout
from branchserve.training.train import CHECKPOINT, SUMMARY, load_model


@dataclass(frozen=True)
class TrainedRun:
    """A finished run folder, read once: the model, its summary, and the data its checkpoint expects."""

    folder: Path
    model: BranchedNet
    summary: dict[str, Any]
    input: InputSpec
    labels: list[str]
    checkpoint_sha256: str


def read_summary(run_dir: Path) -> dict[str, Any]:
    if not (run_dir / SUMMARY).is_file():
        raise ExportError(f"{run_dir}/{SUMMARY} not found: the run has not finished training")
    summary: dict[str, Any] = json.loads((run_dir / SUMMARY).read_text())
    return summary


def load_run(run_dir: Path) -> TrainedRun:
    summary = read_summary(run_dir)
    model, ckpt = load_model(run_dir)
    spec = InputSpec.model_validate(input_from_v1(ckpt["input"]))
    # hashed now: a retraining run may replace the checkpoint later
    return TrainedRun(run_dir, model, summary, spec, ckpt["labels"], sha256_of(run_dir / CHECKPOINT))


def assemble_version(
    run: TrainedRun, name: str, version: int, data: Dataset, work: Path, settings: ExportSettings, progress: bool
) -> Manifest:
    """Write the graphs into `work`, check them, score every exit, time the stages; return the manifest."""
    model, n = run.model, len(run.model.heads)
    write_graphs(model, run.input, work)
    worst = verify_numerics(model, work, n, data.val.head(settings.numerics_batch).loaded().x)
    session = load_session(work / FULL_FILE)
    val = exit_scores(session, n, data.val, settings.confidence, "val", progress)
    test = exit_scores(session, n, data.test, settings.confidence, "test", progress)
    check_split(val, run.summary)
    stage_files = [work / stage_file(k) for k in range(n)]
    cost = cost_profile(
        stage_files, work / FULL_FILE, run.input.shape, settings.batch_sizes, settings.latency_runs, progress
    )
    per_stage = stage_macs(model)
    macs = [float(r["backbone_macs"] + r["head_macs"]) for r in per_stage]
    frontier, default = frontier_points(val, test, macs, cost, settings)
    return Manifest(
        name=name,
        version=version,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        input=run.input,
        labels=data.labels,
        confidence=settings.confidence,
        stages=[
            StageSpec(
                index=k,
                file=stage_file(k),
                sha256=sha256_of(work / stage_file(k)),
                input_name=run.input.name if k == 0 else boundary_name(k - 1),
                boundary_output=boundary_name(k) if k < n - 1 else None,
                logits_output=logits_name(k),
                backbone_macs=per_stage[k]["backbone_macs"],
                head_macs=per_stage[k]["head_macs"],
            )
            for k in range(n)
        ],
        exits=exit_specs(model, val, test),
        full_graph=FullGraphSpec(
            file=FULL_FILE,
            sha256=sha256_of(work / FULL_FILE),
            input_name=run.input.name,
            logits_outputs=[logits_name(k) for k in range(n)],
            boundary_outputs=[boundary_name(k) for k in range(n - 1)],
        ),
        frontier=frontier,
        default_operating_point=default,
        cost=cost,
        certification=certify(val, test, macs, settings.search, frontier, cost.at_batch(1), settings.certify),
        provenance=provenance(run, data, settings, worst),
    )


def exit_specs(model: BranchedNet, val: ExitScores, test: ExitScores) -> list[ExitSpec]:
    return [
        ExitSpec(
            index=k,
            after_block=after,
            val_accuracy=float(val.correct[k].mean()),
            test_accuracy=float(test.correct[k].mean()),
            mean_confidence=float(val.confidence[k].mean()),
            reliability=reliability(val.confidence[k], val.correct[k]),
            after_module=model.exit_module(k) if isinstance(model, StagedNet) else None,
        )
        for k, after in enumerate(model.arch.exits)
    ]


def provenance(run: TrainedRun, data: Dataset, settings: ExportSettings, worst: float) -> dict[str, Any]:
    """Where the version comes from: the run (regime, data, training figures) and the export itself."""
    summary = run.summary
    training_keys = ("data", "val_accuracy", "test_accuracy", "epochs", "wall_time_s", "parameters", "phases")
    return {
        "run": str(run.folder),
        "checkpoint_sha256": run.checkpoint_sha256,
        "regime": summary["config"],
        "seed": summary["config"]["seed"],
        "arch": summary["arch"],
        "backbone": summary.get("backbone"),
        "data": {
            **data.describe(),
            "source": data.source.model_dump(mode="json") if data.source else None,
            "calibrated_on": "val",
            "test_use": "reported only",
        },
        "training": {k: summary.get(k) for k in (*training_keys, "commit", "uncommitted_changes")},
        "export": {
            **asdict(checkout()),
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "opset": OPSET,
            "max_abs_diff_vs_torch": worst,
            "confidence": settings.confidence,
            "search": asdict(settings.search),
            "default_rule": f"cheapest point (expected MACs) with val accuracy ≥ final exit's − {settings.default_tolerance}",
        },
    }
