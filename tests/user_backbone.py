"""A user's own networks, named by import path in the tests (`user_backbone:build`): a chain of
named blocks, and one whose residual connection skips over a block, so it is no chain there."""

from __future__ import annotations

from torch import Tensor, nn


def block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class SmallNet(nn.Module):
    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.block1 = block(in_channels, 16, 2)
        self.block2 = block(16, 16, 1)
        self.block3 = block(16, 32, 2)
        self.block4 = block(32, 32, 1)
        self.classifier = nn.Linear(32, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block4(self.block3(self.block2(self.block1(x))))
        return self.classifier(x.mean((2, 3)))


class SkipNet(SmallNet):
    def forward(self, x: Tensor) -> Tensor:
        a = self.block1(x)
        x = self.block4(self.block3(self.block2(a) + a))  # block1's output skips over block2
        return self.classifier(x.mean((2, 3)))


def build(num_classes: int, in_channels: int) -> SmallNet:
    return SmallNet(num_classes, in_channels)


def build_skip(num_classes: int, in_channels: int) -> SkipNet:
    return SkipNet(num_classes, in_channels)
