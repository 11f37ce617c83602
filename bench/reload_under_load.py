"""Reload under load, recorded: find the server's capacity with an open-loop ladder, then run at half of it
while a new version is loaded (the old one unloaded by the version policy) and a corrupt one is refused.

    python bench/reload_under_load.py                       # ≈ 1 min; a copy of models/ in a temporary folder
    python bench/reload_under_load.py --duration 60 --fraction 0.5

Traffic is branchserve/loadtest/reload.py's: native PNG predicts and OIP REST BYTES infers, mixed.
Capacity is the highest ladder step (--step requests/s, 3 s each) answered with fewer than 1 %
refusals and a p99 under 50 ms. The server runs with its default settings (admission included)
and the default version policy (latest 1). Prints JSON; exits 1 unless no request failed, every
answer named its version, the new version took over and the corrupt one was refused.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
from pathlib import Path

from branchserve.loadtest.openloop import run
from branchserve.loadtest.reload import scenario, traffic
from branchserve.loadtest.servers import branchserve_cmd, free_port, started_server
from branchserve.repo.loading import latest_version, load_repository

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "reload-bench-admin-token"
STEP_S = 3.0


def capacity(host: str, port: int, model: str, step: float, top: float) -> tuple[float, list[dict[str, object]]]:
    """The highest rate of the ladder the server answers well, and every step's summary."""
    requests, ladder, best = traffic(f"{host}:{port}", model), [], 0.0
    rate = step
    while rate <= top:
        out = asyncio.run(run(host, port, requests, rate, STEP_S, 256))
        summary = out.summary(rate, STEP_S)
        ladder.append(summary)
        refused = sum(s != 200 for s in out.status) / len(out.status)
        p99 = summary["ok_p99_ms"]
        print(f"ladder: {rate:.0f}/s: {refused:.1%} refused, p99 {p99} ms", flush=True)
        if refused >= 0.01 or p99 is None or float(p99) > 50:
            break
        best, rate = rate, rate + step
    return best, ladder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=ROOT / "models")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load around the reload (default 30)")
    parser.add_argument("--fraction", type=float, default=0.5, help="of the measured capacity (default 0.5)")
    parser.add_argument("--step", type=float, default=100.0, help="ladder step in requests/s (default 100)")
    parser.add_argument("--out", type=Path, help="also write the JSON report here")
    args = parser.parse_args()
    ((manifest, _),) = load_repository(args.repository).values()
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "models"
        source = latest_version(args.repository / manifest.name)
        shutil.copytree(source, repo / manifest.name / source.name)
        port = free_port()
        cmd = branchserve_cmd(repo, port, "--admin-token", TOKEN, "--log-level", "warning")
        with started_server(cmd, port, Path(tmp) / "server.log") as server:
            best, ladder = capacity("127.0.0.1", port, manifest.name, args.step, 5000)
            rate = max(best * args.fraction, args.step / 2)
            print(f"capacity {best:.0f}/s; reloading at {rate:.0f}/s for {args.duration:g} s", flush=True)
            result = scenario(server.url, repo, manifest.name, TOKEN, rate, args.duration)
            log = server.log_text()
    report = {"capacity_rps": best, "ladder": ladder, "reload": result, "server_log_tail": log.splitlines()[-6:]}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    ok = (
        result["failed"] == 0
        and result["answers_naming_no_version"] == 0
        and result["load"]["status"] == 200
        and result["corrupt_load"]["status"] == 400
        and len(result["answered_by"]) == 2
    )
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
