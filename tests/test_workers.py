"""Two worker processes behind one port: one /metrics that sums both exactly, new connections
spread over both, admin changes and model loads that reach both, readiness of both, and SIGTERM
draining both."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serving import Server, encode, running_server, sample_images

from branchserve.loadtest.servers import branchserve_cmd, free_port

TOKEN = "workers-admin-token-0123456789"
PNG = {"content-type": "image/png"}
ADMIN = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def server(tiny_repo: Path) -> Iterator[Server]:
    with running_server(tiny_repo, "--workers", "2", "--admin-token", TOKEN, "--log-level", "info") as s:
        yield s
        assert "Traceback" not in s.log_text()


def workers(server: Server) -> list[int]:
    text = httpx.get(f"{server.url}/metrics").text
    family = next(f for f in text_string_to_metric_families(text) if f.name == "process_cpu_seconds")
    return [int(s.labels["worker"]) for s in family.samples]


def scrape(server: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{server.url}/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_both_workers_answer_and_one_scrape_sums_them_exactly(server: Server) -> None:
    pids = workers(server)
    assert len(pids) == 2 and all(Path(f"/proc/{p}").exists() for p in pids)
    cpu_before = {p: cpu(p) for p in pids}
    before = scrape(server)
    images, _ = sample_images(60)
    n = 0
    for image in images:  # a fresh connection each: the kernel spreads them over the workers
        r = httpx.post(f"{server.url}/v1/models/tiny/predict", content=encode(image), headers=PNG)
        assert r.status_code == 200, r.text
        n += 1
    after = scrape(server)
    ok = ("branchserve_requests_total", (("model", "tiny"), ("outcome", "ok"), ("version", "1")))
    assert after[ok] - before.get(ok, 0) == n
    answers = [
        after[key] - before.get(key, 0)
        for key in after
        if key[0] == "branchserve_exit_answers_total" and dict(key[1])["model"] == "tiny"
    ]
    assert sum(answers) == n
    assert all(cpu(p) > cpu_before[p] for p in pids)  # both workers did work
    text = httpx.get(f"{server.url}/metrics").text
    if shutil.which("promtool"):  # Debian's prometheus package (scripts/test.sh installs it)
        check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
        assert check.returncode == 0 and not check.stdout.strip(), check.stdout + check.stderr


def test_every_worker_runs_its_own_ladder_and_monitor(server: Server) -> None:
    """Each worker's ladder reads its own queueing and its monitor checks its own samples: their gauges
    come per live worker (label `pid`), as the alert rules and the dashboard aggregate them."""
    pids = {str(p) for p in workers(server)}
    m = scrape(server)

    def per_worker(name: str) -> set[str]:
        return {dict(labels)["pid"] for metric, labels in m if metric == name and dict(labels)["model"] == "tiny"}

    for gauge in ("branchserve_ladder_rung", "branchserve_served_epsilon_ratio", "branchserve_monitor_alarm"):
        assert per_worker(gauge) == pids, gauge
    rungs = [v for (metric, labels), v in m.items() if metric == "branchserve_ladder_rung"]
    assert rungs and all(v == 0 for v in rungs)  # a calm server: every worker at the server's point
    objective = ("branchserve_latency_objective_seconds", (("model", "tiny"), ("version", "1")))
    assert m[objective] == 0.025  # the same setting in every worker: one series


def cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return float(int(fields[11]) + int(fields[12]))


def connections_held(pid: int, port: int) -> int:
    """Established TCP connections to `port` whose socket a process holds (from /proc, no tools)."""
    inodes = {
        os.readlink(fd).removeprefix("socket:[").removesuffix("]")
        for fd in Path(f"/proc/{pid}/fd").iterdir()
        if os.readlink(fd).startswith("socket:")
    }
    rows = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    return sum(1 for r in rows if int(r[1].split(":")[1], 16) == port and r[3] == "01" and r[9] in inodes)


def test_a_burst_of_new_connections_is_spread_over_both_workers(server: Server) -> None:
    """Each worker listens on its own socket of the port (SO_REUSEPORT): the kernel spreads 16 new
    keep-alive connections by hash (both sides get none with probability 2 / 2^16). On one shared
    socket the idle worker accepted whole bursts: 2, 4, 8 and once all 16 went to one worker."""
    port = httpx.URL(server.url).port
    assert port is not None
    socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(16)]
    try:
        for sock in socks:  # a request on each: accepted and answered, the connection kept
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")
        held = [connections_held(pid, port) for pid in workers(server)]
    finally:
        for sock in socks:
            sock.close()
    assert sum(held) == 16 and min(held) >= 1, held


def test_a_port_in_use_stops_serve_in_one_line(tiny_repo: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        cmd = branchserve_cmd(tiny_repo, port, "--workers", "2")
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert f"branchserve serve: cannot listen on 127.0.0.1:{port}: Address already in use" in done.stderr


def test_an_admin_change_reaches_every_worker(server: Server) -> None:
    path = f"{server.url}/v1/models/tiny/operating-point"
    try:
        r = httpx.put(path, json={"max_accuracy_drop": 0}, headers=ADMIN)
        assert r.status_code == 200 and r.json()["name"] == "final"
        time.sleep(0.5)  # workers follow each other's changes every 0.2 s
        names = {httpx.get(path).json()["name"] for _ in range(30)}  # fresh connections: both workers
        assert names == {"final"}
        thresholds = scrape(server)
        key = ("branchserve_exit_threshold", (("exit", "0"), ("model", "tiny"), ("version", "1")))
        assert thresholds[key] == 2.0  # full depth: exit 0 never answers
    finally:
        httpx.put(path, json={}, headers=ADMIN).raise_for_status()
    time.sleep(0.5)
    assert {httpx.get(path).json()["name"] for _ in range(30)} != {"final"}


def test_an_unload_and_a_load_reach_every_worker(server: Server) -> None:
    unload = httpx.post(f"{server.url}/v2/repository/models/tiny/unload", json={}, headers=ADMIN)
    assert unload.status_code == 200
    time.sleep(0.5)
    assert {httpx.get(f"{server.url}/v2/models/tiny/ready").status_code for _ in range(20)} == {404}
    load = httpx.post(f"{server.url}/v2/repository/models/tiny/load", json={}, headers=ADMIN, timeout=60)
    assert load.status_code == 200
    deadline = time.monotonic() + 30
    while {httpx.get(f"{server.url}/v2/models/tiny/ready").status_code for _ in range(20)} != {200}:
        assert time.monotonic() < deadline, "the other worker never loaded the model again"
        time.sleep(0.3)


def test_ready_only_when_every_worker_is_and_sigterm_drains_both(tiny_repo: Path, tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "BRANCHSERVE_WORKERS": "2", "BRANCHSERVE_GRPC_PORT": "0"}
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(branchserve_cmd(tiny_repo, port), stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        seen = set()
        deadline = time.monotonic() + 120
        while 200 not in seen:
            assert time.monotonic() < deadline and proc.poll() is None
            with contextlib.suppress(httpx.TransportError):
                seen.add(httpx.get(f"{url}/v2/health/ready", timeout=2).status_code)
            time.sleep(0.05)
        ready_files = list(Path("/tmp").glob("branchserve-run-*/ready/*"))
        assert len([f for f in ready_files if Path(f"/proc/{f.name}").exists()]) >= 2
        png = encode(sample_images(1)[0][0])
        answers: list[int] = []

        def client() -> None:
            with httpx.Client(base_url=url) as c:
                while True:
                    try:
                        answers.append(c.post("/v1/models/tiny/predict", content=png, headers=PNG).status_code)
                    except httpx.TransportError:
                        return

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        for t in threads:
            t.join(timeout=10)
        assert answers and set(answers) <= {200, 503}
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    text = (tmp_path / "server.log").read_text()
    assert "Traceback" not in text and text.count("Finished server process") == 2
