"""timm's MaxViT and CoAtNet attention (models/maxxvit.py), converted.

Their fused attention (with a relative position bias, without dropout) is converted as timm's ViT
attention is: q, k and v saved as token records, the attention recomputed in backward
(AttentionFn; the bias, heads x T x T whatever the batch, made again in backward where its
module draws no dropout, else kept). AttentionCl runs on
channels-last partitions of MaxViT's maps (its projections map layers: timm_layouts.py),
Attention2d on CoAtNet's (N, C, H, W) maps (its projections 1x1 convolutions). Their forwards are
written out again, so each converts only while timm's reads as the one followed; otherwise, and
in exact mode, timm's forward runs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from timm.models.maxxvit import Attention2d, AttentionCl
from torch import nn

from .functional import AttentionFn
from .layers import DivisionLayer, _needs_saving
from .timm_layouts import map_projections

# timm's forwards (1.0) that the converted ones below follow
ATTENTION_CL_FORWARD = """
def forward(self, x: torch.Tensor, shared_rel_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
    B = x.shape[0]
    restore_shape = x.shape[:-1]

    if self.head_first:
        q, k, v = self.qkv(x).view(B, -1, self.num_heads, self.dim_head * 3).transpose(1, 2).chunk(3, dim=3)
    else:
        q, k, v = self.qkv(x).reshape(B, -1, 3, self.num_heads, self.dim_head).transpose(1, 3).unbind(2)

    if self.fused_attn:
        attn_bias = None
        if self.rel_pos is not None:
            attn_bias = self.rel_pos.get_bias()
        elif shared_rel_pos is not None:
            attn_bias = shared_rel_pos

        x = torch.nn.functional.scaled_dot_product_attention(
            q, k, v,
            attn_mask=attn_bias,
            dropout_p=self.attn_drop.p if self.training else 0.,
        )
    else:
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        if self.rel_pos is not None:
            attn = self.rel_pos(attn, shared_rel_pos=shared_rel_pos)
        elif shared_rel_pos is not None:
            attn = attn + shared_rel_pos
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = attn @ v

    x = x.transpose(1, 2).reshape(restore_shape + (-1,))
    x = self.proj(x)
    x = self.proj_drop(x)
    return x
"""


ATTENTION_2D_FORWARD = """
def forward(self, x: torch.Tensor, shared_rel_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
    B, C, H, W = x.shape

    if self.head_first:
        q, k, v = self.qkv(x).view(B, self.num_heads, self.dim_head * 3, -1).chunk(3, dim=2)
    else:
        q, k, v = self.qkv(x).reshape(B, 3, self.num_heads, self.dim_head, -1).unbind(1)

    if self.fused_attn:
        attn_bias = None
        if self.rel_pos is not None:
            attn_bias = self.rel_pos.get_bias()
        elif shared_rel_pos is not None:
            attn_bias = shared_rel_pos

        x = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(-1, -2).contiguous(),
            k.transpose(-1, -2).contiguous(),
            v.transpose(-1, -2).contiguous(),
            attn_mask=attn_bias,
            dropout_p=self.attn_drop.p if self.training else 0.,
        ).transpose(-1, -2).reshape(B, -1, H, W)
    else:
        q = q * self.scale
        attn = q.transpose(-2, -1) @ k
        if self.rel_pos is not None:
            attn = self.rel_pos(attn)
        elif shared_rel_pos is not None:
            attn = attn + shared_rel_pos
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = (v @ attn.transpose(-2, -1)).view(B, -1, H, W)

    x = self.proj(x)
    x = self.proj_drop(x)
    return x
"""


def _converts(attention: nn.Module, x: torch.Tensor) -> bool:
    """Whether the attention runs AttentionFn: fused, without dropout, saving, not exact, eager."""
    cfg = attention.compressor.cfg
    return (_needs_saving(attention, x, recurse=True) and attention.fused_attn
            and not (attention.attn_drop.p and attention.training) and cfg.compress_attention
            and cfg.backward_mode != "exact" and not torch.compiler.is_compiling())


def _bias(attention: nn.Module, shared_rel_pos: torch.Tensor | None
          ) -> tuple[torch.Tensor | None, Callable[[], torch.Tensor] | None]:
    """The attention's additive bias, and how backward makes it again where that gives the same
    bias (its relative position module has no dropout that draws: a table's gather, or an MLP of
    fixed coordinates); otherwise AttentionFn keeps it."""
    if attention.rel_pos is None:
        return shared_rel_pos, None
    draws = attention.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in attention.rel_pos.modules())
    return attention.rel_pos.get_bias(), None if draws else attention.rel_pos.get_bias


class DivisionAttentionCl(DivisionLayer, AttentionCl):
    """timm's channels-last attention (MaxViT's partitions), fused, without dropout: q, k and v
    saved as token records and the attention recomputed in backward with its relative position
    bias (AttentionFn); otherwise, and in exact mode, timm's forward."""

    def convert_inner(self) -> None:
        map_projections(self, self.compressor)

    def forward(self, x: torch.Tensor, shared_rel_pos: torch.Tensor | None = None) -> torch.Tensor:
        if not _converts(self, x):
            return AttentionCl.forward(self, x, shared_rel_pos)
        b, restore_shape = x.shape[0], x.shape[:-1]
        if self.head_first:
            q, k, v = self.qkv(x).view(b, -1, self.num_heads, self.dim_head * 3).transpose(1, 2).chunk(3, dim=3)
        else:
            q, k, v = self.qkv(x).reshape(b, -1, 3, self.num_heads, self.dim_head).transpose(1, 3).unbind(2)
        x = AttentionFn.apply(q, k, v, self.compressor, *_bias(self, shared_rel_pos))
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(restore_shape + (-1,))))


class DivisionAttention2d(DivisionLayer, Attention2d):
    """timm's attention on (N, C, H, W) maps (CoAtNet's), fused, without dropout: q, k and v saved as
    token records (the positions' tokens), the attention recomputed in backward (AttentionFn)."""

    def forward(self, x: torch.Tensor, shared_rel_pos: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 4 or not _converts(self, x):
            return Attention2d.forward(self, x, shared_rel_pos)
        b, _, h, w = x.shape
        if self.head_first:
            q, k, v = self.qkv(x).view(b, self.num_heads, self.dim_head * 3, -1).chunk(3, dim=2)
        else:
            q, k, v = self.qkv(x).reshape(b, 3, self.num_heads, self.dim_head, -1).unbind(1)
        q, k, v = (t.transpose(-1, -2).contiguous() for t in (q, k, v))
        x = AttentionFn.apply(q, k, v, self.compressor, *_bias(self, shared_rel_pos))
        return self.proj_drop(self.proj(x.transpose(-1, -2).reshape(b, -1, h, w)))


# (timm class, converted class, {method: timm's source that the converted class follows}); timm_blocks.followed_conversions
FOLLOWED = ((AttentionCl, DivisionAttentionCl, {"forward": ATTENTION_CL_FORWARD}),
            (Attention2d, DivisionAttention2d, {"forward": ATTENTION_2D_FORWARD}))
