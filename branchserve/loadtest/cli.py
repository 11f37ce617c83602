"""`branchserve loadtest`: judge a server against a budgets file, and compare it with full depth and the baseline.

Runs locust and the servers as subprocesses, so nothing here imports locust (gevent would patch
this process) and a server's CPU time is its own.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

DEFAULT_OUT = Path("reports/loadtest")


def _loadtest(args: argparse.Namespace) -> None:
    if importlib.util.find_spec("locust") is None:  # never imported here: gevent would patch this process
        raise ModuleNotFoundError("no locust", name="locust")
    from branchserve.loadtest.plan import PlanError, load_plan
    from branchserve.loadtest.report import BASELINE, BRANCHSERVE, FULL_DEPTH, steps_table, table, verdict
    from branchserve.loadtest.runner import (
        FULL_DEPTH_ENV,
        LoadTestError,
        Target,
        TargetResult,
        baseline_cmd,
        measure,
        started_target,
    )
    from branchserve.loadtest.servers import branchserve_cmd, free_port

    try:
        plan = load_plan(args.budgets)
    except PlanError as e:
        sys.exit(f"branchserve loadtest: {e}")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    results: list[TargetResult] = []
    try:
        if args.host:
            results.append(measure(Target(BRANCHSERVE, args.host.rstrip("/")), plan, args.model, out))
        else:
            with started_target(BRANCHSERVE, branchserve_cmd(args.repository, port := free_port()), port, out) as t:
                results.append(measure(t, plan, args.model, out))
            if plan.compare:
                port = free_port()
                cmd = branchserve_cmd(args.repository, port)
                with started_target(FULL_DEPTH, cmd, port, out, FULL_DEPTH_ENV) as t:
                    results.append(measure(t, plan, args.model, out))
                port = free_port()
                with started_target(BASELINE, baseline_cmd(args.repository, args.model, port), port, out) as t:
                    results.append(measure(t, plan, args.model, out))
    except LoadTestError as e:
        sys.exit(f"branchserve loadtest: {e}")

    p99 = plan.step.p99_ms if plan.step else None
    report = "\n\n".join([table(results, p99), *(steps_table(r) for r in results if r.steps)])
    missed = verdict(plan, results)
    report += "\n\n" + ("\n".join(f"MISSED: {m}" for m in missed) if missed else "all budgets met")
    print("\n" + report)
    (out / "summary.txt").write_text(report + "\n")
    summary = {"budgets_file": str(args.budgets), "plan": plan.model_dump(), "missed": missed}
    summary["targets"] = [r.model_dump() | {"capacity_rps": r.capacity_rps} for r in results]
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"reports: {out}/ (summary.txt, summary.json, <target>/judged.html, <target>/judged_stats.csv, ...)")
    if missed:
        sys.exit(1)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("loadtest", help="load-test a server with locust and judge its budgets", description=__doc__)
    p.add_argument(
        "--budgets",
        required=True,
        help="a shipped plan by name (dev: the 2-core dev machine, ~7 min; ci: CI's short lenient run) or a TOML file",
    )
    p.add_argument(
        "--repository",
        type=Path,
        default=Path("models"),
        help="model repository of the servers started (default models)",
    )
    p.add_argument("--model", default="fmnist-resnet", help="model to load-test (default fmnist-resnet)")
    p.add_argument(
        "--host", help="test this running server instead, e.g. http://127.0.0.1:8000 (no comparison, no CPU accounting)"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"folder for locust's CSV/HTML and the summary (default {DEFAULT_OUT})",
    )
    p.set_defaults(func=_loadtest)
