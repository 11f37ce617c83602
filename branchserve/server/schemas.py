"""Request and response schemas for the OpenAPI docs and the metadata endpoints.

Predict bodies are not validated through these (see server/decoding.py); they document the
contract that the numpy checks and the orjson response (server/encoding.py) implement.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue
from typing_extensions import TypeAliasType

from branchserve.repo.manifest import Certificate, ConfidenceKind, Guarantee, InputSpec, OperatingPoint
from branchserve.repo.points import Policy
from branchserve.server.budget import Budget

EXAMPLE_INPUT: list[JsonValue] = [[0.0] * 28] * 28

VERSIONED: dict[str, Any] = {
    "parameters": [
        {
            "name": "version",
            "in": "path",
            "required": True,
            "schema": {"type": "string"},
            "description": "a model version being served; routes without it use the highest",
        }
    ]
}
"""`openapi_extra` of a route under `.../versions/{version}/...`: the route reads the version from the path
itself (the same function serves the route without it), so FastAPI does not document it."""


Nested = TypeAliasType("Nested", "float | Annotated[list[Nested], Field(min_length=1)]")
"""A number, or a non-empty array of them, nested to any depth (a schema cannot say "rectangular")."""


class PredictBody(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"inputs": EXAMPLE_INPUT, "budget": {"deadline_ms": 2}}]})

    inputs: list[Nested] = Field(
        min_length=1,
        description="one input as nested arrays of numbers, (C, H, W), (H, W) for one channel or flat (C·H·W), "
        "or a batch of them with a leading axis; normalised as the model's `input` spec says",
    )
    budget: Budget | None = None
    probabilities: bool = Field(False, description="include every class probability in each output")


class Prediction(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    exit: int = Field(description="exit that answered")
    confidence: float
    class_: int = Field(alias="class")
    label: str
    stages_run: int = Field(description="stages this input went through")
    probabilities: list[float] | None = Field(None, description="only when asked for")


class AppliedBudget(BaseModel):
    source: Literal["server", "ladder", "monitor", "request"] = Field(
        description="server: the server's operating point; ladder: a cheaper certified rung chosen under load; "
        "monitor: a stricter point serving for a rung whose exit-quality alarm is on; request: the request's "
        "max_accuracy_drop"
    )
    operating_point: str
    thresholds: list[float]
    rung: int | None = Field(description="ladder rung (0: the server's point); null for a request's own target")
    guarantee: Guarantee | None = Field(
        description="what the answering point is certified for; null when its choice made no certified claim"
    )
    deadline_ms: float | None
    max_exit: int | None
    max_accuracy_drop: float | None


class PredictResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "fmnist-resnet",
                    "version": 3,
                    "outputs": [{"exit": 0, "confidence": 0.998, "class": 9, "label": "Ankle boot", "stages_run": 1}],
                    "stages_run": 1,
                    "latency_ms": 0.61,
                    "compute_ms": 0.42,
                    "budget": {
                        "source": "server",
                        "operating_point": "near-final",
                        "thresholds": [0.93, 0.9, 0.8, 0.0],
                        "rung": 0,
                        "guarantee": None,
                        "deadline_ms": None,
                        "max_exit": None,
                        "max_accuracy_drop": None,
                    },
                    "deadline_stopped": False,
                    "deadline_missed": None,
                }
            ]
        }
    )

    model: str
    version: int
    outputs: list[Prediction] = Field(description="one per input, in order")
    stages_run: int = Field(description="stage calls the request made (its batch shrinks as inputs leave)")
    latency_ms: float = Field(description="server-side, from receiving the request to the answer")
    compute_ms: float = Field(description="time spent in stage graphs")
    budget: AppliedBudget
    deadline_stopped: bool = Field(description="a stage was skipped to meet the deadline")
    deadline_missed: bool | None = Field(description="answered after the deadline; null without one")


class ErrorResponse(BaseModel):
    detail: str


class OipErrorResponse(BaseModel):
    """The Open Inference Protocol's error body (every route under /v2)."""

    error: str


def errors(*statuses: int, oip: bool = False) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these error statuses, with the native or the OIP error body."""
    return {status: {"model": OipErrorResponse if oip else ErrorResponse} for status in statuses}


class ExitInfo(BaseModel):
    index: int
    val_accuracy: float
    test_accuracy: float
    cumulative_macs: int = Field(description="MACs to answer from this exit")


class Rung(BaseModel):
    name: str
    thresholds: list[float]
    guarantee: Guarantee | None
    expected_compute_saved: float | None = Field(description="vs full depth, by MACs; null for explicit thresholds")


class CurrentOperatingPoint(BaseModel):
    policy: Policy
    name: str
    thresholds: list[float]
    guarantee: Guarantee | None = Field(description="what the policy's point is certified for, if anything")
    expected_compute_saved: float | None = Field(description="vs full depth, by MACs; null for explicit thresholds")
    stage_latency_ms: list[float] = Field(description="live per-stage latency for one input on this host")
    rungs: list[Rung] = Field(description="the ladder's rungs, the policy's point first; one when the ladder is off")
    rung: int = Field(description="the rung serving requests that follow the policy now")


class ModelSummary(BaseModel):
    name: str
    version: int
    exits: int
    operating_point: str


class ModelMetadata(BaseModel):
    name: str
    version: int
    input: InputSpec
    labels: list[str]
    confidence: ConfidenceKind
    exits: list[ExitInfo]
    frontier: list[OperatingPoint]
    certificates: list[Certificate] = Field(description="targets certified when the version was calibrated")
    operating_point: CurrentOperatingPoint
