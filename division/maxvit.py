"""torchvision's MaxViT, converted.

MaxViT alternates MBConv blocks (convolutions, batch norms, squeeze-and-excitation and GELU on
(N, C, H, W) maps: converted as in any conv net, the GELUs by set_conv_activations) with attention
on partitions of the map: a PartitionAttentionLayer cuts its (N, C, H, W) input into (N, G, P, C)
windows (block attention) or a dilated grid (grid attention, the middle axes swapped), runs a
pre-norm attention and an MLP on them and puts the map back together. Its LayerNorms, Linears and
GELU save their inputs as records of the map the partitions tile (tokens.PartitionGrid: planes over
the whole image, blocks of B x B neighbouring positions), and its relative-position attention is
converted whole: the same ops in the same order as stock (exact mode is stock's bit for bit), with
q, k and v saved the same way in place of what stock keeps (q, the scaled k, v and every
partition's softmax, heads x P values per position): PartitionAttentionFn recomputes the attention
from them in backward, as AttentionFn does for ViT.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import Function

from .codec import decompress
from .compressor import Compressor
from .functional import _load_records, _save_records, autocast_state, recompute_grads, rerun
from .layers import DivisionLayer, _needs_saving, set_map_layers
from .tokens import PartitionGrid, map_as_partitions, partitions_as_map

try:
    from torchvision.models import maxvit as tv_maxvit
except ImportError:  # pragma: no cover
    tv_maxvit = None


def relative_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """Stock's attention of (N, G, heads, P, d) q, k, v, op for op: k scaled, q k^T, the relative
    position bias, softmax, @ v."""
    k = k * scale
    logits = torch.einsum("B G H I D, B G H J D -> B G H I J", q, k)
    weights = F.softmax(logits + bias, dim=-1)
    return torch.einsum("B G H I J, B G H J D -> B G H I D", weights, v)


def _heads_as_map(t: torch.Tensor, grid: PartitionGrid) -> torch.Tensor:
    """(N, G, heads, P, d) -> the (N, heads * d, H, W) map of the positions (a channels_last copy)."""
    n, g, h, p, d = t.shape
    return partitions_as_map(t.transpose(2, 3).reshape(n, g, p, h * d), grid).permute(0, 3, 1, 2)


def _map_as_heads(m: torch.Tensor, grid: PartitionGrid, shape: torch.Size) -> torch.Tensor:
    """Inverse of _heads_as_map."""
    n, g, h, p, d = shape
    return map_as_partitions(m.permute(0, 2, 3, 1), grid).view(n, g, p, h, d).transpose(2, 3)


class PartitionAttentionFn(Function):
    """relative_attention saving q, k and v as records of the map the partitions tile; backward
    recomputes the attention on their reconstructions (under forward's autocast state) and
    differentiates it there: q, k, v and the relative position bias. The bias is rebuilt
    (`position_bias`), not kept: heads x P^2 values a layer, whatever the batch."""

    @staticmethod
    def forward(ctx, q, k, v, bias, scale: float, compressor: Compressor, grid: PartitionGrid,
                position_bias: Callable[[], torch.Tensor]):
        out = relative_attention(q, k, v, bias, scale)
        _save_records(ctx, [compressor.compress(_heads_as_map(t, grid)) for t in (q, k, v)])
        ctx.autocast = autocast_state(q.device.type)
        ctx.geometry = (q.shape, scale, grid)
        ctx.position_bias = position_bias
        return out

    @staticmethod
    def backward(ctx, gy):
        records, _ = _load_records(ctx, differentiable=False)
        shape, scale, grid = ctx.geometry
        bias = rerun(ctx.autocast, ctx.position_bias)  # as forward computed it
        qkv = [_map_as_heads(decompress(r), grid, shape) for r in records]
        grads = recompute_grads(lambda q, k, v, b: relative_attention(q, k, v, b, scale), [*qkv, bias],
                                ctx.needs_input_grad[:4], ctx.autocast, gy)
        return *grads, None, None, None, None


class _RelativeAttention(DivisionLayer):
    """torchvision's RelativePositionalMultiHeadAttention on the partitions of a converted
    PartitionAttentionLayer (`map_layout`: their PartitionGrid); other inputs as stock."""

    map_layout: PartitionGrid | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.map_layout
        if not _needs_saving(self, x, recurse=True) or grid is None or not grid.fits(x):
            return super().forward(x)  # type: ignore[misc]
        n, g, p, d = x.shape
        heads, head_dim = self.n_heads, self.head_dim  # type: ignore[attr-defined]
        q, k, v = (t.reshape(n, g, p, heads, head_dim).permute(0, 1, 3, 2, 4)
                   for t in torch.chunk(self.to_qkv(x), 3, dim=-1))  # type: ignore[operator]
        bias = self.get_relative_positional_bias()  # type: ignore[attr-defined]
        scale = self.scale_factor  # type: ignore[attr-defined]
        cfg = self.compressor.cfg
        if cfg.compress_attention and cfg.backward_mode != "exact" and not torch.compiler.is_compiling():
            out = PartitionAttentionFn.apply(q, k, v, bias, scale, self.compressor, grid,
                                             self.get_relative_positional_bias)  # type: ignore[attr-defined]
        else:  # stock's attention saves what it saves (as DivisionMultiheadAttention's)
            out = relative_attention(q, k, v, bias, scale)
        return self.merge(out.permute(0, 1, 3, 2, 4).reshape(n, g, p, d))  # type: ignore[operator]


class _PartitionLayer(DivisionLayer):
    """torchvision's PartitionAttentionLayer: stock's forward; its norms, Linears, GELU and
    attention told the PartitionGrid of their (N, G, P, C) inputs."""

    def convert_inner(self) -> None:
        rows, cols = (side // self.p for side in self.grid_size)  # type: ignore[attr-defined]
        grid = PartitionGrid(self.p, rows, cols, swapped=self.partition_type == "grid")  # type: ignore[attr-defined]
        for sequential in (self.attn_layer, self.mlp_layer):  # type: ignore[attr-defined]
            set_map_layers(sequential, self.compressor, layout=grid)
            for layer in sequential:
                if isinstance(layer, _RelativeAttention):
                    layer.map_layout = grid
                    set_map_layers(layer, self.compressor, {"to_qkv", "merge"}, grid)


MAXVIT_CONVERSIONS: dict[type[nn.Module], type[nn.Module]] = {}
MAXVIT_UNCONVERTED: dict[type[nn.Module], str] = {}
if tv_maxvit is not None:

    class DivisionRelativePositionalMultiHeadAttention(_RelativeAttention, tv_maxvit.RelativePositionalMultiHeadAttention):
        pass

    class DivisionPartitionAttentionLayer(_PartitionLayer, tv_maxvit.PartitionAttentionLayer):
        pass

    MAXVIT_CONVERSIONS = {
        tv_maxvit.RelativePositionalMultiHeadAttention: DivisionRelativePositionalMultiHeadAttention,
        tv_maxvit.PartitionAttentionLayer: DivisionPartitionAttentionLayer,
    }
    MAXVIT_UNCONVERTED = {
        kind: "reshapes and permutes: saves nothing"
        for kind in (tv_maxvit.WindowPartition, tv_maxvit.WindowDepartition, tv_maxvit.SwapAxes)
    }
