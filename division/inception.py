"""torchvision's GoogLeNet and Inception v3, converted.

Both build every convolution as a BasicConv2d: conv, batch norm, then a functional in-place ReLU
whose output stock keeps whole; converted, it keeps a 1-bit mask. Inception v3's blocks also pool
functionally in a branch of their own (F.avg_pool2d, which keeps the block input for its shape,
and F.max_pool2d, which keeps it and int64 indices): the converted blocks run the same branches in
the same order with DIVISION's pools (AvgPoolFn keeps nothing, MaxPoolFn a few bits per
output), so exact mode is stock's bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .functional import AvgPoolFn, MaxPoolFn, ReLUFn
from .layers import DivisionLayer, _needs_saving

try:
    from torchvision.models import inception as tv_inception
    from torchvision.models.googlenet import BasicConv2d as GoogLeNetConv
except ImportError:  # pragma: no cover
    tv_inception = GoogLeNetConv = None


class _ConvBatchNormReLU(DivisionLayer):
    """BasicConv2d: its conv and batch norm converted as any others, its functional in-place ReLU
    keeping a 1-bit mask (ReLUFn)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))  # type: ignore[attr-defined]
        if not _needs_saving(self, x):
            return F.relu(x, inplace=True)
        return ReLUFn.apply(x, True, self.compressor.kernels)


class _InceptionBlock(DivisionLayer):
    """An Inception v3 block: stock's forward (its branches, concatenated), `_forward` below per
    block with the branch pools through DIVISION's."""

    def _avg_pool(self, x: torch.Tensor) -> torch.Tensor:
        """F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)."""
        if not _needs_saving(self, x) or x.dim() != 4:
            return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)
        return AvgPoolFn.apply(x, [3, 3], [1, 1], [1, 1], False, True, None)

    def _max_pool(self, x: torch.Tensor) -> torch.Tensor:
        """F.max_pool2d(x, kernel_size=3, stride=2)."""
        if not _needs_saving(self, x) or x.dim() != 4:
            return F.max_pool2d(x, kernel_size=3, stride=2)
        return MaxPoolFn.apply(x, (3, 3), (2, 2), (0, 0), (1, 1), False, self.compressor.kernels)


INCEPTION_CONVERSIONS: dict[type[nn.Module], type[nn.Module]] = {}
if tv_inception is not None:

    class DivisionInceptionConv2d(_ConvBatchNormReLU, tv_inception.BasicConv2d):
        pass

    class DivisionGoogLeNetConv2d(_ConvBatchNormReLU, GoogLeNetConv):
        pass

    class DivisionInceptionA(_InceptionBlock, tv_inception.InceptionA):
        def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            branch1x1 = self.branch1x1(x)
            branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
            branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return [branch1x1, branch5x5, branch3x3dbl, self.branch_pool(self._avg_pool(x))]

    class DivisionInceptionB(_InceptionBlock, tv_inception.InceptionB):
        def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            branch3x3 = self.branch3x3(x)
            branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return [branch3x3, branch3x3dbl, self._max_pool(x)]

    class DivisionInceptionC(_InceptionBlock, tv_inception.InceptionC):
        def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            branch1x1 = self.branch1x1(x)
            branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            branch7x7dbl = self.branch7x7dbl_1(x)
            for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
                branch7x7dbl = layer(branch7x7dbl)
            return [branch1x1, branch7x7, branch7x7dbl, self.branch_pool(self._avg_pool(x))]

    class DivisionInceptionD(_InceptionBlock, tv_inception.InceptionD):
        def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
            branch7x7x3 = self.branch7x7x3_1(x)
            for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
                branch7x7x3 = layer(branch7x7x3)
            return [branch3x3, branch7x7x3, self._max_pool(x)]

    class DivisionInceptionE(_InceptionBlock, tv_inception.InceptionE):
        def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            branch1x1 = self.branch1x1(x)
            branch3x3 = self.branch3x3_1(x)
            branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
            branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
            return [branch1x1, branch3x3, branch3x3dbl, self.branch_pool(self._avg_pool(x))]

    INCEPTION_CONVERSIONS = {
        tv_inception.BasicConv2d: DivisionInceptionConv2d,
        GoogLeNetConv: DivisionGoogLeNetConv2d,
        tv_inception.InceptionA: DivisionInceptionA,
        tv_inception.InceptionB: DivisionInceptionB,
        tv_inception.InceptionC: DivisionInceptionC,
        tv_inception.InceptionD: DivisionInceptionD,
        tv_inception.InceptionE: DivisionInceptionE,
    }
