"""deploy/: the Prometheus alerts pass promtool's checks and unit tests, every metric the alerts and the
Grafana dashboard query exists in a live /metrics scrape, and the compose file wires what exists."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import orjson
import pytest
import yaml
from serving import encode, running_server, sample_images

from branchserve.server.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "branchserve.json"
METRIC = re.compile(r"\bbranchserve_[a-z_]+\b")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("promtool") is None:
        pytest.fail("promtool not found: install Debian's `prometheus` package (scripts/test.sh does)")
    return subprocess.run(["promtool", *args], capture_output=True, text=True, cwd=PROMETHEUS, timeout=60)


def test_alert_rules_check_and_pass_their_unit_tests() -> None:
    for args in (
        ("check", "rules", "alerts.yml"),
        ("check", "config", "prometheus.yml"),
        ("test", "rules", "alerts_test.yml"),
    ):
        done = promtool(*args)
        assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"][0]["rules"]
    tested = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
    fired = {case["alertname"] for test in tested for case in test["alert_rule_test"] if case["exp_alerts"]}
    assert {r["alert"] for r in rules} == fired  # every alert has a test in which it fires


def queried_metrics() -> dict[str, set[str]]:
    """Metric names each query file uses: the dashboard's panel expressions and the alert rules."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs.append(dashboard["templating"]["list"][0]["query"]["query"])
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"][0]["rules"]
    return {
        "dashboard": {name for e in exprs for name in METRIC.findall(e)},
        "alerts": {name for r in rules for name in METRIC.findall(r["expr"])},
    }


def test_every_queried_metric_exists_in_a_live_scrape(tiny_repo: Path) -> None:
    """A server with the ladder and the monitor on, after some traffic: every name a panel or an alert
    queries is a sample of its /metrics (a histogram's `_bucket` included)."""
    flags = ["--ladder", '{"p99_ms": 25, "risk": 0.05, "max_disagreement": [0.1, 0.3]}', "--monitor-fraction", "0.5"]
    flags += ["--operating-point", '{"max_disagreement": 0.05, "risk": 0.05}', "--log-level", "warning"]
    with running_server(tiny_repo, *flags) as server, server.client() as client:
        name = client.get("/v1/models").json()[0]["name"]
        for image in sample_images(20)[0]:
            client.post(f"/v1/models/{name}/predict", content=encode(image), headers={"content-type": "image/png"})
        body = orjson.dumps({"inputs": np.zeros((2, 784)).tolist(), "budget": {"deadline_ms": 100}})
        client.post(f"/v1/models/{name}/predict", content=body, headers={"content-type": "application/json"})
        text = client.get("/metrics").text
    scraped = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    for source, names in queried_metrics().items():
        assert names, source
        assert names <= scraped, f"{source} queries metrics no scrape has: {sorted(names - scraped)}"


def test_compose_wires_the_server_prometheus_and_grafana(monkeypatch: pytest.MonkeyPatch) -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    assert set(compose) == {"branchserve", "prometheus", "grafana"}
    assert (DEPLOY / compose["branchserve"]["build"] / "Dockerfile").is_file()
    for service in ("prometheus", "grafana"):
        for volume in compose[service]["volumes"]:
            assert (DEPLOY / volume.split(":")[0]).exists(), volume
    scrape = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["static_configs"][0]["targets"] == ["branchserve:8000"]
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    dashboard = json.loads(DASHBOARD.read_text())
    assert all(p["datasource"]["uid"] == uid for p in dashboard["panels"])
    for variable, value in compose["branchserve"]["environment"].items():
        monkeypatch.setenv(variable, value)
    settings = Settings()  # the server's settings accept what compose sets
    assert settings.ladder_spec.targets and settings.policy.risk and settings.monitor_action == "stricter"
