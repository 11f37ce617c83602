"""Server CPU per request by front door, side by side on one server: the native API (PNG upload, JSON
tensors), OIP REST (binary FP32 tensors, as tritonclient.http sends them, and JSON) and OIP gRPC (raw
FP32 contents, as tritonclient.grpc sends them), at batch 1 and 32.

    python bench/protocol_cpu.py --repeats 3 --requests 1000

One client sends prebuilt requests one after another (HTTP/1.1 keep-alive, or one gRPC channel),
so nothing queues and the figure is the request path's own cost; the kinds take turns within each
repeat, so a noisy neighbour slows them alike. CPU is the server process's utime + stime from
/proc (the client's is not in it). Native PNG exists at batch 1 only: an upload is one image.
Requests use the server's operating point, so every kind runs the same stages on the same images.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
from PIL import Image
from tritonclient.grpc import service_pb2, service_pb2_grpc

from branchserve.loadtest.samples import sample_pngs
from branchserve.loadtest.servers import branchserve_cmd, cpu_seconds, free_port, started_server
from branchserve.repo.imaging import image_to_input
from branchserve.repo.loading import load_repository

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 200
HEADER_LENGTH = "Inference-Header-Content-Length"

Send = Callable[[int], None]


def http_sender(port: int, path: str, bodies: list[bytes], headers: list[dict[str, str]]) -> Send:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def send(i: int) -> None:
        if i == 0:  # a new block: the server closes keep-alive connections idle for request_timeout_s
            connection.close()
        connection.request("POST", path, bodies[i % len(bodies)], headers[i % len(headers)])
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            raise SystemExit(f"{path}: HTTP {response.status}")

    return send


def oip_binary(x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """The body and headers tritonclient.http makes of an FP32 input by default."""
    header = {
        "inputs": [
            {"name": "input", "shape": list(x.shape), "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}}
        ],
        "parameters": {"binary_data_output": True},
    }
    head = json.dumps(header).encode()
    return head + x.tobytes(), {HEADER_LENGTH: str(len(head))}


def oip_json(x: np.ndarray) -> bytes:
    return json.dumps(
        {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    ).encode()


def grpc_sender(target: str, model: str, xs: list[np.ndarray]) -> Send:
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(target))
    requests = []
    for x in xs:
        r = service_pb2.ModelInferRequest(model_name=model)
        r.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
        r.raw_input_contents.append(x.tobytes())
        requests.append(r)

    def send(i: int) -> None:
        stub.ModelInfer(requests[i % len(requests)], timeout=30)

    return send


def kinds(port: int, grpc_target: str, model: str, pngs: list[bytes], x: np.ndarray) -> dict[str, tuple[Send, int]]:
    """name → (send, inputs per request)."""
    native, infer = f"/v1/models/{model}/predict", f"/v2/models/{model}/infer"
    out: dict[str, tuple[Send, int]] = {
        "native PNG, batch 1": (http_sender(port, native, pngs, [{"content-type": "image/png"}]), 1)
    }
    for n in (1, 32):
        batches = [x[s : s + n] for s in range(0, len(x) - n + 1, n)][:64]
        json_bodies = [json.dumps({"inputs": b.tolist()}).encode() for b in batches]
        out[f"native JSON, batch {n}"] = (
            http_sender(port, native, json_bodies, [{"content-type": "application/json"}]),
            n,
        )
        binary = [oip_binary(b) for b in batches]
        out[f"OIP REST binary FP32, batch {n}"] = (
            http_sender(port, infer, [b for b, _ in binary], [h for _, h in binary]),
            n,
        )
        out[f"OIP REST JSON FP32, batch {n}"] = (http_sender(port, infer, [oip_json(b) for b in batches], [{}]), n)
        out[f"OIP gRPC FP32, batch {n}"] = (grpc_sender(grpc_target, model, batches), n)
    return out


def measure(pid: int, send: Send, n: int) -> float:
    """Server CPU ms per request over n requests, after a warm-up."""
    for i in range(WARMUP):
        send(i)
    cpu0 = cpu_seconds(pid)
    for i in range(n):
        send(i)
    return 1e3 * (cpu_seconds(pid) - cpu0) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=ROOT / "models")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests", type=int, default=1000, help="requests per kind and repeat (batch 32: a quarter)")
    parser.add_argument("--out", type=Path, help="also write the JSON report here")
    args = parser.parse_args()
    ((manifest, _),) = load_repository(args.repository).values()
    pngs = sample_pngs()
    x = np.stack([image_to_input(Image.open(io.BytesIO(p)), manifest.input) for p in pngs])
    port, grpc_port = free_port(), free_port()
    patient = ["--max-wait-ms", "5000", "--queue-target-ms", "5000"]  # a busy host must not make it shed
    cmd = branchserve_cmd(args.repository, port, "--grpc-port", str(grpc_port), "--log-level", "warning", *patient)
    results: dict[str, list[float]] = {}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp, started_server(cmd, port, Path(tmp) / "server.log") as server:
        senders = kinds(port, f"127.0.0.1:{grpc_port}", manifest.name, pngs, x)
        for r in range(args.repeats):
            for name, (send, batch) in senders.items():
                ms = measure(server.pid, send, args.requests if batch == 1 else max(args.requests // 4, 50))
                results.setdefault(name, []).append(ms)
                print(f"repeat {r}: {name}: {ms:.3f} ms CPU per request", flush=True)
    medians = {name: float(np.median(v)) for name, v in results.items()}
    png_ms = medians["native PNG, batch 1"]
    report = {
        "host_load_average": {"before": load_before, "after": os.getloadavg()},
        "repeats": args.repeats,
        "cpu_ms_per_request": {
            name: {"median": round(ms, 3), "runs": [round(v, 3) for v in results[name]]} for name, ms in medians.items()
        },
    }
    print(f"\nmedians over {args.repeats} repeats (load average {load_before[0]:.2f} → {os.getloadavg()[0]:.2f}):")
    for name, ms in medians.items():
        batch = senders[name][1]
        print(f"  {name:32s} {ms:7.3f} ms/request  {ms / batch:6.3f} ms/input  {ms / png_ms:5.2f}× native PNG")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
