"""Every front door gives the same answers: the 10k Fashion-MNIST test images through the native API,
OIP REST (binary tensors and JSON) and OIP gRPC, at the server's operating point.

    python bench/protocol_agreement.py                    # starts `branchserve serve` on models/ (≈ 2 min)
    python bench/protocol_agreement.py --limit 1000 --batch 50

Tensors (FP32, batches of --batch, the same batches through every door): native JSON, OIP REST
binary (tritonclient.http's default), OIP REST JSON, OIP gRPC (tritonclient.grpc). Images (one per
request): native PNG upload, OIP REST BYTES, OIP gRPC BYTES. Within each group every door must give
exactly the same exit, class and confidence (float32 bit for bit) for every image; prints JSON and
PASS/FAIL, exits 1 on a mismatch. The server's admission is made patient so that a busy host sheds
nothing (the doors are compared, not the shedding).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from PIL import Image

from branchserve.fmnist import read_split
from branchserve.loadtest.servers import branchserve_cmd, free_port, started_server
from branchserve.repo.imaging import image_to_input
from branchserve.repo.loading import load_repository

ROOT = Path(__file__).resolve().parents[1]
PATIENT = ["--max-wait-ms", "5000", "--queue-target-ms", "5000"]
OUTPUTS = ("exit", "class", "confidence")

Answers = tuple[np.ndarray, np.ndarray, np.ndarray]  # exit, class, confidence (float32)


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def native_json(client: httpx.Client, model: str, x: np.ndarray) -> Answers:
    r = client.post(f"/v1/models/{model}/predict", json={"inputs": x.tolist()}).raise_for_status().json()
    assert r["budget"]["source"] == "server", r["budget"]
    return native_answers(r["outputs"])


def native_png(client: httpx.Client, model: str, body: bytes) -> Answers:
    r = client.post(f"/v1/models/{model}/predict", content=body, headers={"content-type": "image/png"})
    return native_answers(r.raise_for_status().json()["outputs"])


def native_answers(outputs: list[dict]) -> Answers:
    return (
        np.array([o["exit"] for o in outputs]),
        np.array([o["class"] for o in outputs]),
        np.array([o["confidence"] for o in outputs], np.float32),
    )


def oip(client: object, module: object, model: str, tensor: object, binary: bool = True) -> Answers:
    if module is thttp:
        outputs = [thttp.InferRequestedOutput(o, binary_data=binary) for o in OUTPUTS]
    else:
        outputs = [tgrpc.InferRequestedOutput(o) for o in OUTPUTS]
    result = client.infer(model, [tensor], outputs=outputs)
    source = result.get_response()["parameters"]["source"] if module is thttp else None
    assert source in (None, "server"), source
    return result.as_numpy("exit"), result.as_numpy("class"), result.as_numpy("confidence").astype(np.float32)


def fp32(module: object, x: np.ndarray, binary: bool = True) -> object:
    tensor = module.InferInput("input", list(x.shape), "FP32")
    return tensor.set_data_from_numpy(x, binary_data=binary) if module is thttp else tensor.set_data_from_numpy(x)


def image(module: object, body: bytes) -> object:
    return module.InferInput("image", [1], "BYTES").set_data_from_numpy(np.array([body], dtype=object))


def compare(doors: dict[str, list[Answers]], labels: np.ndarray) -> dict[str, object]:
    """Each door against the first, element by element; and each door's accuracy."""
    joined = {
        name: tuple(np.concatenate(part) for part in zip(*answers, strict=True)) for name, answers in doors.items()
    }
    reference_name, reference = next(iter(joined.items()))
    report: dict[str, object] = {}
    for name, (exits, classes, conf) in joined.items():
        report[name] = {
            "images": len(classes),
            "accuracy": float((classes == labels[: len(classes)]).mean()),
            f"differs_from_{reference_name}": {
                "exit": int((exits != reference[0]).sum()),
                "class": int((classes != reference[1]).sum()),
                "confidence": int((conf != reference[2]).sum()),
            },
        }
    return report


def run(url: str, grpc_url: str, model: str, manifest: object, limit: int, batch: int) -> dict[str, object]:
    images, labels = read_split("test")
    images, labels = images[:limit], labels[:limit]
    x = np.stack([image_to_input(Image.fromarray(i), manifest.input) for i in images])  # as a PNG upload makes them
    http_client = thttp.InferenceServerClient(url.removeprefix("http://"))
    grpc_client = tgrpc.InferenceServerClient(grpc_url)
    tensor_doors: dict[str, Callable[[np.ndarray], Answers]] = {
        "native JSON": lambda b: native_json(native, model, b),
        "OIP REST binary": lambda b: oip(http_client, thttp, model, fp32(thttp, b)),
        "OIP REST JSON": lambda b: oip(http_client, thttp, model, fp32(thttp, b, binary=False), binary=False),
        "OIP gRPC": lambda b: oip(grpc_client, tgrpc, model, fp32(tgrpc, b)),
    }
    image_doors: dict[str, Callable[[bytes], Answers]] = {
        "native PNG": lambda p: native_png(native, model, p),
        "OIP REST BYTES": lambda p: oip(http_client, thttp, model, image(thttp, p)),
        "OIP gRPC BYTES": lambda p: oip(grpc_client, tgrpc, model, image(tgrpc, p)),
    }
    t0 = time.perf_counter()
    with httpx.Client(base_url=url, timeout=60) as native:
        tensors = {
            name: [door(x[s : s + batch]) for s in range(0, limit, batch)] for name, door in tensor_doors.items()
        }
        bodies = [png(i) for i in images]
        pictures = {name: [door(b) for b in bodies] for name, door in image_doors.items()}
    return {
        "images": limit,
        "batch": batch,
        "seconds": round(time.perf_counter() - t0, 1),
        "tensors": compare(tensors, labels),
        "images_one_per_request": compare(pictures, labels),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=ROOT / "models")
    parser.add_argument("--limit", type=int, default=10_000, help="test images to send (default all 10,000)")
    parser.add_argument("--batch", type=int, default=100, help="images per tensor request (default 100)")
    parser.add_argument("--out", type=Path, help="also write the JSON report here")
    args = parser.parse_args()
    ((manifest, _),) = load_repository(args.repository).values()
    port, grpc_port = free_port(), free_port()
    cmd = branchserve_cmd(args.repository, port, "--grpc-port", str(grpc_port), "--log-level", "warning", *PATIENT)
    with tempfile.TemporaryDirectory() as tmp, started_server(cmd, port, Path(tmp) / "server.log") as server:
        report = run(server.url, f"127.0.0.1:{grpc_port}", manifest.name, manifest, args.limit, args.batch)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    mismatches = sum(
        sum(door[key].values())
        for group in ("tensors", "images_one_per_request")
        for door in report[group].values()
        for key in door
        if key.startswith("differs_from_")
    )
    print("PASS: every door agrees exactly" if mismatches == 0 else f"FAIL: {mismatches} differences")
    sys.exit(1 if mismatches else 0)


if __name__ == "__main__":
    main()
