"""Open Inference Protocol tensors ↔ branchserve, for REST and gRPC alike.

A model takes one of two inputs: its tensor (`input`, FP32 `[N, C, H, W]`, normalised as the
manifest says) or encoded images (`image`, BYTES `[N]`, one PNG or JPEG per element, converted
exactly as the native API converts an upload). It yields six outputs, each requestable by name:
`class` (INT64), `label` (BYTES), `exit` (INT32), `confidence` (FP32), `probabilities` and the
answering exit's `logits` (FP32 `[N, K]`). Request parameters carry the budget; response
parameters say what was applied. Framing (JSON, the binary extension, protobuf) is not here:
this module sees names, shapes, numpy arrays and bytes.
"""

from __future__ import annotations

import base64
import binascii
import math
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ValidationError

from branchserve.repo.imaging import ImageError, OpenedImage, image_to_input, open_image
from branchserve.repo.manifest import InputSpec, Manifest
from branchserve.repo.tensors import FloatArray
from branchserve.server.budget import Budget
from branchserve.server.decoding import INLINE_MAX_PIXELS, Limits, validation_message
from branchserve.server.errors import RequestError
from branchserve.server.predictor import PredictRequest, Result

IMAGE_INPUT = "image"
BUDGET_PARAMETERS = ("deadline_ms", "max_exit", "max_accuracy_drop")
TIMEOUT_PARAMETER = "timeout"  # Triton's, in microseconds: becomes the deadline
IGNORED_PARAMETERS = frozenset({"binary_data_output", "priority", "headers"})  # protocol options with no effect here
RAW_DTYPES: dict[str, np.dtype[Any]] = {"FP32": np.dtype("<f4"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8")}
LENGTH = struct.Struct("<I")  # a BYTES element's length prefix

Parameter = bool | int | float | str


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1: any size

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


def input_specs(spec: InputSpec) -> list[TensorSpec]:
    return [TensorSpec(spec.name, "FP32", (-1, *spec.shape)), TensorSpec(IMAGE_INPUT, "BYTES", (-1,))]


def output_specs(manifest: Manifest) -> list[TensorSpec]:
    k = len(manifest.labels)
    return [
        TensorSpec("class", "INT64", (-1,)),
        TensorSpec("label", "BYTES", (-1,)),
        TensorSpec("exit", "INT32", (-1,)),
        TensorSpec("confidence", "FP32", (-1,)),
        TensorSpec("probabilities", "FP32", (-1, k)),
        TensorSpec("logits", "FP32", (-1, k)),
    ]


OUTPUTS: dict[str, Callable[[Result], np.ndarray]] = {
    "class": lambda r: r.outcome.classes,
    "label": lambda r: np.array([r.manifest.labels[y].encode() for y in r.outcome.classes], object),
    "exit": lambda r: r.outcome.exits.astype(np.int32),
    "confidence": lambda r: r.outcome.confidence.astype(np.float32),
    "probabilities": lambda r: r.outcome.probs,
    "logits": lambda r: r.outcome.logits,
}


@dataclass(frozen=True)
class InputTensor:
    """An input as a request declares it; `data` is raw little-endian bytes (the binary extension, gRPC's
    raw contents) or a list of elements, flat or nested (JSON `data`, gRPC's typed contents)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: bytes | memoryview | list[Any]


@dataclass(frozen=True)
class OutputTensor:
    name: str
    datatype: str
    array: np.ndarray  # BYTES: an object array of bytes

    @property
    def shape(self) -> list[int]:
        return list(self.array.shape)

    def raw(self) -> bytes:
        """The tensor as the binary extension and gRPC's raw contents carry it."""
        if self.datatype == "BYTES":
            return b"".join(LENGTH.pack(len(b)) + b for b in self.array.tolist())
        raw: bytes = self.array.astype(RAW_DTYPES[self.datatype], copy=False).tobytes()
        return raw

    def elements(self) -> list[Any]:
        """Flat row-major elements for JSON (BYTES as UTF-8 text)."""
        if self.datatype == "BYTES":
            return [b.decode() for b in self.array.tolist()]
        values: list[Any] = self.array.ravel().tolist()
        return values


def predict_request(
    spec: InputSpec, inputs: Sequence[InputTensor], parameters: Mapping[str, Parameter], limits: Limits
) -> PredictRequest:
    """The one input and the budget of an inference request, checked; image pixels decode in `inputs()`."""
    if len(inputs) != 1:
        raise RequestError(400, f"send exactly one input ({spec.name!r} or {IMAGE_INPUT!r}), not {len(inputs)}")
    tensor, budget = inputs[0], budget_of(parameters)
    expected = {s.name: s for s in input_specs(spec)}
    if tensor.name not in expected:
        raise RequestError(400, f"unknown input {tensor.name!r}: the model takes {_described(expected.values())}")
    want = expected[tensor.name]
    if tensor.datatype != want.datatype:
        raise RequestError(400, f"input {tensor.name!r} must be {want.datatype}, not {tensor.datatype}")
    n = _batch_size(tensor, want, limits.max_batch)
    if tensor.datatype == "FP32":
        x = _fp32_batch(tensor, spec)
        return PredictRequest(lambda: x, budget, False, light=n == 1)
    images = [_open(b, limits, i) for i, b in enumerate(_bytes_elements(tensor, n))]

    def pixels() -> FloatArray:
        try:
            return np.stack([image_to_input(image, spec) for image in images])
        except ImageError as e:
            raise RequestError(400, f"input {IMAGE_INPUT!r}: {e}") from None

    return PredictRequest(
        pixels, budget, False, light=n == 1 and images[0].width * images[0].height <= INLINE_MAX_PIXELS
    )


def _described(specs: Iterable[TensorSpec]) -> str:
    return " or ".join(f"{s.name!r} ({s.datatype} {list(s.shape)})" for s in specs)


def _batch_size(tensor: InputTensor, want: TensorSpec, max_batch: int) -> int:
    shape = tensor.shape
    fits = len(shape) == len(want.shape) and all(w in (-1, s) for s, w in zip(shape, want.shape, strict=True))
    if want.datatype == "BYTES" and len(shape) == 2 and shape[1] == 1:
        fits = True  # [N, 1]: one image per row
    if not fits or shape[0] < 1:
        expected = ", ".join(["N", *map(str, want.shape[1:])])
        raise RequestError(400, f"input {tensor.name!r} has shape {list(shape)}; expected [{expected}], N ≥ 1")
    if shape[0] > max_batch:
        raise RequestError(413, f"batch of {shape[0]} inputs exceeds the limit of {max_batch}")
    return shape[0]


def _fp32_batch(tensor: InputTensor, spec: InputSpec) -> FloatArray:
    count = math.prod(tensor.shape)
    if isinstance(tensor.data, bytes | memoryview):
        if len(tensor.data) != 4 * count:
            raise RequestError(
                400,
                f"input {tensor.name!r}: {len(tensor.data)} bytes of data, but FP32 {list(tensor.shape)} takes {4 * count}",
            )
        x = np.frombuffer(tensor.data, "<f4").astype(np.float32, copy=False).reshape(tensor.shape)
    else:
        try:
            arr = np.asarray(tensor.data)
        except (ValueError, TypeError, OverflowError):
            raise RequestError(400, f"input {tensor.name!r}: data must be a rectangular array of numbers") from None
        if arr.dtype.kind not in "iuf":
            raise RequestError(400, f"input {tensor.name!r}: FP32 data must hold numbers only")
        if arr.size != count:
            raise RequestError(
                400, f"input {tensor.name!r}: {arr.size} elements of data, but shape {list(tensor.shape)} takes {count}"
            )
        with np.errstate(over="ignore"):
            x = arr.astype(np.float32).reshape(tensor.shape)
    if not np.isfinite(x).all():
        raise RequestError(400, f"input {tensor.name!r}: values must be finite (no NaN or Inf, within FP32 range)")
    return x


def _bytes_elements(tensor: InputTensor, n: int) -> list[bytes]:
    """BYTES elements: length-prefixed raw bytes, or a list of bytes (gRPC) or base64 strings (JSON)."""
    if isinstance(tensor.data, bytes | memoryview):
        elements = unframe(tensor.data, tensor.name)
    else:
        elements = [_element(e, tensor.name) for e in _flat(tensor.data)]
    if len(elements) != n:
        raise RequestError(
            400, f"input {tensor.name!r}: {len(elements)} elements, but shape {list(tensor.shape)} takes {n}"
        )
    return elements


def unframe(raw: bytes | memoryview, name: str) -> list[bytes]:
    """Split length-prefixed BYTES elements, refusing a length that runs past the end."""
    view, elements, at = memoryview(raw), [], 0
    while at < len(view):
        if at + LENGTH.size > len(view):
            raise RequestError(400, f"input {name!r}: BYTES data ends inside an element's 4-byte length")
        (size,) = LENGTH.unpack_from(view, at)
        at += LENGTH.size
        if at + size > len(view):
            raise RequestError(400, f"input {name!r}: a BYTES element of {size} bytes runs past the end of the data")
        elements.append(bytes(view[at : at + size]))
        at += size
    return elements


def _flat(data: list[Any]) -> list[Any]:
    return [e for item in data for e in (_flat(item) if isinstance(item, list) else [item])]


def _element(value: object, name: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(400, f"input {name!r}: a BYTES element in JSON must be base64 text") from None
    raise RequestError(400, f"input {name!r}: BYTES elements must be strings (base64 in JSON)")


def _open(data: bytes, limits: Limits, index: int) -> OpenedImage:
    try:
        return open_image(data, limits.image_formats)
    except ImageError as e:
        raise RequestError(400, f"input {IMAGE_INPUT!r}, element {index}: {e}") from None


def budget_of(parameters: Mapping[str, Parameter]) -> Budget:
    """The request's budget from its parameters; Triton's `timeout` (µs) becomes a deadline."""
    accepted = {*BUDGET_PARAMETERS, TIMEOUT_PARAMETER}
    if unknown := parameters.keys() - accepted - IGNORED_PARAMETERS:
        raise RequestError(400, f"unknown parameters {sorted(unknown)}; budgets take {', '.join(sorted(accepted))}")
    values: dict[str, object] = {k: parameters[k] for k in BUDGET_PARAMETERS if k in parameters}
    if TIMEOUT_PARAMETER in parameters:
        timeout = parameters[TIMEOUT_PARAMETER]
        if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout <= 0:
            raise RequestError(400, "parameter timeout: microseconds, a positive integer")
        deadline = values.get("deadline_ms")
        values["deadline_ms"] = timeout / 1e3 if not isinstance(deadline, int | float) else min(deadline, timeout / 1e3)
    try:
        return Budget.model_validate(values, strict=True)
    except ValidationError as e:
        raise RequestError(400, validation_message(e.errors(), "parameters")) from None


def requested_outputs(names: Sequence[str]) -> tuple[str, ...]:
    """The outputs to return, in the order asked; none asked: every output."""
    if not names:
        return tuple(OUTPUTS)
    if unknown := [n for n in names if n not in OUTPUTS]:
        raise RequestError(400, f"unknown output {unknown[0]!r}: the model yields {', '.join(OUTPUTS)}")
    if len(set(names)) != len(names):
        raise RequestError(400, "an output is requested twice")
    return tuple(names)


def output_tensors(result: Result, names: Sequence[str]) -> list[OutputTensor]:
    datatypes = {s.name: s.datatype for s in output_specs(result.manifest)}
    return [OutputTensor(name, datatypes[name], OUTPUTS[name](result)) for name in names]


def response_parameters(result: Result) -> dict[str, Parameter]:
    """What was applied: the operating point and where it came from, the ladder's rung and the guarantee the
    point is certified for (flattened: OIP parameters are scalars), stages run, deadline outcome."""
    outcome, guarantee = result.outcome, result.choice.guarantee
    params: dict[str, Parameter] = {
        "operating_point": result.choice.name,
        "source": result.source,
        "stages_run": len(outcome.stage_seconds),
        "deadline_stopped": outcome.deadline_stopped,
    }
    if result.rung is not None:
        params["rung"] = result.rung
    if guarantee is not None:
        params |= {f"guarantee_{k}": v for k, v in guarantee.model_dump().items()}
    if result.deadline_missed is not None:
        params["deadline_missed"] = result.deadline_missed
    return params
