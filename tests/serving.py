"""Helpers for the server tests: a real `branchserve serve` subprocess on a free port, and test images."""

from __future__ import annotations

import io
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from branchserve.fmnist import read_split
from branchserve.loadtest.servers import branchserve_cmd, free_port, started_server

TOLERANT = {"BRANCHSERVE_MAX_WAIT_MS": "2000", "BRANCHSERVE_QUEUE_TARGET_MS": "1000", "BRANCHSERVE_WORKERS": "1"}
"""Tests share a 2-core box with their own clients: a 15 ms stall is a hiccup there, not overload;
and one worker process unless a test asks for more. Tests of admission and workers pass their own
flags (flags win over these variables)."""


@dataclass
class Server:
    url: str
    log: Path
    grpc: str  # host:port of the OIP gRPC service
    pid: int

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)

    def log_text(self) -> str:
        return self.log.read_text()


@contextmanager
def running_server(repo: Path, *flags: str, env: dict[str, str] | None = None) -> Iterator[Server]:
    """`branchserve serve` in a subprocess, its gRPC service on a free port too, yielded once
    /v2/health/ready answers 200."""
    port, grpc_port = free_port(), free_port()
    while grpc_port == port:
        grpc_port = free_port()
    cmd = branchserve_cmd(repo, port, "--grpc-port", str(grpc_port), *flags)
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        with started_server(cmd, port, log, {**TOLERANT, **(env or {})}, timeout_s=120) as server:
            yield Server(server.url, log, f"127.0.0.1:{grpc_port}", server.pid)


def sample_images(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first n Fashion-MNIST test images (uint8, (n, 28, 28)) and labels."""
    images, labels = read_split("test")
    return images[:n], labels[:n]


def encode(image: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt)
    return buf.getvalue()


def metric_samples(client: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a live /metrics scrape, keyed by name and sorted labels."""
    text = client.get("/metrics").raise_for_status().text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
