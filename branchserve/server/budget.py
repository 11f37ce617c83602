"""A request's own budget: it applies to that request only (the server's lives in a Policy)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Budget(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        frozen=True,  # NO_BUDGET is shared by every request that names none
        json_schema_extra={"examples": [{"deadline_ms": 2.0}, {"max_exit": 1}, {"max_accuracy_drop": 0}]},
    )

    deadline_ms: float | None = Field(
        None,
        gt=0,
        le=60_000,
        description="stop before a stage whose predicted time would overrun it and answer with the deepest exit so far; "
        "a deadline shorter than the first stage alone is refused (422), one that passes while the request waits "
        "gets 503 + Retry-After",
    )
    max_exit: int | None = Field(None, ge=0, description="deepest exit allowed to answer")
    max_accuracy_drop: float | None = Field(
        None, ge=0, le=1, description="replaces the server's operating point with the cheapest that meets this target"
    )


NO_BUDGET = Budget()
