"""Which versions of a model to serve: Triton's `version_policy`, in the same JSON.

`{"latest": {"num_versions": 2}}` serves the two highest-numbered versions, `{"all": {}}` every
version, `{"specific": {"versions": [1, 3]}}` those named. The highest version served answers
requests that name no version.
"""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict, Field, model_validator

LATEST_ONE = '{"latest": {"num_versions": 1}}'


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Latest(_Strict):
    num_versions: int = Field(1, ge=1)


class All(_Strict):
    pass


class Specific(_Strict):
    versions: list[int] = Field(min_length=1)


class VersionPolicy(_Strict):
    """Give exactly one of `latest`, `all`, `specific`."""

    latest: Latest | None = None
    all: All | None = None
    specific: Specific | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> VersionPolicy:
        given = [k for k in ("latest", "all", "specific") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of latest, all, specific; got {given or 'none'}")
        return self

    def select(self, available: Iterable[int]) -> list[int]:
        """The versions to serve out of those on disk, ascending; a named version that is missing is left out."""
        versions = sorted(set(available))
        if self.latest is not None:
            return versions[-self.latest.num_versions :]
        if self.specific is not None:
            return [v for v in versions if v in self.specific.versions]
        return versions

    def describe(self) -> str:
        if self.latest is not None:
            return f"latest {self.latest.num_versions}"
        if self.specific is not None:
            return f"specific {self.specific.versions}"
        return "all"
