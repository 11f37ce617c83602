"""Branched residual CNN: a backbone of basic blocks with classification exits after chosen blocks.

The backbone is the same whether it has one exit or many, so a branched model and its
unbranched twin differ only in their heads. Stages are the runs of blocks between exits:
stage k ends at exit k, which is how export splits the graph.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from branchserve.training.config import ArchConfig


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ExitHead(nn.Module):
    """Optional 1×1 conv, average pooling to a small grid, then one linear layer."""

    def __init__(self, cin: int, conv_width: int, pool: int, num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = cin
        if conv_width:
            layers += [nn.Conv2d(cin, conv_width, 1, bias=False), nn.BatchNorm2d(conv_width), nn.ReLU()]
            width = conv_width
        layers += [nn.AdaptiveAvgPool2d(pool), nn.Flatten(), nn.Linear(width * pool * pool, num_classes)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BranchedNet(nn.Module):
    """Backbone with one head per exit; `forward` returns every exit's logits, shallowest first."""

    def __init__(self, arch: ArchConfig) -> None:
        super().__init__()
        self.arch = arch.checked()
        self.stem = nn.Sequential(
            nn.Conv2d(arch.in_channels, arch.stem_width, 3, min(arch.stem_stride, 2), 1, bias=False),
            nn.BatchNorm2d(arch.stem_width),
            nn.ReLU(),
            *([nn.MaxPool2d(3, 2, 1)] if arch.stem_stride == 4 else []),
        )
        blocks, cin = [], arch.stem_width
        for width, stride in arch.blocks:
            blocks.append(BasicBlock(cin, width, stride))
            cin = width
        self.blocks = nn.ModuleList(blocks)
        self.heads = nn.ModuleList(
            ExitHead(arch.blocks[i][0], arch.head_conv_width, arch.head_pool, arch.num_classes) for i in arch.exits
        )

    def stage_blocks(self, k: int) -> range:
        """Block indices that stage k runs (stage 0 also runs the stem)."""
        start = 0 if k == 0 else self.arch.exits[k - 1] + 1
        return range(start, self.arch.exits[k] + 1)

    def run_stage(self, k: int, x: Tensor) -> tuple[Tensor, Tensor]:
        """Run stage k on its input; return (boundary tensor, exit k's logits)."""
        if k == 0:
            x = self.stem(x)
        for i in self.stage_blocks(k):
            x = self.blocks[i](x)
        return x, self.heads[k](x)

    def features(self, x: Tensor) -> list[Tensor]:
        """Output of every backbone block, for representation analysis."""
        x, out = self.stem(x), []
        for block in self.blocks:
            x = block(x)
            out.append(x)
        return out

    def forward(self, x: Tensor) -> list[Tensor]:
        logits = []
        for k in range(len(self.heads)):
            x, y = self.run_stage(k, x)
            logits.append(y)
        return logits


def count_macs(module: nn.Module, x: Tensor) -> tuple[int, Tensor]:
    """Multiply-accumulates of conv and linear layers for one sample, and the module's output."""
    total = 0

    def hook(m: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> None:
        nonlocal total
        if isinstance(m, nn.Conv2d):
            total += out[0].numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.Linear):
            total += m.in_features * m.out_features

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    try:
        with torch.no_grad():
            y = module(x[:1])
    finally:
        for h in handles:
            h.remove()
    return total, y


def stage_macs(model: BranchedNet) -> list[dict[str, int]]:
    """Per-stage MACs of the backbone part and of the exit head, for one input."""
    a = model.arch
    x = torch.zeros(1, a.in_channels, a.image_size, a.image_size)
    was_training = model.training
    model.eval()
    rows = []
    for k, head in enumerate(model.heads):
        body = nn.Sequential(*([model.stem] if k == 0 else []), *(model.blocks[i] for i in model.stage_blocks(k)))
        body_macs, x = count_macs(body, x)
        head_macs, _ = count_macs(head, x)
        rows.append({"stage": k, "backbone_macs": body_macs, "head_macs": head_macs})
    model.train(was_training)
    return rows
