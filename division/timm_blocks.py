"""timm's layers that fuse a converted layer with others in one forward, converted.

timm (pytorch-image-models) builds most of its conv nets' norms as BatchNormAct2d: a BatchNorm2d
whose forward runs F.batch_norm itself, then its `drop` and `act` children. Stock keeps the norm's
input whole; converted, the norm saves it compressed, as a converted BatchNorm2d does, and the
children are converted as any others (an act of ReLU keeps a 1-bit mask, SiLU its compressed input).
Its squeeze-and-excitation modules end in `x * gate`, which keeps x whole: converted, x is saved
compressed (ScaleFn), as for torchvision's. Their forwards are written out again here, so each is
converted only while timm's own forward reads as the one written out (a later timm that changes it
keeps its module stock, not a stale copy). Registered only when timm is installed.
"""

from __future__ import annotations

import inspect
import textwrap

import torch
from torch import nn

from .functional import ScaleFn
from .layers import DivisionLayer, _DivisionBatchNorm, _needs_saving

try:
    from timm.layers import BatchNormAct2d
    from timm.layers.squeeze_excite import EffectiveSEModule, SEModule
    from timm.models._efficientnet_blocks import SqueezeExcite
except ImportError:  # timm is optional
    BatchNormAct2d = None

TIMM_CONVERSIONS: dict[type[nn.Module], type[nn.Module]] = {}

# timm's forwards (1.0) that the converted forwards below follow
SQUEEZE_EXCITE_FORWARD = """
def forward(self, x):
    x_se = x.mean((2, 3), keepdim=True)
    x_se = self.conv_reduce(x_se)
    x_se = self.act1(x_se)
    x_se = self.conv_expand(x_se)
    return x * self.gate(x_se)
"""
SE_MODULE_FORWARD = """
def forward(self, x):
    x_se = x.mean((2, 3), keepdim=True)
    if self.add_maxpool:
        # experimental codepath, may remove or change
        x_se = 0.5 * x_se + 0.5 * x.amax((2, 3), keepdim=True)
    x_se = self.fc1(x_se)
    x_se = self.act(self.bn(x_se))
    x_se = self.fc2(x_se)
    return x * self.gate(x_se)
"""
EFFECTIVE_SE_FORWARD = """
def forward(self, x):
    x_se = x.mean((2, 3), keepdim=True)
    if self.add_maxpool:
        # experimental codepath, may remove or change
        x_se = 0.5 * x_se + 0.5 * x.amax((2, 3), keepdim=True)
    x_se = self.fc(x_se)
    return x * self.gate(x_se)
"""


def forward_reads(cls: type[nn.Module], expected: str) -> bool:
    """Whether `cls.forward` is, line for line, the forward a converted version follows."""
    try:
        source = textwrap.dedent(inspect.getsource(cls.forward))
    except (OSError, TypeError):  # no source to read
        return False
    return [ln.strip() for ln in source.strip().splitlines()] == [ln.strip() for ln in expected.strip().splitlines()]


if BatchNormAct2d is not None:

    class DivisionBatchNormAct2d(_DivisionBatchNorm, BatchNormAct2d):
        """timm's BatchNormAct2d: in training, stock's batch norm saving its input compressed
        (_DivisionBatchNorm), then its `drop` and `act` layers; otherwise timm's own forward."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.ndim != 4 or not _needs_saving(self, x):
                return BatchNormAct2d.forward(self, x)  # timm's error for other ranks
            return self.act(self.drop(self.training_batch_norm(x)))

    class DivisionSqueezeExcite(DivisionLayer, SqueezeExcite):
        """timm's EfficientNet / MobileNetV3 squeeze-and-excitation, x saved compressed for
        `x * gate` (its layers converted as any others)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.dim() != 4 or not _needs_saving(self, x, recurse=True):
                return SqueezeExcite.forward(self, x)
            x_se = self.conv_expand(self.act1(self.conv_reduce(x.mean((2, 3), keepdim=True))))
            return ScaleFn.apply(x, self.gate(x_se), self.compressor)

    class DivisionSEModule(DivisionLayer, SEModule):
        """timm's SEModule (RegNet, ResNet-D variants), x saved compressed for `x * gate`; with
        add_maxpool (experimental), whose amax keeps x, timm's own forward."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.dim() != 4 or self.add_maxpool or not _needs_saving(self, x, recurse=True):
                return SEModule.forward(self, x)
            x_se = self.fc2(self.act(self.bn(self.fc1(x.mean((2, 3), keepdim=True)))))
            return ScaleFn.apply(x, self.gate(x_se), self.compressor)

    class DivisionEffectiveSEModule(DivisionLayer, EffectiveSEModule):
        """timm's EffectiveSEModule (VoVNet), as SEModule."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.dim() != 4 or self.add_maxpool or not _needs_saving(self, x, recurse=True):
                return EffectiveSEModule.forward(self, x)
            return ScaleFn.apply(x, self.gate(self.fc(x.mean((2, 3), keepdim=True))), self.compressor)

    TIMM_CONVERSIONS[BatchNormAct2d] = DivisionBatchNormAct2d
    for _timm, _division, _forward in ((SqueezeExcite, DivisionSqueezeExcite, SQUEEZE_EXCITE_FORWARD),
                                       (SEModule, DivisionSEModule, SE_MODULE_FORWARD),
                                       (EffectiveSEModule, DivisionEffectiveSEModule, EFFECTIVE_SE_FORWARD)):
        if forward_reads(_timm, _forward):
            TIMM_CONVERSIONS[_timm] = _division
