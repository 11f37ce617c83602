"""The model a run trains: the built-in branched ResNet, or a backbone cut into stages; from flags
at the start of a run and from the checkpoint at export."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from branchserve.repo.manifest import InputSpec, input_from_v1
from branchserve.training.backbones.imported import build_imported
from branchserve.training.backbones.init import init_backbone, init_built_in
from branchserve.training.backbones.mobile import mobilenet
from branchserve.training.backbones.resnet18 import resnet18
from branchserve.training.backbones.spec import BackboneSpec
from branchserve.training.backbones.staged import StagedNet, equidistant_cuts
from branchserve.training.config import ArchConfig, RegimeConfig, arch_for
from branchserve.training.model import BranchedNet

NAMED = {"resnet18": lambda classes, channels, size: resnet18(classes, channels), "mobilenet": mobilenet}


def backbone_module(name: str, num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    channels, size, _ = input_shape
    if name in NAMED:
        return NAMED[name](num_classes, channels, size)
    return build_imported(name, num_classes, channels, size)


def build_model(
    cfg: RegimeConfig,
    spec: BackboneSpec,
    input_spec: InputSpec,
    num_classes: int,
    base_arch: ArchConfig | None = None,
    init: Path | None = None,
) -> BranchedNet:
    """The run's model with its exits, initial weights drawn from `cfg.seed`, then `init` loaded."""
    torch.manual_seed(cfg.seed)
    if spec.built_in:
        channels, size, _ = input_spec.shape
        base = base_arch or ArchConfig(in_channels=channels, image_size=size, num_classes=num_classes).scaled()
        model = BranchedNet(arch_for(cfg, base))
        if init:
            init_built_in(model, init)
        return model
    backbone = backbone_module(spec.name, num_classes, input_spec.shape)
    if init:
        init_backbone(backbone, init, spec.name)
    cuts = spec.branch_after or equidistant_cuts(backbone, cfg.branches, torch.zeros(1, *input_spec.shape), spec.name)
    return StagedNet(backbone, cuts, input_spec.shape, num_classes, spec.name)


def backbone_record(model: BranchedNet) -> dict[str, Any] | None:
    """What rebuilds a cut backbone (its name and cuts); None for the built-in, which its arch rebuilds."""
    if isinstance(model, StagedNet):
        return {"name": model.backbone_name, "branch_after": list(model.cuts)}
    return None


def model_from_checkpoint(checkpoint: dict[str, Any]) -> BranchedNet:
    """The trained model a run's checkpoint holds, in eval mode."""
    arch = checkpoint["arch"]
    if checkpoint.get("backbone"):
        record = checkpoint["backbone"]
        shape = InputSpec.model_validate(input_from_v1(checkpoint["input"])).shape
        backbone = backbone_module(record["name"], arch["num_classes"], shape)
        model: BranchedNet = StagedNet(
            backbone,
            record["branch_after"],
            shape,
            arch["num_classes"],
            record["name"],
            arch["head_conv_width"],
            arch["head_pool"],
        )
    else:
        model = BranchedNet(
            ArchConfig(**{**arch, "blocks": tuple(map(tuple, arch["blocks"])), "exits": tuple(arch["exits"])})
        )
    model.load_state_dict(checkpoint["model"])
    return model.eval()
