"""Server settings: defaults < `BRANCHSERVE_*` environment variables < `branchserve serve` flags.

Thread defaults are for a small CPU box (measured on 2 cores, see docs/serving.md): one intra-op
thread per stage session and as many inference threads as cores, so requests run side by side
instead of thread pools spinning against each other.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from branchserve.repo.points import Policy
from branchserve.repo.versions import LATEST_ONE, VersionPolicy
from branchserve.server.ladder import LadderSpec

MIN_TOKEN_CHARS = 16


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BRANCHSERVE_", cli_kebab_case=True)

    repository: Path = Field(Path("models"), description="model repository: <name>/<version>/manifest.json")
    host: str = Field("127.0.0.1", description="address to bind; the Docker image uses 0.0.0.0")
    port: int = Field(8000, ge=0, le=65535)
    grpc_port: int = Field(
        8001,
        ge=0,
        le=65535,
        description="port of the Open Inference Protocol's gRPC service (needs branchserve[grpc]); 0 turns it off",
    )
    version_policy: str = Field(
        LATEST_ONE,
        description="which versions of each model to serve, as Triton's version_policy JSON: "
        '{"latest": {"num_versions": N}}, {"all": {}} or {"specific": {"versions": [1, 3]}}',
    )
    operating_point: str = Field(
        "{}",
        description="server operating point for every model, as the JSON the admin endpoint takes, e.g. "
        '{"max_accuracy_drop": 0.005}; {} is the manifest\'s default',
    )
    workers: int = Field(
        os.cpu_count() or 1,
        ge=1,
        description="server processes on one port, each with every model (one per core: each answers small "
        "requests on its own event loop, so one process uses one core)",
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
    max_in_flight: int = Field(
        64, ge=1, description="requests with their body received, queued or computing at once; more get 503"
    )
    max_wait_ms: float = Field(
        15.0, gt=0, description="admission: longest a request may wait for the event loop or a worker to start it"
    )
    queue_target_ms: float = Field(
        5.0, gt=0, description="admission: while a queue stands, a request may wait only this long"
    )
    queue_interval_ms: float = Field(
        100.0, gt=0, description="admission: a queue stands when no request started within the target for this long"
    )
    max_header_bytes: int = Field(16 << 10, ge=1024, description="largest request line and headers (431 above)")
    request_timeout_s: float = Field(
        10.0, gt=0, description="from a request's first byte to its last, and for a new connection to start one (408)"
    )
    image_formats: Annotated[list[Literal["png", "jpeg"]], NoDecode] = Field(
        ["png", "jpeg"],
        min_length=1,
        description="image formats predict decodes, checked from the first bytes before any decoder runs",
    )
    ladder: str = Field(
        '{"p99_ms": 25, "risk": 0.05, "max_disagreement": [0.02, 0.05]}',
        description="load-adaptive ladder, as JSON: the p99 objective and the certified targets of its cheaper rungs, "
        "loosest last (the floor); {} turns it off",
    )
    monitor_fraction: float = Field(
        0.02, ge=0, le=1, description="share of inputs the exit-quality monitor runs to the final exit (0: off)"
    )
    monitor_risk: float = Field(
        0.05,
        gt=0,
        lt=1,
        description="exit-quality monitor: probability of any false alarm while traffic is as certified",
    )
    monitor_action: Literal["alert", "stricter", "full"] = Field(
        "alert", description="on an exit-quality alarm: alert only, serve the next stricter rung, or full depth"
    )
    admin_token: SecretStr | None = Field(
        None,
        description="bearer token of the admin endpoints (at least 16 characters); without one they are disabled",
    )
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        [],
        description="API keys for predict and model metadata (bearer tokens), comma-separated; none: open to every client",
    )
    api_keys_file: Path | None = Field(
        None, description="a file of API keys, one per line, re-read when it changes (rotation without restart)"
    )
    log_level: str = Field("info", description="uvicorn log level")

    @field_validator("operating_point")
    @classmethod
    def _is_policy(cls, text: str) -> str:
        Policy.model_validate_json(text)
        return text

    @field_validator("ladder")
    @classmethod
    def _is_ladder(cls, text: str) -> str:
        LadderSpec.model_validate_json(text)
        return text

    @field_validator("version_policy")
    @classmethod
    def _is_version_policy(cls, text: str) -> str:
        VersionPolicy.model_validate_json(text)
        return text

    @field_validator("image_formats", "api_keys", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value

    @field_validator("admin_token")
    @classmethod
    def _long_enough(cls, token: SecretStr | None) -> SecretStr | None:
        if token is not None and len(token.get_secret_value()) < MIN_TOKEN_CHARS:
            raise ValueError(f"must have at least {MIN_TOKEN_CHARS} characters (an empty token does not disable it)")
        return token

    def environment(self) -> dict[str, str]:
        """The settings given (by flag or variable) as BRANCHSERVE_* variables, secrets included: what a
        worker process, which inherits the environment but not the command line, starts from."""
        env = {}
        for name in sorted(self.model_fields_set):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, list):
                value = ",".join(v.get_secret_value() if isinstance(v, SecretStr) else str(v) for v in value)
            elif isinstance(value, SecretStr):
                value = value.get_secret_value()
            env[f"BRANCHSERVE_{name.upper()}"] = str(value)
        return env

    @property
    def policy(self) -> Policy:
        return Policy.model_validate_json(self.operating_point)

    @property
    def ladder_spec(self) -> LadderSpec:
        return LadderSpec.model_validate_json(self.ladder)

    @property
    def versions(self) -> VersionPolicy:
        return VersionPolicy.model_validate_json(self.version_policy)
