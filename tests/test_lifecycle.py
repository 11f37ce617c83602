"""Model lifecycle on the real server: versions side by side by the version policy, addressable in
every route; the OIP repository extension (index, load, unload; admin only) through the real
tritonclient.http; a corrupt version refused while the old one keeps serving; and a reload under
open-loop load in which no request fails and every answer names its version."""

from __future__ import annotations

import base64
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as thttp
from serving import encode, running_server, sample_images
from tritonclient.utils import InferenceServerException

from branchserve.loadtest.reload import copy_version, corrupt_version, scenario
from branchserve.repo.points import Policy
from branchserve.repo.versions import Latest, VersionPolicy
from branchserve.server.admission import Admission
from branchserve.server.budget import Budget
from branchserve.server.ladder import LadderSpec
from branchserve.server.metrics import Metrics
from branchserve.server.monitor import MonitorSettings
from branchserve.server.predictor import PredictRequest
from branchserve.server.repository import ModelRepository, Serving

TOKEN = "lifecycle-admin-token"
MODEL = "tiny"
PNG = {"content-type": "image/png"}


def admin() -> dict[str, str]:
    return {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def repo(tiny_version: Path, tmp_path: Path) -> Path:
    """A repository of its own holding `tiny/1`, for a test to add versions to."""
    shutil.copytree(tiny_version, tmp_path / "models" / MODEL / "1")
    return tmp_path / "models"


def infer_image(client: httpx.Client, path: str) -> httpx.Response:
    png = encode(sample_images(1)[0][0])
    header = b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["%s"]}]}'
    return client.post(path, content=header % base64.b64encode(png))


def test_version_policy_selects(tmp_path: Path) -> None:
    on_disk = [3, 1, 7, 2]
    assert VersionPolicy.model_validate_json('{"latest": {"num_versions": 2}}').select(on_disk) == [3, 7]
    assert VersionPolicy.model_validate_json('{"all": {}}').select(on_disk) == [1, 2, 3, 7]
    assert VersionPolicy.model_validate_json('{"specific": {"versions": [2, 9]}}').select(on_disk) == [2]
    for bad in ("{}", '{"all": {}, "latest": {}}', '{"latest": {"num_versions": 0}}', '{"newest": {}}'):
        with pytest.raises(ValueError):
            VersionPolicy.model_validate_json(bad)
    done = subprocess.run(
        [sys.executable, "-m", "branchserve", "serve", "--version-policy", '{"all": {}, "latest": {}}'],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode != 0 and "exactly one of latest, all, specific" in done.stderr
    assert "Traceback" not in done.stderr


def test_versions_side_by_side_in_every_route(repo: Path) -> None:
    copy_version(repo / MODEL / "1", 2)
    flags = ["--version-policy", '{"all": {}}', "--log-level", "warning"]
    with running_server(repo, *flags) as s, s.client() as c:
        assert [(m["name"], m["version"]) for m in c.get("/v1/models").json()] == [(MODEL, 1), (MODEL, 2)]
        assert c.get(f"/v2/models/{MODEL}").json()["versions"] == ["1", "2"]
        for v in (1, 2):
            assert c.get(f"/v1/models/{MODEL}/versions/{v}").json()["version"] == v
            native = c.post(
                f"/v1/models/{MODEL}/versions/{v}/predict", content=encode(sample_images(1)[0][0]), headers=PNG
            )
            assert native.json()["version"] == v
            assert infer_image(c, f"/v2/models/{MODEL}/versions/{v}/infer").json()["model_version"] == str(v)
            assert c.get(f"/v2/models/{MODEL}/versions/{v}/ready").status_code == 200
        assert infer_image(c, f"/v2/models/{MODEL}/infer").json()["model_version"] == "2"  # the highest by default
        missing = c.get(f"/v2/models/{MODEL}/versions/3/ready")
        assert missing.status_code == 404 and "no version '3'" in missing.json()["error"]
        assert c.post(f"/v1/models/{MODEL}/versions/3/predict", content=b"{}").status_code == 404
        metrics = c.get("/metrics").text
        for v, answered in (("1", 2), ("2", 3)):
            assert f'branchserve_requests_total{{model="{MODEL}",outcome="ok",version="{v}"}} {answered:.1f}' in metrics
        disabled = c.post("/v2/repository/index")
        assert disabled.status_code == 403 and "BRANCHSERVE_ADMIN_TOKEN" in disabled.json()["error"]


def test_load_swaps_versions_and_a_corrupt_one_is_refused(repo: Path) -> None:
    with running_server(repo, "--admin-token", TOKEN, "--log-level", "warning") as s, s.client() as c:
        client = thttp.InferenceServerClient(s.url.removeprefix("http://"))
        index = client.get_model_repository_index(headers=admin())
        assert index == [{"name": MODEL, "version": "1", "state": "READY", "reason": ""}]

        copy_version(repo / MODEL / "1", 2)
        assert client.get_model_repository_index(headers=admin())[1]["reason"] == "not loaded"
        client.load_model(MODEL, headers=admin())  # latest 1: version 2 in, version 1 out
        assert client.is_model_ready(MODEL, "2") and not client.is_model_ready(MODEL, "1")
        assert infer_image(c, f"/v2/models/{MODEL}/infer").json()["model_version"] == "2"
        states = {e["version"]: e for e in client.get_model_repository_index(headers=admin())}
        assert states["1"]["state"] == "UNAVAILABLE" and "unloaded" in states["1"]["reason"]

        client.load_model(MODEL, headers=admin(), config='{"version_policy": {"specific": {"versions": [1, 2]}}}')
        assert client.is_model_ready(MODEL, "1") and client.is_model_ready(MODEL, "2")

        corrupt_version(repo / MODEL / "1", 3)
        with pytest.raises(InferenceServerException, match="sha256") as refused:
            client.load_model(MODEL, headers=admin())
        assert refused.value.status() == "400" and "nothing changed" in refused.value.message()
        assert client.is_model_ready(MODEL, "1") and client.is_model_ready(MODEL, "2")
        assert infer_image(c, f"/v2/models/{MODEL}/infer").json()["model_version"] == "2"
        states = {e["version"]: e for e in client.get_model_repository_index(headers=admin())}
        assert states["3"]["state"] == "UNAVAILABLE" and "sha256" in states["3"]["reason"]

        client.unload_model(MODEL, headers=admin())
        assert not client.is_model_ready(MODEL) and client.is_server_live()
        assert infer_image(c, f"/v2/models/{MODEL}/infer").status_code == 404
        assert client.get_model_repository_index(headers=admin(), query_params=None) and all(
            e["state"] == "UNAVAILABLE" for e in client.get_model_repository_index(headers=admin())
        )
        client.load_model(MODEL, headers=admin(), config='{"version_policy": {"specific": {"versions": [2]}}}')
        assert client.is_model_ready(MODEL, "2")

        for bad, message in (
            ({"parameters": {"config": '{"max_batch_size": 8}'}}, "config"),
            ({"parameters": {"file:1/model.onnx": "AAAA"}}, "not supported"),
        ):
            r = c.post(f"/v2/repository/models/{MODEL}/load", json=bad, headers=admin())
            assert r.status_code == 400 and message in r.json()["error"]
        r = c.post("/v2/repository/models/no-such-model/load", headers=admin())
        assert r.status_code == 400 and "no model folder" in r.json()["error"]
        assert c.post(f"/v2/repository/models/{MODEL}/unload").status_code == 401
        assert c.post("/v2/repository/index", headers={"authorization": "Bearer wrong"}).status_code == 401
        client.close()
        assert "Traceback" not in s.log_text()


def test_reload_under_load_fails_no_request(repo: Path) -> None:
    """A small run of the scenario bench/reload_under_load.py records at half capacity."""
    with running_server(repo, "--admin-token", TOKEN, "--log-level", "warning") as s:
        result = scenario(s.url, repo, MODEL, TOKEN, rate=100, duration_s=8)
        log = s.log_text()
    assert result["failed"] == 0 and result["answers_naming_no_version"] == 0, result
    assert result["requests"] == 800 and set(result["answered_by"]) == {"1", "2"}, result
    assert result["load"]["status"] == 200 and result["load"]["answer"] == {"name": MODEL, "versions": ["2"]}
    corrupt = result["corrupt_load"]
    assert corrupt["status"] == 400 and "sha256" in corrupt["answer"]["error"], corrupt
    assert result["old_version_last_answered_at_s"] <= result["load"]["done_at_s"] + 0.5
    assert "Traceback" not in log and np.isfinite(result["ok_p99_ms"])


def test_a_request_holding_a_version_finishes_on_it_after_a_swap(repo: Path) -> None:
    """What makes a swap safe, without timing luck: a request holds the ServedModel it started with. A
    version loaded live gets its own certified ladder and exit-quality monitor; a retired one's monitor stops."""
    metrics = Metrics()
    admission = Admission(64, 0.015, 0.005, 0.1, metrics)
    ladder, monitor = LadderSpec(max_disagreement=[0.3]), MonitorSettings(0.5, 0.05, "alert")
    repository = ModelRepository(
        repo, VersionPolicy(latest=Latest()), Serving(Policy(), 1, metrics, admission, ladder, monitor, 1)
    )
    repository.load_all()
    held = repository.get(MODEL)
    copy_version(repo / MODEL / "1", 2)
    assert repository.load(MODEL) == [2] and repository.get(MODEL).version == 2
    swapped_in = repository.get(MODEL)
    assert swapped_in.ladder is not None and len(swapped_in.rungs) >= 1 and swapped_in.monitor is not None
    assert swapped_in.monitor.running and held.monitor is not None and not held.monitor.running
    x = np.zeros((4, *held.manifest.input.shape), np.float32)
    result = held.predict(PredictRequest(lambda: x, Budget(), False, light=False), time.perf_counter())
    assert result.manifest.version == 1 and len(result.outcome.exits) == 4
    assert [(s.version, s.state) for s in repository.index()] == [(1, "UNAVAILABLE"), (2, "READY")]
    repository.close()
    assert not swapped_in.monitor.running
