"""Server parts without HTTP, on the exported tiny model: budgets → thresholds, the stage engine,
the live clock, input checks, settings, and that nothing in server/ imports torch."""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import orjson
import pytest
from pydantic import ValidationError
from starlette.requests import Request

from branchserve.repo.confidence import confidence, exit_confidence, softmax
from branchserve.repo.frontier import expected_cost
from branchserve.repo.loading import load_repository
from branchserve.repo.manifest import Manifest
from branchserve.repo.points import Policy, cheapest_meeting, choose, most_accurate_within
from branchserve.server import api
from branchserve.server.admission import Admission
from branchserve.server.app import EXCEPTION_HANDLERS, BranchServe, predict_path, predict_url
from branchserve.server.budget import Budget
from branchserve.server.cli import register
from branchserve.server.decoding import array_batch
from branchserve.server.errors import RequestError
from branchserve.server.metrics import Metrics
from branchserve.server.oip import rest as oip_rest
from branchserve.server.predictor import DeadlineError, PredictError, PredictRequest, ServedModel
from branchserve.server.runtime import ModelRuntime, StageClock
from branchserve.server.settings import Settings


@pytest.fixture(scope="module")
def runtime(tiny_repo: Path) -> ModelRuntime:
    ((manifest, version_dir),) = load_repository(tiny_repo).values()
    return ModelRuntime(manifest, version_dir)


@pytest.fixture(scope="module")
def manifest(runtime: ModelRuntime) -> Manifest:
    return runtime.manifest


@pytest.fixture(scope="module")
def inputs(runtime: ModelRuntime) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((16, *runtime.input_shape)).astype(np.float32)


def test_accuracy_target_picks_the_cheapest_point_that_meets_it(manifest: Manifest) -> None:
    final = manifest.exits[-1].val_accuracy
    for drop in (0.001, 0.005, 0.01, 0.05, 1.0):
        point = cheapest_meeting(manifest, drop)
        assert point.val_accuracy >= final - drop - 1e-12
        cheaper = [p for p in manifest.frontier if p.expected_macs < point.expected_macs]
        assert all(p.val_accuracy < final - drop for p in cheaper)
    assert cheapest_meeting(manifest, 0).search == "full"


def test_latency_budget_picks_the_most_accurate_point_that_fits(manifest: Manifest) -> None:
    stage_ms = [0.1, 0.2, 0.3, 0.4][: len(manifest.stages)]
    costs = {p.name: expected_cost(p.exit_fractions, stage_ms) for p in manifest.frontier}
    for budget in sorted(costs.values()):
        point = most_accurate_within(manifest, budget, stage_ms)
        assert costs[point.name] <= budget
        assert all(p.val_accuracy <= point.val_accuracy for p in manifest.frontier if costs[p.name] <= budget)
    cheapest = most_accurate_within(manifest, 1e-9, stage_ms)
    assert costs[cheapest.name] == min(costs.values())


def test_policies(manifest: Manifest) -> None:
    n = len(manifest.exits)
    assert choose(manifest, Policy(), []).name == manifest.default_operating_point
    custom = choose(manifest, Policy(thresholds=[0.5] * n), [])
    assert custom.name == "custom" and custom.point is None and custom.thresholds == (0.5,) * n
    with pytest.raises(ValueError, match="thresholds"):
        choose(manifest, Policy(thresholds=[0.5]), [])
    with pytest.raises(ValueError, match="no operating point"):
        choose(manifest, Policy(point="nope"), [])
    with pytest.raises(ValidationError, match="at most one"):
        Policy(point="a", max_accuracy_drop=0.1)
    with pytest.raises(ValidationError):
        Policy(thresholds=[float("nan")] * n)
    with pytest.raises(ValidationError):
        Budget(deadline_ms=0)


def test_shrinking_batch_answers_as_single_inputs_do(runtime: ModelRuntime, inputs: np.ndarray) -> None:
    n = runtime.num_exits
    probe = runtime.run(inputs, [2.0] * n, max_exit=0)
    threshold = float(np.median(probe.confidence))
    thresholds = [threshold] + [0.0] * (n - 1)
    batch = runtime.run(inputs, thresholds, max_exit=n - 1)
    assert set(batch.exits.tolist()) == {0, 1}
    assert len(batch.scored[1]) == (batch.exits == 1).sum()  # stage 1 saw only those that stayed
    for i, x in enumerate(inputs):
        single = runtime.run(x[None], thresholds, max_exit=n - 1)
        assert single.exits[0] == batch.exits[i]
        np.testing.assert_allclose(single.probs[0], batch.probs[i], atol=1e-5)


def test_exit_confidence_is_the_confidence_of_the_softmax_bit_for_bit() -> None:
    """The server scores logits without the full softmax; a threshold must mean what calibration meant."""
    logits = (np.random.default_rng(3).standard_normal((4000, 10)) * 6).astype(np.float32)
    logits[:5] = [0.0] * 10  # ties at the top
    for kind in ("max_softmax", "entropy", "margin"):
        np.testing.assert_array_equal(exit_confidence(logits, kind), confidence(softmax(logits), kind))


def test_batch_one_runs_bound_in_every_thread_and_answers_as_the_graphs_do(
    runtime: ModelRuntime, inputs: np.ndarray
) -> None:
    """Batch 1 runs on each thread's own bound buffers, which its next run writes again; the answers
    (copied out of them) are exactly what the stage graphs return with numpy out, however many
    threads run at once, at the first exit as at the last."""
    n = runtime.num_exits

    def graphs(x: np.ndarray, depth: int) -> np.ndarray:
        h: np.ndarray | None = x[None]
        for stage in runtime.stages[: depth + 1]:
            logits, h = stage(h)
        return logits

    for exit_k, thresholds in ((n - 1, [2.0] * (n - 1) + [0.0]), (0, [0.0] * n)):
        with ThreadPoolExecutor(4) as pool:
            xs = np.repeat(inputs, 4, axis=0)
            outcomes = list(pool.map(lambda x, t=thresholds: runtime.run(x[None], t, n - 1), xs))
        for x, outcome in zip(xs, outcomes, strict=True):
            expected = graphs(x, exit_k)
            np.testing.assert_array_equal(outcome.logits, expected)
            np.testing.assert_array_equal(outcome.probs, softmax(expected))
            assert outcome.classes.tolist() == expected.argmax(axis=1).tolist()
            assert outcome.exits.tolist() == [exit_k] and len(outcome.scored) == exit_k + 1


def test_max_exit_and_deadline(runtime: ModelRuntime, inputs: np.ndarray) -> None:
    n = runtime.num_exits
    never = [2.0] * (n - 1) + [0.0]
    assert set(runtime.run(inputs, never, max_exit=n - 1).exits.tolist()) == {n - 1}
    assert set(runtime.run(inputs, never, max_exit=1).exits.tolist()) == {1}
    past = runtime.run(inputs, never, max_exit=n - 1, deadline_at=time.perf_counter())
    assert past.deadline_stopped and len(past.stage_seconds) == 1 and set(past.exits.tolist()) == {0}
    later = runtime.run(inputs, never, max_exit=n - 1, deadline_at=time.perf_counter() + 60)
    assert not later.deadline_stopped and len(later.stage_seconds) == n


def test_deadlines_that_cannot_be_met_are_refused_before_any_stage(runtime: ModelRuntime, inputs: np.ndarray) -> None:
    """Too short for the first stage even on an idle host: PredictError (422). Passed while the
    request waited: DeadlineError (503). Tight but possible: stops between stages."""
    served = ServedModel(runtime, Policy(max_accuracy_drop=0), Metrics())
    first_ms = runtime.clock.idle_time(0, len(inputs)) * 1e3

    def request(deadline_ms: float) -> PredictRequest:
        return PredictRequest(lambda: inputs, Budget(deadline_ms=deadline_ms), probabilities=False, light=False)

    with pytest.raises(PredictError, match="shorter than the first stage"):
        served.predict(request(first_ms / 2), time.perf_counter())
    waited_long = time.perf_counter() - 1.0  # received a second ago
    with pytest.raises(DeadlineError, match="passed"):
        served.predict(request(100.0), waited_long)
    ok = served.predict(request(60_000.0), time.perf_counter())
    assert ok.deadline_missed is False and len(ok.outcome.stage_seconds) == runtime.num_exits


def test_stage_clock_follows_slowdowns() -> None:
    clock = StageClock([(0.001, 0.0001)])
    base = clock.worst_case(0, 1)
    for _ in range(200):
        clock.observe(0, 1, 0.0022)  # twice the fitted 1.1 ms
    assert clock.per_input_ms()[0] == pytest.approx(2.2, rel=0.01)
    assert clock.worst_case(0, 1) > base and clock.worst_case(0, 4) > clock.worst_case(0, 1)
    assert clock.worst_case(0, 1) >= 0.95 * 0.0022  # the tail sits at or above what every call took
    tail = clock.tail[0]
    clock.observe(0, 1, 0.02)  # one stall nudges the tail quantile; only frequent stalls move it far
    assert tail < clock.tail[0] < 1.1 * tail


@pytest.mark.parametrize(
    ("shape", "batch"),
    [((1, 28, 28), 1), ((28, 28), 1), ((784,), 1), ((3, 1, 28, 28), 3), ((5, 28, 28), 5), ((2, 784), 2)],
)
def test_accepted_input_shapes(manifest: Manifest, shape: tuple[int, ...], batch: int) -> None:
    x = array_batch(np.zeros(shape).tolist(), manifest.input, max_batch=8)
    assert x.shape == (batch, 1, 28, 28) and x.dtype == np.float32


@pytest.mark.parametrize(
    ("value", "status"),
    [([[0.0] * 27] * 28, 422), ([True] * 784, 422), ([float("nan")] * 784, 422), ([[0.0] * 784] * 9, 413)],
)
def test_rejected_inputs(manifest: Manifest, value: object, status: int) -> None:
    with pytest.raises(RequestError) as e:
        array_batch(value, manifest.input, max_batch=8)
    assert e.value.status == status


def test_settings_from_env_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BRANCHSERVE_MAX_BATCH", "7")
    monkeypatch.setenv("BRANCHSERVE_PORT", "9001")
    monkeypatch.setenv("BRANCHSERVE_OPERATING_POINT", '{"max_accuracy_drop": 0.01}')
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["serve", "--port", "9100", "--operating-point", '{"latency_budget_ms": 0.5}'])
    settings = Settings(_cli_settings_source=args.settings_source(parsed_args=args))
    assert settings.max_batch == 7 and settings.port == 9100  # a flag beats the environment
    assert settings.policy == Policy(latency_budget_ms=0.5)
    assert Settings().policy == Policy(max_accuracy_drop=0.01)
    with pytest.raises(ValidationError, match="at most one"):
        Settings(operating_point='{"point": "a", "thresholds": [1]}')
    assert (settings.host, Settings().repository) == ("127.0.0.1", Path("models"))


def test_contract_server_and_command_never_import_torch_or_ray() -> None:
    """Every module of the contract and the server, and the command itself, in a fresh interpreter:
    neither torch nor matplotlib (the training extra) nor Ray (the Ray Serve application's extra)."""
    code = (
        "import pkgutil, importlib, sys, branchserve.repo, branchserve.server, branchserve.cli\n"
        "for package in (branchserve.repo, branchserve.server):\n"
        "    for m in pkgutil.walk_packages(package.__path__, package.__name__ + '.'):\n"
        "        importlib.import_module(m.name)\n"
        "print(len(sys.modules), sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'matplotlib', 'ray')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    count, heavy = out.stdout.split(" ", 1)
    assert int(count) > 100 and heavy.strip() == "[]"


def test_admission_tightens_while_a_queue_stands_and_prices_the_door(monkeypatch: pytest.MonkeyPatch) -> None:
    """Waits up to max_wait pass until requests have kept waiting past the target for an interval;
    then only the target passes until one starts within it. The door refuses when the work already
    in would outlast the allowed wait, priced by the mean work time, which a huge batch cannot blow up."""
    now = [100.0]
    monkeypatch.setattr("branchserve.server.admission.time.perf_counter", lambda: now[0])
    a = Admission(max_in_flight=8, max_wait_s=0.015, target_s=0.005, interval_s=0.1, metrics=Metrics())
    a.start(("m", "1"), now[0] - 0.010)  # waited 10 ms: allowed (no queue stands yet)
    assert not a.standing and a.wait_limit() == 0.015
    now[0] += 0.2  # no request started within the target since: a queue stands
    assert a.standing and a.wait_limit() == 0.005
    with pytest.raises(RequestError) as shed:
        a.start(("m", "1"), now[0] - 0.006)
    assert shed.value.status == 503 and shed.value.headers == {"Retry-After": "1"}
    a.start(("m", "1"), now[0] - 0.001)  # one started within the target: the queue no longer stands
    assert not a.standing
    for _ in range(3):
        a.arrived()
    a.service_s = 0.004
    assert not a.refuse_at_door()  # 3 × 4 ms = 12 ms < 15 ms
    a.arrived()
    assert a.refuse_at_door()  # 16 ms of work already in
    started = now[0]
    now[0] += 5.0  # a 5 s batch counts as at most max_wait
    a.finished(started)
    assert a.service_s == pytest.approx(0.004 + 0.05 * (0.015 - 0.004))
    for _ in range(4):
        a.left()
    assert a.in_flight == 0 and not a.refuse_at_door()


@pytest.mark.parametrize(
    ("url", "named"),
    [
        (b"/v1/models/m/predict", ("m", None)),
        (b"/v1/models/m/predict?deadline_ms=2", ("m", None)),
        (b"/v1/models/m/versions/3/predict", ("m", "3")),
        (b"/v2/models/m/infer", ("m", None)),
        (b"/v2/models/m/versions/3/infer", ("m", "3")),
        (b"/v2/models/m/predict", None),
        (b"/v1/models/m/infer", None),
        (b"/v2/models/m/ready", None),
        (b"/v2/models/m/other/3/infer", None),
        (b"/v2/repository/models/m/load", None),
        (b"/v1/models//predict", None),
        (b"/v1/models/m/versions//predict", None),
        (b"/v1/models/m%2Dx/predict", ("m-x", None)),
    ],
)
def test_the_door_knows_every_predict_url(url: bytes, named: tuple[str, str | None] | None) -> None:
    """The connection counts and may refuse exactly the predict requests of both APIs, and the app
    sends exactly those straight to their endpoint."""
    assert predict_url(url) == named
    target = predict_path(unquote(url.partition(b"?")[0].decode()))
    assert (target is None) == (named is None)
    if target is not None:
        assert target[0] is (api.predict if url.startswith(b"/v1/") else oip_rest.infer)


def test_errors_of_the_direct_inference_path_get_the_registered_answers() -> None:
    """Predict requests skip FastAPI's middleware, so their exceptions must map to the same answers:
    the nearest registered class's handler, and a JSON 500 for anything unexpected."""
    app = BranchServe(exception_handlers=EXCEPTION_HANDLERS)

    async def answer(exc: Exception) -> tuple[int, dict]:
        scope = {"type": "http", "method": "POST", "path": "/v1/models/m/predict", "headers": [], "query_string": b""}
        response = await app.handled(Request(scope), exc)
        return response.status_code, orjson.loads(bytes(response.body))

    status, body = asyncio.run(answer(RequestError(415, "unsupported content type")))
    assert (status, body["detail"]) == (415, "unsupported content type")
    status, body = asyncio.run(answer(PredictError("budget.max_exit: m has exits 0..3")))
    assert status == 422 and body["detail"].startswith("budget.max_exit")
    status, body = asyncio.run(answer(ZeroDivisionError("a bug")))
    assert (status, body["detail"]) == (500, "internal error")
