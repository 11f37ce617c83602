"""Encode a predict `Result` as the native /v1 JSON response (documented by schemas.PredictResponse)."""

from __future__ import annotations

import orjson

from branchserve.server.predictor import Result


def encode_native(result: Result) -> bytes:
    outcome, labels, budget, guarantee = result.outcome, result.manifest.labels, result.budget, result.choice.guarantee
    classes = outcome.classes.tolist()
    outputs: list[dict[str, object]] = [
        {"exit": k, "confidence": c, "class": y, "label": labels[y], "stages_run": k + 1}
        for k, c, y in zip(outcome.exits.tolist(), outcome.confidence.tolist(), classes, strict=True)
    ]
    if result.probabilities:
        for out, p in zip(outputs, outcome.probs.tolist(), strict=True):
            out["probabilities"] = p
    return orjson.dumps(
        {
            "model": result.manifest.name,
            "version": result.manifest.version,
            "outputs": outputs,
            "stages_run": len(outcome.stage_seconds),
            "latency_ms": result.latency_s * 1e3,
            "compute_ms": sum(outcome.stage_seconds) * 1e3,
            "budget": {
                "source": result.source,
                "operating_point": result.choice.name,
                "thresholds": result.choice.thresholds,
                "rung": result.rung,
                "guarantee": None if guarantee is None else guarantee.model_dump(),
                "deadline_ms": budget.deadline_ms,
                "max_exit": budget.max_exit,
                "max_accuracy_drop": budget.max_accuracy_drop,
            },
            "deadline_stopped": outcome.deadline_stopped,
            "deadline_missed": result.deadline_missed,
        }
    )
