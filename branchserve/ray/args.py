"""The application's arguments: `args` of a Serve config file (deploy/ray/config.yaml), or `branchserve ray`'s flags.

The server's settings that mean the same under Ray are taken as they are (server/settings.py: same
names, checks and defaults; `BRANCHSERVE_*` variables on the nodes apply too). The rest belong to
Ray Serve there: its proxy binds the port, its autoscaling and backpressure replace `--workers`
and admission, so giving one of them is an error rather than a setting silently ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from branchserve.server.settings import Settings

RAY_SETTINGS = frozenset(
    {
        "repository",
        "version_policy",
        "operating_point",
        "intra_op_threads",
        "max_batch",
        "max_body_bytes",
        "image_formats",
        "api_keys",
        "api_keys_file",
    }
)

Layout = Literal["replicas", "stages"]


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    layout: Layout = Field(
        "replicas",
        description="replicas: each replica of a model's deployment runs the whole staged model; "
        "stages: each stage is a deployment, and only inputs that did not leave at an exit go on to the next",
    )
    settings: dict[str, Any] = Field(
        default_factory=dict,
        description=f"server settings that apply under Ray: {', '.join(sorted(RAY_SETTINGS))}",
    )
    stage_batch_size: int = Field(
        16, ge=1, description="stages layout: most calls a stage deployment runs as one batch"
    )
    stage_batch_wait_ms: float = Field(
        1.0, ge=0, description="stages layout: longest a stage waits for more calls to fill a batch"
    )

    @field_validator("settings")
    @classmethod
    def _server_settings(cls, value: dict[str, Any]) -> dict[str, Any]:
        if unknown := sorted(value.keys() - RAY_SETTINGS):
            raise ValueError(
                f"{', '.join(unknown)}: not a setting under Ray (the proxy, autoscaling and backpressure are "
                f"Ray Serve's); these apply: {', '.join(sorted(RAY_SETTINGS))}"
            )
        Settings(**value)
        return value

    def server_settings(self) -> Settings:
        return Settings(**self.settings)
