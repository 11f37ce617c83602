"""A small MobileNetV2-style network: a strided stem, inverted-residual blocks (1×1 expansion,
3×3 depthwise, 1×1 projection, a shortcut where shapes allow), a 1×1 head and a linear classifier.

`features.0` … `features.9` run in a chain, so an exit can follow any of them. The stem is strided
only for inputs above 32 pixels, so small inputs keep some resolution for the later blocks.
"""

from __future__ import annotations

from torch import Tensor, nn

BLOCKS = ((16, 1, 1), (24, 4, 2), (24, 4, 1), (32, 4, 2), (32, 4, 1), (64, 4, 2), (64, 4, 1), (96, 4, 1))
"""(output channels, expansion, stride) of each inverted-residual block."""
STEM_WIDTH, HEAD_WIDTH = 16, 256


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    return nn.Sequential(*layers, nn.ReLU6(inplace=True)) if relu else nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, expansion: int, stride: int) -> None:
        super().__init__()
        hidden = cin * expansion
        layers = [conv_bn(cin, hidden, 1)] if expansion != 1 else []
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden), conv_bn(hidden, cout, 1, relu=False)]
        self.conv = nn.Sequential(*layers)
        self.shortcut = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.shortcut else self.conv(x)


class MobileNet(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 3, image_size: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = [conv_bn(in_channels, STEM_WIDTH, 3, 2 if image_size > 32 else 1)]
        cin = STEM_WIDTH
        for cout, expansion, stride in BLOCKS:
            layers.append(InvertedResidual(cin, cout, expansion, stride))
            cin = cout
        layers.append(conv_bn(cin, HEAD_WIDTH, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(HEAD_WIDTH, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


def mobilenet(num_classes: int, in_channels: int, image_size: int) -> MobileNet:
    return MobileNet(num_classes, in_channels, image_size)
