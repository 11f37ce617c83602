"""Admission: how many predict requests are in flight, whether one more may enter, whether the server is loaded."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from branchserve.server.errors import RequestError
from branchserve.server.metrics import Metrics

RETRY_AFTER_SECONDS = "1"


class Admission:
    """At most `limit` requests in flight; more get 503 with Retry-After at once, so overload queues
    nowhere. Above `loaded_at` in flight, requests are served at the cheaper load point."""

    def __init__(self, limit: int, loaded_at: int, metrics: Metrics) -> None:
        self.limit, self.loaded_at, self.metrics = limit, loaded_at, metrics
        self.in_flight = 0

    @contextmanager
    def slot(self, model: str) -> Iterator[None]:
        if self.in_flight >= self.limit:
            self.metrics.requests.labels(model, "overloaded").inc()
            raise RequestError(503, "overloaded: too many requests in flight", {"Retry-After": RETRY_AFTER_SECONDS})
        self.in_flight += 1
        self.metrics.in_flight.inc()
        try:
            yield
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.dec()

    @property
    def loaded(self) -> bool:
        return self.in_flight > self.loaded_at
