"""The load-adaptive ladder: the controller on measured utilisation and queueing (a clock it is given),
the rungs a served model builds from certified points, and the real server moving down under load
and back up once it calms."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from pydantic import ValidationError
from serving import metric_samples, running_server

from branchserve.repo.loading import load_repository
from branchserve.repo.points import Policy
from branchserve.server.budget import Budget
from branchserve.server.ladder import HOLD_S, TICK_S, Ladder, LadderSpec, certified_rungs
from branchserve.server.metrics import Metrics
from branchserve.server.predictor import PredictRequest, ServedModel
from branchserve.server.runtime import ModelRuntime

OBJECTIVE_S = 0.025
COSTS_MS = [1.0, 0.5, 0.3]  # expected stage time per input of rungs 0, 1, 2 (the floor)


class Load:
    """Fake load signals and clock that a test drives: requests of one input arrive at `rate`, each
    taking `service_ms` at rung 0 and less at cheaper rungs by their stage-time difference; a
    request's wait is three times an M/D/1 queue's mean (roughly its p95), or 100 ms once utilisation
    reaches 1."""

    def __init__(self) -> None:
        self.now, self.busy, self.waits = 0.0, 0.0, list[float]()
        self.ladder = Ladder(OBJECTIVE_S, self, clock=lambda: self.now)
        self.ladder.priced_by(lambda: COSTS_MS)

    def busy_seconds(self) -> float:
        return self.busy

    def waits_since(self, started: int) -> tuple[list[float], int]:
        return self.waits[started:], len(self.waits)

    def run(self, seconds: float, rate: float, service_ms: float) -> list[int]:
        """The rung that served each request."""
        visited = []
        for _ in range(int(seconds * rate)):
            service_s = (service_ms - COSTS_MS[0] + COSTS_MS[self.ladder.rung]) / 1e3
            rho = rate * service_s
            self.waits.append(0.1 if rho >= 1 else 3 * service_s * rho / (2 * (1 - rho)))
            self.now += 1 / rate
            self.busy += min(rho, 1.0) / rate
            self.ladder.observe(1)
            visited.append(self.ladder.rung)
        return visited


def test_ladder_steps_down_under_load_to_the_rung_predicted_to_fit() -> None:
    load = Load()
    assert set(load.run(3, rate=450, service_ms=1.4)) == {0}  # utilisation 0.63: rung 0 holds
    visited = load.run(1, rate=800, service_ms=1.4)  # 1.12 of capacity
    assert visited[-1] == 1  # 800/s × 0.9 ms = 0.72 ≤ 0.8: one rung is enough, not the floor
    assert visited.index(1) < 0.2 * 800  # within two ticks
    assert load.run(10, rate=800, service_ms=1.4)[-1] == 1  # holds there: rung 0 would need 1.12


def test_ladder_returns_up_only_after_the_hold_when_the_rung_above_fits() -> None:
    load = Load()
    load.run(1, rate=1200, service_ms=1.4)
    assert load.ladder.rung == 2  # at 1.7× rung 0's capacity only the floor fits
    assert load.run(30, rate=1200, service_ms=1.4)[-1] == 2  # never below the floor, never up while it is needed
    visited = load.run(HOLD_S * 3, rate=300, service_ms=1.4)  # load falls: 300/s × 1.4 ms = 0.42 at rung 0
    first_up = visited.index(1)
    assert first_up >= (HOLD_S - TICK_S) * 300  # not before the hold
    assert visited[-1] == 0  # and then all the way back


def test_ladder_does_not_oscillate_between_capacities() -> None:
    """A load rung 0 cannot carry but rung 1 can: the ladder settles on rung 1 and stays."""
    load = Load()
    visited = load.run(20, rate=700, service_ms=1.4)
    moves = sum(a != b for a, b in pairwise(visited))
    assert moves == 1 and visited[-1] == 1


def test_a_busy_server_without_a_queue_stays_put() -> None:
    """One client sending request after request: busy most of the time, nobody waiting."""
    load = Load()
    for _ in range(3000):
        load.now += 0.001
        load.busy += 0.00095
        load.waits.append(0.0)
        load.ladder.observe(1)
    assert load.ladder.rung == 0


def test_ladder_spec_is_checked() -> None:
    with pytest.raises(ValidationError, match="not both"):
        LadderSpec(max_disagreement=[0.02], max_accuracy_drop=[0.01])
    with pytest.raises(ValidationError, match=r"in \(0, 1\]"):
        LadderSpec(max_disagreement=[0.0])
    assert LadderSpec(max_disagreement=[0.05, 0.02]).targets == [0.02, 0.05]  # strictest first
    assert LadderSpec().targets == []  # {}: no rungs, the ladder is off


@pytest.fixture(scope="module")
def runtime(tiny_repo: Path) -> ModelRuntime:
    ((manifest, version_dir),) = load_repository(tiny_repo).values()
    return ModelRuntime(manifest, version_dir)


def test_served_model_answers_at_the_ladders_rung(runtime: ModelRuntime) -> None:
    rungs = certified_rungs(runtime.manifest, LadderSpec(max_disagreement=[0.1, 0.3]))
    ladder = Load().ladder  # its fake signals never move it: the test sets the rung
    served = ServedModel(runtime, Policy(point="final"), Metrics(), ladder=(ladder, rungs))
    assert [c.name for c in served.rungs] == ["final", *(c.name for c in rungs)]
    macs = [c.point.expected_macs for c in served.rungs if c.point]
    assert macs == sorted(macs, reverse=True)  # each rung cheaper than the one above
    x = np.random.default_rng(0).standard_normal((4, *runtime.input_shape)).astype(np.float32)

    def predict(budget: Budget) -> tuple[str, int | None, str, float | None]:
        r = served.predict(PredictRequest(lambda: x, budget, False, False), time.perf_counter())
        return r.source, r.rung, r.choice.name, None if r.choice.guarantee is None else r.choice.guarantee.epsilon

    assert predict(Budget()) == ("server", 0, "final", 0.0)
    ladder.rung = 2
    assert predict(Budget()) == ("ladder", 2, served.rungs[2].name, 0.3)
    assert predict(Budget(max_accuracy_drop=0)) == ("request", None, "final", 0.0)  # a request's own target wins
    served.set_policy(Policy(max_disagreement=0.1, risk=0.05))  # rung 0 is now the 0.1 point: one rung below it
    assert [c.name for c in served.rungs] == [rungs[0].name, rungs[1].name]
    assert predict(Budget()) == ("ladder", 1, rungs[1].name, 0.3)  # the rung index is clamped to the rungs there are


def test_server_moves_down_the_ladder_under_load_and_back_up(tiny_repo: Path) -> None:
    ladder = '{"p99_ms": 25, "risk": 0.05, "max_disagreement": [0.1, 0.3]}'
    flags = ["--ladder", ladder, "--operating-point", '{"point": "final"}', "--inference-threads", "1"]
    with running_server(tiny_repo, *flags, "--log-level", "warning") as server, server.client() as client:
        listed = client.get("/v1/models").json()[0]
        name, version = listed["name"], str(listed["version"])
        path = f"/v1/models/{name}/predict"
        body = orjson.dumps({"inputs": np.zeros((64, 784), np.float32).tolist()})
        point = client.get(f"/v1/models/{name}/operating-point").json()
        assert [r["guarantee"]["epsilon"] for r in point["rungs"]] == [0.0, 0.1, 0.3]

        def call(_: int) -> httpx.Response:
            with server.client() as c:
                return c.post(path, content=body, headers={"content-type": "application/json"})

        laddered: list[dict[str, Any]] = []
        deadline = time.monotonic() + 30
        with ThreadPoolExecutor(32) as pool:  # one inference thread: requests queue for tens of ms
            while not laddered and time.monotonic() < deadline:  # rounds of load until the ladder moves
                answered = [r.json()["budget"] for r in pool.map(call, range(200)) if r.status_code == 200]
                laddered = [b for b in answered if b["source"] == "ladder"]
        assert laddered and all(b["rung"] >= 1 and b["guarantee"]["epsilon"] in (0.1, 0.3) for b in laddered)
        m = metric_samples(client)
        assert (
            m[("branchserve_ladder_moves_total", (("direction", "down"), ("model", name), ("version", version)))] >= 1
        )
        assert m[("branchserve_latency_objective_seconds", (("model", name), ("version", version)))] == 0.025
        deadline = time.monotonic() + 4 * HOLD_S + 10
        while time.monotonic() < deadline:  # calm traffic: the ladder climbs back to the server's point
            r = client.post(path, content=body, headers={"content-type": "application/json"})
            budget = r.json().get("budget", {}) if r.status_code == 200 else {}  # the backlog may shed a few
            if budget.get("rung") == 0:
                break
            time.sleep(0.05)
        assert budget["rung"] == 0 and budget["source"] == "server"
        m = metric_samples(client)
        assert m[("branchserve_ladder_rung", (("model", name), ("version", version)))] == 0
        assert m[("branchserve_ladder_moves_total", (("direction", "up"), ("model", name), ("version", version)))] >= 1
        assert m[("branchserve_served_epsilon_ratio", (("model", name), ("version", version)))] == 0.0
