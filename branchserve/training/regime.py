"""The training regime as data: presets, loss weighting, objective and the schedule's phases.

A run is a list of phases; each phase says which parameters train, how each exit's loss is
weighted, and which modules stay in eval mode (so frozen BatchNorm statistics cannot drift).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from branchserve.training.model import ArchConfig, BranchedNet, equidistant_positions

Weighting = Literal["equal", "seed", "increasing", "decreasing"]
Schedule = Literal["joint", "backbone-first", "joint+finetune"]
Objective = Literal["ce", "ce+distill"]
FinetuneScope = Literal["after-last-branch", "all"]


class RegimeConfig(BaseModel):
    """Every knob of a run. Presets fill these; flags override single fields."""

    model_config = ConfigDict(extra="forbid")

    branches: int = Field(4, ge=1, description="number of exits, the last one after the last block")
    positions: Literal["equidistant"] | list[int] = "equidistant"
    weighting: Weighting | list[float] = "equal"
    objective: Objective = "ce"
    distill_temperature: float = Field(3.0, gt=0)
    distill_alpha: float = Field(0.5, ge=0, le=1, description="share of the distillation term in an early exit's loss")
    schedule: Schedule = "joint+finetune"
    finetune_scope: FinetuneScope = "after-last-branch"
    epochs: int = Field(10, ge=1, description="total epochs, all phases together: the budget every preset shares")
    finetune_epochs: int = Field(2, ge=0, description="final-exit-only epochs at the end (joint+finetune)")
    refit_epochs: int = Field(1, ge=0, description="branch-head refit epochs after finetune_scope=all")
    backbone_epochs: int = Field(3, ge=0, description="final-exit-only epochs at the start (backbone-first)")
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0)
    finetune_lr: float = Field(0.01, gt=0)
    weight_decay: float = Field(5e-4, ge=0)
    batch_size: int = Field(128, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> RegimeConfig:
        if isinstance(self.positions, list) and len(self.positions) != self.branches:
            raise ValueError(f"{len(self.positions)} positions given for {self.branches} branches")
        if isinstance(self.weighting, list) and len(self.weighting) != self.branches:
            raise ValueError(f"{len(self.weighting)} weights given for {self.branches} branches")
        if self.schedule == "joint+finetune":
            tail = self.finetune_epochs + (self.refit_epochs if self.finetune_scope == "all" else 0)
            if self.branches > 1 and not 0 < tail < self.epochs:
                raise ValueError("joint+finetune needs 0 < finetune (+ refit) epochs < epochs")
        if self.schedule == "backbone-first" and not 0 < self.backbone_epochs < self.epochs:
            raise ValueError("backbone-first needs 0 < backbone_epochs < epochs")
        return self


PRESETS: dict[str, dict[str, object]] = {
    "progressive": {"weighting": "equal", "positions": "equidistant", "schedule": "joint+finetune"},
    "seed-weights": {"weighting": "seed", "positions": "equidistant", "schedule": "joint+finetune"},
    "joint": {"weighting": "equal", "positions": "equidistant", "schedule": "joint"},
    "unbranched": {"branches": 1, "weighting": "equal", "schedule": "joint"},
}


def loss_weights(weighting: Weighting | list[float], n: int) -> list[float]:
    """Per-exit weights normalised to sum to 1, so the learning rate means the same for every choice."""
    if isinstance(weighting, list):
        raw = list(weighting)
    elif weighting == "equal":
        raw = [1.0] * n
    elif weighting == "seed":
        raw = [1.0] * (n - 1) + [2.0]
    elif weighting == "increasing":
        raw = [float(k + 1) for k in range(n)]
    else:
        raw = [float(n - k) for k in range(n)]
    total = sum(raw)
    if total <= 0 or any(w < 0 for w in raw):
        raise ValueError(f"loss weights must be non-negative with a positive sum, got {raw}")
    return [w / total for w in raw]


def arch_for(cfg: RegimeConfig, base: ArchConfig) -> ArchConfig:
    n_blocks = len(base.blocks)
    positions = (
        tuple(cfg.positions) if isinstance(cfg.positions, list) else equidistant_positions(n_blocks, cfg.branches)
    )
    return ArchConfig(**{**base.__dict__, "exits": positions})


@dataclass(frozen=True)
class Phase:
    """`trainable` and `frozen_eval` are module-name prefixes of BranchedNet (stem, blocks.i, heads.k)."""

    name: str
    epochs: int
    weights: tuple[float, ...]
    trainable: tuple[str, ...]
    frozen_eval: tuple[str, ...]
    lr: float


def phases(cfg: RegimeConfig, model: BranchedNet) -> list[Phase]:
    n = len(model.heads)
    w = tuple(loss_weights(cfg.weighting, n))
    final_only = tuple([0.0] * (n - 1) + [1.0])
    everything = ("stem", "blocks", "heads")
    if n == 1 or cfg.schedule == "joint":
        return [Phase("joint", cfg.epochs, w, everything, (), cfg.lr)]
    if cfg.schedule == "backbone-first":
        first = (*everything[:2], f"heads.{n - 1}")
        return [
            Phase("backbone", cfg.backbone_epochs, final_only, first, (), cfg.lr),
            Phase("joint", cfg.epochs - cfg.backbone_epochs, w, everything, (), cfg.lr),
        ]
    tail_start = model.arch.exits[-2] + 1
    if cfg.finetune_scope == "after-last-branch":
        # Only what no earlier exit can see: the last stage's blocks and the final head.
        late = (*(f"blocks.{i}" for i in range(tail_start, len(model.blocks))), f"heads.{n - 1}")
        early = ("stem", *(f"blocks.{i}" for i in range(tail_start)), *(f"heads.{k}" for k in range(n - 1)))
        return [
            Phase("joint", cfg.epochs - cfg.finetune_epochs, w, everything, (), cfg.lr),
            Phase("finetune", cfg.finetune_epochs, final_only, late, early, cfg.finetune_lr),
        ]
    joint = cfg.epochs - cfg.finetune_epochs - cfg.refit_epochs
    early_heads = tuple(f"heads.{k}" for k in range(n - 1))
    branch_only = tuple([*w[:-1], 0.0])
    return [
        Phase("joint", joint, w, everything, (), cfg.lr),
        Phase(
            "finetune",
            cfg.finetune_epochs,
            final_only,
            ("stem", "blocks", f"heads.{n - 1}"),
            early_heads,
            cfg.finetune_lr,
        ),
        Phase(
            "refit", cfg.refit_epochs, branch_only, early_heads, ("stem", "blocks", f"heads.{n - 1}"), cfg.finetune_lr
        ),
    ]
