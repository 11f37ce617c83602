"""Run a load-test plan: start servers, drive them with locust, judge the budgets, compare.

Locust runs as a subprocess: its gevent monkey-patching must not reach this process or a server.
Servers run as subprocesses too, so their CPU time can be read from /proc (utime + stime) before
and after each run: the load generator shares the cores, and wall-clock figures alone would blur
what a request costs the server.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from pydantic import BaseModel

from branchserve.loadtest.analysis import RunSummary, Step, best_step, read_records, step_results, summarise
from branchserve.loadtest.plan import Load, Plan, StepSearch
from branchserve.loadtest.samples import sample_pngs
from branchserve.loadtest.servers import ServerError, cpu_seconds, started_server

LOADTEST_DIR = Path(__file__).parent
LOCUSTFILE = LOADTEST_DIR / "locustfile.py"
STEP_SHAPE = LOADTEST_DIR / "step_load.py"


class LoadTestError(RuntimeError):
    """A server or locust failed to start or run: not a missed budget."""


@dataclass
class Target:
    """A server under test: its URL, and its process when this runner started it (for CPU accounting)."""

    name: str
    url: str
    pid: int | None = None


@contextmanager
def started_target(
    name: str, cmd: list[str], port: int, out: Path, env: dict[str, str] | None = None
) -> Iterator[Target]:
    """A server under test until the block ends; its output goes to out/<name>-server.log."""
    try:
        with started_server(cmd, port, out / f"{name}-server.log", env) as server:
            yield Target(name, server.url, server.pid)
    except ServerError as e:
        raise LoadTestError(f"{name}: {e}") from None


def baseline_cmd(repository: Path, model: str, port: int) -> list[str]:
    return [
        sys.executable, "-m", "branchserve.loadtest.baseline_server",
        "--repository", str(repository), "--model", model, "--port", str(port),
    ]  # fmt: skip


FULL_DEPTH_ENV = {
    "BRANCHSERVE_OPERATING_POINT": json.dumps({"point": "final"}),
    "BRANCHSERVE_LADDER": "{}",  # never step down to a cheaper rung under load
}
"""branchserve with early exit switched off: every input runs to the last exit, whatever the load."""


def run_locust(target: Target, model: str, out: Path, label: str, args: list[str], files: list[Path]) -> Path:
    """One headless locust run; returns the per-request results file. Reports go to out/<target>/<label>*."""
    folder = out.resolve() / target.name  # absolute: locust may resolve paths elsewhere
    folder.mkdir(parents=True, exist_ok=True)
    results = folder / f"{label}-requests.json"
    results.unlink(missing_ok=True)  # a stale file must not pass for this run's
    cmd = [
        sys.executable, "-m", "locust", "-f", ",".join(str(f) for f in files), "--headless",
        "--host", target.url, "--model", model, "--results", str(results),
        "--csv", str(folder / label), "--html", str(folder / f"{label}.html"),
        "--only-summary", "--loglevel", "WARNING", "--exit-code-on-error", "0", "--stop-timeout", "5", *args,
    ]  # fmt: skip
    with (folder / f"{label}-locust.log").open("w") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0 or not results.exists():
        tail = (folder / f"{label}-locust.log").read_text()[-3000:]
        raise LoadTestError(f"locust failed on {target.name} ({label}), exit {done.returncode}:\n{tail}")
    return results


WARM_UP_REQUESTS = 100


def warm_up(target: Target, model: str) -> None:
    """Real requests before measuring: first-call costs (imports, allocations, caches) stay out of the figures."""
    with httpx.Client(base_url=target.url, timeout=30) as client:
        client.get(f"/v1/models/{model}").raise_for_status()
        for png in sample_pngs()[:WARM_UP_REQUESTS]:
            r = client.post(f"/v1/models/{model}/predict", content=png, headers={"content-type": "image/png"})
            if r.status_code != 200:
                raise LoadTestError(f"warm-up request to {target.name} failed: HTTP {r.status_code}: {r.text[:300]}")


def judged_run(target: Target, model: str, load: Load, out: Path) -> RunSummary:
    args = [
        "-u",
        str(load.users),
        "-r",
        str(load.users),
        "-t",
        f"{load.duration_s:g}s",
        "--user-rps",
        f"{load.user_rps:g}",
    ]
    cpu_before = cpu_seconds(target.pid) if target.pid else None
    results = run_locust(target, model, out, "judged", args, [LOCUSTFILE])
    summary = summarise(read_records(results))
    if cpu_before is not None and target.pid and summary.requests:
        summary.server_cpu_ms_per_request = 1000 * (cpu_seconds(target.pid) - cpu_before) / summary.requests
    return summary


def step_run(target: Target, model: str, search: StepSearch, max_failure_ratio: float, out: Path) -> list[Step]:
    args = [
        "--user-rps", f"{search.user_rps:g}", "--step-users", str(search.users_per_step),
        "--step-seconds", f"{search.step_s:g}", "--steps", str(search.steps),
        "-t", f"{search.step_s * search.steps + 10:g}s",  # a backstop: the shape stops the run itself
    ]  # fmt: skip
    results = run_locust(target, model, out, "steps", args, [LOCUSTFILE, STEP_SHAPE])
    return step_results(read_records(results), search, max_failure_ratio)


class TargetResult(BaseModel):
    name: str
    judged: RunSummary
    steps: list[Step] = []

    @property
    def capacity_rps(self) -> float | None:
        best = best_step(self.steps)
        return best.summary.rps if best else None


def measure(target: Target, plan: Plan, model: str, out: Path) -> TargetResult:
    load = plan.load
    print(
        f"[{target.name}] judged run: {load.users} users × {load.user_rps:g} req/s, {load.duration_s:g} s", flush=True
    )
    warm_up(target, model)
    result = TargetResult(name=target.name, judged=judged_run(target, model, plan.load, out))
    if plan.step:
        print(f"[{target.name}] step load: {plan.step.steps} steps of {plan.step.step_s:g} s", flush=True)
        result.steps = step_run(target, model, plan.step, plan.budgets.max_failure_ratio, out)
    return result
