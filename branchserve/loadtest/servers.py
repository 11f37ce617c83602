"""Start a server as a subprocess and wait until it is ready; the one helper the load test, the
benches and the tests use. Standard library only, so it runs on a serve-only install.

A server runs in its own process so its CPU time can be read from /proc (utime + stime) apart
from the load generator's, and so a crash cannot take the caller with it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

READY_PATH = "/v2/health/ready"
READY_TIMEOUT_S = 180
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class ServerError(RuntimeError):
    """A server exited or never became ready; the message ends with the tail of its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _stat(pid: int | str) -> list[str]:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2 :].split()  # the command name may contain spaces


def cpu_seconds(pid: int) -> float:
    """User + system CPU time so far of a process and every process below it (a server's workers)
    (fields 14 and 15 of /proc/<pid>/stat; a child's parent is field 4)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                children.setdefault(int(_stat(entry.name)[1]), []).append(int(entry.name))
            except (FileNotFoundError, ProcessLookupError):
                continue  # exited while we looked
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            fields = _stat(p)
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
        todo += children.get(p, [])
    return total


def branchserve_cmd(repository: Path, port: int, *flags: str) -> list[str]:
    """`branchserve serve` with this interpreter, so a venv's server runs the venv's code; gRPC is off
    unless `flags` give a `--grpc-port`, so servers started side by side never race for port 8001."""
    grpc = [] if "--grpc-port" in flags else ["--grpc-port", "0"]
    return [
        sys.executable,
        "-m",
        "branchserve",
        "serve",
        "--repository",
        str(repository),
        "--port",
        str(port),
        *grpc,
        *flags,
    ]


@dataclass
class Server:
    """A server this process started: its URL, process id and log file."""

    url: str
    pid: int
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def is_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + READY_PATH, timeout=2) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@contextmanager
def started_server(
    cmd: Sequence[str], port: int, log: Path, env: dict[str, str] | None = None, timeout_s: float = READY_TIMEOUT_S
) -> Iterator[Server]:
    """Run `cmd` (a server on 127.0.0.1:port) until the block ends, its output in `log`; yields once ready.
    On leaving, SIGTERM (a server drains and exits), then SIGKILL after 30 s."""
    with log.open("w") as f:
        proc = subprocess.Popen(list(cmd), stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    server = Server(f"http://127.0.0.1:{port}", proc.pid, log)
    try:
        deadline = time.monotonic() + timeout_s
        while not is_ready(server.url):
            if proc.poll() is not None:
                raise ServerError(
                    f"server exited with {proc.returncode} before it was ready:\n{server.log_text()[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise ServerError(
                    f"{server.url}{READY_PATH} not ready after {timeout_s:g} s:\n{server.log_text()[-3000:]}"
                )
            time.sleep(0.1)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
