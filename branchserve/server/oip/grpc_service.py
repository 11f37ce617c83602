"""The Open Inference Protocol's gRPC data plane, `inference.GRPCInferenceService`, on its own port.

grpc.aio runs the handlers on the same event loop as the REST routes (uvloop included), so a gRPC
inference is looked up in the same repository, admitted by the same admission, decoded by the same
tensor rules (oip/tensors.py) and run where server/dispatch.py says, by the same
`ServedModel.predict`. `tritonclient.grpc` works unmodified: inputs and outputs travel as raw
contents (typed contents are read too). Errors are status codes: INVALID_ARGUMENT for a bad
request, NOT_FOUND, UNAUTHENTICATED, UNAVAILABLE when overloaded, and gRPC's own
RESOURCE_EXHAUSTED for a message over `max_body_bytes`. Needs `branchserve[grpc]`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from importlib.metadata import version as package_version
from typing import Any, TypeVar

import grpc

from branchserve.server.auth import bearer
from branchserve.server.decoding import Limits
from branchserve.server.dispatch import dispatch
from branchserve.server.errors import RequestError
from branchserve.server.oip.proto import grpc_predict_v2_pb2 as pb
from branchserve.server.oip.rest import EXTENSIONS, PLATFORM
from branchserve.server.oip.tensors import (
    InputTensor,
    Parameter,
    input_specs,
    output_specs,
    output_tensors,
    predict_request,
    requested_outputs,
    response_parameters,
)
from branchserve.server.predictor import PredictError, PredictRequest, Result, ServedModel
from branchserve.server.state import ServerState

log = logging.getLogger("branchserve")

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
SERVICE_NAME = "inference.GRPCInferenceService"  # the protocol's; the .proto's package is our own (see there)
CODES = {
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}  # any other 4xx: INVALID_ARGUMENT

Reply = TypeVar("Reply")


def parameters_of(params: Mapping[str, pb.InferParameter]) -> dict[str, Parameter]:
    values: dict[str, Parameter] = {}
    for key, param in params.items():
        which = param.WhichOneof("parameter_choice")
        if which is None:
            raise RequestError(400, f"parameter {key!r} has no value")
        values[key] = getattr(param, which)
    return values


def set_parameter(param: pb.InferParameter, value: Parameter) -> None:
    if isinstance(value, bool):
        param.bool_param = value
    elif isinstance(value, int):
        param.int64_param = value
    elif isinstance(value, float):
        param.double_param = value
    else:
        param.string_param = value


def typed_contents(tensor: pb.ModelInferRequest.InferInputTensor) -> list[Any]:
    """The elements of an input sent as typed contents (for the datatypes a model takes)."""
    if tensor.datatype == "BYTES":
        return list(tensor.contents.bytes_contents)
    return list(tensor.contents.fp32_contents)


class GrpcInference:
    """One ModelInfer call: `decode` reads it (wherever dispatch runs it), `encode` answers it."""

    def __init__(self, model: ServedModel, request: pb.ModelInferRequest, limits: Limits) -> None:
        self.model, self.request, self.limits = model, request, limits
        self.size = sum(len(raw) for raw in request.raw_input_contents) or request.ByteSize()
        self.outputs: tuple[str, ...] = ()

    def decode(self) -> PredictRequest:
        r = self.request
        raw = r.raw_input_contents
        if raw and len(raw) != len(r.inputs):
            raise RequestError(400, f"raw_input_contents has {len(raw)} entries for {len(r.inputs)} inputs")
        inputs = [
            InputTensor(t.name, t.datatype, tuple(t.shape), raw[i] if raw else typed_contents(t))
            for i, t in enumerate(r.inputs)
        ]
        for o in r.outputs:
            if unsupported := o.parameters.keys() - {"binary_data"}:
                raise RequestError(400, f"output {o.name!r}: parameters {sorted(unsupported)} are not supported")
        self.outputs = requested_outputs([o.name for o in r.outputs])
        return predict_request(self.model.manifest.input, inputs, parameters_of(r.parameters), self.limits)

    def encode(self, result: Result) -> pb.ModelInferResponse:
        tensors = output_tensors(result, self.outputs)
        response = pb.ModelInferResponse(
            model_name=result.manifest.name,
            model_version=str(result.manifest.version),
            id=self.request.id,
            outputs=[
                pb.ModelInferResponse.InferOutputTensor(name=t.name, datatype=t.datatype, shape=t.shape)
                for t in tensors
            ],
            raw_output_contents=[t.raw() for t in tensors],
        )
        for key, value in response_parameters(result).items():
            set_parameter(response.parameters[key], value)
        return response


class InferenceService:
    """The six RPCs of GRPCInferenceService over the server's state."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        authorization = dict(context.invocation_metadata() or ()).get("authorization", "")
        self.state.keys.check_token(bearer(authorization))

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.state.limiter is not None)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        try:
            self.state.model(request.name, request.version)
        except RequestError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name="branchserve", version=package_version("branchserve"), extensions=EXTENSIONS
        )

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        model = self.state.model(request.name, request.version)
        self._authorize(context)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=[str(v) for v in sorted(self.state.repository.versions(model.name))],
            platform=PLATFORM,
            inputs=[tensor(name=s.name, datatype=s.datatype, shape=s.shape) for s in input_specs(model.manifest.input)],
            outputs=[tensor(name=s.name, datatype=s.datatype, shape=s.shape) for s in output_specs(model.manifest)],
        )

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        state = self.state
        model = state.model(request.model_name, request.model_version)
        self._authorize(context)
        admission = state.admission
        if admission.refuse_at_door():
            state.metrics.requests.labels(*model.labels, "overloaded").inc()
            raise RequestError(503, "overloaded: try again shortly")
        admission.arrived()
        try:
            call = GrpcInference(model, request, state.limits)
            return await dispatch(state, model, call.decode, call.encode, call.size, time.perf_counter())
        except (RequestError, PredictError) as e:
            if not (isinstance(e, RequestError) and e.status == 503):  # admission counted its refusals
                state.metrics.requests.labels(*model.labels, "bad_input").inc()
            raise
        finally:
            admission.left()


def _with_status(rpc: Callable[[Any, Any], Awaitable[Reply]]) -> Callable[[Any, Any], Awaitable[Reply]]:
    """Turn the errors a client caused into gRPC status codes with the message."""

    async def handler(request: Any, context: Any) -> Reply:
        try:
            return await rpc(request, context)
        except RequestError as e:
            await context.abort(CODES.get(e.status, grpc.StatusCode.INVALID_ARGUMENT), e.message)
            raise  # abort raises; this keeps the type checker honest
        except PredictError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            raise

    return handler


async def start(state: ServerState, host: str, port: int) -> Any:
    """A grpc.aio server for `state` on host:port, started on the running event loop."""
    service = InferenceService(state)
    handlers = {
        m.name: grpc.unary_unary_rpc_method_handler(
            _with_status(getattr(service, m.name)),
            request_deserializer=getattr(pb, m.input_type.name).FromString,
            response_serializer=getattr(pb, m.output_type.name).SerializeToString,
        )
        for m in SERVICE.methods
    }
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", state.settings.max_body_bytes)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    try:
        server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as e:
        raise RuntimeError(f"gRPC cannot listen on {host}:{port}: {e}") from None
    await server.start()
    log.info("OIP gRPC on %s:%d", host, port)
    return server
