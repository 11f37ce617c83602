"""Which backbone a run trains and where its exits go, as plain data (no torch): the command line
checks it before anything loads, a checkpoint records it, export rebuilds the model from it."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

BUILT_IN = "branched-resnet"
NAMED = {
    "resnet18": "ResNet-18 with torchvision's module names and state-dict keys",
    "mobilenet": "a small MobileNetV2-style network of inverted-residual blocks",
}
IMPORT_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


class BackboneSpec(BaseModel):
    """The built-in branched ResNet (exits by block, `--positions`), a named backbone, or a factory
    `package.module:function` returning a `torch.nn.Module`; exits after named modules or, when
    none are named, spread evenly over the backbone's multiply-accumulates."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(BUILT_IN, description=f"{BUILT_IN}, {', '.join(NAMED)}, or package.module:factory")
    branch_after: tuple[str, ...] | None = Field(
        None, description="modules after which an exit sits, in the order they run; None: evenly by MACs"
    )

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name != BUILT_IN and name not in NAMED and not IMPORT_PATH.fullmatch(name):
            raise ValueError(
                f"{name!r} is neither {BUILT_IN}, {', '.join(NAMED)} nor an import path such as mypkg.nets:build"
            )
        return name

    @field_validator("branch_after", mode="before")
    @classmethod
    def _names_text(cls, value: object) -> object:
        return tuple(v.strip() for v in value.split(",")) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _where(self) -> BackboneSpec:
        if self.branch_after is not None:
            if self.built_in:
                raise ValueError(f"--branch-after names modules of other backbones; {BUILT_IN} takes --positions")
            if (
                not self.branch_after
                or not all(self.branch_after)
                or len(set(self.branch_after)) < len(self.branch_after)
            ):
                raise ValueError(
                    f"expected distinct module names such as layer1,layer2,layer3, got {self.branch_after}"
                )
        return self

    @property
    def built_in(self) -> bool:
        return self.name == BUILT_IN
