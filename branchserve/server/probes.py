"""Health probes and /metrics: open to every client (orchestrators and scrapers carry no API key)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response

from branchserve.server.errors import RequestError
from branchserve.server.metrics import CONTENT_TYPE
from branchserve.server.schemas import ErrorResponse
from branchserve.server.state import ServerState, state

router = APIRouter()


async def live() -> dict[str, bool]:
    return {"live": True}


async def ready(server: Annotated[ServerState, Depends(state)]) -> dict[str, object]:
    if server.limiter is None:
        raise RequestError(503, "starting up")
    if not server.peers.all_ready():
        raise RequestError(503, f"starting up: not all {server.settings.workers} workers are ready")
    return {"ready": True, "models": server.repository.names()}


for method in ("GET", "HEAD"):  # one route each, so each gets its own OpenAPI operation
    router.add_api_route("/v2/health/live", live, methods=[method], summary="Liveness: the process answers")
    router.add_api_route(
        "/v2/health/ready",
        ready,
        methods=[method],
        summary="Readiness: the repository loaded, checked and calibrated",
        responses={503: {"model": ErrorResponse}},
    )


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics(server: Annotated[ServerState, Depends(state)]) -> Response:
    return Response(server.metrics.render(), media_type=CONTENT_TYPE)
