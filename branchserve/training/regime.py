"""The schedule's phases: a regime (`config.RegimeConfig`) applied to a model.

A run is a list of phases; each phase says which parameters train, how each exit's loss is
weighted, and which modules stay in eval mode (so frozen BatchNorm statistics cannot drift).
"""

from __future__ import annotations

from dataclasses import dataclass

from branchserve.training.config import RegimeConfig, loss_weights
from branchserve.training.model import BranchedNet


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
    if cfg.schedule == "exits-only":
        # A trained backbone stays as it is, BatchNorm statistics too: its final exit answers bit for bit as before.
        early = tuple(f"heads.{k}" for k in range(n - 1))
        weights = (*(x / sum(w[:-1]) for x in w[:-1]), 0.0)
        return [Phase("exits", cfg.epochs, weights, early, ("stem", "blocks", f"heads.{n - 1}"), cfg.lr)]
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
