"""The OIP model repository extension (admin): index, load and unload, as Triton and KServe have them.

`POST /v2/repository/models/{name}/load` serves the versions of `name` that the version policy
selects (the server's, or one given as Triton's load `config`: `{"version_policy": {...}}`),
checking and calibrating new versions in a thread of its own at a lower CPU priority, off the
event loop; versions no longer selected are unloaded once the new set is published. A version that fails to load makes the whole load fail
with a 400 saying why, and what was served stays served. Every route needs the admin token.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any

import anyio
import orjson
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from branchserve.repo.manifest import RepositoryError
from branchserve.repo.versions import VersionPolicy
from branchserve.server.decoding import read_body, validation_message
from branchserve.server.errors import RequestError
from branchserve.server.schemas import errors
from branchserve.server.state import ServerState, admin

router = APIRouter()

LOAD_NICENESS = 10


class LoadConfig(BaseModel):
    """The part of Triton's model configuration a load may override here."""

    model_config = ConfigDict(extra="forbid")
    version_policy: VersionPolicy


class IndexRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    ready: bool = Field(False, description="list only versions being served")


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    parameters: dict[str, Any] = Field(default_factory=dict)


async def json_body(request: Request, schema: type[BaseModel], limit: int = 64 << 10) -> Any:
    """An optional small JSON body (the clients send none, `{}` or a few parameters)."""
    body = await read_body(request, limit) if request.headers.get("content-length", "0") != "0" else b""
    try:
        return schema.model_validate(orjson.loads(body) if body.strip() else {})
    except orjson.JSONDecodeError as e:
        raise RequestError(400, f"malformed JSON: {e}") from None
    except ValidationError as e:
        raise RequestError(400, validation_message(e.errors(include_input=False))) from None


def version_policy_of(parameters: dict[str, Any]) -> VersionPolicy | None:
    if unsupported := parameters.keys() - {"config", "unload_dependents"}:
        raise RequestError(400, f"load parameters {sorted(unsupported)} are not supported (only config)")
    config = parameters.get("config")
    if config is None:
        return None
    if not isinstance(config, str):
        raise RequestError(400, "parameters.config must be a JSON string, as Triton's load takes it")
    try:
        return LoadConfig.model_validate_json(config).version_policy
    except ValidationError as e:
        raise RequestError(400, validation_message(e.errors(include_input=False), "config")) from None


async def in_background(load: Callable[[str, VersionPolicy | None], list[int]], *args: Any) -> list[int]:
    """Run a load in a thread of its own at nice +10, so that checking and calibrating a version
    yields the cores to requests; the thread ends with the load (a pooled worker thread would keep
    the lower priority, and an unprivileged process cannot raise it again)."""

    def niced() -> list[int]:
        with contextlib.suppress(OSError):  # where priorities cannot be changed, it runs as any thread
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOAD_NICENESS)
        return load(*args)

    with ThreadPoolExecutor(1, thread_name_prefix="branchserve-load") as pool:
        return await asyncio.wrap_future(pool.submit(niced))


@router.post(
    "/v2/repository/index",
    responses=errors(400, 401, 403, oip=True),
    summary="Admin: every model version on disk or served, with its state",
)
async def repository_index(request: Request, server: Annotated[ServerState, Depends(admin)]) -> list[dict[str, Any]]:
    ask: IndexRequest = await json_body(request, IndexRequest)
    states = server.repository.index()
    return [
        {"name": s.name, "version": str(s.version), "state": s.state, "reason": s.reason}
        for s in states
        if s.state == "READY" or not ask.ready
    ]


@router.post(
    "/v2/repository/models/{name}/load",
    responses=errors(400, 401, 403, oip=True),
    summary="Admin: (re)load a model's versions by the version policy",
)
async def load_model(name: str, request: Request, server: Annotated[ServerState, Depends(admin)]) -> dict[str, Any]:
    ask: LoadRequest = await json_body(request, LoadRequest)
    policy = version_policy_of(ask.parameters)
    try:
        versions = await in_background(server.repository.load, name, policy)
    except RepositoryError as e:
        raise RequestError(400, f"load of {name!r} failed, nothing changed: {e}") from None
    server.peers.publish({"op": "load", "model": name, "version_policy": policy and policy.model_dump()})
    return {"name": name, "versions": [str(v) for v in versions]}


@router.post(
    "/v2/repository/models/{name}/unload",
    responses=errors(400, 401, 403, 404, oip=True),
    summary="Admin: stop serving every version of a model",
)
async def unload_model(name: str, request: Request, server: Annotated[ServerState, Depends(admin)]) -> dict[str, Any]:
    ask: LoadRequest = await json_body(request, LoadRequest)
    if unsupported := ask.parameters.keys() - {"unload_dependents"}:
        raise RequestError(400, f"unload parameters {sorted(unsupported)} are not supported")
    versions = await anyio.to_thread.run_sync(server.repository.unload, name)  # waits for a load in progress
    server.peers.publish({"op": "unload", "model": name})
    return {"name": name, "unloaded": [str(v) for v in versions]}
