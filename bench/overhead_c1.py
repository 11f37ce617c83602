"""Per-request overhead at low load: one client, one request at a time, PNG in, JSON out.

    python bench/overhead_c1.py --repeats 5 --seconds 10      # needs wrk (Debian's package)

wrk (`-t1 -c1`, closed loop over one keep-alive connection) posts the shipped sample PNGs to a
`branchserve serve --workers 1` on 127.0.0.1 and reads each answer's `compute_ms` (the server's
own stage time); overhead = wrk's p50 latency − the mean compute of the same requests, per
repeat. Passes when the median overhead over repeats is ≤ `--target-ms` (0.3 ms).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

from workers import ROOT, wrk

from branchserve.loadtest.servers import branchserve_cmd, free_port, started_server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of one wrk run")
    parser.add_argument("--target-ms", type=float, default=0.3)
    args = parser.parse_args()
    port = free_port()
    overheads = []
    with tempfile.TemporaryDirectory() as tmp:
        cmd = branchserve_cmd(ROOT / "models", port, "--workers", "1", "--grpc-port", "0", "--log-level", "warning")
        with started_server(cmd, port, Path(tmp) / "server.log") as server:
            wrk(server.url, 1, 3.0)  # warm-up
            for r in range(args.repeats):
                run = wrk(server.url, 1, args.seconds)
                overheads.append(run["p50_ms"] - run["compute_ms_mean"])
                print(
                    f"repeat {r}: {run['ok']} answers ({run['requests'] - run['ok']} not 200), p50 {run['p50_ms']:.3f} ms, "
                    f"p99 {run['p99_ms']:.3f} ms, mean compute {run['compute_ms_mean']:.3f} ms, "
                    f"overhead {overheads[-1]:.3f} ms; load average {os.getloadavg()[0]:.2f}",
                    flush=True,
                )
    median = statistics.median(overheads)
    verdict = "PASS" if median <= args.target_ms else "FAIL"
    print(f"{verdict}: median p50 − compute {median:.3f} ms over {args.repeats} repeats (target ≤ {args.target_ms} ms)")
    sys.exit(0 if verdict == "PASS" else 1)


if __name__ == "__main__":
    main()
