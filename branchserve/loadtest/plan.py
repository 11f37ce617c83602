"""The load-test plan: the judged load, its budgets, the step search and the comparison, from TOML.

A budgets file is tied to a machine: the same server meets different budgets on a laptop and on a
2-core CI runner, so each machine class gets its own file. The shipped ones are in `budgets/`
and can be named: `dev` (the project's 2-core dev machine) and `ci` (CI's short, lenient run).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

BUDGETS_DIR = Path(__file__).parent / "budgets"


class PlanError(ValueError):
    """A budgets file that is missing or invalid."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Load(Strict):
    """The judged run: `users` paced users, each at `user_rps` (0: back to back), for `duration_s`."""

    users: int = Field(ge=1)
    user_rps: float = Field(ge=0)
    duration_s: float = Field(gt=0)


class Budgets(Strict):
    """What the judged run must hold. Percentiles and throughput count successful answers only."""

    p50_ms: float | None = Field(None, gt=0)
    p95_ms: float | None = Field(None, gt=0)
    p99_ms: float | None = Field(None, gt=0)
    max_failure_ratio: float = Field(0.0, ge=0, le=1, description="errors / requests; overload answers apart")
    max_overload_ratio: float = Field(1.0, ge=0, le=1, description="503/429 answers / requests")
    min_rps: float | None = Field(None, gt=0, description="successful answers per second")


class StepSearch(Strict):
    """Step load: `users_per_step` more paced users every `step_s`; the best step holds p99 and failures."""

    users_per_step: int = Field(ge=1)
    user_rps: float = Field(gt=0)
    step_s: float = Field(ge=2)
    steps: int = Field(ge=1)
    p99_ms: float = Field(gt=0)


class VersusBaseline(Strict):
    """Claims against the plain FastAPI + ORT baseline, judged when the comparison runs."""

    max_cpu_ratio: float | None = Field(None, gt=0, description="server CPU per request, branchserve / baseline")
    min_capacity_ratio: float | None = Field(None, gt=0, description="step search's best req/s, branchserve / baseline")
    max_accuracy_drop_pp: float | None = Field(None, ge=0, description="no-budget accuracy below full depth's")


class Plan(Strict):
    load: Load
    budgets: Budgets
    step: StepSearch | None = None
    compare: bool = Field(True, description="also run full depth and the baseline, and print ratios")
    versus_baseline: VersusBaseline = VersusBaseline()


def shipped_plans() -> list[str]:
    return sorted(p.stem for p in BUDGETS_DIR.glob("*.toml"))


def plan_path(name_or_path: str) -> Path:
    """A shipped plan's file (`dev`, `ci`), or the path given."""
    return BUDGETS_DIR / f"{name_or_path}.toml" if name_or_path in shipped_plans() else Path(name_or_path)


def load_plan(name_or_path: str) -> Plan:
    path = plan_path(name_or_path)
    try:
        with path.open("rb") as f:
            return Plan.model_validate(tomllib.load(f))
    except FileNotFoundError:
        raise PlanError(f"no budgets file {path}; shipped plans: {', '.join(shipped_plans())}") from None
    except (tomllib.TOMLDecodeError, ValidationError) as e:
        raise PlanError(f"{path}: {e}") from None
