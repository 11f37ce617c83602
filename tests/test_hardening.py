"""The server's edges, as a hostile or careless client meets them: image formats, strict numbers,
oversized headers, slow and vanishing clients, admin and API-key access. Each case gets its
documented 4xx, never a 5xx, and the server stays live and logs no traceback."""

from __future__ import annotations

import io
import socket
import struct
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
from PIL import Image
from serving import Server, encode, running_server, sample_images

ADMIN_TOKEN = "a-long-enough-admin-token-ü"  # non-ASCII on purpose: it must compare as bytes
KEYS = ("key-one", "key-two")


def other_format(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB" if fmt in ("ICO", "EPS") else "L", (28, 28)).save(buf, fmt)
    return buf.getvalue()


def ico_claiming(side: int) -> bytes:
    """An ICO whose directory claims `side`×`side` pixels around a small embedded PNG (Pillow decodes
    it inside Image.open; 20 of these once held the event loop for 3 s)."""
    png = encode(np.zeros((side if side < 256 else 64, 64), np.uint8))
    entry = struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 22)
    return struct.pack("<HHH", 0, 1, 1) + entry + png


def lab_tiff() -> bytes:
    buf = io.BytesIO()
    Image.new("LAB", (28, 28)).save(buf, "TIFF")
    return buf.getvalue()


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "api-keys.txt"
    path.write_text("# one key per line\nfile-key-1\n")
    return path


@pytest.fixture(scope="module")
def server(tiny_repo: Path, keys_file: Path) -> Iterator[Server]:
    flags = ["--log-level", "warning", "--request-timeout-s", "1", "--max-header-bytes", "4096"]
    env = {
        "BRANCHSERVE_ADMIN_TOKEN": ADMIN_TOKEN,
        "BRANCHSERVE_API_KEYS": ",".join(KEYS),
        "BRANCHSERVE_API_KEYS_FILE": str(keys_file),
    }
    with running_server(tiny_repo, *flags, env=env) as s:
        yield s
        log = s.log_text()
    assert "Traceback" not in log and "unhandled error" not in log, log


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with server.client(headers={"authorization": f"Bearer {KEYS[0]}"}) as c:
        yield c


@pytest.fixture(scope="module")
def model(client: httpx.Client) -> str:
    name: str = client.get("/v1/models").raise_for_status().json()[0]["name"]
    return name


def outcome(client: httpx.Client, model: str, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f'branchserve_requests_total{{model="{model}",outcome="{name}",version="1"}}'):
            return float(line.split()[-1])
    raise AssertionError(f"no {name} series")


PNG = {"content-type": "image/png"}
FORMATS = ["GIF", "BMP", "TIFF", "WEBP", "ICO", "JPEG2000", "PPM", "TGA", "PCX", "SGI", "DDS", "EPS"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_other_image_formats_are_refused_before_any_decoder(client: httpx.Client, model: str, fmt: str) -> None:
    r = client.post(f"/v1/models/{model}/predict", content=other_format(fmt), headers=PNG)
    assert r.status_code == 400 and "accepted format (PNG, JPEG)" in r.json()["detail"]
    assert (
        client.post(f"/v1/models/{model}/predict", content=b"x", headers={"content-type": "image/gif"}).status_code
        == 415
    )


def test_an_ico_claiming_a_huge_image_is_refused_without_decoding(client: httpx.Client, model: str) -> None:
    bombs = [ico_claiming(11000) for _ in range(20)]
    started = time.perf_counter()
    for body in bombs:
        assert client.post(f"/v1/models/{model}/predict", content=body, headers=PNG).status_code == 400
    assert client.get("/v2/health/live").status_code == 200
    assert time.perf_counter() - started < 2.0  # 20 of them once cost 3 s of event loop


def test_lab_tiff_and_odd_png_modes(client: httpx.Client, model: str) -> None:
    assert client.post(f"/v1/models/{model}/predict", content=lab_tiff(), headers=PNG).status_code == 400
    for mode in ("1", "LA", "P", "RGBA", "I;16"):
        buf = io.BytesIO()
        Image.new(mode, (28, 28)).save(buf, "PNG")
        r = client.post(f"/v1/models/{model}/predict", content=buf.getvalue(), headers=PNG)
        assert r.status_code == 200, (mode, r.text)


@pytest.mark.parametrize(
    "budget",
    [{"deadline_ms": True}, {"max_accuracy_drop": False}, {"max_exit": True}, {"max_exit": 1.0}, {"deadline_ms": "5"}],
)
def test_booleans_and_strings_are_not_numbers(client: httpx.Client, model: str, budget: dict[str, object]) -> None:
    body = orjson.dumps({"inputs": [0.0] * 784, "budget": budget})
    r = client.post(f"/v1/models/{model}/predict", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422 and next(iter(budget)) in r.json()["detail"]


def test_admin_policy_is_strict_too(client: httpx.Client, model: str) -> None:
    admin = {"authorization": f"Bearer {ADMIN_TOKEN}".encode()}
    path = f"/v1/models/{model}/operating-point"
    assert client.put(path, json={"max_accuracy_drop": False}, headers=admin).status_code == 422
    assert client.put(path, json={"latency_budget_ms": True}, headers=admin).status_code == 422
    assert client.put(path, json={}, headers=admin).status_code == 200  # the non-ASCII token works


def test_truncated_multipart_is_a_400(client: httpx.Client, model: str) -> None:
    head = b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
    body = head + encode(sample_images(1)[0][0])[:50]
    r = client.post(
        f"/v1/models/{model}/predict", content=body, headers={"content-type": "multipart/form-data; boundary=B"}
    )
    assert r.status_code == 400 and "truncated" in r.json()["detail"]


def test_head_on_health_routes(server: Server) -> None:
    with server.client() as c:
        for path in ("/v2/health/live", "/v2/health/ready"):
            r = c.head(path)
            assert r.status_code == 200 and r.content == b""


def test_api_keys_guard_inference_and_rotate_without_restart(server: Server, model: str, keys_file: Path) -> None:
    png = encode(sample_images(1)[0][0])
    with server.client() as anonymous:
        for path, call in (("/v1/models", anonymous.get), (f"/v1/models/{model}", anonymous.get)):
            r = call(path)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        r = anonymous.post(f"/v1/models/{model}/predict", content=png, headers=PNG)
        assert r.status_code == 401
        for wrong in ("Bearer nope", "Bearer ключ", "Basic a2V5LW9uZQ==", "Bearer"):
            headers = {**PNG, "authorization": wrong.encode()}
            assert anonymous.post(f"/v1/models/{model}/predict", content=png, headers=headers).status_code == 401
        for key in (*KEYS, "file-key-1"):
            headers = {**PNG, "authorization": f"Bearer {key}"}
            assert anonymous.post(f"/v1/models/{model}/predict", content=png, headers=headers).status_code == 200
        keys_file.write_text("file-key-2\n")  # rotate: the old file key goes, a new one comes
        time.sleep(1.2)
        rotated = {**PNG, "authorization": "Bearer file-key-2"}
        assert anonymous.post(f"/v1/models/{model}/predict", content=png, headers=rotated).status_code == 200
        retired = {**PNG, "authorization": "Bearer file-key-1"}
        assert anonymous.post(f"/v1/models/{model}/predict", content=png, headers=retired).status_code == 401
        assert anonymous.get("/v2/health/ready").status_code == 200 and anonymous.get("/metrics").status_code == 200


def raw(server: Server) -> socket.socket:
    port = httpx.URL(server.url).port
    assert port is not None
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def write_calls(pid: int) -> int:
    """Write system calls a process has made so far (libuv sends with write(2))."""
    fields = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return int(fields["syscw"])


def test_a_response_is_one_write_and_heads_still_go(server: Server, model: str) -> None:
    """Head and body go in one write (transport.HeadWithBody; uvicorn alone makes two): 50 answers
    cost the server about 50 write calls. A HEAD answer's head still goes (when the response
    completes), a 100 Continue still comes before the body is sent, and two pipelined requests get
    two whole answers in order."""
    png = encode(sample_images(1)[0][0])
    auth = f"Authorization: Bearer {KEYS[0]}\r\n"
    post = f"POST /v1/models/{model}/predict HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: image/png\r\n"
    request = f"{post}Content-Length: {len(png)}\r\n\r\n".encode() + png
    with raw(server) as sock:
        sock.sendall(request)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        before = write_calls(server.pid)
        for _ in range(50):
            sock.sendall(request)
            answer = sock.recv(65536)
            while not answer.endswith(b"}"):
                answer += sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 200 ")
        assert write_calls(server.pid) - before <= 55
        sock.sendall(b"HEAD /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        sock.sendall(f"{post}Content-Length: {len(png)}\r\nExpect: 100-continue\r\n\r\n".encode())
        assert sock.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(png)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n" * 2)
        answers = b""
        while answers.count(b'{"live":true}') < 2:
            answers += sock.recv(65536)
        assert answers.count(b"HTTP/1.1 200 ") == 2


def test_oversized_headers_get_431(server: Server, model: str) -> None:
    with raw(server) as sock:
        sock.sendall(f"GET /v1/models/{model} HTTP/1.1\r\nHost: x\r\nX-Big: {'a' * 5000}\r\n\r\n".encode())
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 431 ") and b"exceed 4096 bytes" in answer


def test_slow_and_vanishing_clients(server: Server, client: httpx.Client, model: str) -> None:
    """A body that never finishes gets 408 after the request timeout; a client that leaves mid-body
    is counted as disconnected; neither logs a traceback, and nobody else notices."""
    timed_out, disconnected = outcome(client, model, "timed_out"), outcome(client, model, "disconnected")
    head = f"POST /v1/models/{model}/predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEYS[0]}\r\n"
    with raw(server) as slow, raw(server) as gone:
        for sock in (slow, gone):
            sock.sendall((head + "Content-Type: image/png\r\nContent-Length: 1000\r\n\r\n").encode() + b"\x89PNG")
        time.sleep(0.2)
        gone.close()
        png = encode(sample_images(1)[0][0])
        assert client.post(f"/v1/models/{model}/predict", content=png, headers=PNG).status_code == 200
        answer = read_all(slow)
    assert answer.startswith(b"HTTP/1.1 408 ") and b"not received within 1 s" in answer
    time.sleep(0.2)
    assert outcome(client, model, "timed_out") == timed_out + 1
    assert outcome(client, model, "disconnected") == disconnected + 1
    with raw(server) as idle:  # a connection that never sends a byte is closed too
        assert read_all(idle).startswith(b"HTTP/1.1 408 ")


def test_admin_is_disabled_without_a_token(tiny_repo: Path) -> None:
    with running_server(tiny_repo, "--log-level", "info") as s, s.client() as c:
        name = c.get("/v1/models").json()[0]["name"]
        r = c.put(f"/v1/models/{name}/operating-point", json={}, headers={"authorization": "Bearer anything"})
        assert r.status_code == 403 and "BRANCHSERVE_ADMIN_TOKEN" in r.json()["detail"]
        assert "admin endpoints disabled" in s.log_text()


@pytest.mark.parametrize(("token", "shown"), [("", "at least 16 characters"), ("short-secret", "at least 16")])
def test_weak_admin_tokens_stop_the_server_and_are_never_printed(tiny_repo: Path, token: str, shown: str) -> None:
    with (
        pytest.raises(RuntimeError, match=shown) as e,
        running_server(tiny_repo, env={"BRANCHSERVE_ADMIN_TOKEN": token}),
    ):
        pass
    assert (token or "''") not in str(e.value).replace(shown, "")


def test_requests_that_would_wait_too_long_are_refused_fast(tiny_repo: Path) -> None:
    """With a 2 ms wait allowed, 16 clients at once overload the server: some requests are refused
    (at the door or when their turn comes), every refusal is a 503 with Retry-After and says why,
    the answered ones were served, and the server is healthy afterwards."""
    flags = ["--max-wait-ms", "2", "--queue-target-ms", "1", "--queue-interval-ms", "20", "--log-level", "warning"]
    with running_server(tiny_repo, *flags) as s, s.client() as c:
        model = c.get("/v1/models").json()[0]["name"]
        png = encode(sample_images(1)[0][0])

        def burst(_: int) -> list[httpx.Response]:
            with s.client() as own:
                return [own.post(f"/v1/models/{model}/predict", content=png, headers=PNG) for _ in range(20)]

        with ThreadPoolExecutor(16) as pool:
            answers = [r for batch in pool.map(burst, range(16)) for r in batch]
        statuses = {r.status_code for r in answers}
        refused = [r for r in answers if r.status_code == 503]
        assert statuses == {200, 503}, statuses
        assert all(r.headers["retry-after"] == "1" and "overloaded" in r.json()["detail"] for r in refused)
        metrics = c.get("/metrics").text
        assert (
            f'branchserve_requests_total{{model="{model}",outcome="overloaded",version="1"}} {float(len(refused))}'
            in metrics
        )
        assert c.post(f"/v1/models/{model}/predict", content=png, headers=PNG).status_code == 200
        assert "Traceback" not in s.log_text()
