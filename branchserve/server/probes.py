"""Health probes and /metrics: open to every client (orchestrators and scrapers carry no API key)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response

from branchserve.server.errors import RequestError
from branchserve.server.metrics import CONTENT_TYPE
from branchserve.server.state import ServerState, state

router = APIRouter()


@router.api_route("/v2/health/live", methods=["GET", "HEAD"], summary="Liveness: the process answers")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.api_route(
    "/v2/health/ready", methods=["GET", "HEAD"], summary="Readiness: the repository loaded, checked and calibrated"
)
async def ready(server: Annotated[ServerState, Depends(state)]) -> dict[str, object]:
    if server.limiter is None:
        raise RequestError(503, "starting up")
    return {"ready": True, "models": server.repository.names()}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics(server: Annotated[ServerState, Depends(state)]) -> Response:
    return Response(server.metrics.render(), media_type=CONTENT_TYPE)
