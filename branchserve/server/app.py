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

from branchserve.repo.certify import NotCertified
from branchserve.repo.loading import load_repository
from branchserve.repo.points import Choice, cheapest_meeting
from branchserve.server import api, docs, probes
from branchserve.server.admission import Admission
from branchserve.server.auth import AdminToken, Keys
from branchserve.server.decoding import Limits, validation_message
from branchserve.server.errors import RequestError, error_response
from branchserve.server.ladder import Ladder, certified_rungs
from branchserve.server.metrics import Metrics
from branchserve.server.monitor import ExitMonitor
from branchserve.server.predictor import PredictError, ServedModel
from branchserve.server.runtime import ModelRuntime
from branchserve.server.settings import Settings
from branchserve.server.state import ServerState
from branchserve.server.transport import Guard

log = logging.getLogger("branchserve")

DESCRIPTION = """Early-exit inference: each request runs stage by stage and leaves at the first exit
confident enough for the operating point in force. See docs/serving.md."""


async def on_http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    return error_response(exc.status_code, str(exc.detail), exc.headers)


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


def ladder_for(runtime: ModelRuntime, settings: Settings, admission: Admission) -> tuple[Ladder, list[Choice]] | None:
    """The ladder's controller and certified rungs for a model; None when the ladder is off or cannot be built."""
    spec = settings.ladder_spec
    if not spec.targets:
        return None
    try:
        rungs = certified_rungs(runtime.manifest, spec)
    except NotCertified as e:
        log.warning("no load-adaptive ladder for %s: %s", runtime.manifest.name, e)
        return None
    return Ladder(spec.p99_ms / 1e3, admission), rungs


def monitor_for(runtime: ModelRuntime, settings: Settings, admission: Admission, metrics: Metrics) -> ExitMonitor:
    cores = settings.inference_threads
    full_depth = Choice.of(cheapest_meeting(runtime.manifest, 0))
    return ExitMonitor(
        runtime,
        settings.monitor_fraction,
        settings.monitor_risk,
        settings.monitor_action,
        full_depth,
        metrics,
        idle=lambda: admission.in_flight < cores,
    )


def load_models(settings: Settings, metrics: Metrics, admission: Admission) -> dict[str, ServedModel]:
    models = {}
    for name, (manifest, version_dir) in load_repository(settings.repository).items():
        runtime = ModelRuntime(manifest, version_dir, settings.intra_op_threads)
        ladder = ladder_for(runtime, settings, admission)
        monitor = monitor_for(runtime, settings, admission, metrics)
        models[name] = ServedModel(runtime, settings.policy, metrics, ladder, monitor)
        log.info("serving %s/%s from %s (%d exits)", name, manifest.version, version_dir, runtime.num_exits)
    return models


def server_state(settings: Settings) -> ServerState:
    metrics = Metrics()
    admission = Admission(
        settings.max_in_flight,
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
    models = load_models(settings, metrics, admission)
    return ServerState(settings, models, metrics, admission, limits, keys, admin)


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
        monitors = [m.monitor for m in server.models.values() if m.monitor is not None]
        for monitor in monitors:
            monitor.start()
        yield
        for monitor in monitors:
            monitor.stop()

    app = FastAPI(
        title="branchserve", description=DESCRIPTION, version="1", lifespan=lifespan, docs_url=None, redoc_url=None
    )
    app.state.server = server
    app.include_router(api.router)
    app.include_router(probes.router)
    docs.mount(app)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(RequestError, on_request_error)
    app.add_exception_handler(PredictError, on_predict_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(Exception, on_unexpected)

    def openapi() -> dict[str, Any]:
        """FastAPI's schema plus the body schemas that predict documents but does not parse with pydantic."""
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = FastAPI.openapi(app)  # makes and keeps app.openapi_schema, this same dict
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in api.DOC_SCHEMAS:
            doc = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(doc.pop("$defs", {}))
            components[model.__name__] = doc
        return schema

    # FastAPI's documented way to extend the schema is to replace this method on the instance.
    app.openapi = openapi  # type: ignore[method-assign]
    return app
