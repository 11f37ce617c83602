"""The load-test runner: a real short locust run against a real server, judged against budgets.

A budget file that cannot be met must make `branchserve loadtest` exit non-zero and name what
it missed; the shipped budget files must parse; the step analysis must pick the right step.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from branchserve.loadtest.analysis import Records, best_step, missed_budgets, step_results, summarise
from branchserve.loadtest.plan import Budgets, PlanError, StepSearch, load_plan, shipped_plans

IMPOSSIBLE = """
compare = false
[load]
users = 2
user_rps = 20
duration_s = 4
[budgets]
p99_ms = 0.001
max_failure_ratio = 0
min_rps = 1000000
"""


def test_shipped_plans_parse_by_name_and_a_missing_one_says_which_exist(tmp_path: Path) -> None:
    assert shipped_plans() == ["ci", "dev"]
    dev, ci = load_plan("dev"), load_plan("ci")
    assert dev.step is not None and ci.step is None  # CI's short run has no step search
    assert dev.budgets.p99_ms == 25 and ci.budgets.p99_ms is not None and ci.budgets.p99_ms > dev.budgets.p99_ms
    assert ci.load.duration_s < dev.load.duration_s
    with pytest.raises(PlanError, match="shipped plans: ci, dev"):
        load_plan(str(tmp_path / "absent.toml"))
    (tmp_path / "bad.toml").write_text("[load]\nusers = 0\n")
    with pytest.raises(PlanError, match=r"bad\.toml"):
        load_plan(str(tmp_path / "bad.toml"))


def test_unmet_budgets_fail_the_run_and_say_which(tmp_path: Path, tiny_repo: Path) -> None:
    budgets = tmp_path / "impossible.toml"
    budgets.write_text(IMPOSSIBLE)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "branchserve.cli", "loadtest", "--budgets", str(budgets)]
    cmd += ["--repository", str(tiny_repo), "--model", "tiny", "--out", "out"]  # relative to where it runs
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path)

    assert done.returncode == 1, done.stdout + done.stderr
    missed = [line for line in done.stdout.splitlines() if line.startswith("MISSED")]
    assert len(missed) == 2, done.stdout
    assert "p99 latency" in missed[0] and "> budget 0.001 ms" in missed[0]
    assert "throughput" in missed[1] and "< budget 1e+06 req/s" in missed[1]
    assert "failure ratio" not in done.stdout  # real answers: no errors
    for report in ["summary.txt", "summary.json", "branchserve/judged.html", "branchserve/judged_stats.csv"]:
        assert (out / report).is_file(), report


def records(rows: list[tuple[float, float, str]]) -> Records:
    """(finish time s, latency ms, outcome) rows, all no-budget PNG requests answered at exit 0."""
    n = len(rows)
    return Records(
        t=[r[0] for r in rows],
        ms=[r[1] for r in rows],
        outcome=[r[2] for r in rows],
        task=["png"] * n,
        sample=list(range(n)),
        exit=[0] * n,
        correct=[True] * n,
    )


def test_step_analysis_keeps_the_busiest_step_within_p99() -> None:
    search = StepSearch(users_per_step=1, user_rps=10, step_s=2, steps=3, p99_ms=20)
    fast, faster_but_slow, overloaded = 10, 40, 20
    rows = [(1 + i / fast, 5.0, "ok") for i in range(fast)]  # step 0: 10/s at 5 ms
    rows += [(3 + i / faster_but_slow, 30.0, "ok") for i in range(faster_but_slow)]  # step 1: p99 30 ms
    rows += [(5 + i / overloaded, 5.0, "overload" if i % 2 else "ok") for i in range(overloaded)]  # step 2
    steps = step_results(records(rows), search, max_failure_ratio=0.01)

    assert [s.holds for s in steps] == [True, False, False]
    best = best_step(steps)
    assert best is not None and best.users == 1 and best.summary.rps == pytest.approx(10)


def test_missed_budgets_say_by_how_much() -> None:
    rows = [(i / 100, 10.0, "ok") for i in range(99)] + [(1.0, 10.0, "error")]
    summary = summarise(records(rows))
    assert summary.overloads == 0 and summary.errors == 1
    missed = missed_budgets(summary, Budgets(p50_ms=8, max_failure_ratio=0.001, min_rps=50))
    assert missed == [
        "p50 latency 10.0 ms > budget 8 ms (over by 2.0 ms, +25%)",
        "failure ratio 0.0100 (1 of 100) > budget 0.001 (over by 0.0090)",
    ]
