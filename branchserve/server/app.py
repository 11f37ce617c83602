"""`create_app`: load and check the repository, build the runtimes, wire routes and error handlers.

Loading happens before the app exists, so a broken repository stops the server with a message
instead of serving 500s; by the time uvicorn binds, every model is loaded and calibrated.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match, Route

from branchserve.repo.loading import load_repository
from branchserve.server import api, docs, probes
from branchserve.server.admission import Admission
from branchserve.server.auth import AdminToken, Keys
from branchserve.server.decoding import Limits, validation_message
from branchserve.server.errors import RequestError, error_response
from branchserve.server.metrics import Metrics
from branchserve.server.openapi import strict_schema
from branchserve.server.predictor import PredictError, ServedModel
from branchserve.server.runtime import ModelRuntime
from branchserve.server.settings import Settings
from branchserve.server.state import ServerState
from branchserve.server.transport import Guard

log = logging.getLogger("branchserve")
ROUTERS = (api.router, probes.router)

DESCRIPTION = """Early-exit inference: each request runs stage by stage and leaves at the first exit
confident enough for the operating point in force. See docs/serving.md."""


async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code == 405:  # Starlette names only the first route on the path; name them all
        headers["Allow"] = ", ".join(allowed_methods(request))
    return error_response(exc.status_code, str(exc.detail), headers)


def allowed_methods(request: Request) -> list[str]:
    methods: set[str] = set()
    for route in (r for router in ROUTERS for r in router.routes):
        if isinstance(route, Route) and route.methods and route.matches(request.scope)[0] != Match.NONE:
            methods |= route.methods
    return sorted(methods)


async def on_request_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestError)
    return error_response(exc.status, exc.message, exc.headers)


async def on_predict_error(_: Request, exc: Exception) -> JSONResponse:
    return error_response(422, str(exc))


async def on_validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    return error_response(400 if errors[0]["type"] == "json_invalid" else 422, validation_message(errors))


async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal error")


def load_models(settings: Settings, metrics: Metrics) -> dict[str, ServedModel]:
    models = {}
    for name, (manifest, version_dir) in load_repository(settings.repository).items():
        runtime = ModelRuntime(manifest, version_dir, settings.intra_op_threads)
        models[name] = ServedModel(runtime, settings.policy, settings.degrade_accuracy_drop, metrics)
        log.info("serving %s/%s from %s (%d exits)", name, manifest.version, version_dir, runtime.num_exits)
    return models


def server_state(settings: Settings) -> ServerState:
    metrics = Metrics()
    admission = Admission(
        settings.max_in_flight,
        settings.degrade_in_flight,
        settings.max_wait_ms / 1e3,
        settings.queue_target_ms / 1e3,
        settings.queue_interval_ms / 1e3,
        metrics,
    )
    limits = Limits(settings.max_batch, tuple(settings.image_formats))
    keys = Keys(settings.api_keys, settings.api_keys_file)
    admin = AdminToken(settings.admin_token)
    log.info(
        "admin endpoints %s; predict and metadata %s",
        "need the admin token" if admin.token else "disabled (no BRANCHSERVE_ADMIN_TOKEN)",
        "need an API key" if keys.required else "open to every client (no API keys)",
    )
    return ServerState(settings, load_models(settings, metrics), metrics, admission, limits, keys, admin)


def connection_guard(app: FastAPI) -> Guard:
    """The connection-level limits of `app`'s settings, and its admission at the door."""
    server: ServerState = app.state.server
    admission, metrics, models, settings = server.admission, server.metrics, server.models, server.settings

    def predict_model(url: bytes) -> str | None:
        parts = url.partition(b"?")[0].split(b"/")  # b"", b"v1", b"models", name, b"predict"
        name = parts[3].decode("latin-1") if len(parts) == 5 and parts[4] == b"predict" else None
        return name if name in models else None

    def refuse(model: str) -> bool:
        if not admission.refuse_at_door():
            return False
        metrics.requests.labels(model, "overloaded").inc()
        return True

    return Guard(
        settings.max_header_bytes, settings.request_timeout_s, predict_model, refuse, admission.arrived, admission.left
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    server = server_state(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        server.limiter = anyio.CapacityLimiter(settings.inference_threads)
        yield

    app = FastAPI(
        title="branchserve", description=DESCRIPTION, version="1", lifespan=lifespan, docs_url=None, redoc_url=None
    )
    app.state.server = server
    for router in ROUTERS:
        app.include_router(router)
    docs.mount(app)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(RequestError, on_request_error)
    app.add_exception_handler(PredictError, on_predict_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(Exception, on_unexpected)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = strict_schema(app, server.models)
        return app.openapi_schema

    # FastAPI's documented way to extend the schema is to replace this method on the instance.
    app.openapi = openapi  # type: ignore[method-assign]
    return app
