"""timm's layers that fuse a converted layer with others in one forward, converted.

timm (pytorch-image-models) builds most of its conv nets' norms as BatchNormAct2d: a BatchNorm2d
whose forward runs F.batch_norm itself, then its `drop` and `act` children. Stock keeps the norm's
input whole; converted, the norm saves it compressed, as a converted BatchNorm2d does, and the
children are converted as any others (an act of ReLU keeps a 1-bit mask, SiLU its compressed input).
Registered only when timm is installed.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import _DivisionBatchNorm, _needs_saving

try:
    from timm.layers import BatchNormAct2d
except ImportError:  # timm is optional
    BatchNormAct2d = None

TIMM_CONVERSIONS: dict[type[nn.Module], type[nn.Module]] = {}

if BatchNormAct2d is not None:

    class DivisionBatchNormAct2d(_DivisionBatchNorm, BatchNormAct2d):
        """timm's BatchNormAct2d: in training, stock's batch norm saving its input compressed
        (_DivisionBatchNorm), then its `drop` and `act` layers; otherwise timm's own forward."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.ndim != 4 or not _needs_saving(self, x):
                return BatchNormAct2d.forward(self, x)  # timm's error for other ranks
            return self.act(self.drop(self.training_batch_norm(x)))

    TIMM_CONVERSIONS[BatchNormAct2d] = DivisionBatchNormAct2d
