"""The paper's ImageNet models, as torchvision defines them (weights=None, torchvision's init)."""

from __future__ import annotations

import torchvision
from torch import nn

from .registry import register_model


def _stem_channels(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """The same stem convolution taking `in_channels` (e.g. 1 for grey images)."""
    if in_channels == conv.in_channels:
        return conv
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    bias=conv.bias is not None)
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    return new


@register_model
def resnet50(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    model = torchvision.models.resnet50(weights=None, num_classes=num_classes)
    model.conv1 = _stem_channels(model.conv1, in_channels)
    return model


@register_model
def wrn50_2(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    model = torchvision.models.wide_resnet50_2(weights=None, num_classes=num_classes)
    model.conv1 = _stem_channels(model.conv1, in_channels)
    return model


@register_model
def densenet161(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    model = torchvision.models.densenet161(weights=None, num_classes=num_classes)
    model.features.conv0 = _stem_channels(model.features.conv0, in_channels)
    return model
