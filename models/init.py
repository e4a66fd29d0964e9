"""Weight initialisation as the ResNet and DenseNet papers (and torchvision) define it."""

from __future__ import annotations

from torch import nn


def kaiming_init(model: nn.Module) -> nn.Module:
    """He normal (fan_out) for convolutions, BN weight 1 and bias 0, zero linear biases."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model
