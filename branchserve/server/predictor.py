"""A served model: its runtime, the server's operating point for it, and predict.

`predict` takes a decoded request and returns a `Result`, with no HTTP on either side: the REST
routes decode before it and encode after it. It runs on the event loop for a light request and
in a worker thread otherwise (server/api.py says when), so it is synchronous and thread-safe.

Which point answers a request that follows the server's policy: the ladder's rung (rung 0 is the
policy's point; server/ladder.py), unless the exit-quality monitor's action replaces an alarmed
rung (server/monitor.py). Both are optional hooks: without them the policy's point answers.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from branchserve.repo.frontier import expected_cost
from branchserve.repo.manifest import Manifest
from branchserve.repo.points import Choice, Policy, cheapest_meeting, choose
from branchserve.repo.tensors import FloatArray
from branchserve.server.budget import Budget
from branchserve.server.ladder import Ladder
from branchserve.server.metrics import Metrics, ModelLabels
from branchserve.server.monitor import ExitMonitor
from branchserve.server.runtime import ModelRuntime, Outcome

RECHOOSE_SECONDS = 1.0  # a latency budget is re-priced with live stage latencies this often

Source = Literal["server", "ladder", "monitor", "request"]


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
    rung: int | None  # None for a request's own target
    budget: Budget
    probabilities: bool
    latency_s: float
    deadline_missed: bool | None


class ServedModel:
    def __init__(
        self,
        runtime: ModelRuntime,
        policy: Policy,
        metrics: Metrics,
        ladder: tuple[Ladder, list[Choice]] | None = None,
        monitor: ExitMonitor | None = None,
    ) -> None:
        """`ladder`: its controller and the certified rungs below the policy's point, strictest first."""
        self.runtime = runtime
        self.manifest = runtime.manifest
        self.name = self.manifest.name
        self.version = self.manifest.version
        self.labels: ModelLabels = (self.name, str(self.version))  # of its metric series
        self.metrics = metrics
        self.full_macs = float(runtime.cumulative_macs[-1])
        self.ladder: Ladder | None = ladder[0] if ladder else None
        self._ladder_rungs: list[Choice] = ladder[1] if ladder else []
        self.monitor = monitor
        self.series = metrics.add_model(self.labels, runtime.num_exits)
        self._lock = threading.Lock()
        self.policy = policy
        self.set_policy(policy)
        if self.ladder is not None:
            metrics.latency_objective.labels(*self.labels).set(self.ladder.objective_s)
            self.ladder.priced_by(lambda: [self._stage_ms(c) for c in self.rungs])

    def close(self) -> None:
        """No longer served: the monitor's thread stops (requests that hold this version still finish)."""
        if self.monitor is not None:
            self.monitor.stop()

    def set_policy(self, policy: Policy, unless_changed_from: Policy | None = None) -> Choice:
        """Adopt a policy (ValueError if it does not fit this model) and publish its thresholds."""
        with self._lock:  # the admin endpoint and worker threads re-pricing a latency budget
            if unless_changed_from is None or self.policy is unless_changed_from:
                choice = choose(self.manifest, policy, self.runtime.clock.per_input_ms())
                self.policy, self.choice, self.chosen_at = policy, choice, time.monotonic()
                self.rungs = [
                    choice,
                    *(c for c in self._ladder_rungs if self._expected_macs(c) < self._expected_macs(choice)),
                ]
                if self.monitor is not None:
                    self.monitor.watch(self.rungs)
                self._publish_rung(0 if self.ladder is None else self.ladder.rung)
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

    def computed_macs(self, outcome: Outcome) -> tuple[float, float]:
        """MACs a run computed, and what its inputs would have cost at full depth."""
        return float(self.runtime.cumulative_macs[outcome.exits].sum()), self.full_macs * len(outcome.exits)

    def _expected_macs(self, choice: Choice) -> float:
        return self.full_macs if choice.point is None else choice.point.expected_macs

    def _stage_ms(self, choice: Choice) -> float:
        """Expected stage time per input, priced live (explicit thresholds: as full depth)."""
        stage_ms = self.runtime.clock.per_input_ms()
        return sum(stage_ms) if choice.point is None else expected_cost(choice.point.exit_fractions, stage_ms)

    def _thresholds(self, budget: Budget) -> tuple[Choice, Source, int | None]:
        if budget.max_accuracy_drop is not None:
            return Choice.of(cheapest_meeting(self.manifest, budget.max_accuracy_drop)), "request", None
        self.current()
        rungs = self.rungs
        rung = 0 if self.ladder is None else min(self.ladder.rung, len(rungs) - 1)
        replaced = None if self.monitor is None else self.monitor.serving(rungs, rung)
        if replaced is not None:
            return replaced, "monitor", rung
        return rungs[rung], ("ladder" if rung else "server"), rung

    def predict(self, request: PredictRequest, started: float) -> Result:
        """Answer a request whose body arrived at `started` (time.perf_counter())."""
        budget, last = request.budget, self.runtime.num_exits - 1
        if budget.max_exit is not None and budget.max_exit > last:
            raise PredictError(f"budget.max_exit: {self.name} has exits 0..{last}")
        x = request.inputs()
        choice, source, rung = self._thresholds(budget)
        max_exit = last if budget.max_exit is None else budget.max_exit
        deadline_at = None if budget.deadline_ms is None else self._deadline(budget.deadline_ms, len(x), started)
        trace = None if self.monitor is None else self.monitor.trace(len(x))
        outcome = self.runtime.run(x, choice.thresholds, max_exit, deadline_at, trace)
        if trace is not None and self.monitor is not None:
            self.monitor.submit(trace)
        latency = time.perf_counter() - started
        missed = None if deadline_at is None else started + latency > deadline_at
        self._observe(outcome, latency, source, rung, missed)
        self._steer(len(x))
        return Result(self.manifest, outcome, choice, source, rung, budget, request.probabilities, latency, missed)

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

    def _steer(self, inputs: int) -> None:
        """Count a request for the ladder; publish a move."""
        if self.ladder is None:
            return
        before, utilisation = self.ladder.rung, self.ladder.utilisation
        moved_to = self.ladder.observe(inputs)
        if self.ladder.utilisation != utilisation:  # it changes only when a tick measures it
            self.metrics.utilisation.labels(*self.labels).set(self.ladder.utilisation)
        if moved_to is not None:
            self.metrics.ladder_moves.labels(*self.labels, "down" if moved_to > before else "up").inc()
            self._publish_rung(moved_to)

    def _publish_rung(self, rung: int) -> None:
        rung = min(rung, len(self.rungs) - 1)
        guarantee = self.rungs[rung].guarantee
        self.metrics.ladder_rung.labels(*self.labels).set(rung)
        self.metrics.served_epsilon.labels(*self.labels).set(math.nan if guarantee is None else guarantee.epsilon)

    def _observe(self, outcome: Outcome, latency: float, source: Source, rung: int | None, missed: bool | None) -> None:
        m, labels = self.metrics, self.labels
        self.series.observe_run(outcome, *self.computed_macs(outcome))
        self.series.answered.inc()
        self.series.request_seconds.observe(latency)
        if rung is not None:
            m.rung_requests.labels(*labels, str(rung)).inc()
        if source == "monitor":
            m.monitor_substituted.labels(*labels).inc()
        if missed is not None:
            m.deadline_requests.labels(*labels).inc()
            m.deadline_stops.labels(*labels).inc(outcome.deadline_stopped)
            m.deadline_misses.labels(*labels).inc(missed)
