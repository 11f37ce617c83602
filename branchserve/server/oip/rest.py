"""The Open Inference Protocol's REST data plane: server and model metadata, readiness, and infer,
with tensors in JSON or in the binary tensor data extension (what `tritonclient.http` sends by default).

A binary request is a JSON header of `Inference-Header-Content-Length` bytes followed by the
tensors whose `parameters.binary_data_size` say how many bytes each takes, in input order. The
answer is binary for outputs asked for so (`binary_data` on an output, or `binary_data_output` on
the request, which tritonclient sets when it names no outputs), JSON otherwise. Every error is
`{"error": "..."}` (server/errors.py picks the key by path). Liveness and readiness need no key;
metadata and infer need an API key when keys are configured, as the native API does.
"""

from __future__ import annotations

import time
from importlib.metadata import version as package_version
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from branchserve.server.decoding import Limits, read_body, validation_message
from branchserve.server.dispatch import counted, dispatch
from branchserve.server.errors import RequestError
from branchserve.server.oip.tensors import (
    InputTensor,
    input_specs,
    output_specs,
    output_tensors,
    predict_request,
    requested_outputs,
    response_parameters,
)
from branchserve.server.predictor import PredictRequest, Result, ServedModel
from branchserve.server.schemas import VERSIONED, errors
from branchserve.server.state import ServerState, served_model, state
from branchserve.server.transport import READY_AT

HEADER_LENGTH = "Inference-Header-Content-Length"
EXTENSIONS = ["binary_tensor_data", "model_repository", "parameters"]
PLATFORM = "branchserve_staged_onnx"

Parameter = StrictBool | StrictInt | StrictFloat | StrictStr


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class RequestInput(_Message):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Parameter] = Field(default_factory=dict)
    data: Any = None  # checked as an array, not by pydantic


class RequestOutput(_Message):
    name: str
    parameters: dict[str, Parameter] = Field(default_factory=dict)


class InferenceRequest(_Message):
    id: str | None = None
    parameters: dict[str, Parameter] = Field(default_factory=dict)
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] = Field(default_factory=list)


router = APIRouter()
NOT_SERVED = errors(404, oip=True)
INFER_ERRORS = errors(400, 401, 404, 413, 415, 422, 503, oip=True)
"""The body is the protocol's (JSON, or JSON + binary tensors); OpenAPI does not model it, so an empty one is 400."""


def model_metadata(model: ServedModel, versions: list[int]) -> dict[str, Any]:
    return {
        "name": model.name,
        "versions": [str(v) for v in versions],
        "platform": PLATFORM,
        "inputs": [s.as_dict() for s in input_specs(model.manifest.input)],
        "outputs": [s.as_dict() for s in output_specs(model.manifest)],
    }


@router.get("/v2", summary="OIP server metadata")
async def server_metadata() -> dict[str, Any]:
    return {"name": "branchserve", "version": package_version("branchserve"), "extensions": EXTENSIONS}


@router.get(
    "/v2/models/{name}/versions/{version}",
    openapi_extra=VERSIONED,
    responses=NOT_SERVED,
    summary="OIP model metadata of one version",
)
@router.get("/v2/models/{name}", responses=NOT_SERVED, summary="OIP model metadata: inputs, outputs, versions served")
async def oip_model_metadata(
    model: Annotated[ServedModel, Depends(served_model)], server: Annotated[ServerState, Depends(state)]
) -> dict[str, Any]:
    return model_metadata(model, sorted(server.repository.versions(model.name)))


@router.get(
    "/v2/models/{name}/versions/{version}/ready",
    openapi_extra=VERSIONED,
    responses=NOT_SERVED,
    summary="OIP model readiness of one version",
)
@router.get(
    "/v2/models/{name}/ready", responses=NOT_SERVED, summary="OIP model readiness: 200 when served, 404 otherwise"
)
async def model_ready(request: Request, name: str, server: Annotated[ServerState, Depends(state)]) -> dict[str, Any]:
    model = server.model(name, request.path_params.get("version"))
    return {"name": model.name, "version": str(model.version), "ready": True}


@router.post(
    "/v2/models/{name}/versions/{version}/infer",
    openapi_extra=VERSIONED,
    responses=INFER_ERRORS,
    summary="OIP inference with one version",
)
@router.post(
    "/v2/models/{name}/infer",
    responses=INFER_ERRORS,
    summary="OIP inference: JSON tensors or the binary tensor data extension",
)
async def infer(request: Request, name: str) -> Response:
    server: ServerState = request.app.state.server
    model = server.model(name, request.path_params.get("version"))
    server.keys.check(request)
    return await counted(request, model, server, answer(request, model, server))


async def answer(request: Request, model: ServedModel, server: ServerState) -> Response:
    if (encoding := request.headers.get("content-encoding", "identity").lower()) != "identity":
        raise RequestError(415, f"Content-Encoding {encoding!r} is not supported: send the body uncompressed")
    body = await read_body(request, server.settings.max_body_bytes)
    ready_at = request.scope.get(READY_AT) or time.perf_counter()
    call = RestInference(model, body, request.headers.get(HEADER_LENGTH), server.limits)
    payload, header_length = await dispatch(server, model, call.decode, call.encode, len(body), ready_at)
    if header_length is None:
        return Response(payload, media_type="application/json")
    return Response(payload, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_length)})


class RestInference:
    """One REST inference request: `decode` parses it (wherever dispatch runs it), `encode` answers it
    with the outputs and the binary/JSON choice the request made."""

    def __init__(self, model: ServedModel, body: bytes, header_length: str | None, limits: Limits) -> None:
        self.model, self.body, self.header_length, self.limits = model, body, header_length, limits
        self.id: str | None = None
        self.outputs: list[tuple[str, bool]] = []  # (name, binary)

    def decode(self) -> PredictRequest:
        header, binary = split_body(self.body, self.header_length)
        doc = parse_header(header)
        inputs, at = [], 0
        for spec in doc.inputs:
            size = spec.parameters.get("binary_data_size")
            if size is None:
                if spec.data is None:
                    raise RequestError(400, f"input {spec.name!r} has neither data nor parameters.binary_data_size")
                data: Any = spec.data
            else:
                if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                    raise RequestError(400, f"input {spec.name!r}: binary_data_size must be a byte count")
                if at + size > len(binary):
                    raise RequestError(
                        400,
                        f"input {spec.name!r}: binary_data_size {size} runs past the end of the body "
                        f"({len(binary) - at} bytes of binary data left)",
                    )
                data, at = binary[at : at + size], at + size
            inputs.append(InputTensor(spec.name, spec.datatype, tuple(spec.shape), data))
        if at != len(binary):
            raise RequestError(400, f"{len(binary) - at} bytes of binary data after the last tensor that declares any")
        default_binary = doc.parameters.get("binary_data_output") is True
        names = requested_outputs([o.name for o in doc.outputs])
        chosen = {o.name: o.parameters for o in doc.outputs}
        self.outputs = [(n, _binary_output(n, chosen.get(n, {}), default_binary)) for n in names]
        self.id = doc.id
        return predict_request(self.model.manifest.input, inputs, doc.parameters, self.limits)

    def encode(self, result: Result) -> tuple[bytes, int | None]:
        """The response body, and its JSON header's length when binary tensors follow it."""
        tensors = output_tensors(result, [name for name, _ in self.outputs])
        outputs, blobs = [], []
        for tensor, (_, binary) in zip(tensors, self.outputs, strict=True):
            out: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
            if binary:
                blobs.append(tensor.raw())
                out["parameters"] = {"binary_data_size": len(blobs[-1])}
            else:
                out["data"] = tensor.elements()
            outputs.append(out)
        doc = {
            "model_name": result.manifest.name,
            "model_version": str(result.manifest.version),
            **({"id": self.id} if self.id is not None else {}),
            "parameters": response_parameters(result),
            "outputs": outputs,
        }
        header = orjson.dumps(doc)
        return (header + b"".join(blobs), len(header)) if blobs else (header, None)


def split_body(body: bytes, header_length: str | None) -> tuple[memoryview, memoryview]:
    """(JSON header, binary tensor data) of a request body."""
    view = memoryview(body)
    if header_length is None:
        return view, view[len(view) :]
    if not header_length.strip().isdigit():
        raise RequestError(400, f"{HEADER_LENGTH} must be a byte count, not {header_length!r}")
    n = int(header_length)
    if n > len(body):
        raise RequestError(400, f"{HEADER_LENGTH} of {n} bytes is past the end of the {len(body)}-byte body")
    return view[:n], view[n:]


def parse_header(header: memoryview) -> InferenceRequest:
    try:
        doc = orjson.loads(header)
    except orjson.JSONDecodeError as e:
        raise RequestError(400, f"malformed JSON: {e}") from None
    try:
        return InferenceRequest.model_validate(doc)
    except ValidationError as e:
        raise RequestError(400, validation_message(e.errors(include_input=False))) from None


def _binary_output(name: str, parameters: dict[str, Any], default: bool) -> bool:
    if unsupported := parameters.keys() - {"binary_data"}:
        raise RequestError(400, f"output {name!r}: parameters {sorted(unsupported)} are not supported")
    binary = parameters.get("binary_data", default)
    if not isinstance(binary, bool):
        raise RequestError(400, f"output {name!r}: binary_data must be true or false")
    return binary
