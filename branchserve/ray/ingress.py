"""The ingress: the native /v1 API over Ray Serve's HTTP proxy, a deployment handle per model.

It checks what it can without the model (the path, the API key, the content type, the body's
size), hands the body whole to the model's deployment (predictor.py), and turns what Ray Serve
does to a request into the project's answers: backpressure (the model deployment's
`max_queued_requests` reached) and a replica lost with the request on it are 503 + Retry-After
with a `{"detail": ...}` body, counted by outcome.

No `from __future__ import annotations` here: `serve.ingress` rebuilds the routes' signatures, and
FastAPI would then take an annotation left as a string (`request: "Request"`) for a query parameter.
"""

import asyncio
import logging
import time
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator
from starlette.exceptions import HTTPException

from branchserve.ray.answers import Answer, Call, ray_failure
from branchserve.ray.args import AppArgs
from branchserve.ray.metrics import RayMetrics
from branchserve.server.auth import Keys
from branchserve.server.decoding import Limits, parser_for, read_body, validation_message
from branchserve.server.errors import RequestError, error_key, error_response

log = logging.getLogger("branchserve")
READY_TIMEOUT_S = 5.0

app = FastAPI(
    title="branchserve on Ray Serve",
    description="The native /v1 API of docs/serving.md, each model a Ray Serve deployment. See docs/deployment.md.",
    docs_url=None,
    redoc_url=None,
)


@app.exception_handler(RequestError)
async def on_request_error(request: Request, exc: RequestError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.headers, error_key(request.url.path))


@app.exception_handler(HTTPException)
async def on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return error_response(exc.status_code, str(exc.detail), exc.headers, error_key(request.url.path))


@app.exception_handler(RequestValidationError)
async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(422, validation_message(exc.errors()), key=error_key(request.url.path))


@serve.deployment(
    ray_actor_options={"num_cpus": 0},  # it mostly waits on the models' deployments; their replicas take the cores
    max_ongoing_requests=256,  # the model deployments' queues bound the work, not this
    logging_config={"enable_access_log": False},
    autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 64},
)
@serve.ingress(app)
class Ingress:
    def __init__(self, args: AppArgs, models: dict[str, DeploymentHandle[Any]]) -> None:
        settings = args.server_settings()
        self.models = models
        self.limits = Limits(settings.max_batch, tuple(settings.image_formats))
        self.max_body_bytes = settings.max_body_bytes
        self.keys = Keys(settings.api_keys, settings.api_keys_file)
        self.metrics = RayMetrics(serve.get_replica_context().app_name)

    def _model(self, name: str) -> DeploymentHandle[Any]:
        try:
            return self.models[name]
        except KeyError:
            raise RequestError(404, f"no model named {name!r} is served; see GET /v1/models") from None

    async def _answer(
        self, name: str, version: str | None, pending: DeploymentResponse[Any] | DeploymentResponseGenerator[Any]
    ) -> Answer:
        assert isinstance(pending, DeploymentResponse)  # handles here never stream
        try:
            answer: Answer = await pending
        except Exception as e:
            if (failure := ray_failure(e)) is None:
                raise
            log.warning("%s: %s", name, e)
            outcome, answer = failure
            self.metrics.count(name, version or "", outcome)
        return answer

    @app.post("/v1/models/{name}/predict")
    @app.post("/v1/models/{name}/versions/{version}/predict")
    async def predict(self, request: Request, name: str) -> Response:
        model = self._model(name)
        self.keys.check(request)
        parser_for(request.headers.get("content-type"), self.limits)  # 415 before reading the body
        body = await read_body(request, self.max_body_bytes)
        version = request.path_params.get("version")
        call = Call(request.headers.get("content-type"), body, dict(request.query_params), version, time.time())
        return (await self._answer(name, version, model.predict.remote(call))).response()

    @app.get("/v1/models")
    async def list_models(self, request: Request) -> list[dict[str, object]]:
        self.keys.check(request)
        served = await asyncio.gather(*(model.summaries.remote() for model in self.models.values()))
        return [summary for summaries in served for summary in summaries]

    @app.get("/v1/models/{name}")
    @app.get("/v1/models/{name}/versions/{version}")
    async def model_metadata(self, request: Request, name: str) -> Response:
        return await self._document(request, name, "model")

    @app.get("/v1/models/{name}/operating-point")
    async def operating_point(self, request: Request, name: str) -> Response:
        return await self._document(request, name, "operating-point")

    async def _document(self, request: Request, name: str, what: str) -> Response:
        model = self._model(name)
        self.keys.check(request)
        version = request.path_params.get("version")
        return (await self._answer(name, version, model.document.remote(version, what))).response()

    @app.get("/v2/health/live")
    async def live(self) -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready(self) -> dict[str, object]:
        """Ready when every model's deployment answers (Ray Serve's proxy has its own `/-/healthz`)."""
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                await asyncio.gather(*(model.summaries.remote() for model in self.models.values()))
        except Exception as e:
            raise RequestError(503, f"not ready: {e}") from None
        return {"ready": True, "models": sorted(self.models)}
