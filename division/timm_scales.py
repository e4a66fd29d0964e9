"""timm's learned scales, converted: LayerScale, LayerScale2d and ConvNeXt-V2's global response norm.

A ViT built with `init_values` (DeiT-3, DINOv2, CaiT, EVA) scales each block's attention and MLP
output by a learned vector, `x * gamma`, which keeps x whole for gamma's gradient; so do
LayerScale2d (EfficientFormer; FastViT's own: over an (N, C, H, W) map) and ConvNeXt-V2's global response
norm (x and its per-channel norms). Converted, x is saved compressed: a token record over the
model's patch grid, an (N, H, W, C) map record (its MLP's), or a conv map record (ScaleFn; the
response norm through RecomputeFn, which differentiates timm's own expression at the rebuilt x).
Each converts only while timm's forward reads as the one followed (timm_blocks.forward_reads).
"""

from __future__ import annotations

import torch
from timm.layers import LayerScale, LayerScale2d
from timm.layers.grn import GlobalResponseNorm
from timm.models.fastvit import LayerScale2d as FastVitLayerScale2d

from .functional import CONV, MAP, TOKENS, RecomputeFn, ScaleFn
from .layers import DivisionLayer, _needs_saving

# timm's forwards (1.0) that the converted ones below follow
LAYER_SCALE_FORWARD = """
def forward(self, x: torch.Tensor) -> torch.Tensor:
    return x.mul_(self.gamma) if self.inplace else x * self.gamma
"""
LAYER_SCALE_2D_FORWARD = """
def forward(self, x):
    gamma = self.gamma.view(1, -1, 1, 1)
    return x.mul_(gamma) if self.inplace else x * gamma
"""
FASTVIT_LAYER_SCALE_FORWARD = """
def forward(self, x):
    return x.mul_(self.gamma) if self.inplace else x * self.gamma
"""
GLOBAL_RESPONSE_NORM_FORWARD = """
def forward(self, x):
    x_g = x.norm(p=2, dim=self.spatial_dim, keepdim=True)
    x_n = x_g / (x_g.mean(dim=self.channel_dim, keepdim=True) + self.eps)
    return x + torch.addcmul(self.bias.view(self.wb_shape), self.weight.view(self.wb_shape), x * x_n)
"""


class DivisionLayerScale(DivisionLayer, LayerScale):
    """timm's LayerScale, which scales the last dimension: x saved as a token record on (N, T, D)
    tokens (the model's patch grid, as its Linears'), as a map record on (N, H, W, C) maps
    (MaxxViT-V2's channels-last blocks), where stock keeps it whole; in place, or on other inputs,
    timm's forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace or not 3 <= x.dim() <= 5 or not _needs_saving(self, x):
            return LayerScale.forward(self, x)
        return ScaleFn.apply(x, self.gamma, self.compressor, TOKENS if x.dim() == 3 else MAP)


class DivisionLayerScale2d(DivisionLayer, LayerScale2d):
    """timm's LayerScale2d on (N, C, H, W) maps: x saved as a conv map record."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace or x.dim() != 4 or not _needs_saving(self, x):
            return LayerScale2d.forward(self, x)
        return ScaleFn.apply(x, self.gamma.view(1, -1, 1, 1), self.compressor)


class DivisionFastVitLayerScale2d(DivisionLayer, FastVitLayerScale2d):
    """FastViT's own LayerScale2d (gamma of shape (C, 1, 1)) on (N, C, H, W) maps: a conv map record."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace or x.dim() != 4 or not _needs_saving(self, x):
            return FastVitLayerScale2d.forward(self, x)
        return ScaleFn.apply(x, self.gamma, self.compressor)


def global_response_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, norm: GlobalResponseNorm) -> torch.Tensor:
    """timm's global response norm of x, op for op."""
    x_g = x.norm(p=2, dim=norm.spatial_dim, keepdim=True)
    x_n = x_g / (x_g.mean(dim=norm.channel_dim, keepdim=True) + norm.eps)
    return x + torch.addcmul(bias.view(norm.wb_shape), weight.view(norm.wb_shape), x * x_n)


class DivisionGlobalResponseNorm(DivisionLayer, GlobalResponseNorm):
    """ConvNeXt-V2's global response norm: x saved compressed (a map record channels last, a conv
    map record otherwise), the norm differentiated at the rebuilt x (RecomputeFn)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or not _needs_saving(self, x):
            return GlobalResponseNorm.forward(self, x)
        layout = MAP if self.channel_dim == -1 else CONV
        return RecomputeFn.apply(x, self.norm_of, self.compressor, layout, self.weight, self.bias)

    def norm_of(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return global_response_norm(x, weight, bias, self)


# (timm class, converted class, {method: timm's source that the converted class follows}); timm_blocks.followed_conversions
FOLLOWED = ((LayerScale, DivisionLayerScale, {"forward": LAYER_SCALE_FORWARD}),
            (LayerScale2d, DivisionLayerScale2d, {"forward": LAYER_SCALE_2D_FORWARD}),
            (FastVitLayerScale2d, DivisionFastVitLayerScale2d, {"forward": FASTVIT_LAYER_SCALE_FORWARD}),
            (GlobalResponseNorm, DivisionGlobalResponseNorm, {"forward": GLOBAL_RESPONSE_NORM_FORWARD}))
