"""Slow clients cannot block fast ones: 64 connections that send a request's headers and 4 bytes of
a 1,000-byte body, and then nothing, while an open-loop PNG load runs beside them.

    python bench/slow_clients.py --repeats 3          # ≈ 2 min

One `branchserve serve` process on the shipped model. Each repeat measures the load alone and the
load with the 64 slow connections held open (each reopened as soon as the server cuts it off
after its request timeout), one after the other; medians over repeats. Passes when every
prediction beside the slow clients succeeds and their p99 stays within 2× the p99 without them.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
import threading
from pathlib import Path
from typing import Any

from branchserve.loadtest.figures import report
from branchserve.loadtest.openloop import load
from branchserve.loadtest.servers import branchserve_cmd, free_port, started_server

ROOT = Path(__file__).resolve().parents[1]
MODEL = "fmnist-resnet"
HEAD = (
    f"POST /v1/models/{MODEL}/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
    "Content-Length: 1000\r\n\r\n\x89PNG"
).encode("latin-1")


class SlowClients:
    """`count` connections kept in the middle of sending a body, until `stop`; counts the 408s they got."""

    def __init__(self, port: int, count: int) -> None:
        self.port, self.stopping, self.cut_off = port, threading.Event(), 0
        self.threads = [threading.Thread(target=self._hold, daemon=True) for _ in range(count)]

    def __enter__(self) -> SlowClients:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join()

    def _hold(self) -> None:
        while not self.stopping.is_set():
            with socket.create_connection(("127.0.0.1", self.port)) as sock:
                sock.sendall(HEAD)
                sock.settimeout(0.5)
                while not self.stopping.is_set():
                    try:
                        answer = sock.recv(4096)
                    except TimeoutError:
                        continue
                    self.cut_off += answer.startswith(b"HTTP/1.1 408")
                    break


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rate", type=float, default=300.0, help="open-loop PNG requests per second")
    parser.add_argument("--seconds", type=float, default=12.0, help="length of each measurement")
    parser.add_argument("--slow", type=int, default=64, help="slow connections held open")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()
    port = free_port()
    alone: list[dict[str, Any]] = []
    beside: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        cmd = branchserve_cmd(
            ROOT / "models", port, "--workers", "1", "--log-level", "warning", "--request-timeout-s", "5"
        )
        with started_server(cmd, port, Path(tmp) / "server.log") as server:
            load(server.url, MODEL, args.rate, 3.0)  # warm up
            for r in range(args.repeats):
                alone.append(load(server.url, MODEL, args.rate, args.seconds))
                with SlowClients(port, args.slow) as slow:
                    beside.append(load(server.url, MODEL, args.rate, args.seconds))
                print(
                    f"repeat {r}: p99 alone {alone[-1]['ok_p99_ms']:.2f} ms, beside {args.slow} slow clients "
                    f"{beside[-1]['ok_p99_ms']:.2f} ms ({beside[-1]['statuses']}); slow ones cut off: {slow.cut_off}",
                    flush=True,
                )
    p99_alone = statistics.median(r["ok_p99_ms"] for r in alone)
    p99_beside = statistics.median(r["ok_p99_ms"] for r in beside)
    failed = sum(r["requests"] - r["statuses"].get(200, 0) for r in beside)
    figures = {
        "rate_rps": args.rate,
        "slow_connections": args.slow,
        "p99_ms_alone": p99_alone,
        "p99_ms_beside_slow_clients": p99_beside,
        "ratio": p99_beside / p99_alone,
        "failed_beside_slow_clients": failed,
    }
    figures["checks"] = {"no failures": failed == 0, "p99 within 2x": figures["ratio"] <= 2.0}
    report(figures, args.out)


if __name__ == "__main__":
    main()
