"""What the ingress hands a model's deployment, what comes back, and Ray's failures as HTTP answers.

A request crosses a process (often a node) between the ingress and the model's deployment, so it
travels as plain data: the body whole and unparsed, the query, the version asked for, and when the
ingress had it. The answer is the status, the JSON body and its headers, made where the work ran.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError
from starlette.responses import Response

RETRY_AFTER = {"Retry-After": "1"}
REPLICA_LOST = (RayActorError, ActorUnavailableError)  # the replica (or a stage's) died with the request on it


@dataclass(frozen=True)
class Call:
    """A predict request as the ingress hands it on."""

    content_type: str | None
    body: bytes
    query: dict[str, str]
    version: str | None  # None: the highest version served
    received_at: float  # time.time() when the ingress had the whole body: waiting counts against a deadline


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def error(cls, status: int, message: str, headers: dict[str, str] | None = None) -> Answer:
        """The native API's error body, `{"detail": "..."}`."""
        return cls(status, orjson.dumps({"detail": message}), dict(headers or {}))

    def response(self) -> Response:
        return Response(self.body, self.status, self.headers, media_type="application/json")


def ray_failure(e: Exception) -> tuple[str, Answer] | None:
    """(outcome, answer) for Ray Serve refusing or losing a request; None for any other error.

    Backpressure (a deployment's `max_queued_requests` reached at this caller) and a replica that
    died while it held the request both get 503 + Retry-After: another try will find capacity or
    a live replica, and no other request is affected."""
    if isinstance(e, BackPressureError):
        return "overloaded", Answer.error(503, f"overloaded: {e.message} Retry later.", RETRY_AFTER)
    if isinstance(e, REPLICA_LOST):
        message = "the replica computing this request stopped before it answered; retry"
        return "lost", Answer.error(503, message, RETRY_AFTER)
    return None
