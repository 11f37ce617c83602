"""The load-adaptive ladder: certified operating points as rungs, and a controller that moves among them
to hold a p99 latency objective as load rises and falls.

Rung 0 is the server's operating point; each further rung is the cheapest point certified for the
next, looser target of the ladder's list (e.g. disagreement ≤ 2 %, then ≤ 5 %, at δ = 5 %), kept
only if cheaper than the rung above it. The last rung is the floor: the operator's loosest target,
never passed. Each response says which rung answered and the guarantee that rung carries.

The controller looks every `TICK_S` at what admission measured over the tick (server/admission.py):
how long requests queued before they started (their p95), and how busy the server was (the share of
time with a request in flight: the event loop's utilisation, since small requests are answered
there). It predicts the utilisation at another rung from the measured one, this model's inputs per
second and the difference in expected stage time per input between the rungs (each rung's exit mix
priced with live stage latencies).

* **Down** (cheaper) at once, when the tick's queueing p95 passes `WAIT_HIGH` × the objective, or
  passes `WAIT_BUSY` × the objective while utilisation is over `RHO_HIGH`: to the strictest rung
  predicted to run under `RHO_TARGET` (the floor if none), then no further step down for
  `SETTLE_TICKS` while the queue drains. Utilisation alone is no overload: one client sending
  request after request keeps the server busy without anyone waiting.
* **Up** (stricter) one rung, once the rung above is predicted to run under `RHO_UP` and nothing
  looked overloaded for `HOLD_S`. The gap between `RHO_UP` and `RHO_HIGH`, and the hold, are the
  hysteresis: a load between two rungs' capacities settles on the cheaper one instead of
  oscillating.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from branchserve.repo.certify import cheapest_certified
from branchserve.repo.manifest import Manifest, RiskKind
from branchserve.repo.points import Choice

TICK_S = 0.1
WAIT_HIGH = 0.2  # × objective: a tick whose queueing p95 is above this is overloaded
WAIT_BUSY = 0.04  # × objective: ... or above this while utilisation is over RHO_HIGH
RHO_HIGH = 0.9
RHO_TARGET = 0.8
RHO_UP = 0.7
HOLD_S = 2.0
SETTLE_TICKS = 3
SMOOTHING = 0.3  # EWMA weight of one tick in the utilisation and rate that price a step up


class LadderSpec(BaseModel):
    """The ladder's targets: give one list, loosest last (the floor); `{}` turns the ladder off."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"p99_ms": 25, "risk": 0.05, "max_disagreement": [0.02, 0.05]}]},
    )

    p99_ms: float = Field(25.0, gt=0, description="latency objective: the p99 the ladder holds")
    risk: float = Field(0.05, gt=0, lt=1, description="δ of every rung's certificate")
    max_disagreement: list[float] | None = Field(None, description="a rung per target: disagreement ≤ each")
    max_accuracy_drop: list[float] | None = Field(None, description="a rung per target: accuracy drop ≤ each")

    @model_validator(mode="after")
    def _one_list(self) -> LadderSpec:
        if self.max_disagreement is not None and self.max_accuracy_drop is not None:
            raise ValueError("give max_disagreement or max_accuracy_drop, not both")
        if not all(0 < v <= 1 for v in self.targets):
            raise ValueError("ladder targets must be in (0, 1]")
        return self

    @property
    def risk_kind(self) -> RiskKind:
        return "accuracy_drop" if self.max_accuracy_drop is not None else "disagreement"

    @property
    def targets(self) -> list[float]:
        return sorted(self.max_disagreement or self.max_accuracy_drop or [])


class LoadSignals(Protocol):
    """What the ladder reads: admission's busy time and queueing delays."""

    def busy_seconds(self) -> float: ...

    def waits_since(self, started: int) -> tuple[list[float], int]: ...


def certified_rungs(manifest: Manifest, spec: LadderSpec) -> list[Choice]:
    """The cheapest point certified for each target, strictest first (raises NotCertified without counts)."""
    return [Choice.of(*cheapest_certified(manifest, spec.risk_kind, eps, spec.risk)) for eps in spec.targets]


class Ladder:
    """Which rung serves now; `observe` counts every answered request and moves the ladder at most once a tick."""

    def __init__(
        self, objective_s: float, signals: LoadSignals, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        """`clock`: seconds, monotonic (a test's own)."""
        self.objective_s, self.signals, self.clock = objective_s, signals, clock
        self.rung, self.costs_ms = 0, [0.0]
        self.price: Callable[[], Sequence[float]] = lambda: self.costs_ms
        self._inputs = 0
        self._lock = threading.Lock()
        self._tick_at, self._busy_at = clock(), signals.busy_seconds()
        self._seen = signals.waits_since(0)[1]
        self._rho, self._rate = 0.0, 0.0
        self._calm_since: float | None = None
        self._settle = 0

    def priced_by(self, price: Callable[[], Sequence[float]]) -> None:
        """`price()`: the expected stage milliseconds per input of each rung now, rung 0 first; called every tick,
        as live stage latencies move and the rungs themselves may change."""
        self.price = price
        self._reprice()

    def _reprice(self) -> None:
        self.costs_ms = list(self.price())
        self.rung = min(self.rung, len(self.costs_ms) - 1)

    def observe(self, inputs: int) -> int | None:
        """Count one answered request of `inputs` inputs; the new rung if this tick moved the ladder."""
        self._inputs += inputs
        now = self.clock()
        if now - self._tick_at < TICK_S or not self._lock.acquire(blocking=False):
            return None
        try:
            return self._tick(now)
        finally:
            self._lock.release()

    def _tick(self, now: float) -> int | None:
        waits, self._seen = self.signals.waits_since(self._seen)
        busy, elapsed = self.signals.busy_seconds(), now - self._tick_at
        rho, rate = (busy - self._busy_at) / elapsed, self._inputs / elapsed
        self._tick_at, self._busy_at, self._inputs = now, busy, 0
        self._reprice()
        self._rho += SMOOTHING * (rho - self._rho)
        self._rate += SMOOTHING * (rate - self._rate)
        self._settle = max(0, self._settle - 1)
        wait = float(np.percentile(waits, 95)) / self.objective_s if waits else 0.0
        overloaded = wait > WAIT_HIGH or (rho > RHO_HIGH and wait > WAIT_BUSY)
        if overloaded:
            self._calm_since = None
            return self._step_down(rho, rate) if not self._settle else None
        return self._step_up(now)

    def _predicted(self, rho: float, rate: float, rung: int) -> float:
        """Utilisation if this model's inputs (`rate` a second) were served at `rung` instead."""
        return rho + rate * (self.costs_ms[rung] - self.costs_ms[self.rung]) / 1e3

    def _step_down(self, rho: float, rate: float) -> int | None:
        floor = len(self.costs_ms) - 1
        if self.rung == floor:
            return None
        fits = [r for r in range(self.rung + 1, floor + 1) if self._predicted(rho, rate, r) <= RHO_TARGET]
        self.rung, self._settle = (fits[0] if fits else floor), SETTLE_TICKS
        return self.rung

    def _step_up(self, now: float) -> int | None:
        if self.rung == 0 or self._predicted(self._rho, self._rate, self.rung - 1) > RHO_UP:
            self._calm_since = None
            return None
        self._calm_since = self._calm_since or now
        if now - self._calm_since < HOLD_S:
            return None
        self.rung, self._calm_since = self.rung - 1, None
        return self.rung

    @property
    def utilisation(self) -> float:
        return self._rho
