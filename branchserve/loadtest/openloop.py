"""An open-loop HTTP/1.1 load generator with little overhead: requests are sent on a fixed schedule
whether or not earlier ones were answered, and latency is measured from the scheduled send time,
so a slow server cannot slow the load down (no coordinated omission).

    python -m branchserve.loadtest.openloop --url http://127.0.0.1:8000 --rate 1500 --duration 10

Locust's users wait for each answer and cost ~0.3–0.6 core here; this sends pre-built requests on
raw keep-alive connections (asyncio, uvloop when installed) and costs ~0.1–0.2 core at 1,000
requests/s, so a load test on the server's own machine measures the server. Standard library only
(uvloop is optional).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from branchserve.loadtest.samples import sample_pngs


@dataclass
class Outcome:
    """Every request of a run: its scheduled time, latency from that time, HTTP status (0: no answer), which
    of the requests it was, and with `keep_bodies` the response body."""

    scheduled: list[float] = field(default_factory=list)
    latency_ms: list[float] = field(default_factory=list)
    status: list[int] = field(default_factory=list)
    request: list[int] = field(default_factory=list)
    retry_after: int = 0  # 503s that carried Retry-After
    bodies: list[bytes] | None = None  # every response body, in `status` order, when asked to keep them

    def summary(self, rate: float, duration_s: float) -> dict[str, object]:
        ok = [ms for ms, s in zip(self.latency_ms, self.status, strict=True) if s == 200]
        refused = [ms for ms, s in zip(self.latency_ms, self.status, strict=True) if s == 503]
        return {
            "offered_rps": rate,
            "duration_s": duration_s,
            "requests": len(self.status),
            "statuses": dict(sorted(Counter(self.status).items())),
            "goodput_rps": len(ok) / duration_s,
            "ok_p50_ms": percentile(ok, 50),
            "ok_p99_ms": percentile(ok, 99),
            "refused_p99_ms": percentile(refused, 99),
            "refusals_with_retry_after": self.retry_after,
        }


def percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def request_bytes(host: str, path: str, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> bytes:
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bool, bytes]:
    """(status, whether it carried Retry-After, body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length, retry = 0, False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"retry-after":
            retry = True
    return status, retry, await reader.readexactly(length)


async def run(
    host: str,
    port: int,
    requests: Sequence[bytes],
    rate: float,
    duration_s: float,
    connections: int,
    keep_bodies: bool = False,
) -> Outcome:
    """Send `rate` requests/s for `duration_s`, cycling through `requests`, on up to `connections` connections."""
    out = Outcome(bodies=[] if keep_bodies else None)
    idle: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    for _ in range(connections):
        idle.put_nowait(await asyncio.open_connection(host, port))

    async def one(at: float, index: int) -> None:
        reader, writer = await idle.get()
        status, retry, answer = 0, False, b""
        try:
            writer.write(requests[index])
            status, retry, answer = await read_response(reader)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            writer.close()
            reader, writer = await asyncio.open_connection(host, port)
        finally:
            idle.put_nowait((reader, writer))
        out.scheduled.append(at)
        out.latency_ms.append((time.perf_counter() - at) * 1e3)
        out.status.append(status)
        out.request.append(index)
        out.retry_after += retry
        if out.bodies is not None:
            out.bodies.append(answer)

    start = time.perf_counter() + 0.05
    tasks = []
    for i in range(int(rate * duration_s)):
        at = start + i / rate
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(at, i % len(requests))))
    await asyncio.gather(*tasks)
    while not idle.empty():
        _, writer = idle.get_nowait()
        writer.close()
    return out


def png_requests(host: str, path: str, seed: int = 0) -> list[bytes]:
    """The shipped sample PNGs as predict requests, shuffled."""
    bodies = [request_bytes(host, path, png, "image/png") for png in sample_pngs()]
    random.Random(seed).shuffle(bodies)
    return bodies


def load(url: str, model: str, rate: float, duration_s: float, connections: int = 256) -> dict[str, object]:
    """One open-loop run of PNG predict requests against `url`; returns its summary."""
    host_port = url.split("://", 1)[-1].rstrip("/")
    host, _, port = host_port.partition(":")
    requests = png_requests(host_port, f"/v1/models/{model}/predict")
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    outcome = runner(run(host, int(port or 80), requests, rate, duration_s, connections))
    return outcome.summary(rate, duration_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="fmnist-resnet")
    parser.add_argument("--rate", type=float, required=True, help="requests per second, sent on a fixed schedule")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load (default 10)")
    parser.add_argument("--connections", type=int, default=256, help="keep-alive connections to spread it over")
    args = parser.parse_args()
    print(json.dumps(load(args.url, args.model, args.rate, args.duration, args.connections), indent=2))


if __name__ == "__main__":
    main()
