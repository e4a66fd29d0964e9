"""Weight initialisation as the ResNet and DenseNet papers' code (and torchvision) define it."""

from __future__ import annotations

from torch import nn


def kaiming_init(model: nn.Module) -> nn.Module:
    """He normal (fan_out, ReLU gain) for convolutions, BN weight 1 and bias 0, zero biases.

    fan_out is the fb.resnet.torch / DenseNet Torch code's N(0, sqrt(2 / (k*k*out_channels))).
    Linear weights keep PyTorch's default, as in torchvision's ResNet and DenseNet.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
    return model
