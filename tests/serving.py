"""Helpers for the server tests: a real `branchserve serve` subprocess on a free port, and test images."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from loadtest.runner import free_port
from training.idx import read_idx

FMNIST_DIR = Path(os.environ.get("BRANCHSERVE_FMNIST_DIR", "/usr/share/datasets/fashion-mnist"))
READY_TIMEOUT_S = 120


@dataclass
class Server:
    url: str
    log: Path

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)

    def log_text(self) -> str:
        return self.log.read_text()


@contextmanager
def running_server(repo: Path, *flags: str, env: dict[str, str] | None = None) -> Iterator[Server]:
    """`branchserve serve` in a subprocess, yielded once /v2/health/ready answers 200."""
    port = free_port()
    cmd = [sys.executable, "-m", "branchserve.cli", "serve", "--repository", str(repo), "--port", str(port), *flags]
    with tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False) as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    server = Server(f"http://127.0.0.1:{port}", Path(log.name))
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log_text()}")
            try:
                if httpx.get(f"{server.url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after {READY_TIMEOUT_S} s:\n{server.log_text()}")
            time.sleep(0.1)
        yield server
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        server.log.unlink(missing_ok=True)


def sample_images(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first n Fashion-MNIST test images (uint8, (n, 28, 28)) and labels."""
    images = read_idx(FMNIST_DIR / "t10k-images-idx3-ubyte.gz")[:n]
    labels = read_idx(FMNIST_DIR / "t10k-labels-idx1-ubyte.gz")[:n]
    return images, labels.astype(np.int64)


def encode(image: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt)
    return buf.getvalue()
