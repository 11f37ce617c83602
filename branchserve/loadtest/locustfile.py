"""Locust users for the predict API: real Fashion-MNIST test images, as PNG bodies and as JSON.

    locust -f branchserve/loadtest/locustfile.py --host http://127.0.0.1:8000   # web UI
    branchserve loadtest --budgets dev                                          # headless, judged

The request mix is what clients send: a PNG body with no budget (the server's operating point),
with a deadline, or capped at an exit; and the same three as JSON arrays. Every answer's class is
checked against the sample's label. 503/429 (deliberate overload answers) are reported under their
own name, not as failures. With `--results FILE`, every request (time, latency, outcome, exit,
correct) is written there at the end, for the runner's percentiles, step analysis and accuracy.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from gevent.lock import Semaphore
from locust import FastHttpUser, events, task
from locust.env import Environment
from PIL import Image

from branchserve.loadtest.samples import sample_labels, sample_pngs

OVERLOAD_STATUSES = frozenset({429, 503})
OVERLOADED = "overloaded (503/429)"
DEADLINE_MS = 10.0
MAX_EXIT = 1


@dataclass(frozen=True)
class Sample:
    png: bytes
    pixels: np.ndarray
    label: int


def load_samples() -> list[Sample]:
    return [
        Sample(png, np.asarray(Image.open(io.BytesIO(png))), label)
        for png, label in zip(sample_pngs(), sample_labels(), strict=True)
    ]


@dataclass
class Records:
    """Every request of the run, as columns: small enough to keep (a few MB for a minute at 2k/s)."""

    t0: float = field(default_factory=time.perf_counter)
    t: list[float] = field(default_factory=list)
    ms: list[float] = field(default_factory=list)
    outcome: list[str] = field(default_factory=list)  # ok | overload | error
    task: list[str] = field(default_factory=list)
    sample: list[int] = field(default_factory=list)
    exit: list[int | None] = field(default_factory=list)
    correct: list[bool | None] = field(default_factory=list)

    def add(
        self, task: str, sample: int, ms: float, outcome: str, exit: int | None = None, correct: bool | None = None
    ) -> None:
        self.t.append(time.perf_counter() - self.t0)
        self.ms.append(ms)
        self.outcome.append(outcome)
        self.task.append(task)
        self.sample.append(sample)
        self.exit.append(exit)
        self.correct.append(correct)

    def reset(self) -> None:
        self.t0 = time.perf_counter()
        for column in (self.t, self.ms, self.outcome, self.task, self.sample, self.exit, self.correct):
            column.clear()

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "t0"}


SAMPLES = load_samples()
RECORDS = Records()
JSON_BODIES: list[bytes] = []  # built at the first user's start, from the model's input spec
JSON_DEADLINE_BODIES: list[bytes] = []


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument("--model", default="fmnist-resnet", help="model name in the predict path")
    parser.add_argument("--user-rps", type=float, default=0.0, help="requests/s per user; 0: back to back")
    parser.add_argument("--results", default="", help="write every request here (JSON) when the run stops")
    parser.add_argument("--step-users", type=int, default=4, help="step load: users added per step")
    parser.add_argument("--step-seconds", type=float, default=5.0, help="step load: length of a step")
    parser.add_argument("--steps", type=int, default=10, help="step load: number of steps")


@events.test_start.add_listener
def _start(environment: Environment, **_: Any) -> None:
    RECORDS.reset()  # the web UI can run several tests in one process


@events.test_stop.add_listener
def _stop(environment: Environment, **_: Any) -> None:
    path = environment.parsed_options.results if environment.parsed_options else ""
    if path:
        Path(path).write_bytes(orjson.dumps(RECORDS.to_json()))


def json_body(sample: Sample, spec: dict[str, Any], budget: dict[str, float] | None) -> bytes:
    """The JSON form of a sample: pixels normalised as the model's input spec says, as a client does."""
    inputs = np.round((sample.pixels * spec["scale"] - spec["mean"]) / spec["std"], 4)
    return orjson.dumps({"inputs": inputs, "budget": budget}, option=orjson.OPT_SERIALIZE_NUMPY)


SPEC_LOCK = Semaphore()


class PredictUser(FastHttpUser):
    """One client: picks a random sample per request and checks the class it gets back."""

    def wait_time(self) -> float:
        """Back to back, or paced to `--user-rps` like locust's constant_throughput."""
        rate = self.environment.parsed_options.user_rps if self.environment.parsed_options else 0.0
        if rate <= 0:
            return 0.0
        now = time.perf_counter()
        self.next_start = max(now, self.next_start + 1 / rate)  # behind schedule: no catch-up burst
        return self.next_start - now

    def on_start(self) -> None:
        self.next_start = time.perf_counter()
        self.model = self.environment.parsed_options.model if self.environment.parsed_options else "fmnist-resnet"
        self.path = f"/v1/models/{self.model}/predict"
        with SPEC_LOCK:  # one metadata request per run, not one per user
            if not JSON_BODIES:
                spec = self.client.get(f"/v1/models/{self.model}", name="model metadata").json()["input"]
                JSON_BODIES.extend(json_body(s, spec, None) for s in SAMPLES)
                JSON_DEADLINE_BODIES.extend(json_body(s, spec, {"deadline_ms": DEADLINE_MS}) for s in SAMPLES)

    def sample(self) -> int:
        return np.random.randint(len(SAMPLES))

    def send(self, name: str, i: int, body: bytes, content_type: str, query: str = "") -> None:
        with self.client.post(
            self.path + query, data=body, headers={"content-type": content_type}, name=name, catch_response=True
        ) as r:
            ms = r.request_meta["response_time"]
            if r.status_code in OVERLOAD_STATUSES:
                r.request_meta["name"] = OVERLOADED
                r.success()
                RECORDS.add(name, i, ms, "overload")
                return
            try:
                answer = r.json()["outputs"][0]
                predicted, exit_ = int(answer["class"]), answer.get("exit")
            except (ValueError, KeyError, IndexError, TypeError):
                r.failure(f"HTTP {r.status_code}: {(r.text or '')[:200]}")
                RECORDS.add(name, i, ms, "error")
                return
            r.success()
            RECORDS.add(name, i, ms, "ok", exit_, predicted == SAMPLES[i].label)

    @task(4)
    def png(self) -> None:
        i = self.sample()
        self.send("png", i, SAMPLES[i].png, "image/png")

    @task(2)
    def png_deadline(self) -> None:
        i = self.sample()
        self.send("png deadline", i, SAMPLES[i].png, "image/png", f"?deadline_ms={DEADLINE_MS}")

    @task(1)
    def png_max_exit(self) -> None:
        i = self.sample()
        self.send("png max_exit", i, SAMPLES[i].png, "image/png", f"?max_exit={MAX_EXIT}")

    @task(2)
    def json_plain(self) -> None:
        i = self.sample()
        self.send("json", i, JSON_BODIES[i], "application/json")

    @task(1)
    def json_deadline(self) -> None:
        i = self.sample()
        self.send("json deadline", i, JSON_DEADLINE_BODIES[i], "application/json")
