"""A served model: its runtime, the server's operating point for it, and one predict call end to end.

`predict` takes a parsed request and does the rest in one call: pick thresholds from the budgets,
run, record metrics and serialise. The API runs it on the event loop for a small request and in
a worker thread otherwise (server/api.py says when), so it is synchronous and thread-safe.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import orjson

from server.budget import Budget, Choice, Policy, cheapest_meeting, choose
from server.inputs import InputError
from server.metrics import Metrics
from server.runtime import ModelRuntime, Outcome

RECHOOSE_SECONDS = 1.0  # a latency budget is re-priced with live stage latencies this often

Source = Literal["server", "request", "load"]


@dataclass(frozen=True)
class Job:
    """A parsed predict request; `started` is the time.perf_counter() at which the server received it."""

    x: np.ndarray
    budget: Budget
    probabilities: bool
    started: float
    degraded: bool  # the machine is loaded: prefer the cheaper load point


class ServedModel:
    def __init__(self, runtime: ModelRuntime, policy: Policy, degrade_drop: float, metrics: Metrics) -> None:
        self.runtime = runtime
        self.manifest = runtime.manifest
        self.name = self.manifest.name
        self.metrics = metrics
        self.full_macs = float(runtime.cumulative_macs[-1])
        self.load_point = Choice.of(cheapest_meeting(self.manifest, degrade_drop))
        metrics.add_model(self.name, runtime.num_exits)
        self._lock = threading.Lock()
        self.policy = policy
        self.set_policy(policy)

    def set_policy(self, policy: Policy, unless_changed_from: Policy | None = None) -> Choice:
        """Adopt a policy (ValueError if it does not fit this model) and publish its thresholds."""
        with self._lock:  # the admin endpoint and worker threads re-pricing a latency budget
            if unless_changed_from is None or self.policy is unless_changed_from:
                choice = choose(self.manifest, policy, self.runtime.clock.per_input_ms())
                self.policy, self.choice, self.chosen_at = policy, choice, time.monotonic()
                self.metrics.set_thresholds(self.name, choice.thresholds, self.expected_saved(choice))
            return self.choice

    def current(self) -> Choice:
        """The server's choice now; a latency budget is re-priced as live stage latencies move."""
        policy = self.policy
        if policy.latency_budget_ms is not None and time.monotonic() - self.chosen_at > RECHOOSE_SECONDS:
            return self.set_policy(policy, unless_changed_from=policy)
        return self.choice

    def expected_saved(self, choice: Choice) -> float:
        return math.nan if choice.point is None else 1.0 - choice.point.expected_macs / self.full_macs

    def _thresholds(self, job: Job) -> tuple[Choice, Source]:
        if job.budget.max_accuracy_drop is not None:
            return Choice.of(cheapest_meeting(self.manifest, job.budget.max_accuracy_drop)), "request"
        choice = self.current()
        load = self.load_point
        if job.degraded and (choice.point is None or load.point.expected_macs < choice.point.expected_macs):
            return load, "load"
        return choice, "server"

    def predict(self, job: Job) -> bytes:
        """Answer a request; returns the JSON response body."""
        budget, last = job.budget, self.runtime.num_exits - 1
        if budget.max_exit is not None and budget.max_exit > last:
            raise InputError(422, f"budget.max_exit: {self.name} has exits 0..{last}")
        choice, source = self._thresholds(job)
        max_exit = last if budget.max_exit is None else budget.max_exit
        deadline_at = None if budget.deadline_ms is None else job.started + budget.deadline_ms / 1e3
        outcome = self.runtime.run(job.x, choice.thresholds, max_exit, deadline_at)

        exits = outcome.exits
        labels = self.manifest.labels
        classes = outcome.probs.argmax(axis=1)
        outputs = [
            {"exit": k, "confidence": c, "class": y, "label": labels[y], "stages_run": k + 1}
            for k, c, y in zip(exits.tolist(), outcome.confidence.tolist(), classes.tolist(), strict=True)
        ]
        if job.probabilities:
            for out, p in zip(outputs, outcome.probs.tolist(), strict=True):
                out["probabilities"] = p
        latency = time.perf_counter() - job.started
        missed = None if deadline_at is None else job.started + latency > deadline_at
        self._observe(outcome, exits, latency, source, missed)
        return orjson.dumps(
            {
                "model": self.name,
                "version": self.manifest.version,
                "outputs": outputs,
                "stages_run": len(outcome.stage_seconds),
                "latency_ms": latency * 1e3,
                "compute_ms": sum(outcome.stage_seconds) * 1e3,
                "budget": {
                    "source": source,
                    "operating_point": choice.name,
                    "thresholds": choice.thresholds,
                    "deadline_ms": budget.deadline_ms,
                    "max_exit": budget.max_exit,
                    "max_accuracy_drop": budget.max_accuracy_drop,
                },
                "deadline_stopped": outcome.deadline_stopped,
                "deadline_missed": missed,
            }
        )

    def _observe(
        self, outcome: Outcome, exits: np.ndarray, latency: float, source: Source, missed: bool | None
    ) -> None:
        m, name = self.metrics, self.name
        m.observe_run(name, outcome, float(self.runtime.cumulative_macs[exits].sum()), self.full_macs * len(exits))
        m.requests.labels(name, "ok").inc()
        m.request_seconds.labels(name).observe(latency)
        if source == "load":
            m.degraded.labels(name).inc()
        if missed is not None:
            m.deadline_requests.labels(name).inc()
            m.deadline_stops.labels(name).inc(outcome.deadline_stopped)
            m.deadline_misses.labels(name).inc(missed)
