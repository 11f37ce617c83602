"""The real server over HTTP: `branchserve serve` in a subprocess on a freshly exported tiny model.

Every input format, every budget kind, the admin endpoint, metrics moving, overload, and a
bad-input corpus that must get its 4xx (never a 5xx).
"""

from __future__ import annotations

import http.client
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serving import Server, encode, metric_samples, running_server, sample_images

TOKEN = "test-admin-token"
MAX_BATCH = 32
MAX_BODY = 1_000_000
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def server(tiny_repo: Path) -> Iterator[Server]:
    flags = ["--max-batch", str(MAX_BATCH), "--max-body-bytes", str(MAX_BODY), "--admin-token", TOKEN]
    flags += ["--ladder", "{}"]  # answers at the server's point, whatever the host's load (tests/test_ladder.py)
    with running_server(tiny_repo, *flags, "--log-level", "warning") as s:
        yield s
        log = s.log_text()
    assert "Traceback" not in log and "unhandled error" not in log, log


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


@pytest.fixture(scope="module")
def meta(client: httpx.Client) -> dict:
    (model,) = client.get("/v1/models").json()
    return client.get(f"/v1/models/{model['name']}").raise_for_status().json()


@pytest.fixture(scope="module")
def predict_path(meta: dict) -> str:
    return f"/v1/models/{meta['name']}/predict"


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return sample_images(MAX_BATCH)[0]


def normalise(images: np.ndarray, meta: dict) -> np.ndarray:
    spec = meta["input"]
    x = (images.astype(np.float32) * spec["scale"] - spec["mean"]) / spec["std"]
    return x.reshape(len(images), *spec["shape"]).astype(np.float32)


def post_json(client: httpx.Client, path: str, doc: object, **params: str) -> httpx.Response:
    return client.post(path, content=orjson.dumps(doc), headers={"content-type": "application/json"}, params=params)


def full_point(meta: dict) -> dict:
    return next(p for p in meta["frontier"] if p["search"] == "full")


def version(meta: dict) -> str:
    """The version label of a model's metric series."""
    return str(meta["version"])


def test_health_listing_and_metadata(client: httpx.Client, meta: dict) -> None:
    assert client.get("/v2/health/live").json() == {"live": True}
    ready = client.get("/v2/health/ready").json()
    assert ready["ready"] is True and meta["name"] in ready["models"]
    n = len(meta["exits"])
    assert n >= 2 and len(meta["labels"]) == 10
    assert len(meta["operating_point"]["thresholds"]) == n
    assert len(meta["operating_point"]["stage_latency_ms"]) == n
    assert all(ms > 0 for ms in meta["operating_point"]["stage_latency_ms"])
    macs = [e["cumulative_macs"] for e in meta["exits"]]
    assert macs == sorted(macs) and macs[0] > 0
    assert any(p["search"] == "full" for p in meta["frontier"])
    assert client.get("/v1/models/no-such-model").status_code == 404


def test_every_input_format_gives_the_same_answer(client: httpx.Client, predict_path: str, meta: dict, images) -> None:
    x = normalise(images[:1], meta)[0]
    png = encode(images[0])
    answers = {
        "png": client.post(predict_path, content=png, headers={"content-type": "image/png"}),
        "multipart": client.post(predict_path, files={"file": ("item.png", png, "image/png")}),
        "json (C,H,W)": post_json(client, predict_path, {"inputs": x.tolist()}),
        "json (H,W)": post_json(client, predict_path, {"inputs": x[0].tolist()}),
        "json flat": post_json(client, predict_path, {"inputs": x.ravel().tolist()}),
        "json batch of one": post_json(client, predict_path, {"inputs": [x.tolist()]}),
        # curl -d without a content type sends application/x-www-form-urlencoded
        "curl -d": client.post(
            predict_path,
            content=orjson.dumps({"inputs": x.tolist()}),
            headers={"content-type": "application/x-www-form-urlencoded"},
        ),
    }
    outputs = {}
    for name, r in answers.items():
        assert r.status_code == 200, (name, r.text)
        (out,) = r.json()["outputs"]
        outputs[name] = out
    reference = outputs["png"]
    for name, out in outputs.items():
        assert (out["exit"], out["class"], out["label"]) == (reference["exit"], reference["class"], reference["label"])
        assert out["confidence"] == pytest.approx(reference["confidence"], abs=1e-5), name
    jpeg = client.post(predict_path, content=encode(images[0], "JPEG"), headers={"content-type": "image/jpeg"})
    assert jpeg.status_code == 200 and 0 <= jpeg.json()["outputs"][0]["class"] < 10


def test_response_fields_and_probabilities(client: httpx.Client, predict_path: str, meta: dict, images) -> None:
    x = normalise(images[:4], meta)
    body = post_json(client, predict_path, {"inputs": x.tolist(), "probabilities": True}).raise_for_status().json()
    assert body["model"] == meta["name"] and body["version"] == meta["version"]
    assert body["budget"]["source"] == "server"
    assert body["budget"]["operating_point"] == meta["operating_point"]["name"]
    assert body["deadline_missed"] is None and body["deadline_stopped"] is False
    assert 0 < body["compute_ms"] <= body["latency_ms"]
    assert body["stages_run"] == max(o["exit"] for o in body["outputs"]) + 1
    for out in body["outputs"]:
        p = np.array(out["probabilities"])
        assert p.shape == (10,) and p.sum() == pytest.approx(1, abs=1e-5)
        assert out["class"] == p.argmax() and out["label"] == meta["labels"][out["class"]]
        assert out["stages_run"] == out["exit"] + 1
    without = post_json(client, predict_path, {"inputs": x[0].tolist()}).json()
    assert "probabilities" not in without["outputs"][0]


def test_batch_shrinks_and_matches_single_requests(client: httpx.Client, predict_path: str, meta: dict, images) -> None:
    """With exit 0's threshold at its median confidence, half the batch leaves after stage 0 and
    stage 1 computes only the other half; each input's answer is what it gets alone."""
    n = len(meta["exits"])
    x = normalise(images, meta)
    first = post_json(client, predict_path, {"inputs": x.tolist(), "budget": {"max_exit": 0}}).json()
    conf0 = np.array([o["confidence"] for o in first["outputs"]])
    threshold = float(np.median(conf0))
    point = {"thresholds": [threshold] + [2.0] * (n - 2) + [0.0]}
    client.put(f"/v1/models/{meta['name']}/operating-point", json=point, headers=ADMIN).raise_for_status()
    try:
        before = metric_samples(client)
        batch = post_json(client, predict_path, {"inputs": x.tolist()}).raise_for_status().json()
        after = metric_samples(client)
        singles = [post_json(client, predict_path, {"inputs": xi.tolist()}).json()["outputs"][0] for xi in x]
    finally:
        client.put(f"/v1/models/{meta['name']}/operating-point", json={}, headers=ADMIN).raise_for_status()
    exits = np.array([o["exit"] for o in batch["outputs"]])
    assert set(exits.tolist()) == {0, n - 1}
    assert (exits == 0).tolist() == (conf0 >= threshold).tolist()
    assert batch["budget"]["operating_point"] == "custom"
    for out, single in zip(batch["outputs"], singles, strict=True):
        assert (out["exit"], out["class"]) == (single["exit"], single["class"])
        assert out["confidence"] == pytest.approx(single["confidence"], abs=1e-5)
    model = meta["name"]

    def scored(k: int) -> float:
        key = ("branchserve_exit_confidence_count", (("exit", str(k)), ("model", model), ("version", version(meta))))
        return after[key] - before[key]

    assert scored(0) == len(x)
    assert scored(1) == (exits > 0).sum() < len(x)


def test_accuracy_target_of_zero_runs_to_the_end(client: httpx.Client, predict_path: str, meta: dict, images) -> None:
    n = len(meta["exits"])
    x = normalise(images, meta)
    body = post_json(client, predict_path, {"inputs": x.tolist(), "budget": {"max_accuracy_drop": 0}}).json()
    assert body["budget"]["source"] == "request"
    assert body["budget"]["operating_point"] == full_point(meta)["name"]
    assert body["stages_run"] == n
    assert all(o["exit"] == n - 1 and o["stages_run"] == n for o in body["outputs"])
    image = client.post(
        predict_path,
        content=encode(images[0]),
        params={"max_accuracy_drop": "0"},
        headers={"content-type": "image/png"},
    )
    assert image.json()["outputs"][0]["exit"] == n - 1


def test_max_exit_is_honoured(client: httpx.Client, predict_path: str, meta: dict, images) -> None:
    x = normalise(images, meta).tolist()
    for m in range(len(meta["exits"])):
        capped = post_json(client, predict_path, {"inputs": x, "budget": {"max_exit": m}}).json()
        assert max(o["exit"] for o in capped["outputs"]) <= m
        forced = post_json(
            client, predict_path, {"inputs": x, "budget": {"max_exit": m, "max_accuracy_drop": 0}}
        ).json()
        assert {o["exit"] for o in forced["outputs"]} == {m} and forced["stages_run"] == m + 1


def test_deadlines(client: httpx.Client, predict_path: str, meta: dict, images) -> None:
    """A deadline shorter than the first stage alone can never be met: 422, at once, never computed
    late; a loose one runs to the end. (A deadline that passes while a request waits is a 503:
    test_server_units.py, where time is under the test's control.)"""
    n = len(meta["exits"])
    x = normalise(images[:8], meta).tolist()
    for budget in ({"deadline_ms": 0.001, "max_accuracy_drop": 0}, {"deadline_ms": 0.001}):
        tight = post_json(client, predict_path, {"inputs": x, "budget": budget})
        assert tight.status_code == 422 and "shorter than the first stage" in tight.json()["detail"]
    loose = post_json(client, predict_path, {"inputs": x, "budget": {"deadline_ms": 60_000, "max_accuracy_drop": 0}})
    body = loose.json()
    assert body["deadline_stopped"] is False and body["deadline_missed"] is False and body["stages_run"] == n
    image = client.post(
        predict_path,
        content=encode(images[0]),
        params={"deadline_ms": "0.001", "max_accuracy_drop": "0"},
        headers={"content-type": "image/png"},
    )
    assert image.status_code == 422 and "shorter than the first stage" in image.json()["detail"]


def test_operating_point_admin(client: httpx.Client, predict_path: str, meta: dict, images) -> None:
    path = f"/v1/models/{meta['name']}/operating-point"
    assert client.put(path, json={"max_accuracy_drop": 0}).status_code == 401
    assert client.put(path, json={}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    x = normalise(images[:8], meta).tolist()
    frontier = meta["frontier"]
    try:
        point = client.put(path, json={"max_accuracy_drop": 0}, headers=ADMIN).json()
        assert point["name"] == full_point(meta)["name"]
        body = post_json(client, predict_path, {"inputs": x}).json()
        assert body["budget"]["source"] == "server" and body["stages_run"] == len(meta["exits"])

        most_accurate = max(p["val_accuracy"] for p in frontier)
        generous = client.put(path, json={"latency_budget_ms": 1e6}, headers=ADMIN).json()
        assert next(p for p in frontier if p["name"] == generous["name"])["val_accuracy"] == most_accurate
        cheapest = client.put(path, json={"latency_budget_ms": 1e-6}, headers=ADMIN).json()
        assert cheapest["name"] == min(frontier, key=lambda p: p["expected_macs"])["name"]

        named = client.put(path, json={"point": frontier[0]["name"]}, headers=ADMIN).json()
        assert named["thresholds"] == frontier[0]["thresholds"]
        assert client.get(path).json()["name"] == frontier[0]["name"]

        thresholds = [0.9] * (len(meta["exits"]) - 1) + [0.0]
        custom = client.put(path, json={"thresholds": thresholds}, headers=ADMIN).json()
        assert custom["name"] == "custom" and custom["expected_compute_saved"] is None
        gauges = metric_samples(client)
        for k, t in enumerate(thresholds):
            labels = (("exit", str(k)), ("model", meta["name"]), ("version", version(meta)))
            assert gauges[("branchserve_exit_threshold", labels)] == t
    finally:
        restored = client.put(path, json={}, headers=ADMIN).json()
    assert restored["name"] == meta["operating_point"]["name"]


def test_metrics_move_and_follow_conventions(client: httpx.Client, predict_path: str, meta: dict, images) -> None:
    model = meta["name"]
    x = normalise(images[:4], meta).tolist()
    before = metric_samples(client)
    post_json(client, predict_path, {"inputs": x}).raise_for_status()
    loose = post_json(client, predict_path, {"inputs": x[0], "budget": {"deadline_ms": 60_000}})
    assert post_json(client, predict_path, {"inputs": x[0], "budget": {"deadline_ms": 0.001}}).status_code == 422
    client.post(predict_path, content=encode(images[0]), headers={"content-type": "image/png"}).raise_for_status()
    assert post_json(client, predict_path, {"inputs": [1.0]}).status_code == 422
    after = metric_samples(client)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted({"model": model, "version": version(meta), **labels}.items())))
        return after[key] - before.get(key, 0.0)

    assert delta("branchserve_requests_total", outcome="ok") == 3
    assert delta("branchserve_requests_total", outcome="bad_input") == 2
    assert delta("branchserve_request_duration_seconds_count") == 3
    assert sum(delta("branchserve_exit_answers_total", exit=str(k)) for k in range(len(meta["exits"]))) == 6
    assert delta("branchserve_stage_duration_seconds_count", stage="0") == 3
    assert delta("branchserve_exit_confidence_count", exit="0") == 6
    assert delta("branchserve_deadline_requests_total") == 1
    assert loose.json()["deadline_missed"] is False and loose.json()["deadline_stopped"] is False
    assert delta("branchserve_deadline_stops_total") == delta("branchserve_deadline_misses_total") == 0
    assert delta("branchserve_requests_total", outcome="expired") == 0
    assert 0 < delta("branchserve_compute_macs_total") <= delta("branchserve_full_depth_macs_total")
    assert delta("branchserve_full_depth_macs_total") == 6 * meta["exits"][-1]["cumulative_macs"]
    assert after[("branchserve_in_flight_requests", ())] == 0
    assert "_created" not in client.get("/metrics").text
    assert 0 <= after[("branchserve_expected_compute_saved_ratio", (("model", model), ("version", version(meta))))] < 1

    text = client.get("/metrics").text
    families = list(text_string_to_metric_families(text))
    for family in families:
        if family.name.startswith("branchserve_"):
            assert family.type in {"counter", "gauge", "histogram"}
            if family.type == "counter":
                assert all(s.name.endswith("_total") for s in family.samples)
            if family.type == "histogram":
                assert family.name.endswith(("_seconds", "_confidence"))
    if shutil.which("promtool"):  # the Debian `prometheus` package's linter, where installed
        check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
        assert check.returncode == 0 and not check.stdout.strip(), check.stdout + check.stderr


def test_openapi_documents_every_body(client: httpx.Client, predict_path: str) -> None:
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/v1/models/{name}/predict"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "image/png", "image/jpeg", "multipart/form-data"}
    components = schema["components"]["schemas"]
    assert components["PredictBody"]["examples"] and "Budget" in components and "PredictResponse" in components
    docs = client.get("/docs")
    assert docs.status_code == 200 and "//" not in docs.text.replace("://", "").split("<body>")[0]  # no CDN
    for asset in ("/docs/assets/swagger-ui-bundle.js", "/docs/assets/swagger-ui.css"):
        assert asset in docs.text and client.get(asset).status_code == 200


def big_png(side: int) -> bytes:
    return encode(np.zeros((side, side), np.uint8))


def multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "XyZ") -> tuple[dict[str, str], bytes]:
    """(headers, body) of a hand-made multipart/form-data request."""
    chunks = []
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        chunks.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n")
    body = b"".join(chunks) + f"--{boundary}--\r\n".encode()
    return {"content-type": f"multipart/form-data; boundary={boundary}"}, body


ONE = [0.0] * 784
NOISE_PNG = encode(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8))
JSON = {"content-type": "application/json"}
PNG = {"content-type": "image/png"}

# (id, method, path suffix or absolute path, headers, body, query, expected status)
BAD_INPUTS: list[tuple[str, str, str, dict, bytes, dict, int]] = [
    ("empty body", "POST", "predict", JSON, b"", {}, 400),
    ("malformed JSON", "POST", "predict", JSON, b'{"inputs": [1, 2', {}, 400),
    ("not UTF-8", "POST", "predict", JSON, b"\xff\xfe{", {}, 400),
    ("NaN literal", "POST", "predict", JSON, b'{"inputs": [NaN]}', {}, 400),
    ("number beyond double", "POST", "predict", JSON, b'{"inputs": [1e400]}', {}, 400),
    ("JSON array body", "POST", "predict", JSON, b"[1, 2]", {}, 422),
    ("JSON string body", "POST", "predict", JSON, b'"hi"', {}, 422),
    ("missing inputs", "POST", "predict", JSON, b'{"budget": {}}', {}, 422),
    ("misspelt field", "POST", "predict", JSON, orjson.dumps({"inputs": ONE, "budjet": {}}), {}, 422),
    ("wrong shape", "POST", "predict", JSON, orjson.dumps({"inputs": [[0.0] * 27] * 28}), {}, 422),
    ("scalar inputs", "POST", "predict", JSON, b'{"inputs": 3}', {}, 422),
    ("empty inputs", "POST", "predict", JSON, b'{"inputs": []}', {}, 422),
    ("ragged nesting", "POST", "predict", JSON, orjson.dumps({"inputs": [[0.0] * 28] * 27 + [[0.0] * 5]}), {}, 422),
    ("too deep nesting", "POST", "predict", JSON, orjson.dumps({"inputs": [[[[[ONE]]]]]}), {}, 422),
    ("64+ dimensions", "POST", "predict", JSON, b'{"inputs": ' + b"[" * 70 + b"1" + b"]" * 70 + b"}", {}, 422),
    ("nesting 5000 deep", "POST", "predict", JSON, b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}", {}, 400),
    ("strings", "POST", "predict", JSON, orjson.dumps({"inputs": ["a"] * 784}), {}, 422),
    ("booleans", "POST", "predict", JSON, orjson.dumps({"inputs": [True] * 784}), {}, 422),
    ("nulls", "POST", "predict", JSON, orjson.dumps({"inputs": [None] * 784}), {}, 422),
    ("objects", "POST", "predict", JSON, orjson.dumps({"inputs": {"a": 1}}), {}, 422),
    ("beyond float32", "POST", "predict", JSON, orjson.dumps({"inputs": [1e39] * 784}), {}, 422),
    (
        "integers beyond float32",
        "POST",
        "predict",
        JSON,
        b'{"inputs": [' + b",".join([b"1" + b"0" * 40] * 784) + b"]}",
        {},
        422,
    ),
    ("batch over the limit", "POST", "predict", JSON, orjson.dumps({"inputs": [ONE] * (MAX_BATCH + 1)}), {}, 413),
    ("body over the limit", "POST", "predict", JSON, b'{"inputs": [' + b"0," * MAX_BODY + b"0]}", {}, 413),
    (
        "probabilities not a bool",
        "POST",
        "predict",
        JSON,
        orjson.dumps({"inputs": ONE, "probabilities": "yes"}),
        {},
        422,
    ),
    ("budget not an object", "POST", "predict", JSON, orjson.dumps({"inputs": ONE, "budget": 5}), {}, 422),
    (
        "negative deadline",
        "POST",
        "predict",
        JSON,
        orjson.dumps({"inputs": ONE, "budget": {"deadline_ms": -1}}),
        {},
        422,
    ),
    (
        "deadline a string",
        "POST",
        "predict",
        JSON,
        orjson.dumps({"inputs": ONE, "budget": {"deadline_ms": "x"}}),
        {},
        422,
    ),
    ("max_exit too deep", "POST", "predict", JSON, orjson.dumps({"inputs": ONE, "budget": {"max_exit": 99}}), {}, 422),
    ("max_exit negative", "POST", "predict", JSON, orjson.dumps({"inputs": ONE, "budget": {"max_exit": -1}}), {}, 422),
    (
        "accuracy drop > 1",
        "POST",
        "predict",
        JSON,
        orjson.dumps({"inputs": ONE, "budget": {"max_accuracy_drop": 2}}),
        {},
        422,
    ),
    ("unknown budget field", "POST", "predict", JSON, orjson.dumps({"inputs": ONE, "budget": {"speed": 1}}), {}, 422),
    ("query deadline not a number", "POST", "predict", PNG, big_png(28), {"deadline_ms": "soon"}, 422),
    ("query max_exit too deep", "POST", "predict", PNG, big_png(28), {"max_exit": "99"}, 422),
    ("unknown query parameter", "POST", "predict", PNG, big_png(28), {"thresholds": "0.5"}, 422),
    ("garbage PNG", "POST", "predict", PNG, b"\x89PNG not really", {}, 400),
    ("truncated PNG", "POST", "predict", PNG, NOISE_PNG[: len(NOISE_PNG) // 2], {}, 400),
    ("JPEG header only", "POST", "predict", {"content-type": "image/jpeg"}, b"\xff\xd8\xff\xe0", {}, 400),
    ("decompression bomb", "POST", "predict", PNG, big_png(5000), {}, 400),
    ("text/plain", "POST", "predict", {"content-type": "text/plain"}, b"hello", {}, 415),
    ("no content type", "POST", "predict", {}, b'{"inputs": []}', {}, 415),
    ("GIF", "POST", "predict", {"content-type": "image/gif"}, b"GIF89a", {}, 415),
    ("multipart without boundary", "POST", "predict", {"content-type": "multipart/form-data"}, b"--x\r\n", {}, 400),
    ("multipart, no file field", "POST", "predict", *multipart([("note", None, b"hi")]), {}, 422),
    ("multipart, file not an image", "POST", "predict", *multipart([("file", "a.png", b"nope")]), {}, 400),
    (
        "multipart, two files",
        "POST",
        "predict",
        *multipart([("file", "a.png", big_png(28)), ("file", "b.png", big_png(28))]),
        {},
        400,
    ),
    ("unknown model", "POST", "/v1/models/nope/predict", JSON, orjson.dumps({"inputs": ONE}), {}, 404),
    ("empty version", "POST", "versions//predict", JSON, orjson.dumps({"inputs": ONE}), {}, 404),
    ("GET on predict", "GET", "predict", {}, b"", {}, 405),
    ("unknown path", "GET", "/v1/nothing", {}, b"", {}, 404),
    ("admin without token", "PUT", "operating-point", JSON, b"{}", {}, 401),
    (
        "admin: two policies",
        "PUT",
        "operating-point",
        {**JSON, **ADMIN},
        b'{"point": "x", "max_accuracy_drop": 0}',
        {},
        422,
    ),
    ("admin: unknown point", "PUT", "operating-point", {**JSON, **ADMIN}, b'{"point": "nope"}', {}, 422),
    ("admin: wrong threshold count", "PUT", "operating-point", {**JSON, **ADMIN}, b'{"thresholds": [0.5]}', {}, 422),
    ("admin: negative threshold", "PUT", "operating-point", {**JSON, **ADMIN}, b'{"thresholds": [-1, 0]}', {}, 422),
    ("admin: negative latency", "PUT", "operating-point", {**JSON, **ADMIN}, b'{"latency_budget_ms": -3}', {}, 422),
    ("admin: malformed JSON", "PUT", "operating-point", {**JSON, **ADMIN}, b"{", {}, 400),
]


@pytest.mark.parametrize(
    ("method", "where", "headers", "body", "query", "status"),
    [c[1:] for c in BAD_INPUTS],
    ids=[c[0] for c in BAD_INPUTS],
)
def test_bad_input_gets_its_4xx(
    client: httpx.Client, meta: dict, method: str, where: str, headers: dict, body: bytes, query: dict, status: int
) -> None:
    path = where if where.startswith("/") else f"/v1/models/{meta['name']}/{where}"
    r = client.request(method, path, content=body or None, headers=headers, params=query)
    assert r.status_code == status, r.text
    assert isinstance(r.json()["detail"], str) and r.json()["detail"]


def test_chunked_body_over_the_limit_is_refused(client: httpx.Client, predict_path: str) -> None:
    """No content-length to check up front: the limit must hold while the body streams in."""

    def chunks() -> Iterator[bytes]:
        yield b'{"inputs": ['
        for _ in range(MAX_BODY // 10_000 + 1):
            yield b"0," * 5_000
        yield b"0]}"

    r = client.post(predict_path, content=chunks(), headers=JSON)
    assert r.status_code == 413 and "limit" in r.json()["detail"]


def test_overload_sheds_with_retry_after(tiny_repo: Path) -> None:
    """More concurrent requests than admitted: some get 503 + Retry-After, the rest are answered; the
    server stays healthy (tests/test_ladder.py has the cheaper rungs that load moves to)."""
    flags = ["--max-in-flight", "3", "--inference-threads", "1", "--log-level", "warning"]
    with running_server(tiny_repo, *flags) as server, server.client() as client:
        meta = client.get("/v1/models").json()[0]
        path = f"/v1/models/{meta['name']}/predict"
        x = np.zeros((MAX_BATCH, 784), np.float32).tolist()
        body = orjson.dumps({"inputs": x})

        def call(_: int) -> httpx.Response:
            with server.client() as c:
                return c.post(path, content=body, headers=JSON)

        with ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(call, range(48)))
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 503} and 503 in statuses and 200 in statuses
        assert all(r.headers["retry-after"] == "1" for r in responses if r.status_code == 503)
        overloaded = metric_samples(client)[
            (
                "branchserve_requests_total",
                (("model", meta["name"]), ("outcome", "overloaded"), ("version", version(meta))),
            )
        ]
        assert overloaded == statuses.count(503)
        assert client.post(path, content=body, headers=JSON).status_code == 200
        assert "Traceback" not in server.log_text()


def test_answers_on_the_event_loop_match_answers_in_a_worker_thread(
    tiny_repo: Path, client: httpx.Client, predict_path: str, meta: dict, images
) -> None:
    """Small requests run on the event loop; `--inline-body-bytes 0` sends every one to a thread."""
    x = normalise(images[:4], meta)
    bodies = [(encode(image), PNG) for image in images[:4]] + [(orjson.dumps({"inputs": v.tolist()}), JSON) for v in x]
    flags = ("--inline-body-bytes", "0", "--ladder", "{}", "--log-level", "warning")
    with running_server(tiny_repo, *flags) as threaded, threaded.client() as other:
        for body, headers in bodies:
            inline, hopped = (c.post(predict_path, content=body, headers=headers) for c in (client, other))
            assert inline.status_code == hopped.status_code == 200
            assert inline.json()["outputs"] == hopped.json()["outputs"]
        # Small bodies that are not small work go to a thread on the default server too.
        large_image = big_png(512)  # ~1 KB of PNG, 512×512 pixels
        batch = orjson.dumps({"inputs": np.zeros((3, 784), np.uint8).tolist()})  # three inputs in ~5 KB
        for body, headers in ((large_image, PNG), (batch, JSON)):
            inline, hopped = (c.post(predict_path, content=body, headers=headers) for c in (client, other))
            assert len(body) < 16 << 10 and inline.status_code == hopped.status_code == 200
            assert inline.json()["outputs"] == hopped.json()["outputs"]


def test_overload_of_small_requests_is_shed_too(tiny_repo: Path) -> None:
    """Requests answered on the event loop still count as in flight while others wait for it. The
    clients send head and body in one write (http.client does), so no body read ever suspends."""
    with running_server(tiny_repo, "--max-in-flight", "1", "--log-level", "warning") as server:
        with server.client() as client:
            path = f"/v1/models/{client.get('/v1/models').json()[0]['name']}/predict"
            port = httpx.URL(server.url).port

            def calls(_: int) -> list[tuple[int, str | None]]:
                connection, answers = http.client.HTTPConnection("127.0.0.1", port, timeout=30), []
                for _ in range(10):
                    connection.request("POST", path, NOISE_PNG, PNG)
                    response = connection.getresponse()
                    response.read()
                    answers.append((response.status, response.getheader("retry-after")))
                connection.close()
                return answers

            with ThreadPoolExecutor(16) as pool:
                answers = [a for batch in pool.map(calls, range(16)) for a in batch]
            statuses = [status for status, _ in answers]
            assert set(statuses) <= {200, 503} and 503 in statuses and 200 in statuses
            assert all(retry == "1" for status, retry in answers if status == 503)
            assert client.post(path, content=NOISE_PNG, headers=PNG).status_code == 200
        assert "Traceback" not in server.log_text()
