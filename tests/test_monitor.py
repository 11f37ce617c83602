"""The exit-quality monitor: anytime-valid sequences, the per-point check, traced runs finished off
the request path, and the real server raising, acting on and clearing an alarm."""

from __future__ import annotations

import math
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from serving import encode, metric_samples, running_server, sample_images

from branchserve.loadtest.shifts import glyphs
from branchserve.repo.certify import cheapest_certified
from branchserve.repo.frontier import exits_taken
from branchserve.repo.loading import load_repository
from branchserve.repo.points import Choice, cheapest_meeting
from branchserve.repo.quality import PointCheck, QualityCheck, disagreements
from branchserve.repo.sequences import RateSequence
from branchserve.server.metrics import Metrics
from branchserve.server.monitor import ExitMonitor, MonitorSettings
from branchserve.server.runtime import ModelRuntime, Trace

EPSILON, ALPHA = 0.02, 0.05


def alarm_times(rate: float, streams: int, length: int, batch: int, seed: int) -> list[int | None]:
    """For each simulated stream of 0/1 outcomes at `rate`, the sample count at which `above(EPSILON)` first
    held when checked after every `batch` samples, or None."""
    rng, out = np.random.default_rng(seed), []
    for _ in range(streams):
        seq, events = RateSequence(ALPHA), rng.random(length) < rate
        when = None
        for start in range(0, length, batch):
            seq.add(int(events[start : start + batch].sum()), batch)
            if seq.above(EPSILON):
                when = start + batch
                break
        out.append(when)
    return out


def test_sequence_false_alarms_stay_under_alpha_however_often_it_is_checked() -> None:
    times = alarm_times(EPSILON, streams=400, length=10_000, batch=10, seed=0)  # 1,000 looks per stream
    alarms = sum(t is not None for t in times) / len(times)
    assert alarms <= ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / len(times))


def test_sequence_detects_a_rate_above_epsilon() -> None:
    times = alarm_times(5 * EPSILON, streams=50, length=5_000, batch=1, seed=1)
    assert all(t is not None for t in times)
    assert float(np.median([t for t in times if t is not None])) < 400  # ~100 expected at 5× the rate


def test_sequence_bounds_bracket_the_rate_and_match_the_tests() -> None:
    seq = RateSequence(ALPHA)
    assert (seq.lower(), seq.upper()) == (0.0, 1.0) and math.isnan(seq.mean)
    seq.add(60, 1000)
    low, high = seq.lower(), seq.upper()
    assert 0 < low < 0.06 < high < 1
    assert seq.above(low * 0.99) and not seq.above(low * 1.01)  # the lower bound is where `above` stops
    assert seq.below(high * 1.01) and not seq.below(high * 0.99)
    with pytest.raises(ValueError, match="alpha"):
        RateSequence(1.5)


def test_point_check_alarms_then_recovers_on_fresh_evidence() -> None:
    check = PointCheck("p", (0.5, 0.0), EPSILON, ALPHA)
    events = [check.observe(1, 10) for _ in range(20)]  # 10 % disagreement: an alarm
    assert "alarm" in events and check.alarmed and check.evidence is not None
    assert check.evidence.lower() > EPSILON and check.sequence.trials < 200  # a fresh sequence after the alarm
    events = [check.observe(0, 50) for _ in range(40)]  # then none at all: recovery
    assert "recovered" in events and not check.alarmed
    watched = PointCheck("q", (0.5, 0.0), None, ALPHA)
    assert all(watched.observe(10, 10) is None for _ in range(10)) and not watched.alarmed  # no ε: never alarmed


def test_disagreements_count_what_each_point_would_answer() -> None:
    rng = np.random.default_rng(2)
    conf, classes = rng.random((3, 200)), rng.integers(0, 4, (3, 200))
    rows = np.array([[0.3, 0.3, 0.0], [0.9, 0.5, 0.0], [2.0, 2.0, 0.0]])
    counts = disagreements(conf, classes, rows)
    for row, count in zip(rows, counts, strict=True):
        first = [next((k for k in range(2) if conf[k, i] >= row[k]), 2) for i in range(200)]
        assert count == sum(classes[k, i] != classes[2, i] for i, k in enumerate(first))
    assert counts[2] == 0  # full depth always agrees with itself
    check = QualityCheck(ALPHA)
    watched = [("a", tuple(rows[0]), 0.01), ("b", tuple(rows[1]), 0.05), ("c", tuple(rows[2]), None)]
    check.watch(watched)
    assert [p.alpha for p in check.points] == [ALPHA / 2, ALPHA / 2, ALPHA / 2]  # split over the points with an ε
    first = check.points
    check.watch(watched)
    assert all(a is b for a, b in zip(check.points, first, strict=True))  # the same tests go on
    check.watch(watched[:1])
    assert check.points[0].alpha == ALPHA  # one point tested now: its test at the whole level


def test_a_traced_run_finished_later_equals_running_every_exit(tiny_repo: Path) -> None:
    ((manifest, version_dir),) = load_repository(tiny_repo).values()
    runtime = ModelRuntime(manifest, version_dir)
    x = np.random.default_rng(3).standard_normal((12, *runtime.input_shape)).astype(np.float32)
    last = runtime.num_exits - 1
    trace = Trace(len(x), [0, 3, 4, 11], runtime.num_exits)
    runtime.run(x, [0.0, 0.4, 0.6, 0.0], last, trace=trace)  # most rows leave at exit 0 or 1
    assert trace.reached.min() < last
    for k in sorted(set(trace.reached.tolist()) - {last}):
        rows = np.flatnonzero(trace.reached == k)
        confidences, probabilities = runtime.finish(k + 1, np.stack([trace.boundary[r] for r in rows.tolist()]))
        for j, (c, p) in enumerate(zip(confidences, probabilities, strict=True), start=k + 1):
            trace.confidence[j, rows], trace.classes[j, rows] = c, p.argmax(axis=1)
    everything = Trace(len(x), list(range(len(x))), runtime.num_exits)
    runtime.run(x, [2.0, 2.0, 2.0, 0.0], last, trace=everything)  # no early exit: every exit scored
    np.testing.assert_allclose(trace.confidence, everything.confidence[:, trace.rows], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(trace.classes, everything.classes[:, trace.rows])
    assert (exits_taken(trace.confidence.astype(np.float64), np.array([[2.0, 2.0, 2.0, 0.0]])) == last).all()


def answer(client: httpx.Client, path: str, png: bytes) -> dict:
    """The answer to a PNG, retried after a 503 as its Retry-After asks (a busy host may shed a few)."""
    for _ in range(5):
        r = client.post(path, content=png, headers={"content-type": "image/png"})
        if r.status_code != 503:
            break
        time.sleep(0.2)
    return r.raise_for_status().json()


@pytest.mark.parametrize("action", ["alert", "stricter", "full"])
def test_actions_say_what_serves_for_an_alarmed_rung(tiny_repo: Path, action: str) -> None:
    ((manifest, version_dir),) = load_repository(tiny_repo).values()
    runtime = ModelRuntime(manifest, version_dir)
    rungs = [Choice.of(cheapest_certified(manifest, "disagreement", eps, 0.05)[0]) for eps in (0.05, 0.1, 0.3)]
    full = Choice.of(cheapest_meeting(manifest, 0))
    monitor = ExitMonitor(runtime, MonitorSettings(0.5, ALPHA, action), Metrics(), idle=lambda: True)
    assert monitor.full_depth == full
    monitor.watch(rungs)
    assert [monitor.serving(rungs, r) for r in range(3)] == [None, None, None]  # no alarm: every rung serves
    monitor.check.points[1].alarmed = True
    expected = {
        "alert": [None, None, None],
        "stricter": [None, rungs[0], None],  # rung 1 is served by rung 0; rung 2 has no alarm
        "full": [full, full, full],
    }[action]
    assert [monitor.serving(rungs, r) for r in range(3)] == expected
    monitor.check.points[0].alarmed = True
    if action == "stricter":
        assert monitor.serving(rungs, 1) == full  # no stricter rung without an alarm: full depth


def wait_for(client: httpx.Client, key: tuple[str, tuple[tuple[str, str], ...]], value: float) -> float:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        got = metric_samples(client).get(key)
        if got == value:
            return got
        time.sleep(0.1)
    return metric_samples(client)[key]


def test_server_alarms_on_shifted_traffic_serves_full_depth_and_recovers(tiny_repo: Path) -> None:
    policy = '{"max_disagreement": 0.05, "risk": 0.05}'
    flags = ["--monitor-fraction", "1", "--monitor-action", "full", "--operating-point", policy, "--ladder", "{}"]
    images, _ = sample_images(400)
    letters = glyphs(images[:300], np.random.default_rng(4))
    with running_server(tiny_repo, *flags, "--log-level", "warning") as server, server.client() as client:
        listed = client.get("/v1/models").json()[0]
        name, version = listed["name"], str(listed["version"])
        path = f"/v1/models/{name}/predict"
        point = client.get(f"/v1/models/{name}/operating-point").json()["name"]
        alarm = ("branchserve_monitor_alarm", (("model", name), ("point", point), ("version", version)))

        def send(batch: np.ndarray, full_depth: bool = False) -> list[dict]:
            return [answer(client, path + ("?max_accuracy_drop=0" if full_depth else ""), encode(i)) for i in batch]

        calm = send(images)
        assert {a["budget"]["source"] for a in calm} == {"server"} and calm[0]["budget"]["guarantee"]["epsilon"] == 0.05
        assert wait_for(client, alarm, 0.0) == 0.0
        send(letters)  # another kind of image: early exits disagree with the final one far above 5 %
        assert wait_for(client, alarm, 1.0) == 1.0
        shifted = send(letters[:5])
        assert all(a["budget"]["source"] == "monitor" and a["budget"]["guarantee"]["epsilon"] == 0.0 for a in shifted)
        m = metric_samples(client)
        assert m[("branchserve_monitor_alarms_total", (("model", name), ("point", point), ("version", version)))] == 1
        assert m[("branchserve_monitor_sampled_inputs_total", (("model", name), ("version", version)))] >= 300
        assert m[("branchserve_monitor_compute_macs_total", (("model", name), ("version", version)))] > 0
        assert (
            m[("branchserve_monitor_epsilon_ratio", (("model", name), ("point", point), ("version", version)))] == 0.05
        )
        # Traffic the point answers as the final exit does: its upper bound falls under ε within a few hundred.
        finals = send(images, full_depth=True)
        agreeing = images[
            [c["outputs"][0]["class"] == f["outputs"][0]["class"] for c, f in zip(calm, finals, strict=True)]
        ]
        assert len(agreeing) > 300
        send(agreeing)
        assert wait_for(client, alarm, 0.0) == 0.0
        assert send(images[:3])[-1]["budget"]["source"] == "server"
        log = server.log_text()
    assert log.count("exit-quality alarm") == 1 and "exit-quality recovered" in log
    assert "Traceback" not in log
