"""Server CPU per request, side by side: branchserve (small requests on the event loop), branchserve
with every request hopping to a worker thread (`--inline-body-bytes 0`), and the plain baseline.

    python bench/request_cpu.py --repeats 3 --requests 3000

One client sends PNG samples (branchserve/loadtest/samples) one after another over a keep-alive connection,
so nothing queues and the figure is the request path's own cost. CPU is the server process's
utime + stime from /proc (the client's CPU is not in it); wall time per request is also printed.
The servers take turns within each repeat, so a noisy neighbour slows them alike. Needs no torch.
"""

from __future__ import annotations

import argparse
import http.client
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from branchserve.loadtest.samples import sample_pngs
from branchserve.loadtest.servers import cpu_seconds, free_port

ROOT = Path(__file__).resolve().parents[1]
SERVERS = {
    "branchserve": ["-m", "branchserve", "serve", "--log-level", "warning", "--grpc-port", "0"],
    "branchserve, always a thread hop": [
        "-m",
        "branchserve",
        "serve",
        "--log-level",
        "warning",
        "--inline-body-bytes",
        "0",
        "--grpc-port",
        "0",
    ],
    "baseline": ["-m", "branchserve.loadtest.baseline_server", "--model", "{model}"],
}


def measure(args: list[str], repository: Path, model: str, bodies: list[bytes], n: int) -> tuple[float, float]:
    """(CPU ms, wall ms) per request after 300 warm-up requests."""
    port = free_port()
    cmd = [sys.executable, *(a.format(model=model) for a in args), "--repository", str(repository), "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for _ in range(300):
            try:
                connection.request("GET", "/v2/health/ready")
                response = connection.getresponse()
                response.read()
                if response.status == 200:
                    break
            except OSError:
                connection.close()
            time.sleep(0.1)
        else:
            raise SystemExit(f"{' '.join(cmd)}: not ready after 30 s")
        path, headers = f"/v1/models/{model}/predict", {"content-type": "image/png"}

        def send(i: int) -> None:
            connection.request("POST", path, bodies[i % len(bodies)], headers)
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise SystemExit(f"{' '.join(args)}: HTTP {response.status}")

        for i in range(300):
            send(i)
        cpu0, t0 = cpu_seconds(proc.pid), time.perf_counter()
        for i in range(n):
            send(i)
        return 1e3 * (cpu_seconds(proc.pid) - cpu0) / n, 1e3 * (time.perf_counter() - t0) / n
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=ROOT / "models")
    parser.add_argument("--model", default="fmnist-resnet")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args()
    bodies = sample_pngs()
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in SERVERS}
    print(f"load average {os.getloadavg()[0]:.2f}; {args.requests} sequential PNG requests per server and repeat")
    for r in range(args.repeats):
        for name, cmd in SERVERS.items():
            results[name].append(measure(cmd, args.repository, args.model, bodies, args.requests))
            cpu, wall = results[name][-1]
            print(f"repeat {r}: {name}: CPU {cpu:.3f} ms, wall {wall:.3f} ms per request", flush=True)
    baseline = float(np.median([cpu for cpu, _ in results["baseline"]]))
    print(f"\nmedians over {args.repeats} repeats (load average now {os.getloadavg()[0]:.2f}):")
    for name, rows in results.items():
        cpu, wall = (float(np.median(col)) for col in zip(*rows, strict=True))
        print(f"  {name:34s} CPU {cpu:.3f} ms ({cpu / baseline:.2f}× baseline), wall {wall:.3f} ms per request")


if __name__ == "__main__":
    main()
