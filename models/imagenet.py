"""The paper's ImageNet models, as torchvision defines them (weights=None, torchvision's init)."""

from __future__ import annotations

import torchvision
from torch import nn

from .registry import register_model


def _stem_with_channels(conv: nn.Conv2d, in_channels: int, fan_mode: str) -> nn.Conv2d:
    """The same stem convolution taking `in_channels` (e.g. 1 for grey images).

    Initialised as torchvision initialises that model's convolutions: ResNets use fan_out,
    DenseNets kaiming_normal_'s default fan_in.
    """
    if in_channels == conv.in_channels:
        return conv
    new = nn.Conv2d(
        in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
    )
    nn.init.kaiming_normal_(new.weight, mode=fan_mode, nonlinearity="relu")
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    return new


@register_model(image_size=224)
def resnet50(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    """torchvision ResNet-50: 25.557M parameters for 1000 classes."""
    model = torchvision.models.resnet50(weights=None, num_classes=num_classes)
    model.conv1 = _stem_with_channels(model.conv1, in_channels, "fan_out")
    return model


@register_model(image_size=224)
def wrn50_2(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    """torchvision Wide ResNet-50-2: 68.88M parameters for 1000 classes."""
    model = torchvision.models.wide_resnet50_2(weights=None, num_classes=num_classes)
    model.conv1 = _stem_with_channels(model.conv1, in_channels, "fan_out")
    return model


@register_model(image_size=224)
def densenet161(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    """torchvision DenseNet-161: 28.68M parameters for 1000 classes."""
    model = torchvision.models.densenet161(weights=None, num_classes=num_classes)
    model.features.conv0 = _stem_with_channels(model.features.conv0, in_channels, "fan_in")
    return model
