"""Warm the request path before the server says it is ready.

FastAPI builds a router's route state (pydantic adapters of every field) on the first request that
reaches it: ~45 ms, which admission would rightly call queueing and shed the client's first
request with a 503. Pillow loads its PNG and JPEG plugins on first use (~5 ms). So at start-up each
router gets one request that it answers without a model (an unknown model's 404, a probe), and an
image is decoded once; none of them touches the metrics or the models.
"""

from __future__ import annotations

import io
from typing import Any

from PIL import Image
from starlette.types import ASGIApp, Message

from branchserve.repo.imaging import image_to_input, open_image
from branchserve.repo.manifest import InputSpec

NO_MODEL = "warm-up-of-an-unknown-model"
REQUESTS = [
    ("POST", f"/v1/models/{NO_MODEL}/predict"),
    ("GET", f"/v1/models/{NO_MODEL}"),
    ("POST", f"/v2/models/{NO_MODEL}/infer"),
    ("GET", f"/v2/models/{NO_MODEL}"),
    ("GET", "/v2/health/live"),
    ("POST", "/v2/repository/index"),
]


async def _call(app: ASGIApp, method: str, path: str) -> int:
    """One request through the whole ASGI stack, as a client would send it; returns the status."""
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"2")],
        "server": ("127.0.0.1", 0),
        "client": ("127.0.0.1", 0),
        "state": {},
    }
    messages = iter([{"type": "http.request", "body": b"{}", "more_body": False}])
    status = 0

    async def receive() -> Message:
        return next(messages, {"type": "http.disconnect"})

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


async def warm_up(app: ASGIApp) -> list[int]:
    """Run the warm-up requests (their statuses are returned for the tests) and decode one image of each format."""
    statuses = [await _call(app, method, path) for method, path in REQUESTS]
    spec = InputSpec(shape=(1, 8, 8), color_mode="L", mean=0.0, std=1.0)
    for kind in ("PNG", "JPEG"):
        data = io.BytesIO()
        Image.new("L", (8, 8)).save(data, kind)
        image_to_input(open_image(data.getvalue()), spec)
    return statuses
