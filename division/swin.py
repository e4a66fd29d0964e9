"""torchvision's Swin Transformer (V1 and V2) and Video Swin Transformer, converted.

Swin runs on (N, H, W, C) maps: its LayerNorms, MLP Linears and GELU save their inputs as map
records (map_layout, as in ConvNeXt's blocks), and so do patch merging's. Its attention is a
function of the whole block (shifted_window_attention), so the attention module is converted
whole: the same ops in the same order as stock (exact mode is stock's bit for bit), with the qkv
and output projections saving their window inputs as records of the map the windows tile
(tokens.WindowGrid), and (eager, without attention dropout) q, k and v saved the same way in place
of what stock keeps (q, k, v and the softmax of every window, heads x 49 values per token):
WindowAttentionFn recomputes the attention from them in backward, as AttentionFn does for ViT.
Video Swin runs the same blocks on (N, T, H, W, C) maps with 3-d windows (ShiftedWindowAttention3d).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import Function

from .codec import decompress
from .compressor import Compressor
from .functional import _load_records, _save_records, autocast_state, recompute_grads, rerun
from .layers import DivisionLayer, _needs_saving, saving_linear, set_map_layers
from .tokens import (
    WindowGrid,
    input_map_as_windows,
    map_to_windows,
    windows_as_input_map,
)

try:
    from torchvision.models import swin_transformer as tv_swin
    from torchvision.models.video import swin_transformer as tv_swin3d
except ImportError:  # pragma: no cover
    tv_swin = tv_swin3d = None


def shift_mask(grid: WindowGrid, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Stock's attention mask of shifted windows, (windows, window size, window size): -100 between
    positions that came from different regions of the rolled map, else 0 (in the block input's
    dtype)."""
    mask = torch.zeros(grid.padded_size, dtype=dtype, device=device)
    regions = [((0, -w), (-w, -s), (-s, None)) for w, s in zip(grid.window, grid.shift)]
    for count, region in enumerate(itertools.product(*regions)):
        mask[tuple(slice(start, stop) for start, stop in region)] = count
    mask = map_to_windows(mask.view(1, *mask.shape, 1), grid).squeeze(-1)
    mask = mask.unsqueeze(1) - mask.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


def window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor | None,
    logit_scale: torch.Tensor | None, dropout: float = 0.0, training: bool = False,
) -> torch.Tensor:
    """Stock's attention of (windows, heads, T, d) q, k, v, op for op: scaled (V1) or cosine (V2,
    `logit_scale`) logits, the relative position bias, the shift mask, softmax, dropout, @ v."""
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * q.shape[-1] ** -0.5).matmul(k.transpose(-2, -1))
    attn = attn + bias
    if mask is not None:
        windows, heads, t, _ = attn.shape
        attn = attn.view(windows // mask.shape[0], mask.shape[0], heads, t, t) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, heads, t, t)
    attn = F.dropout(F.softmax(attn, dim=-1), p=dropout, training=training)
    return attn.matmul(v)


def _heads_to_windows(t: torch.Tensor) -> torch.Tensor:
    """(windows, heads, T, d) -> (windows, T, heads * d), the layout the projections see."""
    w, h, n, d = t.shape
    return t.transpose(1, 2).reshape(w, n, h * d)


def window_mask(grid: WindowGrid, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """Stock's mask of the grid's windows: shift_mask where they are shifted, else None."""
    return shift_mask(grid, dtype, device) if any(grid.shift) else None


class WindowAttentionFn(Function):
    """window_attention without dropout, saving q, k and v as records of the block input's
    positions (tokens.windows_as_input_map); backward recomputes the attention on their
    reconstructions (under forward's autocast state) and differentiates it there: q, k, v, the
    bias and V2's logit scale. The shift mask comes from `mask` (torchvision's: rebuilt in
    backward, not saved; timm's: its block's buffer) and so does the relative position bias
    (`position_bias`: heads x window size^2 values, 7 MiB for a Video Swin window of 8x7x7 and
    12 heads, whatever the batch). Padded positions come back as what the qkv projection gave
    them, exactly: its bias (`qkv_bias`, None: zeros), since a padded key's cosine has a gradient
    of 1 / eps in V2, which a rebuilt nonzero key would spread."""

    @staticmethod
    def forward(ctx, q, k, v, bias, logit_scale, qkv_bias, compressor: Compressor, grid: WindowGrid,
                mask: Callable[[], torch.Tensor | None], position_bias: Callable[[], torch.Tensor]):
        out = window_attention(q, k, v, bias, mask(), logit_scale)
        maps = [windows_as_input_map(_heads_to_windows(t), grid).movedim(-1, 1) for t in (q, k, v)]
        fill = None if qkv_bias is None or not grid.padded else qkv_bias.detach().to(q.dtype)
        _save_records(ctx, [compressor.compress(m) for m in maps], logit_scale, fill)
        ctx.autocast = autocast_state(q.device.type)
        ctx.geometry = (q.shape, grid)
        ctx.mask = mask
        ctx.position_bias = position_bias
        return out

    @staticmethod
    def backward(ctx, gy):
        records, (logit_scale, fill) = _load_records(ctx, differentiable=False)
        (w, h, t, d), grid = ctx.geometry
        bias = rerun(ctx.autocast, ctx.position_bias)  # as forward computed it
        fills = (None,) * 3 if fill is None else fill.chunk(3)
        qkv = [
            input_map_as_windows(decompress(r).movedim(1, -1), grid, f).view(w, t, h, d).transpose(1, 2)
            for r, f in zip(records, fills)
        ]
        mask = ctx.mask()
        grads = recompute_grads(lambda q, k, v, b, s: window_attention(q, k, v, b, mask, s), [*qkv, bias, logit_scale],
                                ctx.needs_input_grad[:5], ctx.autocast, gy)
        return *grads, None, None, None, None, None


class _WindowAttention(DivisionLayer):
    """torchvision's ShiftedWindowAttention (V2: cosine attention, logit_scale) and Video Swin's
    ShiftedWindowAttention3d converted whole."""

    COMPUTES_CHILDREN = True

    def window_grid(self, size: tuple[int, ...]) -> WindowGrid:
        """Stock's windows of an input map of `size`: whole windows of window_size over the padded
        map, no shift along an axis whose window covers the padded map."""
        window = tuple(self.window_size)  # type: ignore[attr-defined]
        padded = tuple(s + -s % w for s, w in zip(size, window))
        shift = tuple(0 if w >= p else s for w, p, s in zip(window, padded, self.shift_size))  # type: ignore[attr-defined]
        return WindowGrid(tuple(p // w for p, w in zip(padded, window)), window, size, shift)

    def position_bias(self, grid: WindowGrid) -> torch.Tensor:
        return self.get_relative_position_bias()  # type: ignore[attr-defined]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _needs_saving(self, x, recurse=True) or x.dim() != len(self.window_size) + 2:  # type: ignore[attr-defined]
            return super().forward(x)  # type: ignore[misc]
        grid = self.window_grid(tuple(x.shape[1:-1]))
        windows = input_map_as_windows(x, grid)  # stock's pad, roll and partition
        windows = self.attend(windows, grid, partial(window_mask, grid, x.dtype, x.device))
        return windows_as_input_map(windows, grid)  # stock's reverse partition, roll and crop

    def attend(self, x: torch.Tensor, grid: WindowGrid, mask: Callable[[], torch.Tensor | None]) -> torch.Tensor:
        """Stock's attention of (windows, T, C) windows that tile the block input as `grid` says,
        `mask()` their shift mask: the projections save their inputs as records of the block
        input's positions, and so does WindowAttentionFn of q, k and v where it runs."""
        bias = self.position_bias(grid)
        logit_scale = getattr(self, "logit_scale", None)
        qkv_bias = self.qkv.bias  # type: ignore[attr-defined]
        if logit_scale is not None and qkv_bias is not None:  # V2: no bias on k
            qkv_bias = qkv_bias.clone()
            length = qkv_bias.numel() // 3
            qkv_bias[length : 2 * length].zero_()
        qkv = saving_linear(x, self.qkv.weight, qkv_bias, self.compressor, grid)  # type: ignore[attr-defined]
        q, k, v = qkv.reshape(x.size(0), x.size(1), 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # type: ignore[attr-defined]
        cfg = self.compressor.cfg
        dropout = self.attention_dropout_p() if self.training else 0.0
        if dropout == 0.0 and cfg.compress_attention and cfg.backward_mode != "exact" and not torch.compiler.is_compiling():
            x = WindowAttentionFn.apply(q, k, v, bias, logit_scale, qkv_bias, self.compressor, grid, mask,
                                        partial(self.position_bias, grid))
        else:  # stock's attention saves what it saves (as DivisionMultiheadAttention's)
            x = self.stock_attention(q, k, v, bias, mask(), logit_scale, dropout)
        x = x.transpose(1, 2).reshape(x.size(0), x.size(2), -1)
        x = saving_linear(x, self.proj.weight, self.proj.bias, self.compressor, grid)  # type: ignore[attr-defined]
        return self.output_dropout(x)

    def attention_dropout_p(self) -> float:
        return self.attention_dropout  # type: ignore[attr-defined]

    def stock_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                        mask: torch.Tensor | None, logit_scale: torch.Tensor | None, dropout: float) -> torch.Tensor:
        return window_attention(q, k, v, bias, mask, logit_scale, dropout, self.training)

    def output_dropout(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, p=self.dropout, training=self.training)  # type: ignore[attr-defined]


class _WindowAttention3d(_WindowAttention):
    """Video Swin's windows: a window larger than the input shrinks to it (no shift there), as
    stock's _get_window_and_shift_size, and the position bias is that of the window used."""

    def window_grid(self, size: tuple[int, ...]) -> WindowGrid:
        window = tuple(min(s, w) for s, w in zip(size, self.window_size))  # type: ignore[attr-defined]
        shift = tuple(0 if s <= w else t for s, w, t in zip(size, self.window_size, self.shift_size))  # type: ignore[attr-defined]
        padded = tuple(s + -s % w for s, w in zip(size, window))
        return WindowGrid(tuple(p // w for p, w in zip(padded, window)), window, size, shift)

    def position_bias(self, grid: WindowGrid) -> torch.Tensor:
        return self.get_relative_position_bias(list(grid.window))  # type: ignore[attr-defined]


class _MapBlock(DivisionLayer):
    """A Swin block, patch merging or Video Swin's patch embedding: stock's forward; its LayerNorm,
    Linear and GELU layers (the MLP's too) told that their inputs are (N, H, W, C) or
    (N, T, H, W, C) maps."""

    def convert_inner(self) -> None:
        set_map_layers(self, self.compressor)
        if isinstance(getattr(self, "mlp", None), nn.Sequential):
            set_map_layers(self.mlp, self.compressor)


SWIN_CONVERSIONS: dict[type[nn.Module], type[nn.Module]] = {}
if tv_swin is not None:

    class DivisionShiftedWindowAttention(_WindowAttention, tv_swin.ShiftedWindowAttention):
        pass

    class DivisionShiftedWindowAttentionV2(_WindowAttention, tv_swin.ShiftedWindowAttentionV2):
        pass

    class DivisionSwinTransformerBlock(_MapBlock, tv_swin.SwinTransformerBlock):
        pass

    class DivisionSwinTransformerBlockV2(_MapBlock, tv_swin.SwinTransformerBlockV2):
        pass

    class DivisionPatchMerging(_MapBlock, tv_swin.PatchMerging):
        pass

    class DivisionPatchMergingV2(_MapBlock, tv_swin.PatchMergingV2):
        pass

    SWIN_CONVERSIONS = {
        tv_swin.ShiftedWindowAttention: DivisionShiftedWindowAttention,
        tv_swin.ShiftedWindowAttentionV2: DivisionShiftedWindowAttentionV2,
        tv_swin.SwinTransformerBlock: DivisionSwinTransformerBlock,
        tv_swin.SwinTransformerBlockV2: DivisionSwinTransformerBlockV2,
        tv_swin.PatchMerging: DivisionPatchMerging,
        tv_swin.PatchMergingV2: DivisionPatchMergingV2,
    }

    class DivisionShiftedWindowAttention3d(_WindowAttention3d, tv_swin3d.ShiftedWindowAttention3d):
        pass

    class DivisionPatchEmbed3d(_MapBlock, tv_swin3d.PatchEmbed3d):
        pass

    SWIN_CONVERSIONS[tv_swin3d.ShiftedWindowAttention3d] = DivisionShiftedWindowAttention3d
    SWIN_CONVERSIONS[tv_swin3d.PatchEmbed3d] = DivisionPatchEmbed3d
