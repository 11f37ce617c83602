"""Server settings: defaults < `BRANCHSERVE_*` environment variables < `branchserve serve` flags.

Thread defaults are for a small CPU box (measured on 2 cores, see docs/serving.md): one intra-op
thread per stage session and as many inference threads as cores, so requests run side by side
instead of thread pools spinning against each other.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from branchserve.repo.points import Policy


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BRANCHSERVE_", cli_kebab_case=True)

    repository: Path = Field(Path("models"), description="model repository: <name>/<version>/manifest.json")
    host: str = Field("127.0.0.1", description="address to bind; the Docker image uses 0.0.0.0")
    port: int = Field(8000, ge=0, le=65535)
    operating_point: str = Field(
        "{}",
        description="server operating point for every model, as the JSON the admin endpoint takes, e.g. "
        '{"max_accuracy_drop": 0.005}; {} is the manifest\'s default',
    )
    intra_op_threads: int = Field(1, ge=1, description="ONNX Runtime threads inside each stage session")
    inference_threads: int = Field(os.cpu_count() or 1, ge=1, description="requests computed at once: one per core")
    inline_body_bytes: int = Field(
        16 << 10,
        ge=0,
        description="a body up to this size holding one input (or a small image) is answered on the event loop, "
        "where a hop to a worker thread would cost as much as its work; 0 sends every request to a thread",
    )
    max_batch: int = Field(256, ge=1, description="most inputs one request may carry")
    max_body_bytes: int = Field(8 << 20, ge=1024, description="largest request body")
    max_in_flight: int = Field(64, ge=1, description="requests admitted at once; more get 503 with Retry-After")
    degrade_in_flight: int = Field(
        16, ge=1, description="above this many requests in flight, serve at the cheaper load point"
    )
    degrade_accuracy_drop: float = Field(
        0.01, ge=0, le=1, description="the load point: cheapest point within this accuracy drop of the final exit"
    )
    admin_token: str | None = Field(None, description="bearer token the admin endpoint requires, if set")
    log_level: str = Field("info", description="uvicorn log level")

    @field_validator("operating_point")
    @classmethod
    def _is_policy(cls, text: str) -> str:
        Policy.model_validate_json(text)
        return text

    @property
    def policy(self) -> Policy:
        return Policy.model_validate_json(self.operating_point)
