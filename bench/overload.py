"""Overload that keeps its latency: step an open-loop PNG load to 3× the measured capacity.

    python bench/overload.py --repeats 3          # ≈ 4 min

One `branchserve serve` process on the shipped model; the load comes from
`branchserve.loadtest.openloop` on the same host (requests on a fixed schedule, latency from the
scheduled time). First the capacity: the highest rate, stepped up by `--step`, whose requests are
all answered with p99 ≤ `--p99-ms`. Then 1×, 2× and 3× that rate, `--repeats` times each in turn.
Reported per step (medians over repeats): goodput, p99 of the admitted requests, how many were
refused and whether every refusal was a 503 with Retry-After, and the server's CPU per answer and
per refusal (solved from the CPU the server spent at 1× and at 3×, read from /proc).

Passes when, at 3×: the admitted requests' p99 ≤ 2 × `--p99-ms`, goodput ≥ 70 % of the capacity,
and every refusal is a 503 with Retry-After.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from branchserve.loadtest.figures import report
from branchserve.loadtest.openloop import load
from branchserve.loadtest.servers import branchserve_cmd, cpu_seconds, free_port, started_server

ROOT = Path(__file__).resolve().parents[1]
MODEL = "fmnist-resnet"


def step(url: str, pid: int, rate: float, seconds: float) -> dict[str, Any]:
    cpu = cpu_seconds(pid)
    result = load(url, MODEL, rate, seconds)
    result["server_cpu_s"] = cpu_seconds(pid) - cpu
    return result


def holds(result: dict[str, Any], p99_ms: float) -> bool:
    statuses = result["statuses"]
    return statuses.get(200, 0) == result["requests"] and (result["ok_p99_ms"] or 1e9) <= p99_ms


def capacity(url: str, pid: int, start: float, step_rps: float, p99_ms: float, seconds: float) -> float:
    """The highest rate (from `start`, in steps) whose requests are all answered within the p99."""
    best, rate = 0.0, start
    while True:
        result = step(url, pid, rate, seconds)
        print(
            f"capacity search: {rate:.0f} req/s -> p99 {result['ok_p99_ms']:.1f} ms, {result['statuses']}", flush=True
        )
        if not holds(result, p99_ms):
            return best
        best, rate = rate, rate + step_rps


def cost_per_request(one: dict[str, Any], three: dict[str, Any]) -> tuple[float, float]:
    """(CPU ms per answer, per refusal), solved from two steps with different mixes."""
    a1, r1 = one["statuses"].get(200, 0), one["statuses"].get(503, 0)
    a3, r3 = three["statuses"].get(200, 0), three["statuses"].get(503, 0)
    det = a1 * r3 - a3 * r1
    if det == 0:
        return float("nan"), float("nan")
    answer = (one["server_cpu_s"] * r3 - three["server_cpu_s"] * r1) / det
    refusal = (a1 * three["server_cpu_s"] - a3 * one["server_cpu_s"]) / det
    return 1e3 * answer, 1e3 * refusal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each step")
    parser.add_argument("--p99-ms", type=float, default=25.0)
    parser.add_argument("--start", type=float, default=400.0, help="first rate of the capacity search")
    parser.add_argument("--step", type=float, default=100.0, help="capacity search step, req/s")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = branchserve_cmd(ROOT / "models", port, "--workers", "1", "--log-level", "warning")
        with started_server(cmd, port, Path(tmp) / "server.log") as server:
            step(server.url, server.pid, args.start, 3.0)  # warm up
            cap = capacity(server.url, server.pid, args.start, args.step, args.p99_ms, args.seconds)
            if not cap:
                sys.exit(
                    f"no capacity: {args.start:.0f} req/s already breaks the p99 or is refused; try a lower --start"
                )
            runs: dict[int, list[dict[str, Any]]] = {1: [], 2: [], 3: []}
            for r in range(args.repeats):
                for k in runs:
                    runs[k].append(step(server.url, server.pid, k * cap, args.seconds))
                    got = runs[k][-1]
                    print(
                        f"repeat {r}, {k}x = {k * cap:.0f} req/s: goodput {got['goodput_rps']:.0f}, admitted p99 "
                        f"{got['ok_p99_ms']:.1f} ms, {got['statuses']}, Retry-After on {got['refusals_with_retry_after']}",
                        flush=True,
                    )
    figures = summarise(runs, cap, args.p99_ms)
    report(figures, args.out)


def summarise(runs: dict[int, list[dict[str, Any]]], cap: float, p99_ms: float) -> dict[str, Any]:
    def median(k: int, key: str) -> float:
        return statistics.median(float(r[key] or 0.0) for r in runs[k])

    costs = [cost_per_request(one, three) for one, three in zip(runs[1], runs[3], strict=True)]
    refused = sum(r["statuses"].get(503, 0) for rs in runs.values() for r in rs)
    with_retry = sum(r["refusals_with_retry_after"] for rs in runs.values() for r in rs)
    other = sum(n for rs in runs.values() for r in rs for s, n in r["statuses"].items() if s not in (200, 503))
    steps = {
        f"{k}x": {
            "offered_rps": k * cap,
            "goodput_rps": median(k, "goodput_rps"),
            "admitted_p50_ms": median(k, "ok_p50_ms"),
            "admitted_p99_ms": median(k, "ok_p99_ms"),
            "refused_p99_ms": median(k, "refused_p99_ms"),
            "refused_share": statistics.median(r["statuses"].get(503, 0) / r["requests"] for r in runs[k]),
        }
        for k in runs
    }
    return {
        "capacity_rps": cap,
        "steps": steps,
        "cpu_ms_per_answer": statistics.median(c[0] for c in costs),
        "cpu_ms_per_refusal": statistics.median(c[1] for c in costs),
        "checks": {
            f"3x: admitted p99 <= {2 * p99_ms:g} ms": steps["3x"]["admitted_p99_ms"] <= 2 * p99_ms,
            "3x: goodput >= 70 % of capacity": steps["3x"]["goodput_rps"] >= 0.7 * cap,
            "every refusal a 503 with Retry-After": refused == with_retry and other == 0,
        },
    }


if __name__ == "__main__":
    main()
