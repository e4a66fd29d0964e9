"""DenseNet-121 for CIFAR (growth 32, blocks 6-12-24-16, compression 0.5, 3x3 stem, no max-pool).

As the paper's kuangliu-style definition, but every ReLU and pooling is a module (the paper's used
F.relu, which DIVISION cannot convert).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .init import kaiming_init
from .registry import register_model


class Bottleneck(nn.Module):
    """BN-ReLU-conv1x1(4*growth)-BN-ReLU-conv3x3(growth), its output concatenated before x."""

    def __init__(self, in_planes: int, growth: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)  # acts on bn1's output, so x (concatenated) is intact
        self.conv1 = nn.Conv2d(in_planes, 4 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu1(self.bn1(x)))
        out = self.conv2(self.relu2(self.bn2(out)))
        return torch.cat([out, x], 1)  # new features first, as the reference


class Transition(nn.Module):
    """BN-ReLU-conv1x1 to the compressed width, then 2x2 average pooling."""

    def __init__(self, in_planes: int, out_planes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_planes, out_planes, 1, bias=False)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv(self.relu(self.bn(x))))


class CifarDenseNet(nn.Module):
    """DenseNet-BC with a 3x3 stem of 2*growth channels and no max-pool (32x32 inputs)."""

    def __init__(self, blocks: list[int], growth: int = 32, reduction: float = 0.5,
                 num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        planes = 2 * growth
        self.conv1 = nn.Conv2d(in_channels, planes, 3, padding=1, bias=False)
        stages: list[nn.Module] = []
        for i, count in enumerate(blocks):
            layers = []
            for _ in range(count):
                layers.append(Bottleneck(planes, growth))
                planes += growth
            stages.append(nn.Sequential(*layers))
            if i < len(blocks) - 1:
                out_planes = int(math.floor(planes * reduction))
                stages.append(Transition(planes, out_planes))
                planes = out_planes
        self.features = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # avg_pool(4) at 32x32; also fits 28x28 inputs
        self.fc = nn.Linear(planes, num_classes)
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.conv1(x))
        x = self.relu(self.bn(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model(image_size=32)
def densenet121(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """CIFAR DenseNet-121 (kuangliu's definition): 6.96M parameters for 10 classes."""
    return CifarDenseNet([6, 12, 24, 16], growth=32, num_classes=num_classes, in_channels=in_channels)
