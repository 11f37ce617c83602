"""What every route shares: the model repository, settings, metrics, admission and credentials."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import anyio
from fastapi import Depends, Request

from branchserve.server.admission import Admission
from branchserve.server.auth import AdminToken, Keys
from branchserve.server.decoding import Limits
from branchserve.server.metrics import Metrics
from branchserve.server.predictor import ServedModel
from branchserve.server.repository import ModelRepository
from branchserve.server.settings import Settings
from branchserve.server.workers import Peers


@dataclass
class ServerState:
    settings: Settings
    repository: ModelRepository
    metrics: Metrics
    admission: Admission
    limits: Limits
    keys: Keys
    admin_token: AdminToken
    peers: Peers  # the other worker processes, if any: admin changes go to them too
    limiter: anyio.CapacityLimiter | None = None  # made at startup, inside the event loop

    def model(self, name: str, version: int | str | None = None) -> ServedModel:
        """A served version (404 if none): the highest unless `version` names one."""
        return self.repository.get(name, version)


async def state(request: Request) -> ServerState:
    server: ServerState = request.app.state.server
    return server


async def client(request: Request, server: Annotated[ServerState, Depends(state)]) -> ServerState:
    """The state, once the request has shown an API key (when keys are configured)."""
    server.keys.check(request)
    return server


async def served_model(request: Request, name: str, server: Annotated[ServerState, Depends(client)]) -> ServedModel:
    """The model version a route's path names (`.../versions/{version}`), else the highest served."""
    return server.model(name, request.path_params.get("version"))


async def admin(request: Request, server: Annotated[ServerState, Depends(state)]) -> ServerState:
    """The state, once the request has shown the admin token (admin routes need no API key)."""
    server.admin_token.check(request)
    return server
