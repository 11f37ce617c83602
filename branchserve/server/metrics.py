"""Prometheus metrics, in base units (seconds) with `_total` counters, on a registry per app.

A registry per app (not the global one) lets tests run several apps in one process. The
`*_created` series that prometheus-client adds to every counter and histogram are off: they
doubled the series count and no dashboard reads them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

from branchserve.repo.quality import PointCheck
from branchserve.server.runtime import Outcome

REQUEST_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
STAGE_BUCKETS = (0.0001, 0.0002, 0.0003, 0.0005, 0.00075, 0.001, 0.002, 0.005, 0.01, 0.025, 0.1, 0.5)
CONFIDENCE_BUCKETS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.0)
OUTCOMES = ("ok", "bad_input", "overloaded", "expired", "disconnected", "timed_out")
CONTENT_TYPE = CONTENT_TYPE_LATEST

disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus-client leaves it unannotated


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        self.requests = Counter(
            "branchserve_requests", "Predict requests by model and outcome", ["model", "outcome"], registry=r
        )
        self.request_seconds = Histogram(
            "branchserve_request_duration_seconds",
            "Server-side latency of answered predict requests",
            ["model"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "branchserve_in_flight_requests", "Predict requests admitted, not yet answered", registry=r
        )
        self.rung_requests = Counter(
            "branchserve_rung_requests",
            "Requests that followed the server's point, by the ladder rung that served them (0: the point itself)",
            ["model", "rung"],
            registry=r,
        )
        self.exit_answers = Counter(
            "branchserve_exit_answers", "Inputs answered by each exit", ["model", "exit"], registry=r
        )
        self.exit_confidence = Histogram(
            "branchserve_exit_confidence",
            "Confidence of every input scored at each exit (answered there or not)",
            ["model", "exit"],
            buckets=CONFIDENCE_BUCKETS,
            registry=r,
        )
        self.stage_seconds = Histogram(
            "branchserve_stage_duration_seconds",
            "Wall time of one stage call (one batch)",
            ["model", "stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.deadline_requests = Counter(
            "branchserve_deadline_requests", "Requests that carried a deadline", ["model"], registry=r
        )
        self.deadline_stops = Counter(
            "branchserve_deadline_stops",
            "Requests stopped before a stage to meet their deadline",
            ["model"],
            registry=r,
        )
        self.deadline_misses = Counter(
            "branchserve_deadline_misses", "Requests answered after their deadline", ["model"], registry=r
        )
        self.threshold = Gauge(
            "branchserve_exit_threshold",
            "Server threshold of each exit at the current operating point",
            ["model", "exit"],
            registry=r,
        )
        self.expected_saved = Gauge(
            "branchserve_expected_compute_saved_ratio",
            "1 - expected MACs of the current operating point over full depth (NaN for explicit thresholds)",
            ["model"],
            registry=r,
        )
        self.macs = Counter("branchserve_compute_macs", "Multiply-accumulates computed", ["model"], registry=r)
        self.full_depth_macs = Counter(
            "branchserve_full_depth_macs",
            "Multiply-accumulates the same inputs would cost at full depth",
            ["model"],
            registry=r,
        )

        self._ladder_and_monitor(r)
        self._before_render: list[Callable[[], None]] = []

    def _ladder_and_monitor(self, r: CollectorRegistry) -> None:
        self.ladder_rung = Gauge(
            "branchserve_ladder_rung",
            "Ladder rung serving now (0: the server's operating point)",
            ["model"],
            registry=r,
        )
        self.ladder_moves = Counter(
            "branchserve_ladder_moves", "Ladder moves: down is cheaper", ["model", "direction"], registry=r
        )
        self.served_epsilon = Gauge(
            "branchserve_served_epsilon_ratio",
            "Certified risk bound (ε) of the rung serving now; NaN without a certificate",
            ["model"],
            registry=r,
        )
        self.utilisation = Gauge(
            "branchserve_utilisation_ratio",
            "Share of time with a request in flight, smoothed over the ladder's ticks",
            ["model"],
            registry=r,
        )
        self.latency_objective = Gauge(
            "branchserve_latency_objective_seconds", "p99 latency the ladder holds", ["model"], registry=r
        )
        self.monitor_sampled = Counter(
            "branchserve_monitor_sampled_inputs", "Inputs checked at every exit by the monitor", ["model"], registry=r
        )
        self.monitor_dropped = Counter(
            "branchserve_monitor_dropped_inputs",
            "Sampled inputs dropped: no core was free in time",
            ["model"],
            registry=r,
        )
        self.monitor_seconds = Counter(
            "branchserve_monitor_compute_seconds",
            "Time spent finishing sampled inputs to the final exit",
            ["model"],
            registry=r,
        )
        self.monitor_macs = Counter(
            "branchserve_monitor_compute_macs", "MACs spent finishing sampled inputs", ["model"], registry=r
        )
        self.disagreement = Gauge(
            "branchserve_monitor_disagreement_ratio",
            "Disagreement with the final exit seen in the point's current sequence",
            ["model", "point"],
            registry=r,
        )
        self.disagreement_lower = Gauge(
            "branchserve_monitor_disagreement_lower_ratio",
            "Anytime-valid lower bound on the point's disagreement (alarm when above its epsilon)",
            ["model", "point"],
            registry=r,
        )
        self.disagreement_upper = Gauge(
            "branchserve_monitor_disagreement_upper_ratio",
            "Anytime-valid upper bound on the point's disagreement (recovery when below its epsilon)",
            ["model", "point"],
            registry=r,
        )
        self.checked_epsilon = Gauge(
            "branchserve_monitor_epsilon_ratio",
            "Certified disagreement each watched point is checked against; NaN: watched, never alarmed",
            ["model", "point"],
            registry=r,
        )
        self.monitor_alarm = Gauge(
            "branchserve_monitor_alarm", "1 while the point's exit-quality alarm is on", ["model", "point"], registry=r
        )
        self.monitor_alarms = Counter(
            "branchserve_monitor_alarms", "Exit-quality alarms raised", ["model", "point"], registry=r
        )
        self.monitor_substituted = Counter(
            "branchserve_monitor_substituted_requests",
            "Requests served by a stricter point because of an exit-quality alarm",
            ["model"],
            registry=r,
        )
        self._watched: dict[str, list[str]] = {}

    def add_model(self, name: str, num_exits: int) -> None:
        """Create every series of a model at zero, so rates and absences mean something from the start."""
        for outcome in OUTCOMES:
            self.requests.labels(name, outcome)
        for k in map(str, range(num_exits)):
            self.exit_answers.labels(name, k)
            self.exit_confidence.labels(name, k)
            self.stage_seconds.labels(name, k)
        for m in (
            self.request_seconds,
            self.deadline_requests,
            self.deadline_stops,
            self.deadline_misses,
            self.macs,
            self.full_depth_macs,
            self.ladder_rung,
            self.served_epsilon,
            self.utilisation,
            self.monitor_sampled,
            self.monitor_dropped,
            self.monitor_seconds,
            self.monitor_macs,
            self.monitor_substituted,
        ):
            m.labels(name)
        for direction in ("down", "up"):
            self.ladder_moves.labels(name, direction)

    def set_thresholds(self, name: str, thresholds: tuple[float, ...], saved: float) -> None:
        for k, t in enumerate(thresholds):
            self.threshold.labels(name, str(k)).set(t)
        self.expected_saved.labels(name).set(saved)

    def observe_run(self, name: str, outcome: Outcome, macs: float, full_macs: float) -> None:
        for k, (seconds, scored) in enumerate(zip(outcome.stage_seconds, outcome.scored, strict=True)):
            self.stage_seconds.labels(name, str(k)).observe(seconds)
            hist = self.exit_confidence.labels(name, str(k))
            for c in scored.tolist():
                hist.observe(c)
        for k, count in enumerate(np.bincount(outcome.exits).tolist()):
            if count:
                self.exit_answers.labels(name, str(k)).inc(count)
        self.macs.labels(name).inc(macs)
        self.full_depth_macs.labels(name).inc(full_macs)

    def watch_points(self, name: str, points: Sequence[tuple[str, float | None]]) -> None:
        """The monitor's points of a model: series for each, and none left for points no longer watched."""
        per_point = (
            self.disagreement,
            self.disagreement_lower,
            self.disagreement_upper,
            self.checked_epsilon,
            self.monitor_alarm,
            self.monitor_alarms,
        )
        for old in self._watched.get(name, []):
            for m in per_point:
                m.remove(name, old)
        self._watched[name] = [point for point, _ in points]
        for point, epsilon in points:
            for m in per_point:
                m.labels(name, point)
            self.checked_epsilon.labels(name, point).set(math.nan if epsilon is None else epsilon)
            self.disagreement.labels(name, point).set(math.nan)
            self.disagreement_upper.labels(name, point).set(1.0)

    def observe_monitor(self, name: str, samples: int, seconds: float, macs: float) -> None:
        self.monitor_sampled.labels(name).inc(samples)
        self.monitor_seconds.labels(name).inc(seconds)
        self.monitor_macs.labels(name).inc(macs)

    def set_checks(self, name: str, points: Sequence[PointCheck], bounds: bool) -> None:
        """Publish each point's alarm state and, when `bounds`, its estimate and anytime-valid bounds
        (~1 ms a point to compute, so the monitor asks for them when /metrics is read)."""
        for p in points:
            self.monitor_alarm.labels(name, p.name).set(p.alarmed)
            if bounds:
                seq = p.sequence
                self.disagreement.labels(name, p.name).set(seq.mean)
                self.disagreement_lower.labels(name, p.name).set(seq.lower())
                self.disagreement_upper.labels(name, p.name).set(seq.upper())

    def before_render(self, refresh: Callable[[], None]) -> None:
        """Call `refresh` whenever the metrics are read, for figures too costly to keep current."""
        self._before_render.append(refresh)

    def render(self) -> bytes:
        for refresh in self._before_render:
            refresh()
        return generate_latest(self.registry)
