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


@dataclass
class Server:
    url: str
    log: Path

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)

    def log_text(self) -> str:
        return self.log.read_text()


@contextmanager
def running_server(repo: Path, *flags: str, env: dict[str, str] | None = None) -> Iterator[Server]:
    """`branchserve serve` in a subprocess, yielded once /v2/health/ready answers 200."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        with started_server(branchserve_cmd(repo, port, *flags), port, log, env, timeout_s=120) as server:
            yield Server(server.url, log)


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
