"""The exit-quality monitor: a random share of inputs is also run to the final exit, off the request
path, and every rung's disagreement with the final exit is checked against its certificate
(branchserve/repo/quality.py has the statistics).

Off the request path: a sampled input's answer is sent as usual; the run keeps the sampled rows'
scores and boundary tensors (`runtime.Trace`), and one background thread finishes them from where
they stopped. That thread starts a sample only while fewer requests are in flight than there are
inference threads (a core is free), so it uses cores the requests leave free; while none is, samples
queue (up to `QUEUE`), and beyond that they are dropped and counted. An input that reached the final
exit anyway is a sample for free. The thread keeps the normal OS priority on purpose: at idle
priority (SCHED_IDLE) it was descheduled while holding the GIL, and a request waiting for the GIL
took up to 9 ms for a 0.3 ms stage.

On an alarm: one log line, `branchserve_monitor_alarm` = 1, and the action: `alert` (nothing else),
`stricter` (the alarmed rung is served by the nearest stricter rung without an alarm, full depth if
none), or `full` (full depth while any rung is alarmed). It ends when the rung recovers (see
quality.py), checked on the same samples, which keep arriving while the rung is not served.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from branchserve.repo.points import Choice, cheapest_meeting
from branchserve.repo.quality import PointCheck, QualityCheck
from branchserve.server.metrics import Metrics, ModelLabels
from branchserve.server.runtime import ModelRuntime, Trace

log = logging.getLogger("branchserve")

Action = Literal["alert", "stricter", "full"]
QUEUE = 256  # sampled requests waiting for a free core
IDLE_POLL_S = 0.002
BOUNDS_EVERY_S = 1.0  # the thread publishes the bounds this often (and on every alarm or recovery)


@dataclass(frozen=True)
class MonitorSettings:
    """`fraction` of inputs sampled; `alpha`: this process's chance of any false alarm (with several workers,
    the server's `monitor_risk` over the number of workers, so the chance that any worker raises a false
    alarm stays at most `monitor_risk`); `action` on an alarm."""

    fraction: float
    alpha: float
    action: Action


class ExitMonitor:
    def __init__(
        self, runtime: ModelRuntime, settings: MonitorSettings, metrics: Metrics, idle: Callable[[], bool]
    ) -> None:
        """`idle()`: whether a core is free for a sample now."""
        self.runtime, self.fraction, self.action = runtime, settings.fraction, settings.action
        self.full_depth = Choice.of(cheapest_meeting(runtime.manifest, 0))
        self.name, self.metrics, self.idle = runtime.manifest.name, metrics, idle
        self.labels: ModelLabels = (self.name, str(runtime.manifest.version))
        self._bounds_at = 0.0  # when the thread last published the bounds
        self.check = QualityCheck(settings.alpha)
        self._jobs: queue.Queue[Trace] = queue.Queue(QUEUE)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, rungs: Sequence[Choice]) -> None:
        """Check these rungs; each with a disagreement certificate is tested against its ε."""
        points = []
        for c in rungs:
            g = c.guarantee
            points.append((c.name, c.thresholds, g.epsilon if g is not None and g.risk == "disagreement" else None))
        with self._lock:
            self.check.watch(points)
            self.metrics.watch_points(self.labels, [(p.name, p.epsilon) for p in self.check.points])

    def publish_bounds(self) -> None:
        with self._lock:
            self.metrics.set_checks(self.labels, self.check.points, bounds=True)

    def trace(self, n: int) -> Trace | None:
        """A trace of the rows of an n-input request picked for checking, or None (most requests)."""
        rows = [i for i in range(n) if random.random() < self.fraction]
        return Trace(n, rows, self.runtime.num_exits) if rows else None

    def submit(self, trace: Trace) -> None:
        try:
            self._jobs.put_nowait(trace)
        except queue.Full:
            self.metrics.monitor_dropped.labels(*self.labels).inc(len(trace.rows))

    def serving(self, rungs: Sequence[Choice], rung: int) -> Choice | None:
        """What serves instead of `rungs[rung]` under the action while rungs are alarmed; None: serve it."""
        if self.action == "alert":  # the default: nothing to build per request
            return None
        alarmed = {(p.name, p.thresholds) for p in self.check.points if p.alarmed}
        if not alarmed:
            return None
        if self.action == "full":
            return self.full_depth
        for choice in reversed(rungs[: rung + 1]):
            if (choice.name, choice.thresholds) not in alarmed:
                return None if choice is rungs[rung] else choice
        return self.full_depth

    def start(self) -> None:
        self.metrics.before_render(self.publish_bounds)
        if self.fraction > 0:
            self._thread = threading.Thread(
                target=self._work, name=f"monitor-{self.name}-{self.labels[1]}", daemon=True
            )
            self._thread.start()

    @property
    def running(self) -> bool:
        """Whether the thread that finishes samples is alive."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Stop the thread and publishing (a version no longer served, or the server stopping)."""
        self.metrics.stop_refreshing(self.publish_bounds)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                trace = self._jobs.get(timeout=0.2)
            except queue.Empty:
                continue
            while not self.idle() and not self._stop.is_set():
                time.sleep(IDLE_POLL_S)
            self._finish(trace)

    def _finish(self, trace: Trace) -> None:
        """Run the trace's rows to the final exit, check them, and publish what changed."""
        last, started = self.runtime.num_exits - 1, time.perf_counter()
        for k in sorted(set(trace.reached.tolist()) - {last}):
            rows = np.flatnonzero(trace.reached == k)
            h = np.stack([trace.boundary[r] for r in rows.tolist()])
            confidences, probabilities = self.runtime.finish(k + 1, h)
            for j, (c, p) in enumerate(zip(confidences, probabilities, strict=True), start=k + 1):
                trace.confidence[j, rows], trace.classes[j, rows] = c, p.argmax(axis=1)
        macs = self.runtime.cumulative_macs
        extra = float((macs[last] - macs[trace.reached]).sum())
        with self._lock:
            events = self.check.observe(trace.confidence, trace.classes)
            self.metrics.observe_monitor(self.labels, len(trace.rows), time.perf_counter() - started, extra)
            bounds = bool(events) or started - self._bounds_at > BOUNDS_EVERY_S
            self.metrics.set_checks(self.labels, self.check.points, bounds)
            self._bounds_at = started if bounds else self._bounds_at
        for point, event in events:
            self._announce(point, event)

    def _announce(self, point: PointCheck, event: str) -> None:
        seen = point.evidence
        assert seen is not None and point.epsilon is not None
        if event == "alarm":
            self.metrics.monitor_alarms.labels(*self.labels, point.name).inc()
            log.warning(
                "exit-quality alarm: %s point %s disagrees with the final exit on at least %.4f of inputs "
                "(anytime-valid lower bound at level %.3g, %d samples, %.4f seen), above its certified ε %.4g; "
                "action: %s",
                "/".join(self.labels),
                point.name,
                seen.lower(),
                point.alpha,
                seen.trials,
                seen.mean,
                point.epsilon,
                self.action,
            )
        else:
            log.warning(
                "exit-quality recovered: %s point %s disagrees on at most %.4f (upper bound, %d samples), under ε %.4g",
                "/".join(self.labels),
                point.name,
                seen.upper(),
                seen.trials,
                point.epsilon,
            )
