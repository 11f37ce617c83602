"""The shipped model, served from the repository's own `models/`, reproduces what its export measured.

All 10k Fashion-MNIST test images go through the real server (JSON batches, to stay fast) at the
default operating point and at full depth; accuracy and exit fractions must match the manifest's
test figures, which export computed offline with the same thresholds.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
from serving import Server, running_server, sample_images

REPO = Path(__file__).resolve().parents[1] / "models"
MODEL = "fmnist-resnet"
BATCH = 256


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with running_server(REPO, "--ladder", "{}", "--log-level", "warning") as s:  # the manifest's own point
        yield s


def serve_all(client: httpx.Client, x: np.ndarray, budget: dict) -> tuple[np.ndarray, np.ndarray]:
    classes, exits = [], []
    for start in range(0, len(x), BATCH):
        doc = orjson.dumps({"inputs": x[start : start + BATCH].tolist(), "budget": budget})
        for _ in range(5):  # on a busy host admission may shed a large batch: retry as Retry-After says
            r = client.post(f"/v1/models/{MODEL}/predict", content=doc, headers={"content-type": "application/json"})
            if r.status_code != 503:
                break
            time.sleep(float(r.headers["retry-after"]) / 10)
        outputs = r.raise_for_status().json()["outputs"]
        classes += [o["class"] for o in outputs]
        exits += [o["exit"] for o in outputs]
    return np.array(classes), np.array(exits)


def test_shipped_model_reproduces_its_manifest(server: Server) -> None:
    with server.client() as client:
        meta = client.get(f"/v1/models/{MODEL}").raise_for_status().json()
        spec = meta["input"]
        images, labels = sample_images(10_000)
        x = ((images.astype(np.float32) * spec["scale"] - spec["mean"]) / spec["std"]).reshape(-1, *spec["shape"])
        default = next(p for p in meta["frontier"] if p["name"] == meta["operating_point"]["name"])
        classes, exits = serve_all(client, x, {})
        full_classes, full_exits = serve_all(client, x, {"max_accuracy_drop": 0})
    n_exits = len(meta["exits"])
    assert (full_exits == n_exits - 1).all()
    assert (full_classes == labels).mean() == pytest.approx(meta["exits"][-1]["test_accuracy"], abs=0.001)
    assert (classes == labels).mean() == pytest.approx(default["test_accuracy"], abs=0.001)
    fractions = np.bincount(exits, minlength=n_exits) / len(exits)
    np.testing.assert_allclose(fractions, default["test_exit_fractions"], atol=0.002)
    assert (exits < n_exits - 1).mean() > 0.5  # most inputs leave early at the default point
