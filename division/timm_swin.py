"""timm's Swin Transformer (V1), converted as torchvision's (swin.py).

timm's block takes an (N, H, W, C) map as torchvision's does, but cuts its windows in another
order (rolled, then padded: WindowGrid.roll_first), runs its attention module on the windows with
the block's shift mask (a buffer, or `dynamic_mask`), and its MLP on the map flattened to (N, H x W,
C) tokens. Converted, the block runs the same ops on the same values: its norms and MLP on the
map (a layer norm, a Linear and a GELU give the same numbers on (N, H, W, C) as on (N, H x W, C)),
which they save as map records, and its attention told the grid its windows tile, so that the
qkv and output projections and q, k, v (WindowAttentionFn) save records of the block input's
positions. Patch merging and the patch embedding's norm (Swin's, whose output is (N, H, W, C))
save map records too. The block and attention, whose forwards are written out again here, are
converted only while timm's read as the ones written out (timm_blocks.forward_reads).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.layers import Format, PatchEmbed
from timm.models.swin_transformer import (
    PatchMerging,
    SwinTransformer,
    SwinTransformerBlock,
    WindowAttention,
)
from torch import nn

from .compressor import Compressor
from .layers import DivisionLayer, _needs_saving, set_map_layers
from .swin import _MapBlock, _WindowAttention
from .tokens import WindowGrid, map_to_windows, padded_input_map, windows_as_input_map

# timm's forwards (1.0) that the converted ones below follow
BLOCK_FORWARD = '''
def forward(self, x: torch.Tensor) -> torch.Tensor:
    """Forward pass.

    Args:
        x: Input features with shape (B, H, W, C).

    Returns:
        Output features with shape (B, H, W, C).
    """
    B, H, W, C = x.shape
    x = x + self.drop_path1(self._attn(self.norm1(x)))
    x = x.reshape(B, -1, C)
    x = x + self.drop_path2(self.mlp(self.norm2(x)))
    x = x.reshape(B, H, W, C)
    return x
'''
BLOCK_ATTN = """
def _attn(self, x):
    B, H, W, C = x.shape

    # cyclic shift
    has_shift = any(self.shift_size)
    if has_shift:
        shifted_x = torch.roll(x, shifts=(-self.shift_size[0], -self.shift_size[1]), dims=(1, 2))
    else:
        shifted_x = x

    # pad for resolution not divisible by window size
    pad_h = (self.window_size[0] - H % self.window_size[0]) % self.window_size[0]
    pad_w = (self.window_size[1] - W % self.window_size[1]) % self.window_size[1]
    shifted_x = torch.nn.functional.pad(shifted_x, (0, 0, 0, pad_w, 0, pad_h))
    _, Hp, Wp, _ = shifted_x.shape

    # partition windows
    x_windows = window_partition(shifted_x, self.window_size)  # nW*B, window_size, window_size, C
    x_windows = x_windows.view(-1, self.window_area, C)  # nW*B, window_size*window_size, C

    # W-MSA/SW-MSA
    if getattr(self, 'dynamic_mask', False):
        attn_mask = self.get_attn_mask(shifted_x)
    else:
        attn_mask = self.attn_mask
    attn_windows = self.attn(x_windows, mask=attn_mask)  # nW*B, window_size*window_size, C

    # merge windows
    attn_windows = attn_windows.view(-1, self.window_size[0], self.window_size[1], C)
    shifted_x = window_reverse(attn_windows, self.window_size, Hp, Wp)  # B H' W' C
    shifted_x = shifted_x[:, :H, :W, :].contiguous()

    # reverse cyclic shift
    if has_shift:
        x = torch.roll(shifted_x, shifts=self.shift_size, dims=(1, 2))
    else:
        x = shifted_x
    return x
"""
WINDOW_ATTENTION_FORWARD = '''
def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Forward pass.

    Args:
        x: Input features with shape of (num_windows*B, N, C).
        mask: (0/-inf) mask with shape of (num_windows, Wh*Ww, Wh*Ww) or None.

    Returns:
        Output features with shape of (num_windows*B, N, C).
    """
    B_, N, C = x.shape
    qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)

    if self.fused_attn:
        attn_mask = self._get_rel_pos_bias()
        if mask is not None:
            num_win = mask.shape[0]
            mask = mask.view(1, num_win, 1, N, N).expand(B_ // num_win, -1, self.num_heads, -1, -1)
            attn_mask = attn_mask + mask.reshape(-1, self.num_heads, N, N)
        x = torch.nn.functional.scaled_dot_product_attention(
            q, k, v,
            attn_mask=attn_mask,
            dropout_p=self.attn_drop.p if self.training else 0.,
        )
    else:
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        attn = attn + self._get_rel_pos_bias()
        if mask is not None:
            num_win = mask.shape[0]
            attn = attn.view(-1, num_win, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = self.softmax(attn)
        attn = self.attn_drop(attn)
        x = attn @ v

    x = x.transpose(1, 2).reshape(B_, N, -1)
    x = self.proj(x)
    x = self.proj_drop(x)
    return x
'''


def fused_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                           mask: torch.Tensor | None, dropout: float) -> torch.Tensor:
    """timm's fused window attention (scaled_dot_product_attention, the position bias and the shift
    mask added into one attention mask), op for op."""
    windows, heads, t, _ = q.shape
    if mask is not None:
        expanded = mask.view(1, mask.shape[0], 1, t, t).expand(windows // mask.shape[0], -1, heads, -1, -1)
        bias = bias + expanded.reshape(-1, heads, t, t)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)


class DivisionTimmWindowAttention(_WindowAttention, WindowAttention):
    """timm's window attention, called by its converted block with the grid its windows tile:
    as torchvision's converted attention (its projections' inputs and q, k, v saved as records of
    the block input's positions, the attention recomputed in backward). Called without a grid
    (alone, or by a block that is not converted), timm's forward."""

    COMPUTES_CHILDREN = True

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, grid: WindowGrid | None = None) -> torch.Tensor:
        if grid is None or x.dim() != 3 or not _needs_saving(self, x, recurse=True):
            return WindowAttention.forward(self, x, mask)
        return self.attend(x, grid, lambda: mask)

    def position_bias(self, grid: WindowGrid) -> torch.Tensor:
        return self._get_rel_pos_bias()

    def attention_dropout_p(self) -> float:
        return self.attn_drop.p

    def stock_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                        mask: torch.Tensor | None, logit_scale: torch.Tensor | None, dropout: float) -> torch.Tensor:
        if self.fused_attn:
            return fused_window_attention(q, k, v, bias, mask, dropout)
        return super().stock_attention(q, k, v, bias, mask, logit_scale, dropout)

    def output_dropout(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_drop(x)


class DivisionTimmSwinBlock(DivisionLayer, SwinTransformerBlock):
    """timm's Swin block: its norms and MLP on the (N, H, W, C) map (map records), its attention
    given the grid of its windows."""

    def convert_inner(self) -> None:
        set_map_layers(self, self.compressor, {"norm1", "norm2"})
        set_map_layers(self.mlp, self.compressor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or not _needs_saving(self, x, recurse=True):
            return SwinTransformerBlock.forward(self, x)
        x = x + self.drop_path1(self.windowed_attention(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))

    def windowed_attention(self, x: torch.Tensor) -> torch.Tensor:
        """timm's _attn: the map rolled, padded and cut into windows, their attention under the
        block's mask, and the map put back together."""
        size = tuple(x.shape[1:3])
        counts = tuple(-(-s // w) for s, w in zip(size, self.window_size))
        grid = WindowGrid(counts, tuple(self.window_size), size, tuple(self.shift_size), roll_first=True)
        shifted = padded_input_map(x, grid)
        mask = self.get_attn_mask(shifted) if self.dynamic_mask else self.attn_mask
        windows = map_to_windows(shifted, grid)
        if isinstance(self.attn, DivisionTimmWindowAttention):
            windows = self.attn(windows, mask=mask, grid=grid)
        else:  # excluded from the conversion
            windows = self.attn(windows, mask=mask)
        return windows_as_input_map(windows, grid)


class DivisionTimmPatchMerging(_MapBlock, PatchMerging):
    """timm's patch merging: its norm and reduction run on an (N, H / 2, W / 2, 4C) map."""


class DivisionTimmPatchEmbed(DivisionLayer, PatchEmbed):
    """timm's patch embedding where it gives (N, H, W, C) maps (Swin's): its norm saves map records."""

    @classmethod
    def reason_to_keep(cls, module: nn.Module) -> str:
        if module.flatten or module.output_fmt != Format.NHWC:
            return "its output is not an (N, H, W, C) map: its convolution converts alone"
        return ""

    def convert_inner(self) -> None:
        set_map_layers(self, self.compressor, {"norm"})


# the final norm of timm's Swin runs on the last stage's (N, H, W, C) map
SWIN_LAYOUTS: dict[type[nn.Module], Callable[[nn.Module, Compressor], None]] = {
    SwinTransformer: lambda model, compressor: set_map_layers(model, compressor, {"norm"})}


# (timm class, converted class, {method: timm's source that the converted class follows}); timm_blocks.followed_conversions
FOLLOWED = ((PatchMerging, DivisionTimmPatchMerging, {}),  # nothing of its forward written out
            (PatchEmbed, DivisionTimmPatchEmbed, {}),
            (WindowAttention, DivisionTimmWindowAttention, {"forward": WINDOW_ATTENTION_FORWARD}),
            (SwinTransformerBlock, DivisionTimmSwinBlock, {"forward": BLOCK_FORWARD, "_attn": BLOCK_ATTN}))
