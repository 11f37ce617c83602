"""A model's deployment: decode → `ServedModel.predict` → encode, as `branchserve serve` does it.

Each replica loads the model's versions with `ModelRepository` (checked and calibrated, as the
plain server loads them). In the *replicas* layout a version's stages are ONNX Runtime sessions in
the replica, and a request is answered on the replica's event loop: it is one core's work, about a
millisecond, and a hop to a thread would cost as much (docs/serving.md). In the *stages* layout
the same `ServedModel` calls its stages through the stage deployments (stages.py); a stage call
waits for the stage's answer, so requests run in a pool of threads there. Either way, `Result` and
the JSON are made by the plain server's code, so the answers are the same.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, Literal

from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import Headers

from branchserve.ray.answers import RETRY_AFTER, Answer, Call, ray_failure
from branchserve.ray.args import AppArgs
from branchserve.ray.metrics import RayMetrics
from branchserve.ray.stages import RemoteStage
from branchserve.repo.manifest import Manifest, RepositoryError
from branchserve.server import api
from branchserve.server.app import settings_admission, settings_serving
from branchserve.server.decoding import MULTIPART, Limits, Parser, media_type, multipart_file, parser_for
from branchserve.server.encoding import encode_native
from branchserve.server.errors import RequestError
from branchserve.server.metrics import Metrics
from branchserve.server.predictor import DeadlineError, PredictError
from branchserve.server.repository import ModelRepository
from branchserve.server.runtime import StageFn
from branchserve.server.schemas import ModelSummary

CHAIN_THREADS = 64  # stages layout: requests in flight at once per replica (each holds a thread while its stages run)

Stages = dict[int, list[DeploymentHandle[Any]]]  # stages layout: each served version's stage deployments, in order
Document = Literal["model", "operating-point"]


@serve.deployment(
    ray_actor_options={"num_cpus": 1},  # one core per replica: ONNX Runtime runs one intra-op thread per stage
    max_ongoing_requests=4,
    max_queued_requests=64,  # per caller (each ingress replica); more are refused: 503 + Retry-After
    logging_config={"enable_access_log": False},  # a log line per request costs more than its stage 0
    autoscaling_config={
        "min_replicas": 1,
        "max_replicas": 8,
        "target_ongoing_requests": 2,
        "look_back_period_s": 15,
        "upscale_delay_s": 5,
        "downscale_delay_s": 60,
    },
)
class Predictor:
    def __init__(self, args: AppArgs, name: str, stages: Stages | None = None) -> None:
        settings = args.server_settings()
        self.name = name
        self.limits = Limits(settings.max_batch, tuple(settings.image_formats))
        remote = None if stages is None else partial(remote_stages, stages)
        metrics = Metrics()
        # Ray Serve queues requests itself, out of admission's sight, so no ladder (the policy's point always),
        # and the monitor, which finishes its samples when admission has a core idle, samples at any load.
        no_ladder = settings.model_copy(update={"ladder": "{}"})
        serving = settings_serving(no_ladder, metrics, settings_admission(settings, metrics), remote)
        self.repository = ModelRepository(settings.repository, settings.versions, serving)
        self.metrics = RayMetrics(serve.get_replica_context().app_name)
        self.threads = None if stages is None else ThreadPoolExecutor(CHAIN_THREADS, thread_name_prefix="chain")
        if self.threads is None:
            self.repository.load(name)
        else:  # calibrating remote stages waits for their answers, which needs this replica's event loop free
            self.threads.submit(self.repository.load, name).result()

    async def predict(self, call: Call) -> Answer:
        try:
            parse = parser_for(call.content_type, self.limits)
            body = call.body
            if media_type(call.content_type) == MULTIPART:
                body = await multipart_file(Headers({"content-type": call.content_type or ""}), body)
        except RequestError as e:
            return self._refused(call.version, "bad_input", e.status, e.message, e.headers)
        if self.threads is None:
            return self._answer(parse, body, call)
        return await asyncio.get_running_loop().run_in_executor(self.threads, self._answer, parse, body, call)

    def _answer(self, parse: Parser, body: bytes, call: Call) -> Answer:
        started = time.perf_counter() - max(time.time() - call.received_at, 0.0)  # on this host's clock
        try:
            model = self.repository.get(self.name, call.version)
        except RequestError as e:
            return self._refused(call.version, "bad_input", e.status, e.message)
        version = str(model.version)
        try:
            result = model.predict(parse(body, call.query, model.manifest.input, self.limits), started)
        except RequestError as e:
            return self._refused(version, "bad_input", e.status, e.message, e.headers)
        except PredictError as e:
            return self._refused(version, "bad_input", 422, str(e))
        except DeadlineError as e:
            return self._refused(version, "expired", 503, str(e), RETRY_AFTER)
        except Exception as e:  # stages layout: a stage deployment refused or lost the request
            if (failure := ray_failure(e)) is None:
                raise
            self.metrics.count(self.name, version, failure[0])
            return failure[1]
        self.metrics.observe(model, result)
        return Answer(200, encode_native(result))

    def _refused(
        self, version: str | None, outcome: str, status: int, message: str, headers: dict[str, str] | None = None
    ) -> Answer:
        self.metrics.count(self.name, version or "", outcome)
        return Answer.error(status, message, headers)

    async def document(self, version: str | None, what: Document) -> Answer:
        """GET /v1/models/{name}[/versions/{v}] (metadata) or .../operating-point, as the plain server answers them."""
        try:
            model = self.repository.get(self.name, version)
        except RequestError as e:
            return Answer.error(e.status, e.message)
        doc = await api.model_metadata(model) if what == "model" else api.current_point(model)
        return Answer(200, doc.model_dump_json().encode())

    async def summaries(self) -> list[dict[str, object]]:
        """Every version served, for GET /v1/models."""
        return [
            ModelSummary(
                name=m.name, version=m.version, exits=m.runtime.num_exits, operating_point=m.choice.name
            ).model_dump()
            for m in self.repository.served()
        ]


def remote_stages(stages: Stages, manifest: Manifest) -> Sequence[StageFn]:
    """A version's stages as their deployments (the `Serving.remote_stages` of the stages layout)."""
    if manifest.version not in stages:  # the repository changed between building the application and now
        raise RepositoryError(f"{manifest.name}/{manifest.version} has no stage deployments; deploy again")
    return [RemoteStage(handle) for handle in stages[manifest.version]]
