"""A served model: its runtime, the server's operating point for it, and predict.

`predict` takes a decoded request and returns a `Result`, with no HTTP on either side: the REST
routes decode before it and encode after it. It runs on the event loop for a light request and
in a worker thread otherwise (server/api.py says when), so it is synchronous and thread-safe.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from branchserve.repo.manifest import Manifest
from branchserve.repo.points import Choice, Policy, cheapest_meeting, choose
from branchserve.repo.tensors import FloatArray
from branchserve.server.budget import Budget
from branchserve.server.metrics import Metrics, ModelLabels
from branchserve.server.runtime import ModelRuntime, Outcome

RECHOOSE_SECONDS = 1.0  # a latency budget is re-priced with live stage latencies this often

Source = Literal["server", "request", "load"]


class PredictError(ValueError):
    """A budget that does not fit the model (e.g. `max_exit` past its last exit); safe to show a client."""


class DeadlineError(RuntimeError):
    """A request's deadline passed while it waited to start: answered at once (503), never computed late."""


@dataclass(frozen=True)
class PredictRequest:
    """What predict needs. `inputs` may still decode an image's pixels, so it runs where predict runs."""

    inputs: Callable[[], FloatArray]
    budget: Budget
    probabilities: bool
    light: bool  # cheap enough to answer on the event loop


@dataclass(frozen=True)
class Result:
    """One answered request: every input's exit and scores, and what was applied to get them."""

    manifest: Manifest
    outcome: Outcome
    choice: Choice
    source: Source
    budget: Budget
    probabilities: bool
    latency_s: float
    deadline_missed: bool | None


class ServedModel:
    def __init__(self, runtime: ModelRuntime, policy: Policy, degrade_drop: float, metrics: Metrics) -> None:
        self.runtime = runtime
        self.manifest = runtime.manifest
        self.name = self.manifest.name
        self.version = self.manifest.version
        self.labels: ModelLabels = (self.name, str(self.version))  # of its metric series
        self.metrics = metrics
        self.full_macs = float(runtime.cumulative_macs[-1])
        self.load_point = Choice.of(cheapest_meeting(self.manifest, degrade_drop))
        metrics.add_model(self.labels, runtime.num_exits)
        self._lock = threading.Lock()
        self.policy = policy
        self.set_policy(policy)

    def set_policy(self, policy: Policy, unless_changed_from: Policy | None = None) -> Choice:
        """Adopt a policy (ValueError if it does not fit this model) and publish its thresholds."""
        with self._lock:  # the admin endpoint and worker threads re-pricing a latency budget
            if unless_changed_from is None or self.policy is unless_changed_from:
                choice = choose(self.manifest, policy, self.runtime.clock.per_input_ms())
                self.policy, self.choice, self.chosen_at = policy, choice, time.monotonic()
                self.metrics.set_thresholds(self.labels, choice.thresholds, self.expected_saved(choice))
            return self.choice

    def current(self) -> Choice:
        """The server's choice now; a latency budget is re-priced as live stage latencies move."""
        policy = self.policy
        if policy.latency_budget_ms is not None and time.monotonic() - self.chosen_at > RECHOOSE_SECONDS:
            return self.set_policy(policy, unless_changed_from=policy)
        return self.choice

    def expected_saved(self, choice: Choice) -> float:
        return math.nan if choice.point is None else 1.0 - choice.point.expected_macs / self.full_macs

    def _thresholds(self, budget: Budget, loaded: bool) -> tuple[Choice, Source]:
        if budget.max_accuracy_drop is not None:
            return Choice.of(cheapest_meeting(self.manifest, budget.max_accuracy_drop)), "request"
        choice = self.current()
        load = self.load_point
        assert load.point is not None
        if loaded and (choice.point is None or load.point.expected_macs < choice.point.expected_macs):
            return load, "load"
        return choice, "server"

    def predict(self, request: PredictRequest, started: float, loaded: bool) -> Result:
        """Answer a request received at `started` (time.perf_counter()); `loaded`: prefer the load point."""
        budget, last = request.budget, self.runtime.num_exits - 1
        if budget.max_exit is not None and budget.max_exit > last:
            raise PredictError(f"budget.max_exit: {self.name} has exits 0..{last}")
        x = request.inputs()
        choice, source = self._thresholds(budget, loaded)
        max_exit = last if budget.max_exit is None else budget.max_exit
        deadline_at = None if budget.deadline_ms is None else self._deadline(budget.deadline_ms, len(x), started)
        outcome = self.runtime.run(x, choice.thresholds, max_exit, deadline_at)
        latency = time.perf_counter() - started
        missed = None if deadline_at is None else started + latency > deadline_at
        self._observe(outcome, latency, source, missed)
        return Result(self.manifest, outcome, choice, source, budget, request.probabilities, latency, missed)

    def _deadline(self, deadline_ms: float, rows: int, started: float) -> float:
        """The instant a deadline falls due; refuses one no answer could meet (PredictError) and one
        that passed while the request waited (DeadlineError): neither is ever computed late."""
        first_ms = self.runtime.clock.idle_time(0, rows) * 1e3
        if deadline_ms < first_ms:
            raise PredictError(
                f"budget.deadline_ms: {deadline_ms:g} ms is shorter than the first stage alone takes here "
                f"({first_ms:.2f} ms for {rows} input(s)), so no answer could meet it"
            )
        late_ms = (time.perf_counter() - started) * 1e3 - deadline_ms
        if late_ms >= 0:
            raise DeadlineError(f"deadline passed {late_ms:.2f} ms ago, while the request waited to start")
        return started + deadline_ms / 1e3

    def _observe(self, outcome: Outcome, latency: float, source: Source, missed: bool | None) -> None:
        m, labels, exits = self.metrics, self.labels, outcome.exits
        m.observe_run(labels, outcome, float(self.runtime.cumulative_macs[exits].sum()), self.full_macs * len(exits))
        m.requests.labels(*labels, "ok").inc()
        m.request_seconds.labels(*labels).observe(latency)
        if source == "load":
            m.degraded.labels(*labels).inc()
        if missed is not None:
            m.deadline_requests.labels(*labels).inc()
            m.deadline_stops.labels(*labels).inc(outcome.deadline_stopped)
            m.deadline_misses.labels(*labels).inc(missed)
