"""Vision Transformers: torchvision's ViT-B/16 and a small ViT for 28-32 px images.

Both are torchvision's VisionTransformer (its `image_size`, `patch_size` and class token tell
division.convert_model the patch grid), with the patch embedding taking `in_channels`.
"""

from __future__ import annotations

import math

import torchvision
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from .registry import register_model


def _patch_embedding_with_channels(model: VisionTransformer, in_channels: int) -> VisionTransformer:
    """The same patch embedding taking `in_channels`, initialised as torchvision initialises it."""
    conv = model.conv_proj
    if in_channels != conv.in_channels:
        new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride)
        fan_in = new.in_channels * new.kernel_size[0] * new.kernel_size[1]
        nn.init.trunc_normal_(new.weight, std=math.sqrt(1 / fan_in))
        nn.init.zeros_(new.bias)
        model.conv_proj = new
    return model


@register_model(image_size=32)
def vit_small(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """A ViT for 32x32 images: patch 4 (an 8x8 grid and a class token), depth 6, width 192,
    3 heads, MLP 768; 2.7M parameters for 10 classes."""
    model = VisionTransformer(
        image_size=32, patch_size=4, num_layers=6, num_heads=3, hidden_dim=192, mlp_dim=768,
        num_classes=num_classes,
    )
    return _patch_embedding_with_channels(model, in_channels)


@register_model(image_size=224)
def vit_b_16(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    """torchvision ViT-B/16 (224x224: a 14x14 grid and a class token): 86.6M parameters for 1000 classes."""
    model = torchvision.models.vit_b_16(weights=None, num_classes=num_classes)
    return _patch_embedding_with_channels(model, in_channels)
