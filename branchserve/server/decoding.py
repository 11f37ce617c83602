"""Decode a predict request: body and query → `PredictRequest`, one decoder per media type.

Decoding runs in two steps so the route can choose where the work happens: `parse` does what is
cheap (JSON into arrays, an image's header) and says whether the request is light enough to answer
on the event loop; `PredictRequest.inputs` then does the rest (an image's pixels) wherever predict
runs. JSON is parsed with orjson and checked as numpy arrays: pydantic validating 784 floats per
input cost 12–20 % of throughput; only the small budget goes through pydantic.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import orjson
from pydantic import ValidationError
from pydantic_core import ErrorDetails
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from branchserve.repo.imaging import ImageError, image_to_input, open_image
from branchserve.repo.manifest import InputSpec
from branchserve.repo.tensors import FloatArray
from branchserve.server.budget import NO_BUDGET, Budget
from branchserve.server.errors import RequestError
from branchserve.server.predictor import PredictRequest

INLINE_MAX_PIXELS = 256 * 256  # decodes in well under a millisecond; a 1024×1024 PNG of 1 KB took 9 ms
JSON_FIELDS = frozenset({"inputs", "budget", "probabilities"})


def validation_message(errors: Sequence[ErrorDetails], prefix: str = "") -> str:
    """The first of pydantic's (or FastAPI's) validation errors as "where: what"."""
    first = errors[0]
    where = ".".join(str(p) for p in (prefix, *first["loc"]) if p != "")
    return f"{where}: {first['msg']}" if where else str(first["msg"])


class QueryParams(Budget):
    """Query parameters of predict: the budget (for image uploads; a JSON body carries its own) and probabilities."""

    probabilities: bool = False


def query_options(query: Mapping[str, str]) -> tuple[Budget, bool]:
    """The budget and the probabilities flag from the query string."""
    if not query:  # most requests: no validation to run
        return NO_BUDGET, False
    try:
        params = QueryParams.model_validate(dict(query))
    except ValidationError as e:
        raise RequestError(422, validation_message(e.errors(), "query")) from None
    return Budget.model_construct(**params.model_dump(exclude={"probabilities"})), params.probabilities


def input_forms(spec: InputSpec) -> list[tuple[int, ...]]:
    """Accepted shapes of one input: (C, H, W), flat (C·H·W,), and (H, W) for one channel."""
    c, h, w = spec.shape
    return [(c, h, w), (c * h * w,)] + ([(h, w)] if c == 1 else [])


def array_batch(value: object, spec: InputSpec, max_batch: int) -> FloatArray:
    """One input or a batch of inputs as nested lists → (N, C, H, W) float32."""
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError, OverflowError):
        raise RequestError(422, "inputs must be a rectangular array of numbers (ragged nesting?)") from None
    if arr.dtype.kind not in "iuf":
        raise RequestError(422, "inputs must hold numbers only")
    for form in input_forms(spec):
        if arr.shape == form:
            n = 1
            break
        if arr.shape[1:] == form and arr.ndim == len(form) + 1:
            n = arr.shape[0]
            break
    else:
        forms = " or ".join(str(list(f)) for f in input_forms(spec))
        raise RequestError(422, f"inputs of shape {list(arr.shape)}: one input is {forms}, a batch adds a leading axis")
    if n > max_batch:
        raise RequestError(413, f"batch of {n} inputs exceeds the limit of {max_batch}")
    with np.errstate(over="ignore"):
        x = arr.astype(np.float32).reshape(n, *spec.shape)
    if not np.isfinite(x).all():
        raise RequestError(422, "inputs must be finite (no NaN or Inf, and within float32 range)")
    return x


@dataclass(frozen=True)
class Limits:
    """What a request may hold: inputs per batch, and the image formats decoded."""

    max_batch: int
    image_formats: tuple[str, ...]


def parse_json(body: bytes, query: Mapping[str, str], spec: InputSpec, limits: Limits) -> PredictRequest:
    """`{"inputs": ..., "budget": {...}, "probabilities": bool}`; a field of the body's budget
    overrides the same query parameter.
    The budget is validated strictly: `true` is not a number, whatever Python thinks."""
    budget, probabilities = query_options(query)
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise RequestError(400, f"malformed JSON: {e}") from None
    if not isinstance(doc, dict):
        raise RequestError(422, 'body must be a JSON object like {"inputs": [...]}')
    if unknown := doc.keys() - JSON_FIELDS:
        raise RequestError(422, f"unknown fields {sorted(unknown)}; expected inputs, budget, probabilities")
    if "inputs" not in doc:
        raise RequestError(422, "inputs: field required")
    if not isinstance(doc.get("probabilities", False), bool):
        raise RequestError(422, "probabilities: must be true or false")
    if doc.get("budget") is not None:
        try:
            own = Budget.model_validate(doc["budget"], strict=True)
        except ValidationError as e:
            raise RequestError(422, validation_message(e.errors(), "budget")) from None
        budget = budget.model_copy(update=own.model_dump(exclude_unset=True))  # the body's fields win
    x = array_batch(doc["inputs"], spec, limits.max_batch)
    return PredictRequest(lambda: x, budget, doc.get("probabilities", False) or probabilities, light=len(x) == 1)


def parse_image(body: bytes, query: Mapping[str, str], spec: InputSpec, limits: Limits) -> PredictRequest:
    """One image of an allowed format: its header is read now, its pixels when `inputs` is called."""
    budget, probabilities = query_options(query)
    try:
        image = open_image(body, limits.image_formats)
    except ImageError as e:
        raise RequestError(400, str(e)) from None

    def pixels() -> FloatArray:
        try:
            return image_to_input(image, spec)[None]
        except ImageError as e:
            raise RequestError(400, str(e)) from None

    return PredictRequest(pixels, budget, probabilities, light=image.width * image.height <= INLINE_MAX_PIXELS)


async def multipart_file(headers: Headers, body: bytes) -> bytes:
    """Bytes of the upload in field `file` of a multipart/form-data body."""
    boundary = Headers(headers).get("content-type", "").partition("boundary=")[2].strip('"; ').encode()
    if boundary and not body.rstrip(b"\r\n").endswith(b"--" + boundary + b"--"):
        raise RequestError(400, "bad multipart body: truncated (no closing boundary)")

    async def stream() -> AsyncGenerator[bytes, None]:
        yield body

    try:
        form = await MultiPartParser(headers, stream(), max_files=1, max_fields=16).parse()
    except MultiPartException as e:
        raise RequestError(400, f"bad multipart body: {e.message}") from None
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise RequestError(422, "multipart body needs an image in a file field named 'file'")
        return await upload.read()
    finally:
        await form.close()


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


Parser = Callable[[bytes, Mapping[str, str], InputSpec, Limits], PredictRequest]

# curl -d sends application/x-www-form-urlencoded; this API takes no forms, so such a body is JSON.
MULTIPART = "multipart/form-data"
PARSERS: dict[str, Parser] = {
    "application/json": parse_json,
    "application/x-www-form-urlencoded": parse_json,
    "image/png": parse_image,
    "image/jpeg": parse_image,
    MULTIPART: parse_image,  # after `multipart_file` has taken the image out
}


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


@functools.cache  # once per server's limits: it is asked on every request
def accepted_types(limits: Limits) -> tuple[str, ...]:
    images = [f"image/{f}" for f in limits.image_formats]
    return tuple(t for t in PARSERS if not t.startswith("image/") or t in images)


def parser_for(content_type: str | None, limits: Limits) -> Parser:
    kind = media_type(content_type)
    if kind not in accepted_types(limits):
        raise RequestError(415, f"unsupported content type {kind!r}: send one of {', '.join(accepted_types(limits))}")
    return PARSERS[kind]
