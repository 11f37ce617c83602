"""The Open Inference Protocol front doors, spoken by the real clients: `tritonclient.http` and
`tritonclient.grpc` at their default settings (binary tensors on), against `branchserve serve` on
the tiny model, with API keys and an admin token configured. Metadata, readiness, FP32 batches and
BYTES images, a subset of outputs, budgets in parameters, bad requests (4xx or the right gRPC
code, with a message, server live afterwards), and the same answers through every front door."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import numpy as np
import orjson
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from PIL import Image
from serving import Server, encode, running_server, sample_images
from tritonclient.utils import InferenceServerException

from branchserve.repo.imaging import image_to_input
from branchserve.repo.loading import load_repository

KEY = "oip-test-key"


def auth() -> dict[str, str]:
    """A fresh headers dict per call: tritonclient.http adds its own headers to the one it is given."""
    return {"authorization": f"Bearer {KEY}"}


MAX_BATCH = 64
OUTPUTS = ["class", "label", "exit", "confidence", "probabilities", "logits"]


@pytest.fixture(scope="module")
def server(tiny_repo: Path) -> Iterator[Server]:
    # generous admission: these tests check the protocol, not shedding on a busy host
    flags = ["--api-keys", KEY, "--max-batch", str(MAX_BATCH), "--log-level", "warning"]
    with running_server(tiny_repo, *flags) as s:
        yield s
        log = s.log_text()
    assert "Traceback" not in log and "unhandled error" not in log, log


@pytest.fixture(scope="module")
def model(tiny_repo: Path) -> tuple[str, object]:
    ((manifest, _),) = load_repository(tiny_repo).values()
    return manifest.name, manifest


@pytest.fixture(scope="module")
def http_client(server: Server) -> Iterator[thttp.InferenceServerClient]:
    client = thttp.InferenceServerClient(server.url.removeprefix("http://"))
    yield client
    client.close()


@pytest.fixture(scope="module")
def grpc_client(server: Server) -> Iterator[tgrpc.InferenceServerClient]:
    client = tgrpc.InferenceServerClient(server.grpc)
    yield client
    client.close()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return sample_images(MAX_BATCH)[0]


def tensors(images: np.ndarray, manifest: object) -> np.ndarray:
    """Exactly the tensors the server makes of these images as PNG uploads."""
    return np.stack([image_to_input(Image.fromarray(i), manifest.input) for i in images])


def fp32_input(module: object, x: np.ndarray, binary: bool = True) -> object:
    tensor = module.InferInput("input", list(x.shape), "FP32")
    return tensor.set_data_from_numpy(x, binary_data=binary) if module is thttp else tensor.set_data_from_numpy(x)


def answers(result: object) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return result.as_numpy("exit"), result.as_numpy("class"), result.as_numpy("confidence")


def test_metadata_and_readiness(http_client, grpc_client, model) -> None:
    name, manifest = model
    for client in (http_client, grpc_client):
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready(name) and client.is_model_ready(name, "1")
        assert not client.is_model_ready(name, "7") and not client.is_model_ready("no-such-model")
    server_meta = http_client.get_server_metadata()
    assert server_meta["name"] == "branchserve" and "binary_tensor_data" in server_meta["extensions"]
    assert "model_repository" in grpc_client.get_server_metadata(as_json=True)["extensions"]
    meta = http_client.get_model_metadata(name, headers=auth())
    over_grpc = grpc_client.get_model_metadata(name, headers=auth())
    assert [(t.name, t.datatype, list(t.shape)) for t in over_grpc.outputs] == [
        (t["name"], t["datatype"], t["shape"]) for t in meta["outputs"]
    ]
    assert meta["versions"] == ["1"] and [o["name"] for o in meta["outputs"]] == OUTPUTS
    assert meta["inputs"][0] == {"name": "input", "datatype": "FP32", "shape": [-1, *manifest.input.shape]}
    assert meta["inputs"][1] == {"name": "image", "datatype": "BYTES", "shape": [-1]}
    with pytest.raises(InferenceServerException, match="API key"):
        http_client.get_model_metadata(name)


def test_fp32_batch_over_every_front_door(http_client, grpc_client, server: Server, model, images) -> None:
    """One batch through OIP REST binary, OIP REST JSON, gRPC and the native API: the same answers
    (bench/protocol_agreement.py does this for the 10k test images on the shipped model)."""
    name, manifest = model
    x = tensors(images, manifest)
    binary = http_client.infer(name, [fp32_input(thttp, x)], headers=auth())
    json_out = [thttp.InferRequestedOutput(o, binary_data=False) for o in OUTPUTS]
    plain = http_client.infer(name, [fp32_input(thttp, x, binary=False)], outputs=json_out, headers=auth())
    over_grpc = grpc_client.infer(name, [fp32_input(tgrpc, x)], headers=auth())
    with server.client(headers=auth()) as c:
        native = c.post(f"/v1/models/{name}/predict", json={"inputs": x.tolist()}).raise_for_status().json()
    expected = (
        np.array([o["exit"] for o in native["outputs"]]),
        np.array([o["class"] for o in native["outputs"]]),
        np.array([o["confidence"] for o in native["outputs"]], np.float32),
    )
    for result in (binary, plain, over_grpc):
        for got, want in zip(answers(result), expected, strict=True):
            assert got.tolist() == want.tolist()
        assert result.as_numpy("probabilities").shape == (len(x), len(manifest.labels))
        labels = [b.decode() if isinstance(b, bytes) else b for b in result.as_numpy("label").tolist()]  # JSON: str
        assert labels == [manifest.labels[y] for y in expected[1]]
        logits = result.as_numpy("logits")
        assert (logits.argmax(axis=1) == expected[1]).all()
    assert binary.get_response()["model_version"] == "1" and over_grpc.get_response().model_version == "1"
    params, budget = binary.get_response()["parameters"], native["budget"]
    assert params["operating_point"] == budget["operating_point"] and params["rung"] == budget["rung"]
    guarantee = {k[len("guarantee_") :]: v for k, v in params.items() if k.startswith("guarantee_")}
    assert guarantee == (budget["guarantee"] or {})  # the guarantee, flattened into scalar parameters
    assert over_grpc.get_response().parameters["rung"].int64_param == budget["rung"]


def test_bytes_images_answer_as_png_uploads(http_client, grpc_client, server: Server, model, images) -> None:
    name, _ = model
    pngs = [encode(i) for i in images[:3]]
    with server.client(headers=auth()) as c:
        native = [
            c.post(f"/v1/models/{name}/predict", content=p, headers={"content-type": "image/png"})
            .raise_for_status()
            .json()["outputs"][0]
            for p in pngs
        ]
    for k, png in enumerate(pngs):
        for module, client in ((thttp, http_client), (tgrpc, grpc_client)):
            image = module.InferInput("image", [1], "BYTES")
            image.set_data_from_numpy(np.array([png], dtype=object))
            exits, classes, conf = answers(client.infer(name, [image], headers=auth()))
            assert (exits[0], classes[0], conf[0]) == (
                native[k]["exit"],
                native[k]["class"],
                np.float32(native[k]["confidence"]),
            )
    batch = thttp.InferInput("image", [3], "BYTES")
    batch.set_data_from_numpy(np.array(pngs, dtype=object))
    exits, classes, _ = answers(http_client.infer(name, [batch], headers=auth()))
    assert classes.tolist() == [n["class"] for n in native] and len(exits) == 3


def test_a_requested_subset_of_outputs(http_client, grpc_client, model, images) -> None:
    name, manifest = model
    x = tensors(images[:4], manifest)
    asked = [thttp.InferRequestedOutput("exit"), thttp.InferRequestedOutput("label", binary_data=False)]
    result = http_client.infer(name, [fp32_input(thttp, x)], outputs=asked, headers=auth())
    assert [o["name"] for o in result.get_response()["outputs"]] == ["exit", "label"]
    assert result.as_numpy("class") is None and result.as_numpy("exit").dtype == np.int32
    over_grpc = grpc_client.infer(
        name, [fp32_input(tgrpc, x)], outputs=[tgrpc.InferRequestedOutput("logits")], headers=auth()
    )
    assert [o.name for o in over_grpc.get_response().outputs] == ["logits"]
    assert over_grpc.as_numpy("logits").shape == (4, len(manifest.labels))


def test_budgets_in_parameters(http_client, grpc_client, model, images) -> None:
    name, manifest = model
    x, last = tensors(images[:16], manifest), len(manifest.exits) - 1
    for module, client in ((thttp, http_client), (tgrpc, grpc_client)):
        shallow = client.infer(name, [fp32_input(module, x)], parameters={"max_exit": 0}, headers=auth())
        assert (shallow.as_numpy("exit") == 0).all()
        full = client.infer(name, [fp32_input(module, x)], parameters={"max_accuracy_drop": 0.0}, headers=auth())
        assert (full.as_numpy("exit") == last).all()
        timed = client.infer(name, [fp32_input(module, x)], timeout=60_000_000, headers=auth())
        with pytest.raises(InferenceServerException, match="deadline"):
            client.infer(name, [fp32_input(module, x)], timeout=1, headers=auth())
    params = full.get_response().parameters
    assert params["source"].string_param == "request" and params["stages_run"].int64_param == len(manifest.exits)
    assert "rung" not in params  # a request's own target is no rung of the ladder
    assert params["guarantee_epsilon"].double_param == 0.0 and params["guarantee_n"].int64_param == 0  # full depth
    assert timed.get_response().parameters["deadline_missed"].bool_param is False
    with pytest.raises(InferenceServerException, match="max_exit") as e:
        http_client.infer(name, [fp32_input(thttp, x)], parameters={"max_exit": last + 1}, headers=auth())
    assert e.value.status() == "422"


def raw_infer(
    server: Server, name: str, header: dict, binary: bytes = b"", length: str | None = None
) -> httpx.Response:
    body = orjson.dumps(header)
    headers = {**auth(), "Inference-Header-Content-Length": length or str(len(body))} if binary or length else auth()
    with server.client() as c:
        return c.post(f"/v2/models/{name}/infer", content=body + binary, headers=headers)


def fp32_header(shape: list[int], size: int | None = None, datatype: str = "FP32", **extra: object) -> dict:
    params = {} if size is None else {"parameters": {"binary_data_size": size}}
    return {"inputs": [{"name": "input", "shape": shape, "datatype": datatype, **params}], **extra}


def test_bad_requests_get_a_4xx_with_a_message(server: Server, http_client, model, images) -> None:
    name, manifest = model
    shape = [1, *manifest.input.shape]
    one = tensors(images[:1], manifest).tobytes()
    cases = {
        "datatype mismatch": (fp32_header(shape, len(one), "FP64"), one, None, "must be FP32"),
        "shape mismatch": (fp32_header([1, 1, 28, 27], len(one)), one, None, "expected [N, 1, 28, 28]"),
        "data size mismatch": (fp32_header([2, *shape[1:]], len(one)), one, None, "takes 6272"),
        "binary_data_size beyond the body": (fp32_header(shape, len(one) + 100), one, None, "past the end"),
        "header length past the end": (fp32_header(shape, len(one)), one, "999999", "past the end"),
        "header length not a number": (fp32_header(shape, len(one)), one, "-3", "byte count"),
        "unknown output": (fp32_header(shape, len(one), outputs=[{"name": "nope"}]), one, None, "unknown output"),
        "unknown input": (
            {"inputs": [{"name": "x", "shape": shape, "datatype": "FP32", "data": [0]}]},
            b"",
            None,
            "unknown input",
        ),
        "unknown parameter": (
            fp32_header(shape, len(one), parameters={"max_acuracy_drop": 0}),
            one,
            None,
            "unknown parameters",
        ),
        "bad budget": (fp32_header(shape, len(one), parameters={"deadline_ms": -1}), one, None, "deadline_ms"),
        "bytes left over": (fp32_header(shape, len(one)), one + b"xx", None, "after the last tensor"),
        "no data": ({"inputs": [{"name": "input", "shape": shape, "datatype": "FP32"}]}, b"", None, "neither data"),
        "NaN": (fp32_header(shape, len(one)), np.full(784, np.nan, np.float32).tobytes(), None, "finite"),
        "classification": (
            fp32_header(shape, len(one), outputs=[{"name": "class", "parameters": {"classification": 3}}]),
            one,
            None,
            "not supported",
        ),
        "not an image": (
            {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 9}}]},
            struct.pack("<I", 5) + b"hello",
            None,
            "image",
        ),
        "BYTES length past the end": (
            {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 8}}]},
            struct.pack("<I", 500) + b"abcd",
            None,
            "runs past the end",
        ),
        "batch over the limit": (fp32_header([MAX_BATCH + 1, *shape[1:]], len(one)), one, None, "exceeds the limit"),
    }
    for case, (header, binary, length, message) in cases.items():
        r = raw_infer(server, name, header, binary, length)
        assert 400 <= r.status_code < 500, (case, r.status_code, r.text)
        assert message in r.json()["error"], (case, r.text)
    with server.client() as c:
        malformed = c.post(f"/v2/models/{name}/infer", content=b"{nope", headers=auth())
        assert malformed.status_code == 400 and "malformed JSON" in malformed.json()["error"]
        assert c.post(f"/v2/models/{name}/infer", content=b"{}").status_code == 401
        missing = c.post("/v2/models/no-such-model/infer", content=b"{}", headers=auth())
        assert missing.status_code == 404 and "no-such-model" in missing.json()["error"]
        assert c.get("/v2/nowhere").json()["error"] == "Not Found"
    with pytest.raises(InferenceServerException, match="unknown output"):
        http_client.infer(
            name,
            [fp32_input(thttp, tensors(images[:1], manifest))],
            outputs=[thttp.InferRequestedOutput("x")],
            headers=auth(),
        )
    assert http_client.is_server_live()
    assert http_client.infer(name, [fp32_input(thttp, tensors(images[:2], manifest))], headers=auth()).as_numpy(
        "class"
    ).shape == (2,)


def test_bad_grpc_requests_get_their_status_codes(server: Server, grpc_client, model, images) -> None:
    name, manifest = model
    x = tensors(images[:2], manifest)

    def code_of(call: object) -> grpc.StatusCode:
        with pytest.raises(InferenceServerException) as e:
            call()
        assert e.value.message()
        return e.value.status()

    wrong_type = tgrpc.InferInput("input", list(x.shape), "FP64")
    wrong_type.set_data_from_numpy(x.astype(np.float64))
    assert code_of(lambda: grpc_client.infer(name, [wrong_type], headers=auth())) == "StatusCode.INVALID_ARGUMENT"
    unknown = [tgrpc.InferRequestedOutput("nope")]
    assert (
        code_of(lambda: grpc_client.infer(name, [fp32_input(tgrpc, x)], outputs=unknown, headers=auth()))
        == "StatusCode.INVALID_ARGUMENT"
    )
    assert (
        code_of(lambda: grpc_client.infer("no-such-model", [fp32_input(tgrpc, x)], headers=auth()))
        == "StatusCode.NOT_FOUND"
    )
    assert code_of(lambda: grpc_client.infer(name, [fp32_input(tgrpc, x)])) == "StatusCode.UNAUTHENTICATED"
    assert (  # a 1 µs deadline: shorter than the first stage alone, so no answer could meet it
        code_of(lambda: grpc_client.infer(name, [fp32_input(tgrpc, x)], timeout=1, headers=auth()))
        == "StatusCode.INVALID_ARGUMENT"
    )
    huge = np.zeros((3000, *manifest.input.shape), np.float32)  # 9.4 MB, over the 8 MiB message limit
    assert (
        code_of(lambda: grpc_client.infer(name, [fp32_input(tgrpc, huge)], headers=auth()))
        == "StatusCode.RESOURCE_EXHAUSTED"
    )
    assert grpc_client.is_server_live()
    assert grpc_client.infer(name, [fp32_input(tgrpc, x)], headers=auth()).as_numpy("exit").shape == (2,)


def test_protocol_metrics_carry_the_version(server: Server) -> None:
    with server.client() as c:
        text = c.get("/metrics").text
    assert 'branchserve_requests_total{model="tiny",outcome="ok",version="1"}' in text
    assert 'branchserve_requests_total{model="tiny",outcome="bad_input",version="1"}' in text


def test_overload_refuses_oip_infers_over_rest_and_grpc(tiny_repo: Path, model) -> None:
    """More concurrent infers than admitted, over both OIP doors: REST gets 503 + Retry-After with
    {"error"} (from the connection itself at the door, or from admission), gRPC gets UNAVAILABLE;
    the rest are answered, and the overloaded counter adds up both."""
    name, manifest = model
    flags = ["--max-in-flight", "3", "--inference-threads", "1", "--log-level", "warning"]
    x = np.zeros((MAX_BATCH // 2, *manifest.input.shape), np.float32)
    head = orjson.dumps(fp32_header(list(x.shape), x.nbytes))
    with running_server(tiny_repo, *flags) as server:
        grpc_client = tgrpc.InferenceServerClient(server.grpc)

        def call(i: int) -> str:
            if i % 2:
                try:
                    grpc_client.infer(name, [fp32_input(tgrpc, x)])
                    return "OK"
                except InferenceServerException as e:
                    return e.status()
            with server.client() as c:
                r = c.post(
                    f"/v2/models/{name}/infer",
                    content=head + x.tobytes(),
                    headers={"Inference-Header-Content-Length": str(len(head))},
                )
            assert r.status_code == 200 or ("error" in r.json() and r.headers["retry-after"] == "1"), r.text
            return str(r.status_code)

        with ThreadPoolExecutor(12) as pool:
            outcomes = list(pool.map(call, range(48)))
        assert set(outcomes) <= {"200", "503", "OK", "StatusCode.UNAVAILABLE"}, outcomes
        refused = outcomes.count("503") + outcomes.count("StatusCode.UNAVAILABLE")
        assert refused and outcomes.count("200") + outcomes.count("OK")
        with server.client() as c:
            text = c.get("/metrics").text
        assert f'branchserve_requests_total{{model="{name}",outcome="overloaded",version="1"}} {refused:.1f}' in text
        assert grpc_client.is_server_live()
        grpc_client.close()
        assert "Traceback" not in server.log_text()
