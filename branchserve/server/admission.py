"""Admission: decide from how long requests wait whether one more may start, and refuse the rest fast.

An in-flight count alone cannot see a backlog that waits in socket buffers and on the event loop
(at 3× capacity, 128 connections gave a p99 of 250–310 ms with only 0.2 % shed). So a request is
judged by its *sojourn*, the time from its last byte arriving to its work starting, CoDel-style as
"Fail at Scale" adapts it to server queues:

* a request may wait up to `max_wait` (a request that waited longer is shed when its turn comes,
  and a new one is refused at the door, by the connection before any of the ASGI stack runs,
  while the requests already in would take longer than that to work off);
* once requests have kept waiting more than `target` for a whole `interval` (none started
  sooner since the first that waited longer), a queue stands, and `max_wait` tightens to
  `target` until one starts within it.

The door counts a predict request once its body has arrived (a slow client never holds a place a
fast one needs) until its answer is written; the time with any request counted is the server's
busy time, from which the ladder (server/ladder.py) reads its utilisation. Refusals are 503 with Retry-After. (A request whose
own deadline passed while it waited, or leaves too little time for the first stage, is answered
503 by predict itself: its deadline is known only once the body is decoded.)
"""

from __future__ import annotations

import time
from collections import deque
from typing import NoReturn

from branchserve.server.errors import RequestError
from branchserve.server.metrics import Metrics, ModelLabels

RETRY_AFTER = {"Retry-After": "1"}
SERVICE_STEP = 0.05  # EWMA weight of one request's work time
WAITS_KEPT = 4096  # recent sojourns the ladder reads (server/ladder.py)


class Admission:
    def __init__(
        self,
        max_in_flight: int,
        max_wait_s: float,
        target_s: float,
        interval_s: float,
        metrics: Metrics,
    ) -> None:
        self.max_in_flight, self.metrics = max_in_flight, metrics
        self.max_wait, self.target, self.interval = max_wait_s, target_s, interval_s
        self.in_flight = 0  # predict requests received whole and not yet answered
        self.service_s = 0.001  # mean work time of one request (EWMA), to price the queue ahead
        self.waiting_since: float | None = None  # since then, every request waited more than `target`
        self._busy_s, self._busy_from = 0.0, 0.0  # time with requests in flight: before and since `_busy_from`
        self._waits: deque[float] = deque(maxlen=WAITS_KEPT)
        self.started = 0  # requests judged by `start` so far

    @property
    def standing(self) -> bool:
        """Every request that started in the last `interval` or longer waited more than `target`."""
        return self.waiting_since is not None and time.perf_counter() - self.waiting_since > self.interval

    def busy_seconds(self) -> float:
        """Seconds so far during which at least one request was in flight."""
        ongoing = time.perf_counter() - self._busy_from if self.in_flight else 0.0
        return self._busy_s + ongoing

    def waits_since(self, started: int) -> tuple[list[float], int]:
        """Sojourns of the requests judged since `self.started` was `started` (the latest WAITS_KEPT at most),
        and `self.started` now."""
        now = self.started
        n = min(now - started, len(self._waits))
        return (list(self._waits)[len(self._waits) - n :] if n > 0 else []), now

    def wait_limit(self) -> float:
        """How long a request may wait to start now."""
        return self.target if self.standing else self.max_wait

    def refuse_at_door(self) -> bool:
        """Refuse a new request before reading it: too many are in, or those in would take longer
        than a request may wait to work off."""
        return self.in_flight >= self.max_in_flight or self.in_flight * self.service_s > self.wait_limit()

    def arrived(self) -> None:
        if not self.in_flight:
            self._busy_from = time.perf_counter()
        self.in_flight += 1
        self.metrics.in_flight.inc()

    def left(self) -> None:
        self.in_flight -= 1
        self.metrics.in_flight.dec()
        if not self.in_flight:
            self._busy_s += time.perf_counter() - self._busy_from

    def start(self, model: ModelLabels, ready_at: float) -> float:
        """A request whose body arrived at `ready_at` is about to start its work: shed it (RequestError 503)
        if it waited too long; otherwise return the time work starts."""
        now = time.perf_counter()
        waited = now - ready_at
        self._waits.append(waited)
        self.started += 1
        if waited <= self.target:
            self.waiting_since = None
        elif self.waiting_since is None:
            self.waiting_since = now
        self.check_wait(model, ready_at)
        return now

    def check_wait(self, model: ModelLabels, since: float) -> None:
        """Shed a request that has waited since `since` longer than a request may wait now."""
        waited, limit = time.perf_counter() - since, self.wait_limit()
        if waited > limit:
            self.shed(model, f"overloaded: queued {waited * 1e3:.1f} ms, over the {limit * 1e3:g} ms allowed now")

    def finished(self, started: float) -> None:
        """Learn how long a request's work takes; a large batch counts as at most `max_wait`, so a
        few of them cannot make the door refuse small requests the server has time for."""
        spent = min(time.perf_counter() - started, self.max_wait)
        self.service_s += SERVICE_STEP * (spent - self.service_s)

    def shed(self, model: ModelLabels, message: str, outcome: str = "overloaded") -> NoReturn:
        self.metrics.requests.labels(*model, outcome).inc()
        raise RequestError(503, message, RETRY_AFTER)
