"""How the inputs of converted layers lie inside timm's blocks that say so by their structure alone
(CONTAINER_LAYOUTS: nothing of the block's own forward is written out again, so no forward is
followed line for line; a layout decides how a record's planes run, not what the layer computes).

- FastViT's MobileOneBlock and ReparamLargeKernelConv end in an activation of a sum of their
  convolution branches' (N, C, H, W) maps.
- MaxViT's channels-last blocks (PartitionAttentionCl, ParallelPartitionAttention: timm's MaxViT
  and MaxxViT-V2) run their norms and MLP on (N, H, W, C) maps, and their attention (AttentionCl)
  its qkv and output projections on (N', h, w, C) partitions of one: map records, where the
  Linears kept their inputs whole (compress_linear=False) and the GELUs theirs (a 4-D input of
  unknown layout).
"""

from __future__ import annotations

from collections.abc import Callable

from timm.models.fastvit import MobileOneBlock, ReparamLargeKernelConv
from timm.models.maxxvit import AttentionCl, ParallelPartitionAttention, PartitionAttentionCl
from torch import nn

from .compressor import Compressor
from .layers import set_conv_gelus, set_map_layers


def map_projections(attention: nn.Module, compressor: Compressor) -> None:
    """AttentionCl's projections run on (N', h, w, C) partitions of a map."""
    set_map_layers(attention, compressor, {"qkv", "proj"})


def _channels_last_block(block: nn.Module, compressor: Compressor) -> None:
    set_map_layers(block, compressor, {"norm1", "norm2"})
    set_map_layers(block.mlp, compressor)


LAYOUTS: dict[type[nn.Module], Callable[[nn.Module, Compressor], None]] = {
    MobileOneBlock: lambda block, compressor: set_conv_gelus(block, ("act",)),
    ReparamLargeKernelConv: lambda block, compressor: set_conv_gelus(block, ("act",)),
    PartitionAttentionCl: _channels_last_block,
    ParallelPartitionAttention: _channels_last_block,
    AttentionCl: map_projections,  # where its forward is not converted (timm_maxxvit.py)
}
