"""Does the load-adaptive ladder hold the p99 objective as load steps up and down? Open-loop step load
of the 10k Fashion-MNIST test images (PNG) against the ladder and against the strictest point fixed.

    python bench/ladder_steps.py models/fmnist-resnet/3 --step-s 10

1. Capacity of the strictest rung (full depth) and of the cheapest rung, each served fixed: the
   highest of `--capacity-rates` (`--capacity-s` seconds each, in turn until two in a row fail)
   whose p99 holds the objective with under 1 % of requests refused.
2. Steps of `--fractions` × the strictest rung's capacity, `--step-s` seconds each. Two servers (one
   worker process each: the ladder is per worker, and the load generator needs the other core) run
   side by side, the ladder (rungs: full depth, then the cheapest points certified for disagreement
   ≤ each of `--targets` at δ = 5 %) and full depth fixed; each step is sent to one, then the other,
   so both see the same host minutes. Latency is from each request's scheduled send time
   (branchserve/loadtest/openloop.py: no coordinated omission), whole steps included.
3. Per step and rung: the disagreement of the answers with the final exit's answer to the same image
   (computed offline from the model's full graph), against the ε the responses declared.

Prints a table and JSON (`--out`); exits 1 when a step up to the cheapest rung's capacity breaks the
objective on the ladder, or a rung's measured disagreement exceeds its declared ε.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
import tempfile
from collections import defaultdict
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path

import numpy as np
from PIL import Image

from branchserve.fmnist import read_split
from branchserve.loadtest.openloop import percentile, request_bytes, run
from branchserve.loadtest.servers import Server, branchserve_cmd, free_port, started_server
from branchserve.repo.loading import load_version
from branchserve.repo.scoring import exit_logits

STRICTEST = '{"point": "final"}'


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def open_loop(url: str, requests: list[bytes], rate: float, seconds: float) -> tuple[dict, list[int], list[bytes]]:
    host, port = url.split("://")[1].split(":")
    out = asyncio.run(run(host, int(port), requests, rate, seconds, connections=256, keep_bodies=True))
    ok = [ms for ms, s in zip(out.latency_ms, out.status, strict=True) if s == 200]
    summary = {
        "rate": rate,
        "requests": len(out.status),
        "refused": sum(s != 200 for s in out.status),
        "p50_ms": percentile(ok, 50),
        "p99_ms": percentile(ok, 99),
    }
    return summary, out.request, out.bodies or []


def holds(summary: dict, objective: float) -> bool:
    p99 = summary["p99_ms"]
    return p99 is not None and p99 <= objective and summary["refused"] <= 0.01 * summary["requests"]


def serve(repo: Path, flags: list[str], log: Path) -> AbstractContextManager[Server]:
    port = free_port()
    return started_server(branchserve_cmd(repo, port, "--workers", "1", "--log-level", "warning", *flags), port, log)


def capacity(
    repo: Path, flags: list[str], requests: list[bytes], rates: list[float], seconds: float, objective: float, log: Path
) -> tuple[float, list[dict]]:
    """The highest of `rates` holding the objective, tried in turn until two in a row fail (one may be a hiccup)."""
    held, tried, misses = 0.0, [], 0
    with serve(repo, flags, log) as server:
        open_loop(server.url, requests, rates[0], 2)  # warm up
        for rate in rates:
            summary, _, _ = open_loop(server.url, requests, rate, seconds)
            tried.append(summary)
            misses = 0 if holds(summary, objective) else misses + 1
            held = rate if not misses else held
            if misses == 2:
                break
    return held, tried


def by_rung(which: list[int], bodies: list[bytes], final_class: np.ndarray) -> dict[str, dict[str, float]]:
    """Per rung answered (index, point, declared ε): answers and their disagreement with the final exit."""
    found: dict[str, list[int]] = defaultdict(list)
    for index, body in zip(which, bodies, strict=True):
        if not body.startswith(b'{"model"'):
            continue
        budget, output = (answer := json.loads(body))["budget"], answer["outputs"][0]
        eps = None if budget["guarantee"] is None else budget["guarantee"]["epsilon"]
        found[f"{budget['rung']}:{budget['operating_point']}:ε={eps}"].append(
            int(output["class"] != final_class[index])
        )
    return {k: {"answers": len(v), "disagreement": float(np.mean(v))} for k, v in sorted(found.items())}


def steps(
    repo: Path,
    runs: dict[str, list[str]],
    requests: list[bytes],
    final_class: np.ndarray,
    rates: list[float],
    seconds: float,
    logs: Path,
) -> dict[str, list[dict]]:
    """Every step on every server in turn: latency, and per rung the answers' disagreement with the final exit."""
    out: dict[str, list[dict]] = {name: [] for name in runs}
    with ExitStack() as stack:
        servers = {
            name: stack.enter_context(serve(repo, flags, logs / f"{i}.log"))
            for i, (name, flags) in enumerate(runs.items())
        }
        for server in servers.values():
            open_loop(server.url, requests, rates[0], 2)  # warm up
        for rate in rates:
            for name, server in servers.items():
                summary, which, bodies = open_loop(server.url, requests, rate, seconds)
                out[name].append(summary | {"rungs": by_rung(which, bodies, final_class)})
    return out


def declared_holds(run_steps: list[dict]) -> list[bool]:
    """Per step and rung: the measured disagreement is at most the declared ε."""
    checks = []
    for s in run_steps:
        for key, r in s["rungs"].items():
            eps = key.split("ε=")[1]
            checks.append(eps != "None" and r["disagreement"] <= float(eps))
    return checks


def ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def report(result: dict, objective: float) -> None:
    cap = result["capacity"]
    print(
        f"capacity at p99 ≤ {objective:g} ms: full depth {cap['strictest']:g} req/s, cheapest rung {cap['cheapest']:g} req/s"
    )
    print(
        "| req/s | × full-depth capacity | ladder p99 ms | refused | rungs served: answers, disagreement (declared ε) | full depth fixed p99 ms | refused |"
    )
    print("|--:|--:|--:|--:|---|--:|--:|")
    for lad, fix in zip(result["steps"]["ladder"], result["steps"]["full depth fixed"], strict=True):
        rungs = "; ".join(f"{k}: {r['answers']}, {100 * r['disagreement']:.2f} %" for k, r in lad["rungs"].items())
        print(
            f"| {lad['rate']:g} | {lad['rate'] / max(cap['strictest'], 1):.2f} | {ms(lad['p99_ms'])} | {lad['refused']} | {rungs} | "
            f"{ms(fix['p99_ms'])} | {fix['refused']} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("version_dir", type=Path)
    parser.add_argument("--objective-ms", type=float, default=25.0)
    parser.add_argument("--targets", default="0.01,0.02,0.05", help="the ladder's rungs below full depth")
    parser.add_argument("--fractions", default="0.5,0.75,1.0,1.25,1.5,1.25,1.0,0.75,0.5")
    parser.add_argument("--step-s", type=float, default=10.0)
    parser.add_argument("--capacity-rates", default=",".join(map(str, range(50, 1501, 25))), help="req/s tried in turn")
    parser.add_argument("--capacity-s", type=float, default=6.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    m = load_version(args.version_dir)
    images, _ = read_split("test")
    final_class = exit_logits(args.version_dir, m, images)[-1].argmax(axis=1)
    requests = [request_bytes("127.0.0.1", f"/v1/models/{m.name}/predict", png(i), "image/png") for i in images]
    repo, objective = args.version_dir.parent.parent, args.objective_ms
    targets = [float(t) for t in args.targets.split(",")]
    ladder = json.dumps({"p99_ms": objective, "risk": 0.05, "max_disagreement": targets})
    fixed = ["--operating-point", STRICTEST, "--ladder", "{}"]
    cheapest = ["--operating-point", json.dumps({"max_disagreement": targets[-1], "risk": 0.05}), "--ladder", "{}"]
    rates = [float(r) for r in args.capacity_rates.split(",")]
    result: dict[str, object] = {"load_average_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        logs = Path(tmp)
        strict_cap, strict_tried = capacity(repo, fixed, requests, rates, args.capacity_s, objective, logs / "a.log")
        cheap_cap, cheap_tried = capacity(repo, cheapest, requests, rates, args.capacity_s, objective, logs / "b.log")
        if not strict_cap or not cheap_cap:
            sys.exit(f"a fixed point held p99 ≤ {objective:g} ms at none of --capacity-rates: host too busy to measure")
        step_rates = [round(float(f) * strict_cap) for f in args.fractions.split(",")]
        runs = {"ladder": ["--operating-point", STRICTEST, "--ladder", ladder], "full depth fixed": fixed}
        stepped = steps(repo, runs, requests, final_class, step_rates, args.step_s, logs)
    result |= {
        "capacity": {"strictest": strict_cap, "cheapest": cheap_cap},
        "capacity_runs": {"strictest": strict_tried, "cheapest": cheap_tried},
        "steps": stepped,
        "load_average_after": os.getloadavg(),
    }
    report(result, objective)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    broke = [s["rate"] for s in stepped["ladder"] if s["rate"] <= cheap_cap and not holds(s, objective)]
    failed = bool(broke) or not all(declared_holds(stepped["ladder"]))
    print(f"load average before / after: {result['load_average_before']} / {result['load_average_after']}")
    print("ladder: " + (f"MISSED (objective broken at {broke} req/s, or a rung over its ε)" if failed else "held"))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
