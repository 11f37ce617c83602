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

import secrets
import time
from dataclasses import dataclass
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from branchserve.repo.points import Policy
from branchserve.server.admission import Admission
from branchserve.server.decoding import MULTIPART, QueryParams, media_type, multipart_file, parser_for
from branchserve.server.encoding import encode_native
from branchserve.server.errors import RequestError
from branchserve.server.metrics import CONTENT_TYPE, Metrics
from branchserve.server.predictor import PredictError, PredictRequest, ServedModel
from branchserve.server.schemas import (
    CurrentOperatingPoint,
    ErrorResponse,
    ExitInfo,
    ModelMetadata,
    ModelSummary,
    PredictBody,
    PredictResponse,
)
from branchserve.server.settings import Settings


@dataclass
class ServerState:
    settings: Settings
    models: dict[str, ServedModel]
    metrics: Metrics
    admission: Admission
    limiter: anyio.CapacityLimiter | None = None  # made at startup, inside the event loop

    def model(self, name: str) -> ServedModel:
        try:
            return self.models[name]
        except KeyError:
            raise RequestError(404, f"no model named {name!r}; see GET /v1/models") from None


async def state(request: Request) -> ServerState:
    server: ServerState = request.app.state.server
    return server


async def served_model(name: str, server: Annotated[ServerState, Depends(state)]) -> ServedModel:
    return server.model(name)


bearer = HTTPBearer(auto_error=False)


async def admin(
    server: Annotated[ServerState, Depends(state)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    token = server.settings.admin_token
    given = credentials.credentials if credentials else ""
    if token and not secrets.compare_digest(given.encode(), token.encode()):
        raise RequestError(401, "admin endpoint: missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})


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


def respond(model: ServedModel, request: PredictRequest, started: float, loaded: bool) -> bytes:
    return encode_native(model.predict(request, started, loaded))


async def answer(request: Request, model: ServedModel, server: ServerState, started: float) -> bytes:
    """Read and decode the body, then predict and encode on the loop or in one worker-thread hop."""
    settings, admission = server.settings, server.admission
    parse = parser_for(request.headers.get("content-type"))
    body = await read_body(request, settings.max_body_bytes)
    if media_type(request.headers.get("content-type")) == MULTIPART:
        body = await multipart_file(request.headers, body)
    spec, query = model.manifest.input, request.query_params

    if len(body) > settings.inline_body_bytes:

        def decode_and_respond() -> bytes:
            return respond(model, parse(body, query, spec, settings.max_batch), started, admission.loaded)

        return await anyio.to_thread.run_sync(decode_and_respond, limiter=server.limiter)
    # A body already received never suspends this coroutine: yield once, so requests that arrived
    # meanwhile are counted in flight (admission, load point) before this one runs.
    await anyio.sleep(0)
    decoded = parse(body, query, spec, settings.max_batch)  # JSON into arrays, or an image's header
    if decoded.light:
        return respond(model, decoded, started, admission.loaded)
    loaded = admission.loaded
    return await anyio.to_thread.run_sync(lambda: respond(model, decoded, started, loaded), limiter=server.limiter)


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refusing (413) anything over `limit` bytes before or while it arrives."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body:
        raise RequestError(400, "empty body")
    return body


@router.post(
    "/v1/models/{name}/predict",
    response_model=PredictResponse,
    responses=errors(400, 404, 413, 415, 422, 503),
    openapi_extra=PREDICT_OPENAPI,
    summary="Classify one input or a batch: JSON arrays, a PNG/JPEG body, or a multipart upload in field `file`",
)
async def predict(request: Request, name: str) -> Response:
    started = time.perf_counter()
    server: ServerState = request.app.state.server
    model = server.model(name)
    with server.admission.slot(model.name):
        try:
            payload = await answer(request, model, server, started)
        except (RequestError, PredictError):
            server.metrics.requests.labels(model.name, "bad_input").inc()
            raise
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
        raise RequestError(422, str(e)) from None
    return current_point(model)


@router.get("/v2/health/live", summary="Liveness: the process answers")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/v2/health/ready", summary="Readiness: every model loaded, checked and calibrated")
async def ready(server: Annotated[ServerState, Depends(state)]) -> dict[str, object]:
    if server.limiter is None:
        raise RequestError(503, "starting up")
    return {"ready": True, "models": sorted(server.models)}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics(server: Annotated[ServerState, Depends(state)]) -> Response:
    return Response(server.metrics.render(), media_type=CONTENT_TYPE)
