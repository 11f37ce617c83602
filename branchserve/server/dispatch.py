"""Where a decoded request runs, for every front door (native /v1, OIP REST, OIP gRPC).

All CPU work of a request runs in one go: on the event loop for a light request (a body of at
most `inline_body_bytes` holding one input, or an image of at most 256×256 pixels), where a hop to
a worker thread would cost as much CPU as the work itself (~0.3–0.55 ms against ~0.5 ms on the
shipped model); otherwise in one hop to a worker thread, bounded by a limiter of
`inference_threads`, so a batch or a large image never stalls the loop.

Admission judges a request's wait when the server starts working on it (the door resumes with the
whole body), and again when a worker thread picks it up; the request's own parsing never counts
as waiting.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from branchserve.server.admission import Admission
from branchserve.server.errors import RequestError
from branchserve.server.predictor import DeadlineError, PredictError, PredictRequest, Result, ServedModel
from branchserve.server.state import ServerState
from branchserve.server.transport import TIMED_OUT

log = logging.getLogger("branchserve")

Encoded = TypeVar("Encoded")


def respond(
    model: ServedModel,
    request: PredictRequest,
    encode: Callable[[Result], Encoded],
    admission: Admission,
    ready_at: float,
) -> Encoded:
    """Predict and encode; a request whose deadline passed while it waited is shed, not computed late."""
    try:
        return encode(model.predict(request, ready_at))
    except DeadlineError as e:
        admission.shed(model.labels, str(e), "expired")


def in_worker(
    model: ServedModel,
    decode: Callable[[], PredictRequest],
    encode: Callable[[Result], Encoded],
    admission: Admission,
    ready_at: float,
    hop_at: float,
) -> Encoded:
    """The work of a request handed to a worker thread at `hop_at`: shed if it waited too long for one."""
    admission.check_wait(model.labels, hop_at)
    return respond(model, decode(), encode, admission, ready_at)


async def dispatch(
    server: ServerState,
    model: ServedModel,
    decode: Callable[[], PredictRequest],
    encode: Callable[[Result], Encoded],
    size: int,
    ready_at: float,
    started: float | None = None,
) -> Encoded:
    """Answer a request of `size` bytes that arrived whole at `ready_at`, on the loop or in one thread
    hop. `started`: when the door began working on it, if it already had admission judge its wait
    (before parsing a multipart body, say); otherwise admission judges it now."""
    admission = server.admission
    started = admission.start(model.labels, ready_at) if started is None else started
    try:
        if size > server.settings.inline_body_bytes:
            hop = time.perf_counter()
            return await anyio.to_thread.run_sync(
                in_worker, model, decode, encode, admission, ready_at, hop, limiter=server.limiter
            )
        decoded = decode()  # cheap at this size: JSON into arrays, raw bytes into a tensor, or an image's header
        if decoded.light:
            return respond(model, decoded, encode, admission, ready_at)
        hop = time.perf_counter()
        return await anyio.to_thread.run_sync(
            in_worker, model, lambda: decoded, encode, admission, ready_at, hop, limiter=server.limiter
        )
    finally:
        admission.finished(started)


async def counted(request: Request, model: ServedModel, server: ServerState, answer: Awaitable[Response]) -> Response:
    """A predict route's answer, counting what the client caused: a bad request, or leaving before the end."""
    try:
        return await answer
    except ClientDisconnect:
        outcome = "timed_out" if request.scope.get(TIMED_OUT) else "disconnected"
        server.metrics.requests.labels(*model.labels, outcome).inc()
        log.debug("%s: client %s before sending its whole body", request.url.path, outcome.replace("_", " "))
        return Response(status_code=400)  # never sent: the client is gone
    except (RequestError, PredictError) as e:
        if not (isinstance(e, RequestError) and e.status == 503):  # admission counted its refusals
            server.metrics.requests.labels(*model.labels, "bad_input").inc()
        raise
