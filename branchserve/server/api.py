"""HTTP routes: the native /v1 model API, health probes and /metrics.

Predict is decode → predict → encode (server/decoding.py, server/predictor.py, server/encoding.py);
server/dispatch.py decides where the work runs and keeps admission. Predict reads the request
itself rather than FastAPI dependencies and a query model: on this path they cost ~0.4 ms of CPU
per request, as much as the model's first stage. Every route that names a model also takes
`/versions/{version}`; without it, the highest version served answers.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response

from branchserve.repo.points import Choice, Policy
from branchserve.server.decoding import MULTIPART, QueryParams, media_type, multipart_file, parser_for, read_body
from branchserve.server.dispatch import counted, dispatch
from branchserve.server.encoding import encode_native
from branchserve.server.errors import RequestError
from branchserve.server.predictor import ServedModel
from branchserve.server.schemas import (
    VERSIONED,
    CurrentOperatingPoint,
    ExitInfo,
    ModelMetadata,
    ModelSummary,
    PredictResponse,
    Rung,
    errors,
)
from branchserve.server.state import ServerState, admin, client, served_model
from branchserve.server.transport import READY_AT

PREDICT_PARAMETERS = [
    {"name": name, "in": "query", "required": False, "schema": schema}
    | ({"description": schema["description"]} if "description" in schema else {})
    for name, schema in QueryParams.model_json_schema()["properties"].items()
]
PREDICT_OPENAPI = {
    "parameters": PREDICT_PARAMETERS,
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/PredictBody"}},  # server/openapi.py
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

router = APIRouter()


async def answer(request: Request, model: ServedModel, server: ServerState) -> Response:
    """Read the body, then decode, predict and encode (server/dispatch.py says where)."""
    settings, limits = server.settings, server.limits
    parse = parser_for(request.headers.get("content-type"), limits)
    body = await read_body(request, settings.max_body_bytes)
    ready_at = request.scope.get(READY_AT) or time.perf_counter()  # the last byte's arrival
    started = server.admission.start(model.labels, ready_at)  # before parsing a multipart body
    if media_type(request.headers.get("content-type")) == MULTIPART:
        body = await multipart_file(request.headers, body)
    decode = partial(parse, body, request.query_params, model.manifest.input, limits)
    payload = await dispatch(server, model, decode, encode_native, len(body), ready_at, started)
    return Response(payload, media_type="application/json")


PREDICT_RESPONSES = errors(400, 401, 404, 413, 415, 422, 503)
VERSIONED_PREDICT_OPENAPI = PREDICT_OPENAPI | {"parameters": PREDICT_PARAMETERS + VERSIONED["parameters"]}


@router.post(
    "/v1/models/{name}/versions/{version}/predict",
    response_model=PredictResponse,
    responses=PREDICT_RESPONSES,
    openapi_extra=VERSIONED_PREDICT_OPENAPI,
    summary="Classify with one version of a model",
)
@router.post(
    "/v1/models/{name}/predict",
    response_model=PredictResponse,
    responses=PREDICT_RESPONSES,
    openapi_extra=PREDICT_OPENAPI,
    summary="Classify one input or a batch: JSON arrays, a PNG/JPEG body, or a multipart upload in field `file`",
)
async def predict(request: Request, name: str) -> Response:
    server: ServerState = request.app.state.server
    model = server.model(name, request.path_params.get("version"))
    server.keys.check(request)
    return await counted(request, model, server, answer(request, model, server))


@router.get(
    "/v1/models", response_model=list[ModelSummary], responses=errors(401), summary="Model versions being served"
)
async def list_models(server: Annotated[ServerState, Depends(client)]) -> list[ModelSummary]:
    return [
        ModelSummary(name=m.name, version=m.manifest.version, exits=m.runtime.num_exits, operating_point=m.choice.name)
        for m in server.repository.served()
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


@router.get(
    "/v1/models/{name}/versions/{version}",
    response_model=ModelMetadata,
    responses=errors(404),
    openapi_extra=VERSIONED,
    summary="Metadata of one version of a model",
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
    summary="Admin: set the server's operating point for every served version "
    "(needs BRANCHSERVE_ADMIN_TOKEN; disabled without one)",
)
async def set_operating_point(
    name: str, policy: Policy, server: Annotated[ServerState, Depends(admin)]
) -> CurrentOperatingPoint:
    try:
        model = server.repository.set_policy(name, policy)
    except RequestError:  # no such model: its 404
        raise
    except ValueError as e:
        raise RequestError(422, str(e)) from None
    server.peers.publish({"op": "policy", "model": name, "policy": policy.model_dump()})
    return current_point(model)
