"""What every route shares: the served models, settings, metrics, admission and credentials."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import anyio
from fastapi import Depends, Request

from branchserve.server.admission import Admission
from branchserve.server.auth import AdminToken, Keys
from branchserve.server.decoding import Limits
from branchserve.server.errors import RequestError
from branchserve.server.metrics import Metrics
from branchserve.server.predictor import ServedModel
from branchserve.server.settings import Settings


@dataclass
class ServerState:
    settings: Settings
    models: dict[str, ServedModel]
    metrics: Metrics
    admission: Admission
    limits: Limits
    keys: Keys
    admin_token: AdminToken
    limiter: anyio.CapacityLimiter | None = None  # made at startup, inside the event loop

    def model(self, name: str) -> ServedModel:
        try:
            return self.models[name]
        except KeyError:
            raise RequestError(404, f"no model named {name!r}; see GET /v1/models") from None


async def state(request: Request) -> ServerState:
    server: ServerState = request.app.state.server
    return server


async def client(request: Request, server: Annotated[ServerState, Depends(state)]) -> ServerState:
    """The state, once the request has shown an API key (when keys are configured)."""
    server.keys.check(request)
    return server


async def served_model(name: str, server: Annotated[ServerState, Depends(client)]) -> ServedModel:
    return server.model(name)


async def admin(request: Request, server: Annotated[ServerState, Depends(state)]) -> ServerState:
    """The state, once the request has shown the admin token (admin routes need no API key)."""
    server.admin_token.check(request)
    return server


async def administered_model(name: str, server: Annotated[ServerState, Depends(admin)]) -> ServedModel:
    return server.model(name)
