"""HTTP routes: the native /v1 model API, health probes and /metrics.

Predict is decode → predict → encode (server/decoding.py, server/predictor.py, server/encoding.py);
the route itself keeps admission and where the work runs. All CPU work of a request runs in one
go: on the event loop for a light request (a body of at most `inline_body_bytes` holding one
input, or an image of at most 256×256 pixels), where a hop to a worker thread would cost as much
CPU as the work itself (~0.3–0.55 ms against ~0.5 ms on the shipped model); otherwise in one hop
to a worker thread, bounded by a limiter of `inference_threads`, so a batch or a large image never
stalls the loop. Predict reads the request itself rather than FastAPI dependencies and a query
model: on this path they cost ~0.4 ms of CPU per request, as much as the model's first stage.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Request, Response
from starlette.requests import ClientDisconnect

from branchserve.repo.points import Choice, Policy
from branchserve.server.admission import Admission
from branchserve.server.decoding import MULTIPART, QueryParams, media_type, multipart_file, parser_for, read_body
from branchserve.server.encoding import encode_native
from branchserve.server.errors import RequestError
from branchserve.server.predictor import DeadlineError, PredictError, PredictRequest, ServedModel
from branchserve.server.schemas import (
    CurrentOperatingPoint,
    ErrorResponse,
    ExitInfo,
    ModelMetadata,
    ModelSummary,
    PredictBody,
    PredictResponse,
    Rung,
)
from branchserve.server.state import ServerState, administered_model, client, served_model
from branchserve.server.transport import READY_AT, TIMED_OUT

log = logging.getLogger("branchserve")


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse} for status in statuses}


PREDICT_OPENAPI = {
    "parameters": [
        {"name": name, "in": "query", "required": False, "schema": schema}
        | ({"description": schema["description"]} if "description" in schema else {})
        for name, schema in QueryParams.model_json_schema()["properties"].items()
    ],
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/PredictBody"}},
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
DOC_SCHEMAS = (PredictBody,)  # referenced by PREDICT_OPENAPI; app.py adds them to the OpenAPI components

router = APIRouter()


def respond(model: ServedModel, decode: Callable[[], PredictRequest], admission: Admission, ready_at: float) -> bytes:
    """Decode, predict and encode, if admission lets the request start after its wait since `ready_at`."""
    started = admission.start(model.name, ready_at)
    try:
        return encode_native(model.predict(decode(), ready_at))
    except DeadlineError as e:
        admission.shed(model.name, str(e), "expired")
    finally:
        admission.finished(started)


async def answer(request: Request, model: ServedModel, server: ServerState) -> bytes:
    """Read the body, then decode, predict and encode on the loop or in one worker-thread hop."""
    settings, admission, limits = server.settings, server.admission, server.limits
    parse = parser_for(request.headers.get("content-type"), limits)
    body = await read_body(request, settings.max_body_bytes)
    if media_type(request.headers.get("content-type")) == MULTIPART:
        body = await multipart_file(request.headers, body)
    ready_at = request.scope.get(READY_AT) or time.perf_counter()  # the last byte's arrival
    decode = partial(parse, body, request.query_params, model.manifest.input, limits)
    if len(body) > settings.inline_body_bytes:
        return await anyio.to_thread.run_sync(respond, model, decode, admission, ready_at, limiter=server.limiter)
    decoded = decode()  # cheap at this size: JSON into arrays, or an image's header
    if decoded.light:
        return respond(model, lambda: decoded, admission, ready_at)
    return await anyio.to_thread.run_sync(respond, model, lambda: decoded, admission, ready_at, limiter=server.limiter)


@router.post(
    "/v1/models/{name}/predict",
    response_model=PredictResponse,
    responses=errors(400, 401, 404, 413, 415, 422, 503),
    openapi_extra=PREDICT_OPENAPI,
    summary="Classify one input or a batch: JSON arrays, a PNG/JPEG body, or a multipart upload in field `file`",
)
async def predict(request: Request, name: str) -> Response:
    server: ServerState = request.app.state.server
    model = server.model(name)
    server.keys.check(request)
    try:
        payload = await answer(request, model, server)
    except ClientDisconnect:
        outcome = "timed_out" if request.scope.get(TIMED_OUT) else "disconnected"
        server.metrics.requests.labels(model.name, outcome).inc()
        log.debug("predict %s: client %s before sending its whole body", name, outcome.replace("_", " "))
        return Response(status_code=400)  # never sent: the client is gone
    except (RequestError, PredictError) as e:
        if not (isinstance(e, RequestError) and e.status == 503):  # admission counted its refusals
            server.metrics.requests.labels(model.name, "bad_input").inc()
        raise
    return Response(payload, media_type="application/json")


@router.get("/v1/models", response_model=list[ModelSummary], responses=errors(401), summary="Models being served")
async def list_models(server: Annotated[ServerState, Depends(client)]) -> list[ModelSummary]:
    return [
        ModelSummary(name=m.name, version=m.manifest.version, exits=m.runtime.num_exits, operating_point=m.choice.name)
        for m in server.models.values()
    ]


def rung_of(model: ServedModel, choice: Choice) -> Rung:
    saved = None if choice.point is None else model.expected_saved(choice)
    return Rung(
        name=choice.name,
        thresholds=list(choice.thresholds),
        guarantee=choice.guarantee,
        expected_compute_saved=saved,
    )


def current_point(model: ServedModel) -> CurrentOperatingPoint:
    choice = model.current()
    return CurrentOperatingPoint(
        policy=model.policy,
        name=choice.name,
        thresholds=list(choice.thresholds),
        guarantee=choice.guarantee,
        expected_compute_saved=None if choice.point is None else model.expected_saved(choice),
        stage_latency_ms=model.runtime.clock.per_input_ms(),
        rungs=[rung_of(model, c) for c in model.rungs],
        rung=0 if model.ladder is None else min(model.ladder.rung, len(model.rungs) - 1),
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
        certificates=[] if m.certification is None else m.certification.certificates,
        operating_point=current_point(model),
    )


@router.get("/v1/models/{name}/operating-point", response_model=CurrentOperatingPoint, responses=errors(404))
async def get_operating_point(model: Annotated[ServedModel, Depends(served_model)]) -> CurrentOperatingPoint:
    return current_point(model)


@router.put(
    "/v1/models/{name}/operating-point",
    response_model=CurrentOperatingPoint,
    responses=errors(400, 401, 403, 404, 422),
    summary="Admin: set the server's operating point (needs BRANCHSERVE_ADMIN_TOKEN; disabled without one)",
)
async def set_operating_point(
    policy: Policy, model: Annotated[ServedModel, Depends(administered_model)]
) -> CurrentOperatingPoint:
    try:
        model.set_policy(policy)
    except ValueError as e:
        raise RequestError(422, str(e)) from None
    return current_point(model)
