"""timm's weight-standardized and 'same'-padded convolutions and pools, and its group norm +
activation, converted.

BiT's ResNetV2 and NFNet convolve with StdConv2d / ScaledStdConv2d: a Conv2d whose forward first
standardizes its weight (F.batch_norm over each filter; NFNet scales it by a learned gain), so
stock keeps every convolution's input whole. Converted, the weight is standardized by timm's own
op and the convolution saves its input compressed, as a converted Conv2d does (the gradient
flows to the weight and gain through the standardization, as stock's). BiT's norms are
GroupNormAct (a GroupNorm whose forward runs F.group_norm, then its `drop` and `act` children):
converted, the norm saves its input compressed, as a converted GroupNorm does. Conv2dSame,
AvgPool2dSame and MaxPool2dSame (TensorFlow-ported weights: EfficientNet's tf_ variants, MaxViT's)
pad their input to 'same' in their forward, then convolve or pool: converted, the same padding,
then the converted layer's own op (a compressed input; nothing; a window offset). NFNet's block runs
GELUs on its convolutions' maps, which it says (their records are then conv-map records). Each
forward written out again here converts only while timm's reads as the one followed (forward_reads).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.layers import (
    Conv2dSame,
    GroupNorm1Act,
    GroupNormAct,
    ScaledStdConv2d,
    ScaledStdConv2dSame,
    StdConv2d,
    StdConv2dSame,
)
from timm.layers.padding import pad_same
from timm.layers.pool2d_same import AvgPool2dSame, MaxPool2dSame
from timm.models.nfnet import NormFreeBlock, NormFreeNet
from torch import nn

from .compressor import Compressor
from .functional import WeightRecipe
from .layers import (
    DivisionAvgPool2d,
    DivisionConv2d,
    DivisionGroupNorm,
    DivisionLayer,
    DivisionMaxPool2d,
    _needs_saving,
    set_conv_gelus,
)

# timm's forwards (1.0) that the converted ones below follow
STD_CONV_FORWARD = """
def forward(self, x):
    weight = F.batch_norm(
        self.weight.reshape(1, self.out_channels, -1),
        None,  # running_mean
        None,  # running_var
        training=True,
        momentum=0.,
        eps=self.eps,
    ).reshape_as(self.weight)
    x = F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
    return x
"""
SCALED_STD_CONV_FORWARD = """
def forward(self, x):
    weight = F.batch_norm(
        self.weight.reshape(1, self.out_channels, -1),
        None,  # running_mean
        None,  # running_var
        weight=(self.gain * self.scale).view(-1),
        training=True,
        momentum=0.,
        eps=self.eps,
    ).reshape_as(self.weight)
    return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
"""


def padded_same_first(forward: str) -> str:
    """timm's 'same' variant of a forward (StdConv2dSame's of StdConv2d's): x padded to 'same' first."""
    head = "def forward(self, x):\n"
    return forward.replace(head, head + "    if self.same_pad:\n        x = pad_same(x, self.kernel_size, self.stride, self.dilation)\n", 1)


STD_CONV_SAME_FORWARD = padded_same_first(STD_CONV_FORWARD)
SCALED_STD_CONV_SAME_FORWARD = padded_same_first(SCALED_STD_CONV_FORWARD)

CONV_SAME_FORWARD = """
def forward(self, x):
    return conv2d_same(
        x,
        self.weight,
        self.bias,
        self.stride,
        self.padding,
        self.dilation,
        self.groups,
    )
"""
AVG_POOL_SAME_FORWARD = """
def forward(self, x):
    x = pad_same(x, self.kernel_size, self.stride)
    return F.avg_pool2d(
        x, self.kernel_size, self.stride, self.padding, self.ceil_mode, self.count_include_pad)
"""
MAX_POOL_SAME_FORWARD = """
def forward(self, x):
    x = pad_same(x, self.kernel_size, self.stride, self.dilation, value=-float('inf'))
    return F.max_pool2d(x, self.kernel_size, self.stride, (0, 0), self.dilation, self.ceil_mode)
"""

GROUP_NORM_ACT_FORWARD = """
def forward(self, x):
    if self._fast_norm:
        x = fast_group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
    else:
        x = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
    x = self.drop(x)
    x = self.act(x)
    return x
"""


def standardize(weight: torch.Tensor, gain: torch.Tensor | None, eps: float) -> torch.Tensor:
    """timm's weight standardization: each filter to zero mean and unit variance (times `gain`), by its op."""
    return F.batch_norm(weight.reshape(1, weight.shape[0], -1), None, None, weight=gain, training=True, momentum=0.0,
                        eps=eps).reshape_as(weight)


class _StandardizedConv(DivisionConv2d):
    """A weight-standardized convolution saving its input compressed; `same_pad`: timm's padding
    to 'same' first; SCALED: NFNet's gain on the standardized weight. Backward makes the weight
    again from the parameters (a WeightRecipe) where stock keeps a weight-sized copy per layer until
    backward (NFNet-F0: 0.18 GiB, whatever the batch), except under torch.compile, whose graph
    decides what it keeps."""

    SCALED = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or not _needs_saving(self, x):
            return super(DivisionLayer, self).forward(x)  # timm's, the class after the conversions
        if getattr(self, "same_pad", False):
            x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        recipe = self.recipe()
        weight = recipe.make(*recipe.params)
        return self.saving_conv(x, weight, None if torch.compiler.is_compiling() else recipe)

    def recipe(self) -> WeightRecipe:
        eps = self.eps
        if self.SCALED:
            scale = self.scale
            return WeightRecipe(lambda w, gain: standardize(w, (gain * scale).view(-1), eps), (self.weight, self.gain))
        return WeightRecipe(lambda w: standardize(w, None, eps), (self.weight,))


class DivisionStdConv2d(_StandardizedConv, StdConv2d):
    pass


class DivisionStdConv2dSame(_StandardizedConv, StdConv2dSame):
    pass


class DivisionScaledStdConv2d(_StandardizedConv, ScaledStdConv2d):
    SCALED = True


class DivisionScaledStdConv2dSame(_StandardizedConv, ScaledStdConv2dSame):
    SCALED = True


class DivisionConv2dSame(DivisionConv2d, Conv2dSame):
    """timm's Conv2dSame: x padded to 'same' as timm pads it, then a convolution saving it compressed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or not _needs_saving(self, x):
            return Conv2dSame.forward(self, x)
        return self.saving_conv(pad_same(x, self.weight.shape[-2:], self.stride, self.dilation), self.weight)


class DivisionAvgPool2dSame(DivisionAvgPool2d, AvgPool2dSame):
    """timm's AvgPool2dSame: x padded to 'same', then average pooling that keeps nothing of it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or not _needs_saving(self, x):
            return AvgPool2dSame.forward(self, x)
        return DivisionAvgPool2d.forward(self, pad_same(x, self.kernel_size, self.stride))


class DivisionMaxPool2dSame(DivisionMaxPool2d, MaxPool2dSame):
    """timm's MaxPool2dSame: x padded to 'same' with -inf, then max pooling keeping window offsets."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or not _needs_saving(self, x):
            return MaxPool2dSame.forward(self, x)
        return DivisionMaxPool2d.forward(self, pad_same(x, self.kernel_size, self.stride, self.dilation, value=-float("inf")))


class _GroupNormAct(DivisionGroupNorm):
    """timm's GroupNormAct / GroupNorm1Act: the norm saving its input compressed, then its `drop`
    and `act` layers (converted as any others); with timm's fast (APEX) kernel, timm's forward."""

    def convert_inner(self) -> None:
        set_conv_gelus(self, ("act",))  # a GELU act takes the norm's (N, C, *spatial) map

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fast_norm or not self.saves(x):
            return super(DivisionLayer, self).forward(x)  # timm's, the class after the conversions
        return self.act(self.drop(self.saving_group_norm(x)))


class DivisionGroupNormAct(_GroupNormAct, GroupNormAct):
    pass


class DivisionGroupNorm1Act(_GroupNormAct, GroupNorm1Act):
    pass


class DivisionNormFreeBlock(DivisionLayer, NormFreeBlock):
    """NFNet's block (timm's forward), whose GELUs act on its convolutions' maps."""

    def convert_inner(self) -> None:
        set_conv_gelus(self, ("act1", "act2", "act2b", "act3"))


# NFNet's last GELU acts on its last convolution's map
NFNET_LAYOUTS: dict[type[nn.Module], Callable[[nn.Module, Compressor], None]] = {
    NormFreeNet: lambda model, compressor: set_conv_gelus(model, ("final_act",))}


# (timm class, converted class, {method: timm's source that the converted class follows}); timm_blocks.followed_conversions
FOLLOWED = ((StdConv2d, DivisionStdConv2d, {"forward": STD_CONV_FORWARD}),
            (StdConv2dSame, DivisionStdConv2dSame, {"forward": STD_CONV_SAME_FORWARD}),
            (ScaledStdConv2d, DivisionScaledStdConv2d, {"forward": SCALED_STD_CONV_FORWARD}),
            (ScaledStdConv2dSame, DivisionScaledStdConv2dSame, {"forward": SCALED_STD_CONV_SAME_FORWARD}),
            (Conv2dSame, DivisionConv2dSame, {"forward": CONV_SAME_FORWARD}),
            (AvgPool2dSame, DivisionAvgPool2dSame, {"forward": AVG_POOL_SAME_FORWARD}),
            (MaxPool2dSame, DivisionMaxPool2dSame, {"forward": MAX_POOL_SAME_FORWARD}),
            (GroupNormAct, DivisionGroupNormAct, {"forward": GROUP_NORM_ACT_FORWARD}),
            (GroupNorm1Act, DivisionGroupNorm1Act, {"forward": GROUP_NORM_ACT_FORWARD}),
            (NormFreeBlock, DivisionNormFreeBlock, {}))  # nothing of its forward written out
