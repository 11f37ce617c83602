"""Budgets → per-exit thresholds: pick an operating point on a manifest's frontier.

The frontier was searched on validation data at export, so every choice here compares
validation accuracy (test accuracy is for reporting only) and ranks cost by expected MACs,
except a latency budget, which prices each point with stage latencies measured on this host.
A target with a `risk` is certified instead (branchserve/repo/certify.py): the choice then
carries the guarantee a response states.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer, model_validator
from pydantic.json_schema import SkipJsonSchema

from branchserve.repo.certify import FULL_DEPTH, cheapest_certified, is_full_depth
from branchserve.repo.frontier import cheapest_within, expected_cost
from branchserve.repo.manifest import Guarantee, Manifest, OperatingPoint

TARGETS = ("point", "max_disagreement", "max_accuracy_drop", "latency_budget_ms", "thresholds")
"""A policy's ways to pick a point: at most one of them."""


class Policy(BaseModel):
    """The server's operating point for a model: at most one field, plus `risk` with a certified target
    (its JSON Schema says so too: no two targets, `max_disagreement` requires `risk`, `risk` requires a
    certified target, no nulls); none means the manifest's default."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "maxProperties": 2,
            "not": {"anyOf": [{"required": [a, b]} for i, a in enumerate(TARGETS) for b in TARGETS[i + 1 :]]},
            "dependentRequired": {"max_disagreement": ["risk"]},
            "dependentSchemas": {
                "risk": {"anyOf": [{"required": ["max_disagreement"]}, {"required": ["max_accuracy_drop"]}]}
            },
            "examples": [{"max_accuracy_drop": 0.005}, {"max_disagreement": 0.01, "risk": 0.05}],
        },
    )

    point: str | SkipJsonSchema[None] = Field(None, description="a frontier point by name")
    # Constraints go inside Annotated: on the union with SkipJsonSchema, pydantic would write them
    # into the JSON schema under their own names (ge, gt) instead of minimum, exclusiveMinimum.
    max_disagreement: Annotated[float, Field(ge=0, le=1)] | SkipJsonSchema[None] = Field(
        None,
        description="certified (needs `risk`): the cheapest point whose disagreement with the final exit is ≤ this",
    )
    max_accuracy_drop: Annotated[float, Field(ge=0, le=1)] | SkipJsonSchema[None] = Field(
        None,
        description="largest drop below the final exit's accuracy: the cheapest point that meets it "
        "(on validation; certified when `risk` is given)",
    )
    latency_budget_ms: Annotated[float, Field(gt=0)] | SkipJsonSchema[None] = Field(
        None, description="expected mean latency per input: the most accurate point that fits"
    )
    thresholds: (
        Annotated[list[Annotated[float, Field(ge=0, allow_inf_nan=False)]], Field(min_length=1)] | SkipJsonSchema[None]
    ) = Field(
        None, description="explicit per-exit thresholds; a sample leaves at exit k when confidence ≥ thresholds[k]"
    )
    risk: Annotated[float, Field(gt=0, lt=1)] | SkipJsonSchema[None] = Field(
        None,
        description="δ of a certified target: the target holds with probability ≥ 1 − δ over calibration",
    )

    @model_validator(mode="before")
    @classmethod
    def _at_most_one(cls, data: object) -> object:
        if isinstance(data, dict):
            if nulls := sorted(k for k, v in data.items() if v is None):
                raise ValueError(f"{', '.join(nulls)}: null is not a value; leave the field out")
            given = sorted(k for k in data if k != "risk")
            if len(given) > 1:
                raise ValueError(f"give at most one of {', '.join(TARGETS)}; got {given}")
            if "max_disagreement" in data and "risk" not in data:
                raise ValueError("max_disagreement needs risk: the δ it holds at, e.g. 0.05")
            if "risk" in data and not {"max_disagreement", "max_accuracy_drop"} & set(data):
                raise ValueError("risk (δ) goes with max_disagreement or max_accuracy_drop")
        return data

    @model_serializer(mode="wrap")
    def _without_nulls(self, handler: SerializerFunctionWrapHandler) -> dict[str, object]:
        """Only the fields given: an absent field is absent, not null."""
        return {k: v for k, v in handler(self).items() if v is not None}


@dataclass(frozen=True)
class Choice:
    """Thresholds in force and where they came from; `point` is None for explicit thresholds; `guarantee`
    is what a certified target (or full depth, exactly) lets a response claim."""

    name: str
    thresholds: tuple[float, ...]
    point: OperatingPoint | None
    guarantee: Guarantee | None = None

    @classmethod
    def of(cls, point: OperatingPoint, guarantee: Guarantee | None = None) -> Choice:
        if guarantee is None and is_full_depth(point.thresholds):
            guarantee = FULL_DEPTH
        return cls(point.name, tuple(point.thresholds), point, guarantee)


def cheapest_meeting(manifest: Manifest, max_drop: float) -> OperatingPoint:
    """Cheapest point (expected MACs) whose validation accuracy is at most `max_drop` below the final exit's.

    A drop of 0 means full depth: an early-exit point that ties the final exit on validation
    (same count of correct samples) is a tie by chance, not a promise of no loss.
    """
    full = [p for p in manifest.frontier if p.search == "full"]
    if max_drop == 0 and full:
        return full[0]
    return cheapest_within(manifest.frontier, manifest.exits[-1].val_accuracy, max_drop)


def most_accurate_within(manifest: Manifest, budget_ms: float, stage_ms: Sequence[float]) -> OperatingPoint:
    """Most accurate point whose expected latency per input, priced with `stage_ms`, fits; else the cheapest."""

    def latency(p: OperatingPoint) -> float:
        return expected_cost(p.exit_fractions, stage_ms)

    fitting = [p for p in manifest.frontier if latency(p) <= budget_ms]
    if not fitting:
        return min(manifest.frontier, key=latency)
    return max(fitting, key=lambda p: (p.val_accuracy, -latency(p)))


def choose(manifest: Manifest, policy: Policy, stage_ms: Sequence[float]) -> Choice:
    """Apply a policy; raises ValueError (safe to show a client) when it does not fit this model."""
    if policy.thresholds is not None:
        if len(policy.thresholds) != len(manifest.exits):
            raise ValueError(
                f"{manifest.name} has {len(manifest.exits)} exits, got {len(policy.thresholds)} thresholds"
            )
        return Choice("custom", tuple(policy.thresholds), None)
    if policy.risk is not None and policy.max_disagreement is not None:
        return Choice.of(*cheapest_certified(manifest, "disagreement", policy.max_disagreement, policy.risk))
    if policy.risk is not None and policy.max_accuracy_drop is not None:
        return Choice.of(*cheapest_certified(manifest, "accuracy_drop", policy.max_accuracy_drop, policy.risk))
    if policy.max_accuracy_drop is not None:
        return Choice.of(cheapest_meeting(manifest, policy.max_accuracy_drop))
    if policy.latency_budget_ms is not None:
        return Choice.of(most_accurate_within(manifest, policy.latency_budget_ms, stage_ms))
    name = manifest.default_operating_point if policy.point is None else policy.point
    try:
        return Choice.of(manifest.operating_point(name))
    except KeyError:
        names = ", ".join(p.name for p in manifest.frontier)
        raise ValueError(f"{manifest.name} has no operating point {name!r}; it has {names}") from None
