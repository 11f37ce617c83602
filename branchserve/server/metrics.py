"""Prometheus metrics, in base units (seconds) with `_total` counters, on a registry per app.

A registry per app (not the global one) lets tests run several apps in one process. The
`*_created` series that prometheus-client adds to every counter and histogram are off: they
doubled the series count and no dashboard reads them.

With several workers (server/workers.py) every worker writes prometheus-client's multiprocess
files and a scrape of any of them reads all: counters and histograms are summed exactly; the
in-flight gauge is summed over live workers; the thresholds and the expected saving are the most
recent any worker wrote (workers apply the same admin changes); `process_*` series are kept per
worker, labelled `worker="<pid>"`. Each worker runs its own ladder and exit-quality monitor (see
docs/serving.md), so their state gauges (rung, ε served, utilisation, the monitor's estimates,
bounds and alarms) are kept per live worker, labelled `pid`: aggregate them with `max by (...)`,
as the alert rules in deploy/ do.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

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
    multiprocess,
    values,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from branchserve.repo.quality import PointCheck
from branchserve.server.runtime import Outcome

REQUEST_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
STAGE_BUCKETS = (0.0001, 0.0002, 0.0003, 0.0005, 0.00075, 0.001, 0.002, 0.005, 0.01, 0.025, 0.1, 0.5)
CONFIDENCE_BUCKETS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.0)
OUTCOMES = ("ok", "bad_input", "overloaded", "expired", "disconnected", "timed_out")
CONTENT_TYPE = CONTENT_TYPE_LATEST
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")

ModelLabels = tuple[str, str]
"""(model, version): the labels every per-model series starts with."""

disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus-client leaves it unannotated


_PID = [os.getpid()]  # this process's pid, kept current across a fork


@functools.cache
def _values_of_this_worker() -> None:
    """Multiprocess values that read this process's pid from memory: prometheus-client's default asks
    the kernel on every update (to notice a fork), ~0.25 µs each of ~15 updates per request. A fork
    still moves the child to files of its own: `_PID` is updated in the child, and prometheus-client
    sees the new pid on the next update. Once per process: every registry's values share one set of
    files."""
    os.register_at_fork(after_in_child=lambda: _PID.__setitem__(0, os.getpid()))
    values.ValueClass = values.MultiProcessValue(lambda: _PID[0])  # type: ignore[no-untyped-call]


@dataclass(frozen=True)
class ModelSeries:
    """The series of a model version that every answer updates, labelled once: prometheus-client's
    `labels()` took ~1 µs per call, ~9 calls per request."""

    answered: Counter
    request_seconds: Histogram
    stage_seconds: tuple[Histogram, ...]
    exit_confidence: tuple[Histogram, ...]
    exit_answers: tuple[Counter, ...]
    macs: Counter
    full_depth_macs: Counter

    def observe_run(self, outcome: Outcome, macs: float, full_macs: float) -> None:
        for k, (seconds, scored) in enumerate(zip(outcome.stage_seconds, outcome.scored, strict=True)):
            self.stage_seconds[k].observe(seconds)
            for c in scored.tolist():
                self.exit_confidence[k].observe(c)
        for answers, count in zip(self.exit_answers, np.bincount(outcome.exits).tolist(), strict=False):
            if count:
                answers.inc(count)
        self.macs.inc(macs)
        self.full_depth_macs.inc(full_macs)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if self.multiprocess_dir is None:
            ProcessCollector(registry=r)
        else:
            _values_of_this_worker()
        self.requests = Counter(
            "branchserve_requests", "Predict requests by model and outcome", ["model", "version", "outcome"], registry=r
        )
        self.request_seconds = Histogram(
            "branchserve_request_duration_seconds",
            "Server-side latency of answered predict requests",
            ["model", "version"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "branchserve_in_flight_requests",
            "Predict requests received whole, not yet answered",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.rung_requests = Counter(
            "branchserve_rung_requests",
            "Requests that followed the server's point, by the ladder rung that served them (0: the point itself)",
            ["model", "version", "rung"],
            registry=r,
        )
        self.exit_answers = Counter(
            "branchserve_exit_answers", "Inputs answered by each exit", ["model", "version", "exit"], registry=r
        )
        self.exit_confidence = Histogram(
            "branchserve_exit_confidence",
            "Confidence of every input scored at each exit (answered there or not)",
            ["model", "version", "exit"],
            buckets=CONFIDENCE_BUCKETS,
            registry=r,
        )
        self.stage_seconds = Histogram(
            "branchserve_stage_duration_seconds",
            "Wall time of one stage call (one batch)",
            ["model", "version", "stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.deadline_requests = Counter(
            "branchserve_deadline_requests", "Requests that carried a deadline", ["model", "version"], registry=r
        )
        self.deadline_stops = Counter(
            "branchserve_deadline_stops",
            "Requests stopped before a stage to meet their deadline",
            ["model", "version"],
            registry=r,
        )
        self.deadline_misses = Counter(
            "branchserve_deadline_misses", "Requests answered after their deadline", ["model", "version"], registry=r
        )
        self.threshold = Gauge(
            "branchserve_exit_threshold",
            "Server threshold of each exit at the current operating point",
            ["model", "version", "exit"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.expected_saved = Gauge(
            "branchserve_expected_compute_saved_ratio",
            "1 - expected MACs of the current operating point over full depth (NaN for explicit thresholds)",
            ["model", "version"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.macs = Counter(
            "branchserve_compute_macs", "Multiply-accumulates computed", ["model", "version"], registry=r
        )
        self.full_depth_macs = Counter(
            "branchserve_full_depth_macs",
            "Multiply-accumulates the same inputs would cost at full depth",
            ["model", "version"],
            registry=r,
        )

        self._ladder_and_monitor(r)
        self._before_render: list[Callable[[], None]] = []

    def _ladder_and_monitor(self, r: CollectorRegistry) -> None:
        model, point = ["model", "version"], ["model", "version", "point"]

        def per_worker(name: str, doc: str, labels: list[str]) -> Gauge:
            """A gauge of one worker's ladder or monitor: kept per live worker (label `pid`) with several."""
            return Gauge(name, doc, labels, registry=r, multiprocess_mode="liveall")

        self.ladder_rung = per_worker(
            "branchserve_ladder_rung", "Ladder rung serving now (0: the server's operating point)", model
        )
        self.ladder_moves = Counter(
            "branchserve_ladder_moves", "Ladder moves: down is cheaper", [*model, "direction"], registry=r
        )
        self.served_epsilon = per_worker(
            "branchserve_served_epsilon_ratio",
            "Certified risk bound (ε) of the rung serving now; NaN without a certificate",
            model,
        )
        self.utilisation = per_worker(
            "branchserve_utilisation_ratio",
            "Share of time with a request in flight, smoothed over the ladder's ticks",
            model,
        )
        self.latency_objective = Gauge(
            "branchserve_latency_objective_seconds",
            "p99 latency the ladder holds",
            model,
            registry=r,
            multiprocess_mode="livemax",
        )
        self.monitor_sampled = Counter(
            "branchserve_monitor_sampled_inputs", "Inputs checked at every exit by the monitor", model, registry=r
        )
        self.monitor_dropped = Counter(
            "branchserve_monitor_dropped_inputs", "Sampled inputs dropped: no core was free in time", model, registry=r
        )
        self.monitor_seconds = Counter(
            "branchserve_monitor_compute_seconds",
            "Time spent finishing sampled inputs to the final exit",
            model,
            registry=r,
        )
        self.monitor_macs = Counter(
            "branchserve_monitor_compute_macs", "MACs spent finishing sampled inputs", model, registry=r
        )
        self.disagreement = per_worker(
            "branchserve_monitor_disagreement_ratio",
            "Disagreement with the final exit seen in the point's current sequence",
            point,
        )
        self.disagreement_lower = per_worker(
            "branchserve_monitor_disagreement_lower_ratio",
            "Anytime-valid lower bound on the point's disagreement (alarm when above its epsilon)",
            point,
        )
        self.disagreement_upper = per_worker(
            "branchserve_monitor_disagreement_upper_ratio",
            "Anytime-valid upper bound on the point's disagreement (recovery when below its epsilon)",
            point,
        )
        self.checked_epsilon = per_worker(
            "branchserve_monitor_epsilon_ratio",
            "Certified disagreement each watched point is checked against; NaN: watched, never alarmed",
            point,
        )
        self.monitor_alarm = per_worker(
            "branchserve_monitor_alarm", "1 while the point's exit-quality alarm is on", point
        )
        self.monitor_alarms = Counter("branchserve_monitor_alarms", "Exit-quality alarms raised", point, registry=r)
        self.monitor_substituted = Counter(
            "branchserve_monitor_substituted_requests",
            "Requests served by a stricter point because of an exit-quality alarm",
            model,
            registry=r,
        )
        self._watched: dict[ModelLabels, list[str]] = {}

    def add_model(self, labels: ModelLabels, num_exits: int) -> ModelSeries:
        """Create every series of a model version at zero, so rates and absences mean something from
        the start; returns those every answer updates."""
        for outcome in OUTCOMES:
            self.requests.labels(*labels, outcome)
        for m in (
            self.deadline_requests,
            self.deadline_stops,
            self.deadline_misses,
            self.ladder_rung,
            self.served_epsilon,
            self.utilisation,
            self.monitor_sampled,
            self.monitor_dropped,
            self.monitor_seconds,
            self.monitor_macs,
            self.monitor_substituted,
        ):
            m.labels(*labels)
        for direction in ("down", "up"):
            self.ladder_moves.labels(*labels, direction)
        exits = [str(k) for k in range(num_exits)]
        return ModelSeries(
            answered=self.requests.labels(*labels, "ok"),
            request_seconds=self.request_seconds.labels(*labels),
            stage_seconds=tuple(self.stage_seconds.labels(*labels, k) for k in exits),
            exit_confidence=tuple(self.exit_confidence.labels(*labels, k) for k in exits),
            exit_answers=tuple(self.exit_answers.labels(*labels, k) for k in exits),
            macs=self.macs.labels(*labels),
            full_depth_macs=self.full_depth_macs.labels(*labels),
        )

    def drop_model(self, labels: ModelLabels, num_exits: int) -> None:
        """An unloaded version: its gauges go (they would claim thresholds, rungs or alarms nobody serves);
        counters stay."""
        for k in map(str, range(num_exits)):
            self.threshold.remove(*labels, k)
        for gauge in (self.expected_saved, self.ladder_rung, self.served_epsilon, self.utilisation):
            gauge.remove(*labels)
        if labels in self._watched:
            self.watch_points(labels, [])
            del self._watched[labels]

    def set_thresholds(self, labels: ModelLabels, thresholds: tuple[float, ...], saved: float) -> None:
        for k, t in enumerate(thresholds):
            self.threshold.labels(*labels, str(k)).set(t)
        self.expected_saved.labels(*labels).set(saved)

    def watch_points(self, labels: ModelLabels, points: Sequence[tuple[str, float | None]]) -> None:
        """The monitor's points of a model version: series for each, and none left for points no longer
        watched (with several workers a removed series stays in this worker's file, so its alarm is
        cleared first)."""
        per_point = (
            self.disagreement,
            self.disagreement_lower,
            self.disagreement_upper,
            self.checked_epsilon,
            self.monitor_alarm,
            self.monitor_alarms,
        )
        for old in self._watched.get(labels, []):
            self.monitor_alarm.labels(*labels, old).set(0)
            for m in per_point:
                m.remove(*labels, old)
        self._watched[labels] = [point for point, _ in points]
        for point, epsilon in points:
            for m in per_point:
                m.labels(*labels, point)
            self.checked_epsilon.labels(*labels, point).set(math.nan if epsilon is None else epsilon)
            self.disagreement.labels(*labels, point).set(math.nan)
            self.disagreement_upper.labels(*labels, point).set(1.0)

    def observe_monitor(self, labels: ModelLabels, samples: int, seconds: float, macs: float) -> None:
        self.monitor_sampled.labels(*labels).inc(samples)
        self.monitor_seconds.labels(*labels).inc(seconds)
        self.monitor_macs.labels(*labels).inc(macs)

    def set_checks(self, labels: ModelLabels, points: Sequence[PointCheck], bounds: bool) -> None:
        """Publish each point's alarm state and, when `bounds`, its estimate and anytime-valid bounds
        (~1 ms a point to compute, so the monitor publishes them at most once a second and when /metrics
        is read)."""
        for p in points:
            self.monitor_alarm.labels(*labels, p.name).set(p.alarmed)
            if bounds:
                seq = p.sequence
                self.disagreement.labels(*labels, p.name).set(seq.mean)
                self.disagreement_lower.labels(*labels, p.name).set(seq.lower())
                self.disagreement_upper.labels(*labels, p.name).set(seq.upper())

    def before_render(self, refresh: Callable[[], None]) -> None:
        """Call `refresh` whenever the metrics are read, for figures too costly to keep current (with several
        workers, only the worker that answers the scrape refreshes; the others' figures are as they wrote them)."""
        self._before_render.append(refresh)

    def stop_refreshing(self, refresh: Callable[[], None]) -> None:
        if refresh in self._before_render:
            self._before_render.remove(refresh)

    def render(self) -> bytes:
        for refresh in self._before_render:
            refresh()
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        every_worker = CollectorRegistry()
        MultiProcessCollector(every_worker, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        every_worker.register(WorkerProcesses(Path(self.multiprocess_dir)))
        return generate_latest(every_worker)

    def leave(self) -> None:
        """This worker is stopping: its share of the in-flight gauge goes."""
        if self.multiprocess_dir is not None:
            multiprocess.mark_process_dead(os.getpid(), self.multiprocess_dir)  # type: ignore[no-untyped-call]


class WorkerProcesses(Collector):
    """CPU, memory and start time of every live worker, one series each, from /proc (prometheus-client's
    own process collector reports only the process that answers the scrape)."""

    def __init__(self, multiprocess_dir: Path) -> None:
        self.multiprocess_dir = multiprocess_dir

    def collect(self) -> Iterator[Metric]:
        cpu = CounterMetricFamily("process_cpu_seconds", "User and system CPU time", labels=["worker"])
        memory = GaugeMetricFamily("process_resident_memory_bytes", "Resident memory", labels=["worker"])
        for pid in sorted({f.stem.rsplit("_", 1)[-1] for f in self.multiprocess_dir.glob("*.db")}):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
            except (FileNotFoundError, ValueError):
                continue  # a worker that has exited
            fields = stat[stat.rindex(")") + 2 :].split()
            cpu.add_metric([pid], (int(fields[11]) + int(fields[12])) / CLOCK_TICKS)
            memory.add_metric([pid], pages * PAGE_BYTES)
        yield cpu
        yield memory
