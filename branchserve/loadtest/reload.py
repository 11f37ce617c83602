"""Reload under load: open-loop traffic while a new model version is loaded (and the old one unloaded
by the version policy), then a deliberately corrupt version is refused. Standard library and numpy.

    python -m branchserve.loadtest.reload --url http://127.0.0.1:8000 --repository REPO --token TOKEN --rate 300

The traffic alternates native PNG requests and OIP REST requests with a BYTES image, so both front
doors swap; every answer must be a 200 that names the version that answered it. The server must
serve REPO with the default version policy (latest 1) and the admin token TOKEN; the scenario adds
version folders to REPO/<model>/ itself (copies of the highest one, the corrupt one with a flipped
byte in a stage graph so its sha256 no longer matches).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

from branchserve.loadtest.openloop import Outcome, request_bytes, run
from branchserve.loadtest.samples import sample_pngs
from branchserve.repo.loading import version_dirs

MANIFEST = "manifest.json"


def copy_version(src: Path, version: int) -> Path:
    """Publish a copy of version folder `src` beside it as `version` (its manifest says so); written under
    a dotted name and renamed, so the server never sees half a version."""
    dest, staging = src.parent / str(version), src.parent / f".{version}.staging"
    shutil.copytree(src, staging)
    manifest = json.loads((staging / MANIFEST).read_text())
    manifest["version"] = version
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
    staging.rename(dest)
    return dest


def corrupt_version(src: Path, version: int) -> Path:
    """As `copy_version`, with one byte of the first stage graph flipped: its hash check must fail."""
    dest = copy_version(src, version)
    stage = dest / json.loads((dest / MANIFEST).read_text())["stages"][0]["file"]
    data = bytearray(stage.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stage.write_bytes(bytes(data))
    return dest


def traffic(host: str, model: str, seed: int = 0) -> list[bytes]:
    """Native PNG predicts and OIP BYTES infers, alternating, over the shipped sample images."""
    requests = []
    for png in sample_pngs():
        requests.append(request_bytes(host, f"/v1/models/{model}/predict", png, "image/png"))
        header = {
            "inputs": [
                {"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 4 + len(png)}}
            ],
            "outputs": [{"name": "class"}],
        }
        head = json.dumps(header).encode()
        body = head + len(png).to_bytes(4, "little") + png
        length = {"Inference-Header-Content-Length": str(len(head))}
        requests.append(request_bytes(host, f"/v2/models/{model}/infer", body, "application/octet-stream", length))
    random.Random(seed).shuffle(requests)
    return requests


def answered_by(body: bytes) -> str | None:
    """The version a native or OIP answer names, or None."""
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    version = doc.get("version", doc.get("model_version")) if isinstance(doc, dict) else None
    return None if version is None else str(version)


def admin_post(
    url: str, path: str, token: str, body: dict[str, object] | None = None
) -> tuple[int, dict[str, object], float]:
    """(status, JSON answer, seconds) of an admin POST."""
    request = urllib.request.Request(
        url + path,
        json.dumps(body or {}).encode(),
        {"authorization": f"Bearer {token}", "content-type": "application/json"},
    )
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read()), time.perf_counter() - t0
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), time.perf_counter() - t0


def scenario(
    url: str, repository: Path, model: str, token: str, rate: float, duration_s: float, connections: int = 64
) -> dict[str, object]:
    """Load at `rate` for `duration_s`: at 25 % of it load a copy of the highest version as the next
    version, at 60 % a corrupt one after it; report statuses, versions answering and the two loads."""
    model_dir = repository / model
    first = max(version_dirs(model_dir))
    host_port = url.split("://", 1)[-1].rstrip("/")
    host, _, port = host_port.partition(":")
    outcome: list[Outcome] = []
    load = threading.Thread(
        target=lambda: outcome.append(
            asyncio.run(
                run(host, int(port), traffic(host_port, model), rate, duration_s, connections, keep_bodies=True)
            )
        )
    )
    t0 = time.perf_counter()
    load.start()
    time.sleep(0.25 * duration_s)
    copy_version(model_dir / str(first), first + 1)
    status, swap, swap_s = admin_post(url, f"/v2/repository/models/{model}/load", token)
    swap_done = time.perf_counter() - t0
    time.sleep(max(0.6 * duration_s - swap_done, 0))
    corrupt_version(model_dir / str(first), first + 2)
    bad_status, refused, _ = admin_post(url, f"/v2/repository/models/{model}/load", token)
    load.join()
    (out,) = outcome
    versions = [answered_by(b) for b in out.bodies or []]
    by_time = sorted(zip(out.scheduled, versions, out.status, strict=True))
    return {
        "offered_rps": rate,
        "duration_s": duration_s,
        "requests": len(out.status),
        "statuses": dict(Counter(out.status)),
        "failed": sum(s != 200 for s in out.status),
        "answers_naming_no_version": sum(v is None for v in versions),
        "answered_by": dict(Counter(v for v in versions if v is not None)),
        "failed_at_s": [round(t - by_time[0][0], 2) for t, _, status in by_time if status != 200],
        "old_version_last_answered_at_s": max(
            (t - by_time[0][0] for t, v, _ in by_time if v == str(first)), default=None
        ),
        "load": {"status": status, "answer": swap, "seconds": round(swap_s, 3), "done_at_s": round(swap_done, 2)},
        "corrupt_load": {"status": bad_status, "answer": refused},
        "ok_p99_ms": out.summary(rate, duration_s)["ok_p99_ms"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--repository", type=Path, required=True, help="the repository the server serves")
    parser.add_argument("--model", default="fmnist-resnet")
    parser.add_argument("--token", required=True, help="the server's admin token")
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load (default 20)")
    args = parser.parse_args()
    print(json.dumps(scenario(args.url, args.repository, args.model, args.token, args.rate, args.duration), indent=2))


if __name__ == "__main__":
    main()
