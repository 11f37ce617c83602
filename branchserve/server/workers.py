"""Several worker processes behind one port: what they share, and how an admin change reaches all.

`branchserve serve --workers N` runs uvicorn's supervisor: N worker processes, each with its own
event loop, admission and copy of every model (the shipped model is 7 MB), and its own listening
socket on the one port (`OwnListener`: `SO_REUSEPORT`, so the kernel spreads new connections by
their addresses' hash; on one shared socket whichever worker woke first took a whole burst). Workers are spawned, not forked, and each loads and calibrates
the repository itself: onnxruntime sessions are not fork-safe, and spawning keeps one code path.

What they share lives in a run folder the supervisor makes and removes (`RunFolder`):

* `metrics/`: prometheus-client's multiprocess files, so one scrape of any worker sums every
  counter and histogram exactly across workers (gauges say how they combine: `Metrics`).
* `changes.jsonl`: admin changes (an operating point set, a model loaded or unloaded). The worker
  that took the request applies it and appends it; every other worker applies it within
  `FOLLOW_S` (`Peers.follow`). So a change answered 200 is in force everywhere a moment later.
* `ready/<pid>`: a worker whose models are loaded and calibrated; readiness waits for all N.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("branchserve")

RUN_FOLDER_ENV = "BRANCHSERVE_RUN_FOLDER"
METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"
FOLLOW_S = 0.2

Change = dict[str, Any]
Apply = Callable[[Change], Awaitable[None]]


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) with SO_REUSEPORT (and SO_REUSEADDR, as uvicorn binds)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


@dataclass(frozen=True)
class OwnListener:
    """What the supervisor hands every worker as its socket: pickled to a spawned worker as an
    address only, it arrives as a socket of the worker's own on it (`reuse_port_socket`), which
    the worker listens on. With one socket shared by all, an idle worker accepted every pending
    connection at once: 2, 4, 8 and once all 16 new keep-alive connections landed on one of two
    workers, which served them alone. Connections queued on a worker that dies are reset, where a
    shared socket would have kept them for the others."""

    host: str
    port: int

    def __reduce__(self) -> tuple[Callable[[str, int], socket.socket], tuple[str, int]]:
        return reuse_port_socket, (self.host, self.port)


@contextlib.contextmanager
def port_for_workers(host: str, port: int) -> Iterator[OwnListener]:
    """The port, held by the supervisor while its workers run: bound with SO_REUSEPORT and never
    listened on (the kernel hands connections only to listening sockets), so a port in use fails
    here, once (ListenError), and port 0 becomes one port for every worker."""
    try:
        held = reuse_port_socket(host, port)
    except OSError as e:
        raise ListenError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    with held:
        yield OwnListener(host, held.getsockname()[1])


class ListenError(RuntimeError):
    """The workers' port cannot be bound (in use, or an address this host does not have)."""


class RunFolder:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.metrics, self.ready, self.changes = path / "metrics", path / "ready", path / "changes.jsonl"

    @classmethod
    def make(cls) -> RunFolder:
        """A fresh folder for one run of the supervisor (never reused: stale metric files would count)."""
        run = cls(Path(tempfile.mkdtemp(prefix="branchserve-run-")))
        run.metrics.mkdir()
        run.ready.mkdir()
        run.changes.touch()
        return run

    @classmethod
    def of_this_worker(cls) -> RunFolder | None:
        path = os.environ.get(RUN_FOLDER_ENV)
        return cls(Path(path)) if path else None

    def environment(self) -> dict[str, str]:
        """What a worker needs to find the folder; set before the workers start (prometheus-client
        picks its multiprocess mode when it is imported)."""
        return {RUN_FOLDER_ENV: str(self.path), METRICS_ENV: str(self.metrics)}

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class Peers:
    """This worker's view of the others: it publishes its admin changes and follows theirs."""

    def __init__(self, run: RunFolder | None, workers: int) -> None:
        self.run, self.workers, self.offset = run, workers, 0
        if run is not None:
            self.offset = run.changes.stat().st_size  # changes made before this worker started are in its load

    def publish(self, change: Change) -> None:
        if self.run is None:
            return
        line = json.dumps({**change, "by": os.getpid()}) + "\n"
        with self.run.changes.open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.write(line)  # followed back like any other line, then skipped: this worker applied it already

    def _new_changes(self) -> list[Change]:
        assert self.run is not None
        with self.run.changes.open("rb") as f:
            fcntl.flock(f, fcntl.LOCK_SH)
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        changes = [json.loads(line) for line in data.splitlines() if line.strip()]
        return [c for c in changes if c.get("by") != os.getpid()]

    async def follow(self, apply: Apply) -> None:
        """Apply the other workers' changes as they appear, until cancelled."""
        while self.run is not None:
            for change in self._new_changes():
                try:
                    await apply(change)
                except Exception:  # a change another worker could apply should apply here; say so if not
                    log.exception("worker %d: could not apply %s", os.getpid(), change)
            await asyncio.sleep(FOLLOW_S)

    def mark_ready(self) -> None:
        if self.run is not None:
            (self.run.ready / str(os.getpid())).touch()

    def leave(self) -> None:
        if self.run is not None:
            with contextlib.suppress(FileNotFoundError):
                (self.run.ready / str(os.getpid())).unlink()

    def all_ready(self) -> bool:
        if self.run is None:
            return True
        alive = [p for p in self.run.ready.iterdir() if Path(f"/proc/{p.name}").exists()]
        return len(alive) >= self.workers
