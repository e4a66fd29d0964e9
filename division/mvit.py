"""torchvision's MViT (Multiscale Vision Transformers, v1 and v2), converted.

MViT runs on (N, 1 + T x H x W, C) tokens, a class token and then a video's patch grid, which
pooling shrinks from stage to stage. Every grid a model's tokens lie on follows from the model
(mvit_token_grids: its positional encoding's sizes and each block's pooling convolutions), and
they are told apart by their length; so its LayerNorms, Linears and GELUs save token records over
the grid of their input (tokens.py: 3-d maps, B x B x B blocks, the class token exact), as a
ViT's do. The norms of its pooling, which run on each head's (N, heads, T, d) q, k or v, save
per-head token records (HEADS). The attention is converted whole: stock's ops in stock's order
(exact mode is stock's bit for bit), and (eager) the pooled q, k and v saved as token records in
place of what stock keeps (q, the scaled q, k, v, v2's relative position terms, and every head's
softmax over all the pooled keys): MultiscaleAttentionFn recomputes the attention in backward, as
AttentionFn does for ViT.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd import Function

from .compressor import Compressor
from .functional import (
    HEADS,
    _heads_to_tokens,
    _load_records,
    _save_records,
    autocast_state,
    recompute_grads,
)
from .layers import DivisionLayer, DivisionLayerNorm, _needs_saving
from .tokens import TokenGrid, compress_tokens, decompress_tokens

try:
    from torchvision.models.video import mvit as tv_mvit
except ImportError:  # pragma: no cover
    tv_mvit = None

THW = tuple[int, int, int]


def _pooled(thw: THW, conv: nn.Module) -> THW:
    """The (T, H, W) grid a pooling convolution gives from `thw` (ATen's output size)."""
    sizes = (
        (s + 2 * p - d * (k - 1) - 1) // st + 1
        for s, k, st, p, d in zip(thw, conv.kernel_size, conv.stride, conv.padding, conv.dilation)
    )
    return tuple(sizes)  # type: ignore[return-value]


def mvit_token_grids(model: nn.Module) -> tuple[TokenGrid, ...] | None:
    """The grids of a torchvision MViT's tokens: each block's input, its pooled keys and values,
    its pooled queries (the next block's input); None for other models."""
    if tv_mvit is None or not isinstance(model, tv_mvit.MViT):
        return None
    thw = (model.pos_encoding.temporal_size, *model.pos_encoding.spatial_size)
    grids = {thw}
    for block in model.blocks:
        attention = block.attn
        if attention.pool_k is not None:
            grids.add(_pooled(thw, attention.pool_k.pool))
        if attention.pool_q is not None:
            thw = _pooled(thw, attention.pool_q.pool)
            grids.add(thw)
    return tuple(TokenGrid(h, w, prefix=1, time=t) for t, h, w in sorted(grids))


def multiscale_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_pos: tuple[torch.Tensor, ...] | None,
    q_thw: THW, k_thw: THW, scaler: float, residual_pool: bool, residual_with_cls_embed: bool,
) -> torch.Tensor:
    """Stock's attention of pooled (N, heads, T, d) q, k, v, op for op: scaled q k^T, v2's
    decomposed relative positions (rel_pos: h, w, t tables), softmax, @ v, v2's residual q."""
    attn = torch.matmul(scaler * q, k.transpose(2, 3))
    if rel_pos is not None:
        attn = tv_mvit._add_rel_pos(attn, q, q_thw, k_thw, *rel_pos)
    attn = attn.softmax(dim=-1)
    x = torch.matmul(attn, v)
    if residual_pool:
        tv_mvit._add_shortcut(x, q, residual_with_cls_embed)
    return x


class MultiscaleAttentionFn(Function):
    """multiscale_attention saving q, k and v as token records (each over the grid of its length);
    backward recomputes the attention on their reconstructions (under forward's autocast state)
    and differentiates it there: q, k, v and v2's relative position tables."""

    @staticmethod
    def forward(ctx, q, k, v, rel_h, rel_w, rel_t, geometry: tuple, compressor: Compressor):
        rel_pos = None if rel_h is None else (rel_h, rel_w, rel_t)
        out = multiscale_attention(q, k, v, rel_pos, *geometry)
        _save_records(ctx, [compress_tokens(compressor, _heads_to_tokens(t)) for t in (q, k, v)], rel_h, rel_w, rel_t)
        ctx.autocast = autocast_state(q.device.type)
        ctx.shapes, ctx.geometry = (q.shape, k.shape, v.shape), geometry
        return out

    @staticmethod
    def backward(ctx, gy):
        records, tables = _load_records(ctx, differentiable=False)
        qkv = [decompress_tokens(r).view(n, t, h, d).transpose(1, 2) for r, (n, h, t, d) in zip(records, ctx.shapes)]

        def attention(q, k, v, rel_h, rel_w, rel_t):
            return multiscale_attention(q, k, v, None if rel_h is None else (rel_h, rel_w, rel_t), *ctx.geometry)

        return *recompute_grads(attention, [*qkv, *tables], ctx.needs_input_grad[:6], ctx.autocast, gy), None, None


class _MultiscaleAttention(DivisionLayer):
    """torchvision's MultiscaleAttention: stock's projections and pooling (their layers converted),
    the attention core saving token records of q, k, v (MultiscaleAttentionFn)."""

    def forward(self, x: torch.Tensor, thw: THW) -> tuple[torch.Tensor, THW]:
        if not _needs_saving(self, x, recurse=True) or x.dim() != 3:
            return super().forward(x, thw)  # type: ignore[misc]
        n, t, _ = x.shape
        heads, head_dim = self.num_heads, self.head_dim  # type: ignore[attr-defined]
        q, k, v = self.qkv(x).reshape(n, t, 3, heads, head_dim).transpose(1, 3).unbind(dim=2)  # type: ignore[operator]
        k_thw = thw
        if self.pool_k is not None:  # type: ignore[attr-defined]
            k, k_thw = self.pool_k(k, thw)  # type: ignore[attr-defined]
        if self.pool_v is not None:  # type: ignore[attr-defined]
            v = self.pool_v(v, thw)[0]  # type: ignore[attr-defined]
        if self.pool_q is not None:  # type: ignore[attr-defined]
            q, thw = self.pool_q(q, thw)  # type: ignore[attr-defined]
        tables = (self.rel_pos_h, self.rel_pos_w, self.rel_pos_t)  # type: ignore[attr-defined]
        if any(p is None for p in tables):
            tables = (None, None, None)
        geometry = (thw, k_thw, self.scaler, self.residual_pool, self.residual_with_cls_embed)  # type: ignore[attr-defined]
        cfg = self.compressor.cfg
        if cfg.compress_attention and cfg.backward_mode != "exact" and not torch.compiler.is_compiling():
            x = MultiscaleAttentionFn.apply(q, k, v, *tables, geometry, self.compressor)
        else:  # stock's attention saves what it saves (as DivisionMultiheadAttention's)
            x = multiscale_attention(q, k, v, None if tables[0] is None else tables, *geometry)
        x = x.transpose(1, 2).reshape(n, -1, self.output_dim)  # type: ignore[attr-defined]
        return self.project(x), thw  # type: ignore[operator]


class _Pool(DivisionLayer):
    """torchvision's MViT Pool: stock's forward; its norm after pooling (on (N, heads, T, d) q, k
    or v) saves per-head token records."""

    def convert_inner(self) -> None:
        if self.norm_act is not None and not self.norm_before_pool:  # type: ignore[attr-defined]
            for layer in self.norm_act:  # type: ignore[attr-defined]
                if isinstance(layer, DivisionLayerNorm):
                    layer.map_layout = HEADS


MVIT_CONVERSIONS: dict[type[nn.Module], type[nn.Module]] = {}
if tv_mvit is not None:

    class DivisionMultiscaleAttention(_MultiscaleAttention, tv_mvit.MultiscaleAttention):
        pass

    class DivisionPool(_Pool, tv_mvit.Pool):
        pass

    MVIT_CONVERSIONS = {tv_mvit.MultiscaleAttention: DivisionMultiscaleAttention, tv_mvit.Pool: DivisionPool}
