"""Every core of the box: `branchserve serve --workers 2` against `--workers 1`, the highest load each
holds with p99 ≤ 25 ms.

    python bench/workers.py --repeats 3          # ≈ 5 min; needs wrk (Debian's package)

wrk (a C load generator: little CPU of its own on the shared cores) posts the shipped sample PNGs
closed-loop with 1, 2, 4, … connections for `--seconds` each; a server's capacity is the highest
throughput of a step whose p99 ≤ `--p99-ms` with every request answered 200. The two servers take
turns within each repeat, so a noisy neighbour slows both; medians over repeats. Passes when the
ratio is ≥ 1.8.

Each step also records the CPU the server (all its processes) and wrk spent per request. They
bound the ratio on this box: one worker has a core (and a little of the other: its background
threads) and leaves wrk the rest, while two workers share both cores with wrk, so --workers 2
can reach at most 2 cores / (S2 + W2) requests a second, S2 and W2 the server's and wrk's CPU per
request at its capacity step. The figures report that ceiling over --workers 1's capacity, and
2 × S1 / S2: what a second worker would add with the load generator on another machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from branchserve.loadtest.figures import report
from branchserve.loadtest.samples import SAMPLES_DIR
from branchserve.loadtest.servers import branchserve_cmd, cpu_seconds, free_port, started_server

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).with_name("wrk_png.lua")
MODEL = "fmnist-resnet"
CONNECTIONS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)


def pinned(cmd: list[str], cpus: str | None) -> list[str]:
    """`cmd` run on these CPUs only (`taskset -c`), or anywhere."""
    return ["taskset", "-c", cpus, *cmd] if cpus else cmd


def wrk(url: str, connections: int, seconds: float, prefix: str = "", cpus: str | None = None) -> dict[str, Any]:
    """`connections` closed-loop clients for `seconds`; `prefix`: an application's route prefix; `cpus`:
    pin wrk to these CPUs (`taskset -c`). Also wrk's own CPU per request (µs)."""
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "-s", str(SCRIPT), url, "--", str(SAMPLES_DIR), MODEL]
    cmd = pinned(cmd + ([prefix] if prefix else []), cpus)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    result["rps"] = result["ok"] / result["seconds"]
    used = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    result["wrk_cpu_us"] = used / max(result["requests"], 1) * 1e6
    return result


def capacity(workers: int, seconds: float, p99_ms: float) -> tuple[float, list[dict[str, Any]]]:
    """Start a server with `workers` processes and step connections up until p99 breaks; the steps
    also record the server's CPU per request (µs)."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = branchserve_cmd(
            ROOT / "models", port, "--workers", str(workers), "--grpc-port", "0", "--log-level", "warning"
        )
        with started_server(cmd, port, Path(tmp) / "server.log") as server:
            return capacity_at(server.url, seconds, p99_ms, f"workers={workers}", server_pid=server.pid)


def capacity_at(
    url: str, seconds: float, p99_ms: float, name: str, prefix: str = "", server_pid: int | None = None
) -> tuple[float, list[dict[str, Any]]]:
    """The highest throughput of a step (more connections each) whose p99 ≤ `p99_ms`, every answer 200."""
    wrk(url, 4, 2.0, prefix)  # warm up every worker (or replica)
    steps, best = [], 0.0
    for c in CONNECTIONS:
        used = None if server_pid is None else cpu_seconds(server_pid)
        step = wrk(url, c, seconds, prefix) | {"connections": c}
        cpu = ""
        if used is not None:
            step["server_cpu_us"] = (cpu_seconds(server_pid) - used) / max(step["requests"], 1) * 1e6
            cpu = f", CPU/request server {step['server_cpu_us']:.0f} µs wrk {step['wrk_cpu_us']:.0f} µs"
        steps.append(step)
        holds = step["p99_ms"] <= p99_ms and step["ok"] == step["requests"] and not step["errors"]
        print(f"  {name} c={c:3d}: {step['rps']:7.0f} req/s, p99 {step['p99_ms']:6.2f} ms, "
              f"refused {step['refused']}, {'holds' if holds else 'breaks'}{cpu}", flush=True)  # fmt: skip
        if not holds:
            break
        best = max(best, step["rps"])
    return best, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--p99-ms", type=float, default=25.0)
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()
    runs: dict[int, list[float]] = {1: [], 2: []}
    cpu: dict[int, list[tuple[float, float]]] = {1: [], 2: []}  # (server, wrk) µs per request at capacity
    for r in range(args.repeats):
        for workers in runs:
            print(f"repeat {r}, --workers {workers}:", flush=True)
            best, steps = capacity(workers, args.seconds, args.p99_ms)
            runs[workers].append(best)
            at = next(step for step in steps if step["rps"] == best)
            cpu[workers].append((at["server_cpu_us"], at["wrk_cpu_us"]))
    one, two = statistics.median(runs[1]), statistics.median(runs[2])
    (s1, w1), (s2, w2) = (
        (statistics.median(c[0] for c in cpu[n]), statistics.median(c[1] for c in cpu[n])) for n in (1, 2)
    )
    figures = {
        "capacity_rps": {"workers_1": runs[1], "workers_2": runs[2]},
        "median_rps": {"workers_1": one, "workers_2": two},
        "ratio": two / one,
        "cpu_us_per_request_at_capacity": {
            "workers_1": {"server": s1, "wrk": w1},
            "workers_2": {"server": s2, "wrk": w2},
        },
        "ceiling_with_wrk_on_the_cores": 2e6 / (s2 + w2) / one,
        "server_scaling": 2 * s1 / s2,
        "p99_ms_budget": args.p99_ms,
    }
    figures["checks"] = {"--workers 2 holds >= 1.8x the load of --workers 1": figures["ratio"] >= 1.8}
    report(figures, args.out)


if __name__ == "__main__":
    main()
