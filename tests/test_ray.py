"""The Ray Serve application on a real two-node Ray cluster on this machine (`ray.cluster_utils.Cluster`):
the replicas layout deployed by `branchserve ray` from a Serve config file, the stages layout by
`serve.run`, both next to a single-process `branchserve serve` on the same repository, and a third
application whose model deployment autoscales quickly.

They answer exactly as the single-process server does (exits, classes, confidences, errors), the
replicas sit on both nodes, Ray Serve's backpressure is a 503 with Retry-After and the native error
body, a killed replica fails only the requests it held, a model's deployment scales up under load
and back down, and per-exit metrics reach Ray's metrics endpoints. bench/ray_cluster.py runs the same on the 10k test images with the shipped model.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import ray
import yaml
from prometheus_client.parser import text_string_to_metric_families
from ray import serve
from ray.cluster_utils import Cluster
from ray.util.state import list_actors
from serving import Server, encode, running_server, sample_images

from branchserve.loadtest import openloop
from branchserve.loadtest.servers import free_port
from branchserve.ray.app import build
from branchserve.ray.args import AppArgs
from branchserve.ray.ingress import Ingress
from branchserve.ray.predictor import Predictor

MODEL = "tiny"  # tests/conftest.py's exported model
REPLICA_MAX_ONGOING = 2
REPLICA_MAX_QUEUED = 8
PNG = {"content-type": "image/png"}
LOST = "the replica computing this request stopped before it answered; retry"
SCALING = {  # the shipped policy (branchserve/ray/predictor.py) with delays a test can wait for
    "min_replicas": 1,
    "max_replicas": 2,
    "target_ongoing_requests": 1,
    "look_back_period_s": 2,
    "upscale_delay_s": 1,
    "downscale_delay_s": 3,
}


@dataclass
class RayApps:
    url: str  # Ray Serve's proxy: the replicas layout at /, the stages layout at /stages
    dashboard: str
    node_ids: set[str]

    def replicas(self, app: str, deployment: str = MODEL) -> list[object]:
        return [
            a
            for a in list_actors(address=self.dashboard, filters=[("state", "=", "ALIVE")], limit=1000)
            if a.class_name == f"ServeReplica:{app}:{deployment}"
        ]


def serve_config(repo: Path, port: int) -> dict[str, object]:
    """deploy/ray/config.yaml's shape, with two fixed replicas and small queues so that tests reach them."""
    return {
        "proxy_location": "HeadOnly",  # both nodes are this machine: one proxy, one port
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [
            {
                "name": "branchserve",
                "route_prefix": "/",
                "import_path": "branchserve.ray.app:build",
                "args": {"layout": "replicas", "settings": {"repository": str(repo)}},
                "deployments": [
                    {
                        "name": MODEL,
                        "num_replicas": 2,
                        "autoscaling_config": None,
                        "max_ongoing_requests": REPLICA_MAX_ONGOING,
                        "max_queued_requests": REPLICA_MAX_QUEUED,
                    },
                    {"name": "Ingress", "num_replicas": 1, "autoscaling_config": None},
                ],
            }
        ],
    }


def wait_ready(url: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout_s:g} s")


@pytest.fixture(scope="module")
def apps(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayApps]:
    dashboard_port, http_port = free_port(), free_port()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 4,  # logical: enough to place every replica of both applications
            "include_dashboard": True,  # the state API (actors' nodes) is served by the dashboard
            "dashboard_port": dashboard_port,
            "_system_config": {"metrics_report_interval_ms": 1000},
        },
    )
    try:
        cluster.add_node(num_cpus=4)
        cluster.wait_for_nodes()
        config = tmp_path_factory.mktemp("ray") / "config.yaml"
        config.write_text(yaml.safe_dump(serve_config(tiny_repo, http_port)))
        cli = [sys.executable, "-m", "branchserve", "ray", "--config", str(config), "--address", cluster.address]
        subprocess.run([*cli, "--non-blocking"], check=True, capture_output=True, timeout=180)
        ray.init(address=cluster.address, logging_level="warning")
        stages = build(AppArgs(layout="stages", settings={"repository": str(tiny_repo)}))
        serve.run(stages, name="stages", route_prefix="/stages")
        args = AppArgs(layout="replicas", settings={"repository": str(tiny_repo)})
        scaling = Ingress.bind(
            args, {MODEL: Predictor.options(name=MODEL, autoscaling_config=SCALING).bind(args, MODEL)}
        )
        serve.run(scaling, name="scaling", route_prefix="/scaling")
        url = f"http://127.0.0.1:{http_port}"
        for prefix in ("", "/stages", "/scaling"):
            wait_ready(url + prefix)
        nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        yield RayApps(url, f"http://127.0.0.1:{dashboard_port}", nodes)
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def plain(tiny_repo: Path) -> Iterator[Server]:
    """The single-process server at the point the Ray applications serve: theirs has no ladder, so neither
    does this one (a busy host would otherwise move it to a cheaper rung mid-comparison)."""
    with running_server(tiny_repo, "--ladder", "{}") as server:
        yield server


def answers(url: str, bodies: list[bytes], params: dict[str, str] | None = None) -> list[tuple[int, float, int]]:
    """(exit, confidence, class) of each PNG body's answer, sent four at a time."""

    def one(body: bytes) -> tuple[int, float, int]:
        r = httpx.post(f"{url}/v1/models/{MODEL}/predict", content=body, headers=PNG, params=params, timeout=60)
        assert r.status_code == 200, r.text
        out = r.json()["outputs"][0]
        return out["exit"], out["confidence"], out["class"]

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, bodies))


def test_replicas_are_placed_on_both_nodes(apps: RayApps) -> None:
    replicas = apps.replicas("branchserve")
    assert len(replicas) == 2 and len(apps.node_ids) == 2
    assert {r.node_id for r in replicas} == apps.node_ids


def test_both_layouts_answer_exactly_as_the_single_process_server(apps: RayApps, plain: Server) -> None:
    images, _ = sample_images(200)
    bodies = [encode(image) for image in images]
    expected = answers(plain.url, bodies)
    assert len({e for e, _, _ in expected}) >= 2  # a spread of exits: inputs leave at several stages
    for url in (apps.url, f"{apps.url}/stages"):
        assert answers(url, bodies) == expected
        assert answers(url, bodies[:40], {"max_exit": "1"}) == answers(plain.url, bodies[:40], {"max_exit": "1"})
    batch = {"inputs": ((images[:16] / 255.0 - 0.286) / 0.353).tolist(), "probabilities": True}
    outputs = [
        httpx.post(f"{url}/v1/models/{MODEL}/predict", json=batch, timeout=60).raise_for_status().json()["outputs"]
        for url in (plain.url, apps.url, f"{apps.url}/stages")
    ]
    assert outputs[0] == outputs[1] == outputs[2]


BAD = [
    ("/v1/models/nope/predict", b"x", "image/png"),
    (f"/v1/models/{MODEL}/predict", b"", "image/png"),
    (f"/v1/models/{MODEL}/predict", b"not an image", "image/png"),
    (f"/v1/models/{MODEL}/predict", b"hello", "text/plain"),
    (f"/v1/models/{MODEL}/predict", b'{"inputs": [1, 2, 3]}', "application/json"),
    (f"/v1/models/{MODEL}/predict", b'{"inputs": ', "application/json"),
    (f"/v1/models/{MODEL}/predict?max_exit=99", b"PNG", "image/png"),
    (f"/v1/models/{MODEL}/predict?deadline_ms=-1", b"PNG", "image/png"),
    (f"/v1/models/{MODEL}/versions/9/predict", b"PNG", "image/png"),
]


@pytest.mark.parametrize(("path", "body", "content_type"), BAD, ids=[f"{p} {t} {b[:12]!r}" for p, b, t in BAD])
def test_bad_requests_get_the_same_answers(
    apps: RayApps, plain: Server, path: str, body: bytes, content_type: str
) -> None:
    body = encode(sample_images(1)[0][0]) if body == b"PNG" else body
    want = httpx.post(plain.url + path, content=body, headers={"content-type": content_type})
    assert 400 <= want.status_code < 500 and want.json()["detail"]
    for url in (apps.url, f"{apps.url}/stages"):
        got = httpx.post(url + path, content=body, headers={"content-type": content_type}, timeout=60)
        assert (got.status_code, got.json()) == (want.status_code, want.json())


def test_metrics_reach_rays_metrics_endpoints(apps: RayApps) -> None:
    """Per-exit answers, requests by outcome and stage times, summed over every node's metrics endpoint."""
    images, _ = sample_images(30)
    before = settled_metrics("stages")
    exits = [e for e, _, _ in answers(f"{apps.url}/stages", [encode(i) for i in images])]
    httpx.post(f"{apps.url}/stages/v1/models/{MODEL}/predict", content=b"bad", headers=PNG)
    want = {("requests", "ok"): 30.0, ("requests", "bad_input"): 1.0} | {
        ("exit_answers", str(k)): float(n) for k, n in Counter(exits).items()
    }
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        after = ray_metrics("stages")
        got = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in want}
        if got == want:
            break
        time.sleep(1)
    assert got == want
    assert after[("stage_calls", "0")] - before.get(("stage_calls", "0"), 0.0) == 30


def settled_metrics(application: str) -> dict[tuple[str, str], float]:
    """The series once earlier requests' have all arrived (two scrapes two report intervals apart agree)."""
    last = ray_metrics(application)
    for _ in range(30):
        time.sleep(2)
        now, last = last, ray_metrics(application)
        if now == last:
            break
    return last


def ray_metrics(application: str) -> dict[tuple[str, str], float]:
    """branchserve's series of one application, summed over nodes and processes."""
    sums: Counter[tuple[str, str]] = Counter()
    for node in ray.nodes():
        text = httpx.get(f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics").text
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.labels.get("application") != application:
                    continue
                if s.name == "ray_branchserve_requests_total":
                    sums["requests", s.labels["outcome"]] += s.value
                elif s.name == "ray_branchserve_exit_answers_total":
                    sums["exit_answers", s.labels["exit"]] += s.value
                elif s.name == "ray_branchserve_stage_duration_seconds_count":
                    sums["stage_calls", s.labels["stage"]] += s.value
    return dict(sums)


def test_backpressure_is_a_503_with_retry_after_and_the_native_body(apps: RayApps) -> None:
    host, port = apps.url.removeprefix("http://").split(":")
    requests = openloop.png_requests(f"{host}:{port}", f"/v1/models/{MODEL}/predict")
    outcome = asyncio.run(openloop.run(host, int(port), requests, 1500, 1.0, 128, keep_bodies=True))
    assert outcome.bodies is not None
    refused = [body for status, body in zip(outcome.status, outcome.bodies, strict=True) if status == 503]
    assert set(outcome.status) == {200, 503}, Counter(outcome.status)
    assert refused and outcome.retry_after == len(refused)
    assert all(b'{"detail":"overloaded: Request dropped due to backpressure' in body for body in refused)


def test_killing_a_replica_fails_only_the_requests_it_held(apps: RayApps) -> None:
    """Closed-loop requests that take the replicas ~0.1 s each (a 4096² PNG to decode and shrink) keep
    both replicas full, each holding `max_ongoing_requests`; one is killed (SIGKILL) mid-load. The
    requests it held fail with the ingress's 503; every other request, and every one after, is answered."""
    side = np.arange(4096)
    big = encode((np.add.outer(side, side) % 256).astype(np.uint8))  # 26 KB, 16.8 M pixels
    statuses: list[tuple[float, int, str]] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=apps.url, timeout=60) as c:
            while not stop.is_set():
                r = c.post(f"/v1/models/{MODEL}/predict", content=big, headers=PNG)
                statuses.append((time.monotonic(), r.status_code, "" if r.status_code == 200 else r.json()["detail"]))

    threads = [threading.Thread(target=client) for _ in range(3 * REPLICA_MAX_ONGOING)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    victim = next(r for r in apps.replicas("branchserve") if r.node_id != ray.get_runtime_context().get_node_id())
    os.kill(victim.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    time.sleep(3.0)
    stop.set()
    for t in threads:
        t.join()
    failed = [(at, detail) for at, status, detail in statuses if status != 200]
    print(f"\nkilled a replica on node {victim.node_id[:8]}: {len(failed)} of {len(statuses)} requests failed")
    assert all(detail == LOST and at >= killed_at for at, detail in failed), failed
    assert 1 <= len(failed) <= REPLICA_MAX_ONGOING
    after = [status for at, status, _ in statuses if at > killed_at + 0.5]
    assert len(after) > 5 and set(after) == {200}


def test_a_models_deployment_scales_up_under_load_and_back_down(apps: RayApps) -> None:
    """Autoscaling on ongoing requests (`SCALING`): one replica at rest; eight closed-loop clients keep
    ~8 requests ongoing against a target of 1, so a second replica starts; when they stop, it goes."""
    assert len(apps.replicas("scaling")) == 1
    body = encode(sample_images(1)[0][0])
    stop = threading.Event()
    answered: list[int] = []

    def client() -> None:
        with httpx.Client(base_url=f"{apps.url}/scaling", timeout=60) as c:
            while not stop.is_set():
                answered.append(c.post(f"/v1/models/{MODEL}/predict", content=body, headers=PNG).status_code)

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(apps.replicas("scaling")) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    grown = len(apps.replicas("scaling"))
    stop.set()
    for t in threads:
        t.join()
    assert grown == 2 and set(answered) == {200}, (grown, Counter(answered))
    deadline = time.monotonic() + 60
    while len(apps.replicas("scaling")) > 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(apps.replicas("scaling")) == 1


BAD_ARGS = [
    (["--repository", "/nonexistent"], "model repository /nonexistent is not a folder (resolved to /nonexistent)"),
    (["--operating-point", '{"bogus": 1}'], "args.settings.operating_point.bogus: Extra inputs are not permitted"),
    (["--config", "{dir}/empty.yaml"], "{dir}/empty.yaml: needs exactly one application with import_path "),
    (["--config", "{dir}/port.yaml"], "args.settings: Value error, port: not a setting under Ray (the proxy, "),
]


@pytest.mark.parametrize(("flags", "error"), BAD_ARGS, ids=[" ".join(f)[:40] for f, _ in BAD_ARGS])
def test_bad_arguments_stop_the_command_in_one_line(tmp_path: Path, flags: list[str], error: str) -> None:
    """Checked before anything reaches a cluster: no Ray is started for these."""
    (tmp_path / "empty.yaml").write_text("applications: []\n")
    app = {"import_path": "branchserve.ray.app:build", "args": {"settings": {"port": 9}}}
    (tmp_path / "port.yaml").write_text(yaml.safe_dump({"applications": [app]}))
    argv = [sys.executable, "-m", "branchserve", "ray", *(f.replace("{dir}", str(tmp_path)) for f in flags)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stdout == ""
    [line] = done.stderr.splitlines()
    assert line.startswith(f"branchserve ray: {error.replace('{dir}', str(tmp_path))}")
