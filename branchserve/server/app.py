"""`create_app`: load and check the repository, build the runtimes, wire routes and error handlers.

Loading happens before the app exists, so a broken repository stops the server with a message
instead of serving 500s; by the time uvicorn binds, every model is loaded and calibrated. Three
front doors share one repository, admission and predictor: the native /v1 routes, the Open
Inference Protocol's REST routes (server/oip/rest.py) and its gRPC service on `grpc_port`
(server/oip/grpc_service.py, started with the app when `branchserve[grpc]` is installed).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from functools import partial
from types import ModuleType
from typing import Any, cast
from urllib.parse import unquote

import anyio
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.telemetry import TelemetryConfig
from starlette.exceptions import HTTPException
from starlette.routing import Match, Route
from starlette.types import Receive, Scope, Send

from branchserve.repo.points import Policy
from branchserve.repo.versions import VersionPolicy
from branchserve.server import api, docs, probes
from branchserve.server.admission import Admission
from branchserve.server.auth import AdminToken, Keys
from branchserve.server.decoding import Limits, validation_message
from branchserve.server.errors import RequestError, error_key, error_response
from branchserve.server.metrics import Metrics, ModelLabels
from branchserve.server.monitor import MonitorSettings
from branchserve.server.oip import repository_api
from branchserve.server.oip import rest as oip_rest
from branchserve.server.oip.repository_api import in_background
from branchserve.server.openapi import strict_schema
from branchserve.server.predictor import PredictError
from branchserve.server.repository import ModelRepository, RemoteStages, Serving
from branchserve.server.settings import Settings
from branchserve.server.state import ServerState
from branchserve.server.transport import Guard, install
from branchserve.server.warmup import warm_up
from branchserve.server.workers import Change, Peers, RunFolder

log = logging.getLogger("branchserve")
ROUTERS = (api.router, probes.router, oip_rest.router, repository_api.router)
Endpoint = Callable[[Request, str], Awaitable[Response]]
INFERENCE_ENDPOINTS: dict[tuple[str, str], Endpoint] = {("v1", "predict"): api.predict, ("v2", "infer"): oip_rest.infer}
"""(API, last path segment) of a predict URL → its endpoint, which reads the request itself given only
the model's name: see `BranchServe`."""

NO_TELEMETRY: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False}
"""FastAPI's native OpenTelemetry, off: it looked up the global providers on every request (~5 µs of
a ~0.4 ms answer) to find none; the server's telemetry is its Prometheus /metrics."""

GRPC_GRACE_S = 5.0  # on shutdown, in-flight gRPC calls get this long to finish

DESCRIPTION = """Early-exit inference: each request runs stage by stage and leaves at the first exit
confident enough for the operating point in force. See docs/serving.md."""


async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code == 405:  # Starlette names only the first route on the path; name them all
        headers["Allow"] = ", ".join(allowed_methods(request))
    return error_response(exc.status_code, str(exc.detail), headers, error_key(request.url.path))


def allowed_methods(request: Request) -> list[str]:
    methods: set[str] = set()
    for route in (r for router in ROUTERS for r in router.routes):
        if isinstance(route, Route) and route.methods and route.matches(request.scope)[0] != Match.NONE:
            methods |= route.methods
    return sorted(methods)


async def on_request_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestError)
    return error_response(exc.status, exc.message, exc.headers, error_key(request.url.path))


async def on_predict_error(request: Request, exc: Exception) -> JSONResponse:
    return error_response(422, str(exc), key=error_key(request.url.path))


async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    status = 400 if errors[0]["type"] == "json_invalid" else 422
    return error_response(status, validation_message(errors), key=error_key(request.url.path))


async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal error", key=error_key(request.url.path))


EXCEPTION_HANDLERS: dict[int | type[Exception], Callable[[Request, Any], Coroutine[Any, Any, Response]]] = {
    HTTPException: on_http_error,
    RequestError: on_request_error,
    PredictError: on_predict_error,
    RequestValidationError: on_validation_error,
    Exception: on_unexpected,  # a JSON 500, logged
}


def settings_serving(
    settings: Settings, metrics: Metrics, admission: Admission, remote_stages: RemoteStages | None = None
) -> Serving:
    """How this process serves the versions it loads; the monitor's chance of a false alarm is split over
    the server's workers."""
    workers = settings.workers if RunFolder.of_this_worker() else 1
    monitor = MonitorSettings(settings.monitor_fraction, settings.monitor_risk / workers, settings.monitor_action)
    return Serving(
        settings.policy,
        settings.intra_op_threads,
        metrics,
        admission,
        settings.ladder_spec,
        monitor,
        settings.inference_threads,
        remote_stages,
    )


def served_repository(settings: Settings, metrics: Metrics, admission: Admission) -> ModelRepository:
    """The repository at `settings.repository`, every model loaded as the version policy says."""
    serving = settings_serving(settings, metrics, admission)
    repository = ModelRepository(settings.repository, settings.versions, serving)
    repository.load_all()
    return repository


def settings_admission(settings: Settings, metrics: Metrics) -> Admission:
    return Admission(
        settings.max_in_flight,
        settings.max_wait_ms / 1e3,
        settings.queue_target_ms / 1e3,
        settings.queue_interval_ms / 1e3,
        metrics,
    )


def server_state(settings: Settings) -> ServerState:
    metrics = Metrics()
    admission = settings_admission(settings, metrics)
    limits = Limits(settings.max_batch, tuple(settings.image_formats))
    keys = Keys(settings.api_keys, settings.api_keys_file)
    admin = AdminToken(settings.admin_token)
    log.info(
        "admin endpoints %s; predict and metadata %s",
        "need the admin token" if admin.token else "disabled (no BRANCHSERVE_ADMIN_TOKEN)",
        "need an API key" if keys.required else "open to every client (no API keys)",
    )
    peers = Peers(RunFolder.of_this_worker(), settings.workers)
    repository = served_repository(settings, metrics, admission)
    return ServerState(settings, repository, metrics, admission, limits, keys, admin, peers)


async def apply_change(server: ServerState, change: Change) -> None:
    """An admin change another worker made and published (server/workers.py): make it here too."""
    name, op = change["model"], change["op"]
    if op == "policy":
        server.repository.set_policy(name, Policy.model_validate(change["policy"]))
    elif op == "load":
        policy = None if change["version_policy"] is None else VersionPolicy.model_validate(change["version_policy"])
        await in_background(server.repository.load, name, policy)
    elif op == "unload":
        await anyio.to_thread.run_sync(server.repository.unload, name)
    log.info("worker %d: applied %s of %s from worker %s", os.getpid(), op, name, change["by"])


def predict_path(path: str) -> tuple[Endpoint, str, str | None] | None:
    """(endpoint, model, version or None) of a predict path: /v1/models/{name}[/versions/{v}]/predict
    or /v2/models/{name}[/versions/{v}]/infer; None for any other."""
    parts = path.split("/")  # "", "v1", "models", name, ["versions", v,] "predict"
    if len(parts) not in (5, 7) or parts[2] != "models" or (len(parts) == 7 and parts[4] != "versions"):
        return None
    if not all(parts[3:-1]):  # an empty name or version, which a route's `{name}` would not match
        return None
    endpoint = INFERENCE_ENDPOINTS.get((parts[1], parts[-1]))
    if endpoint is None:
        return None
    return endpoint, parts[3], parts[5] if len(parts) == 7 else None


def predict_url(url: bytes) -> tuple[str, str | None] | None:
    """(model, version or None) of a predict request's raw URL, as the connection reads it, decoded
    as uvicorn decodes the path it gives the app; None for any other URL."""
    target = predict_path(unquote(url.partition(b"?")[0].decode("latin-1")))
    return None if target is None else target[1:]


class BranchServe(FastAPI):
    """FastAPI, except that a predict request goes straight to its endpoint. Its middleware stack
    (server errors, exception handlers, body limit, exit stack) and routing cost ~30 µs of a
    ~0.5 ms answer at concurrency 1, and these endpoints use none of it: they read the request
    themselves, and their errors map to answers through the same handlers (`handled`). Their
    FastAPI routes stay, for the OpenAPI schema, and answer 405 to other methods."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        target = predict_path(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if target is None:
            return await super().__call__(scope, receive, send)
        endpoint, name, version = target
        scope["app"] = self
        scope["path_params"] = {"name": name} if version is None else {"name": name, "version": version}
        request = Request(scope, receive, send)
        try:
            response = await endpoint(request, name)
        except Exception as exc:
            response = await self.handled(request, exc)
        await response(scope, receive, send)

    async def handled(self, request: Request, exc: Exception) -> Response:
        """The answer the registered handler of `exc`'s nearest class gives (`on_unexpected` at the least)."""
        handler = next((self.exception_handlers[c] for c in type(exc).__mro__ if c in self.exception_handlers), None)
        if handler is None:  # an app without a handler for Exception: uvicorn answers 500
            raise exc
        return await cast(Awaitable[Response], handler(request, exc))  # EXCEPTION_HANDLERS: all async


def connection_guard(app: FastAPI) -> Guard:
    """The connection-level limits of `app`'s settings, and its admission at the door."""
    server: ServerState = app.state.server
    admission, metrics, settings = server.admission, server.metrics, server.settings

    def predict_model(url: bytes) -> ModelLabels | None:
        named = predict_url(url)
        if named is None:
            return None
        try:
            return server.model(*named).labels
        except RequestError:
            return None  # the route answers 404

    def refuse(model: ModelLabels) -> bool:
        if not admission.refuse_at_door():
            return False
        metrics.requests.labels(*model, "overloaded").inc()
        return True

    return Guard(
        settings.max_header_bytes, settings.request_timeout_s, predict_model, refuse, admission.arrived, admission.left
    )


def optional_grpc(settings: Settings) -> ModuleType | None:
    """The gRPC service module when a port is set and `branchserve[grpc]` is installed; a port asked for
    explicitly without it is an error, the default port without it a log line."""
    if settings.grpc_port == 0:
        return None
    try:
        from branchserve.server.oip import grpc_service
    except ImportError as e:
        if "grpc_port" in settings.model_fields_set:
            raise ValueError(
                f"grpc_port {settings.grpc_port}: gRPC needs pip install 'branchserve[grpc]' ({e})"
            ) from None
        log.info("gRPC off: %s is not installed (pip install 'branchserve[grpc]')", e.name)
        return None
    return grpc_service


def create_app(settings: Settings | None = None) -> BranchServe:
    settings = settings or Settings()
    grpc_service = optional_grpc(settings)  # before loading: a missing extra is a quick error
    server = server_state(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        server.limiter = anyio.CapacityLimiter(settings.inference_threads)
        grpc = None if grpc_service is None else await grpc_service.start(server, settings.host, settings.grpc_port)
        following = asyncio.create_task(server.peers.follow(partial(apply_change, server)))
        await warm_up(app)
        gc.freeze()  # what start-up made lives as long as the server: a full collection need not walk it again
        server.peers.mark_ready()
        try:
            yield
        finally:
            server.peers.leave()
            following.cancel()
            if grpc is not None:
                await grpc.stop(GRPC_GRACE_S)
            server.repository.close()
            server.metrics.leave()

    app = BranchServe(
        title="branchserve",
        description=DESCRIPTION,
        version="1",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        telemetry=NO_TELEMETRY,
        exception_handlers=EXCEPTION_HANDLERS,
    )
    app.state.server = server
    for router in ROUTERS:
        app.include_router(router)
    docs.mount(app)

    schema_of = [-1]  # the repository generation the cached schema describes

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None or schema_of[0] != server.repository.generation:
            app.openapi_schema, schema_of[0] = None, server.repository.generation
            app.openapi_schema = strict_schema(app, list(server.repository.served()))
        return app.openapi_schema

    # FastAPI's documented way to extend the schema is to replace this method on the instance.
    app.openapi = openapi  # type: ignore[method-assign]
    install(connection_guard(app))  # for this process's connections (server/transport.py)
    return app


def worker_app() -> BranchServe:
    """The app of one worker process (`branchserve serve --workers N`): its settings come from the
    BRANCHSERVE_* variables the supervisor set."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)-9s %(message)s")
    return create_app(Settings())
