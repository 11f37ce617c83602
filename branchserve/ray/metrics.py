"""The plain server's per-model series (server/metrics.py: same names, labels and buckets), exported
through Ray's metrics (`ray.util.metrics`), so one dashboard reads either deployment.

Every replica records its own; Ray's metrics agent on each node serves them to Prometheus, which
sums across replicas and nodes. Prometheus sees them with Ray's `ray_` prefix
(`ray_branchserve_exit_answers_total`), and with the label `application` (the Serve application's
name) beside the server's labels, so two applications on one cluster keep apart. In the stages layout a stage's time is what the model's
deployment waited for it: the hop to the stage's deployment, the batch wait and the stage itself.
"""

from __future__ import annotations

import numpy as np
from ray.util.metrics import Counter, Histogram

from branchserve.server.metrics import REQUEST_BUCKETS, STAGE_BUCKETS
from branchserve.server.predictor import Result, ServedModel

MODEL = ("application", "model", "version")


class RayMetrics:
    def __init__(self, application: str) -> None:
        self.requests = Counter(
            "branchserve_requests",
            "Predict requests by model and outcome (ok, bad_input, overloaded, expired, lost)",
            tag_keys=(*MODEL, "outcome"),
        )
        self.request_seconds = Histogram(
            "branchserve_request_duration_seconds",
            "Latency of answered predict requests, from the ingress having the body to the answer",
            boundaries=list(REQUEST_BUCKETS),
            tag_keys=MODEL,
        )
        self.exit_answers = Counter(
            "branchserve_exit_answers", "Inputs answered by each exit", tag_keys=(*MODEL, "exit")
        )
        self.stage_seconds = Histogram(
            "branchserve_stage_duration_seconds",
            "Wall time of one stage call (one batch)",
            boundaries=list(STAGE_BUCKETS),
            tag_keys=(*MODEL, "stage"),
        )
        self.macs = Counter("branchserve_compute_macs", "Multiply-accumulates computed", tag_keys=MODEL)
        self.full_depth_macs = Counter(
            "branchserve_full_depth_macs",
            "Multiply-accumulates the same inputs would cost at full depth",
            tag_keys=MODEL,
        )
        for metric in (
            self.requests,
            self.request_seconds,
            self.exit_answers,
            self.stage_seconds,
            self.macs,
            self.full_depth_macs,
        ):
            metric.set_default_tags({"application": application})

    def count(self, model: str, version: str, outcome: str) -> None:
        self.requests.inc(1.0, {"model": model, "version": version, "outcome": outcome})

    def observe(self, model: ServedModel, result: Result) -> None:
        """An answered request: its exits, stage times, compute and latency."""
        name, version = model.labels
        tags = {"model": name, "version": version}
        outcome = result.outcome
        for k, seconds in enumerate(outcome.stage_seconds):
            self.stage_seconds.observe(seconds, tags | {"stage": str(k)})
        for k, count in enumerate(np.bincount(outcome.exits).tolist()):
            if count:
                self.exit_answers.inc(float(count), tags | {"exit": str(k)})
        computed, full_depth = model.computed_macs(outcome)
        self.macs.inc(computed, tags)
        self.full_depth_macs.inc(full_depth, tags)
        self.request_seconds.observe(result.latency_s, tags)
        self.count(name, version, "ok")
