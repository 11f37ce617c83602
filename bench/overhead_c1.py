"""Per-request overhead at low load: one client, one request at a time, PNG in, JSON out.

    python bench/overhead_c1.py --repeats 5 --seconds 10      # needs wrk (Debian's package)

wrk (`-t1 -c1`, closed loop over one keep-alive connection) posts the shipped sample PNGs to a
`branchserve serve --workers 1` on 127.0.0.1 and reads each answer's `compute_ms` (the server's
own stage time); overhead = wrk's p50 latency − the mean compute of the same requests.

Two placements, taking turns in each repeat, each with a server of its own:

* one core: server and wrk pinned to CPU 0 (`taskset`). At concurrency 1 they strictly take turns,
  so neither waits for the other's CPU, and a round trip has no cross-CPU wake-up.
* free: the scheduler places both. Each request then wakes the server on one CPU from wrk on the
  other and back: on a VM each such wake-up is an inter-processor interrupt through the
  hypervisor, which costs the host, not the server, and varies with where the scheduler puts them.

The verdict (exit status) is the one-core figure's: what the server itself adds. The free figure,
and their difference (what this host's cross-CPU wake-ups add), are printed beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
from pathlib import Path

from workers import ROOT, pinned, wrk

from branchserve.loadtest.servers import Server, branchserve_cmd, free_port, started_server

PLACEMENTS = {"one core": "0", "free": None}  # placement → CPUs that server and wrk are pinned to


def overhead(server: Server, seconds: float, cpus: str | None) -> tuple[float, dict[str, float]]:
    run = wrk(server.url, 1, seconds, cpus=cpus)
    return run["p50_ms"] - run["compute_ms_mean"], run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of one wrk run")
    parser.add_argument("--target-ms", type=float, default=0.3)
    args = parser.parse_args()
    overheads: dict[str, list[float]] = {name: [] for name in PLACEMENTS}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        servers = {}
        for name, cpus in PLACEMENTS.items():
            port = free_port()
            cmd = branchserve_cmd(ROOT / "models", port, "--workers", "1", "--grpc-port", "0", "--log-level", "warning")
            servers[name] = stack.enter_context(
                started_server(pinned(cmd, cpus), port, Path(tmp) / f"server-{port}.log")
            )
            wrk(servers[name].url, 1, 3.0, cpus=cpus)  # warm-up
        for r in range(args.repeats):
            for name, cpus in PLACEMENTS.items():
                value, run = overhead(servers[name], args.seconds, cpus)
                overheads[name].append(value)
                print(
                    f"repeat {r}, {name}: {run['ok']} answers ({run['requests'] - run['ok']} not 200), "
                    f"p50 {run['p50_ms']:.3f} ms, p99 {run['p99_ms']:.3f} ms, mean compute "
                    f"{run['compute_ms_mean']:.3f} ms, overhead {value:.3f} ms; load average {os.getloadavg()[0]:.2f}",
                    flush=True,
                )
    medians = {name: statistics.median(v) for name, v in overheads.items()}
    for name, v in overheads.items():
        print(f"{name}: median p50 − compute {medians[name]:.3f} ms (min {min(v):.3f}, max {max(v):.3f})")
    print(f"cross-CPU wake-ups add {medians['free'] - medians['one core']:.3f} ms (free − one core)")
    verdict = "PASS" if medians["one core"] <= args.target_ms else "FAIL"
    print(
        f"{verdict}: one core, median p50 − compute {medians['one core']:.3f} ms over {args.repeats} repeats "
        f"(target ≤ {args.target_ms} ms)"
    )
    sys.exit(0 if verdict == "PASS" else 1)


if __name__ == "__main__":
    main()
