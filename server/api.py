"""HTTP routes: the /v1 model API, health probes and /metrics.

Predict admits a request only while fewer than `max_in_flight` are in flight (else 503 with
Retry-After, so overload queues nowhere) and reads the body with a size limit. Then all CPU work
(parsing, decoding, inference, serialising) runs in one go: on the event loop for a small request
(a body of at most `inline_body_bytes` holding one input, or an image of at most INLINE_MAX_PIXELS),
where a hop to a worker thread would cost as much CPU as the work itself (~0.3–0.55 ms against
~0.5 ms, measured on the shipped model); otherwise in one hop to a worker thread, bounded by a
limiter of `inference_threads`, so a batch or a large image never stalls the loop.

Predict takes the request itself rather than FastAPI dependencies and a query model: on this
path they cost ~0.4 ms of CPU per request, as much as the model's first stage.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Annotated

import anyio
import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from PIL import Image
from pydantic import ValidationError

from server.budget import Budget, Policy
from server.inputs import (
    IMAGE_TYPES,
    JSON_TYPES,
    MULTIPART_TYPE,
    InputError,
    image_batch,
    image_upload,
    json_request,
    media_type,
    multipart_file,
    read_body,
    validation_message,
)
from server.metrics import CONTENT_TYPE, Metrics
from server.predictor import Job, ServedModel
from server.schemas import (
    CurrentOperatingPoint,
    ErrorResponse,
    ExitInfo,
    ModelMetadata,
    ModelSummary,
    PredictRequest,
    PredictResponse,
)
from server.settings import Settings

RETRY_AFTER_SECONDS = "1"
INLINE_MAX_PIXELS = 256 * 256  # decodes in well under a millisecond; a 1024×1024 PNG of 1 KB took 9 ms


@dataclass
class ServerState:
    settings: Settings
    models: dict[str, ServedModel]
    metrics: Metrics
    limiter: anyio.CapacityLimiter | None = None  # made at startup, inside the event loop
    in_flight: int = field(default=0)


async def state(request: Request) -> ServerState:
    return request.app.state.server


async def served_model(name: str, server: Annotated[ServerState, Depends(state)]) -> ServedModel:
    try:
        return server.models[name]
    except KeyError:
        raise HTTPException(404, f"no model named {name!r}; see GET /v1/models") from None


bearer = HTTPBearer(auto_error=False)


async def admin(
    server: Annotated[ServerState, Depends(state)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    token = server.settings.admin_token
    if token and not (credentials and secrets.compare_digest(credentials.credentials, token)):
        raise HTTPException(401, "admin endpoint: missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})


class PredictParams(Budget):
    """Query parameters of predict: the budget (for image uploads; a JSON body carries its own) and probabilities."""

    probabilities: bool = False


def predict_params(request: Request) -> PredictParams:
    try:
        return PredictParams.model_validate(dict(request.query_params))
    except ValidationError as e:
        raise InputError(422, validation_message(e.errors(), "query")) from None


def errors(*statuses: int) -> dict[int | str, dict]:
    return {status: {"model": ErrorResponse} for status in statuses}


PREDICT_ERRORS = errors(400, 404, 413, 415, 422, 503)
PREDICT_OPENAPI = {
    "parameters": [
        {"name": name, "in": "query", "required": False, "schema": schema}
        | ({"description": schema["description"]} if "description" in schema else {})
        for name, schema in PredictParams.model_json_schema()["properties"].items()
    ],
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/PredictRequest"}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            },
        },
    },
}
DOC_SCHEMAS = (PredictRequest,)  # referenced by PREDICT_OPENAPI; app.py adds them to the OpenAPI components

router = APIRouter()


def request_inputs(
    model: ServedModel, kind: str, content: bytes | Image.Image, params: PredictParams, max_batch: int
) -> tuple[np.ndarray, Budget, bool]:
    """A JSON body, image bytes or an opened image → (inputs, budget, whether probabilities were asked for)."""
    budget = Budget.model_construct(**params.model_dump(exclude={"probabilities"}))
    if kind in JSON_TYPES:
        assert isinstance(content, bytes)
        x, body_budget, body_probabilities = json_request(content, model.manifest.input, max_batch)
        return x, body_budget or budget, body_probabilities or params.probabilities
    image = content if isinstance(content, Image.Image) else image_upload(content)
    return image_batch(image, model.manifest.input), budget, params.probabilities


def answer(
    model: ServedModel,
    kind: str,
    content: bytes | Image.Image,
    params: PredictParams,
    started: float,
    degraded: bool,
    max_batch: int,
) -> bytes:
    """The CPU work of predict: body → inputs → response JSON."""
    x, budget, probabilities = request_inputs(model, kind, content, params, max_batch)
    return model.predict(Job(x, budget, probabilities, started, degraded))


@router.post(
    "/v1/models/{name}/predict",
    response_model=PredictResponse,
    responses=PREDICT_ERRORS,
    openapi_extra=PREDICT_OPENAPI,
    summary="Classify one input or a batch: JSON arrays, a PNG/JPEG body, or a multipart upload in field `file`",
)
async def predict(request: Request, name: str) -> Response:
    started = time.perf_counter()
    server: ServerState = request.app.state.server
    model = await served_model(name, server)
    settings, metrics = server.settings, server.metrics
    if server.in_flight >= settings.max_in_flight:
        metrics.requests.labels(model.name, "overloaded").inc()
        raise HTTPException(503, "overloaded: too many requests in flight", {"Retry-After": RETRY_AFTER_SECONDS})
    server.in_flight += 1
    metrics.in_flight.inc()
    try:
        params = predict_params(request)
        kind = media_type(request.headers.get("content-type"))
        if kind not in JSON_TYPES | IMAGE_TYPES | {MULTIPART_TYPE}:
            raise InputError(
                415,
                f"unsupported content type {kind!r}: send application/json, image/png, "
                "image/jpeg or multipart/form-data",
            )
        body = await read_body(request, settings.max_body_bytes)
        if kind == MULTIPART_TYPE:
            body = await multipart_file(request.headers, body)
        small = len(body) <= settings.inline_body_bytes
        if small:
            # A body already received never suspends this coroutine: yield once, so requests that
            # arrived meanwhile are counted in flight (admission, load point) before this one runs.
            await anyio.sleep(0)
        degraded = server.in_flight > settings.degrade_in_flight
        # A small body is parsed on the loop (cheap) and answered there if it holds one input or a
        # small image; anything else goes to a worker thread whole.
        if not small:
            work, inline = partial(answer, model, kind, body, params, started, degraded, settings.max_batch), False
        elif kind in JSON_TYPES:
            x, budget, probabilities = request_inputs(model, kind, body, params, settings.max_batch)
            work, inline = partial(model.predict, Job(x, budget, probabilities, started, degraded)), len(x) == 1
        else:
            image = image_upload(body)  # the header only
            work = partial(answer, model, kind, image, params, started, degraded, settings.max_batch)
            inline = image.width * image.height <= INLINE_MAX_PIXELS
        payload = work() if inline else await anyio.to_thread.run_sync(work, limiter=server.limiter)
    except InputError:
        metrics.requests.labels(model.name, "bad_input").inc()
        raise
    finally:
        server.in_flight -= 1
        metrics.in_flight.dec()
    return Response(payload, media_type="application/json")


@router.get("/v1/models", response_model=list[ModelSummary], summary="Models being served")
async def list_models(server: Annotated[ServerState, Depends(state)]) -> list[ModelSummary]:
    return [
        ModelSummary(name=m.name, version=m.manifest.version, exits=m.runtime.num_exits, operating_point=m.choice.name)
        for m in server.models.values()
    ]


def current_point(model: ServedModel) -> CurrentOperatingPoint:
    choice = model.current()
    saved = model.expected_saved(choice)
    return CurrentOperatingPoint(
        policy=model.policy,
        name=choice.name,
        thresholds=list(choice.thresholds),
        expected_compute_saved=None if choice.point is None else saved,
        stage_latency_ms=model.runtime.clock.per_input_ms(),
    )


@router.get("/v1/models/{name}", response_model=ModelMetadata, responses=errors(404), summary="Model metadata")
async def model_metadata(model: Annotated[ServedModel, Depends(served_model)]) -> ModelMetadata:
    m = model.manifest
    return ModelMetadata(
        name=m.name,
        version=m.version,
        input=m.input,
        labels=m.labels,
        confidence=m.confidence,
        exits=[
            ExitInfo(index=e.index, val_accuracy=e.val_accuracy, test_accuracy=e.test_accuracy, cumulative_macs=int(c))
            for e, c in zip(m.exits, model.runtime.cumulative_macs, strict=True)
        ],
        frontier=m.frontier,
        operating_point=current_point(model),
    )


@router.get("/v1/models/{name}/operating-point", response_model=CurrentOperatingPoint, responses=errors(404))
async def get_operating_point(model: Annotated[ServedModel, Depends(served_model)]) -> CurrentOperatingPoint:
    return current_point(model)


@router.put(
    "/v1/models/{name}/operating-point",
    response_model=CurrentOperatingPoint,
    responses=errors(400, 401, 404, 422),
    dependencies=[Depends(admin)],
    summary="Admin: set the server's operating point (bearer token if BRANCHSERVE_ADMIN_TOKEN is set)",
)
async def set_operating_point(
    policy: Policy, model: Annotated[ServedModel, Depends(served_model)]
) -> CurrentOperatingPoint:
    try:
        model.set_policy(policy)
    except ValueError as e:
        raise HTTPException(422, str(e)) from None
    return current_point(model)


@router.get("/v2/health/live", summary="Liveness: the process answers")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/v2/health/ready", summary="Readiness: every model loaded, checked and calibrated")
async def ready(server: Annotated[ServerState, Depends(state)]) -> dict[str, object]:
    if server.limiter is None:
        raise HTTPException(503, "starting up")
    return {"ready": True, "models": sorted(server.models)}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics(server: Annotated[ServerState, Depends(state)]) -> Response:
    return Response(server.metrics.render(), media_type=CONTENT_TYPE)
