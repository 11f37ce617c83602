"""The stages layout: each stage of a model version is a deployment of its own.

A stage deployment holds one stage's ONNX Runtime session and runs, as one batch, the rows that
many requests handed it at about the same time (`@serve.batch`): stage 0 every input, a later
stage only the inputs that did not leave at an earlier exit, a fraction the manifest predicts
(`exit_fractions` of the operating point). Each stage scales on its own traffic. ONNX Runtime's
answers for a row do not depend on the rows batched with it (checked bit for bit on the shipped
model), so batching changes no answer.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from branchserve.ray.args import AppArgs
from branchserve.repo.loading import load_version
from branchserve.repo.sessions import load_session
from branchserve.repo.tensors import FloatArray
from branchserve.server.runtime import Stage

StageOutput = tuple[FloatArray, FloatArray | None]  # (exit logits, boundary tensor or None after the last stage)


@serve.deployment(
    ray_actor_options={"num_cpus": 0.25},  # a share: stage 0 takes every input, later stages a fraction
    max_ongoing_requests=64,  # at least the batch size, or batches never fill
    max_queued_requests=256,
    logging_config={"enable_access_log": False},
    autoscaling_config={
        "min_replicas": 1,
        "max_replicas": 4,
        "target_ongoing_requests": 16,
        "look_back_period_s": 15,
        "upscale_delay_s": 5,
        "downscale_delay_s": 60,
    },
)
class StageServer:
    def __init__(self, args: AppArgs, model: str, version: int, index: int) -> None:
        settings = args.server_settings()
        version_dir = settings.repository / model / str(version)
        spec = load_version(version_dir).stages[index]
        self.stage = Stage(spec, load_session(version_dir / spec.file, settings.intra_op_threads))
        # serve.batch gives the method these setters; its annotation keeps the plain method's type
        self.run.set_max_batch_size(args.stage_batch_size)  # type: ignore[attr-defined]
        self.run.set_batch_wait_timeout_s(args.stage_batch_wait_ms / 1e3)  # type: ignore[attr-defined]

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.001)
    async def run(self, parts: list[FloatArray]) -> list[StageOutput]:
        """Each call's rows → its logits and boundary rows; the calls run as one batch."""
        logits, boundary = self.stage(np.concatenate(parts))
        cuts = np.cumsum([len(p) for p in parts])[:-1]
        boundaries = [None] * len(parts) if boundary is None else np.split(boundary, cuts)
        return list(zip(np.split(logits, cuts), boundaries, strict=True))


class RemoteStage:
    """A stage deployment as the runtime calls a stage (server/runtime.py: `StageFn`); it blocks
    until the stage answers, so it runs in a thread, never on an event loop."""

    def __init__(self, handle: DeploymentHandle[Any]) -> None:
        self.handle = handle

    def __call__(self, x: FloatArray) -> StageOutput:
        output: StageOutput = self.handle.run.remote(x).result()
        return output
