"""timm's BEiT (BEiT, BEiT-v2, data2vec-vision: models/beit.py), converted.

Its attention adds a relative position bias and, with `q_bias`, runs its qkv projection as
F.linear on the Linear's weight and a bias it concatenates, which kept that input whole; its
blocks scale the attention and MLP outputs by learned vectors (`gamma_1 * y`), which kept y whole.
Converted, the qkv input is a token record (saving_linear), the fused attention is recomputed in
backward from q, k, v records (AttentionFn; its own bias gathered again from the table, a shared
one kept), and `gamma * y` saves y as a token
record (ScaleFn). The forwards are written out again, so each converts only while timm's reads as
the one followed; otherwise (and in exact mode, or with attention dropout) timm's forward runs.
"""

from __future__ import annotations

import torch
from timm.models.beit import Attention as BeitAttention
from timm.models.beit import Block as BeitBlock

from .functional import TOKENS, AttentionFn, ScaleFn
from .layers import DivisionLayer, _needs_saving, saving_linear

# timm's forwards (1.0) that the converted ones below follow
ATTENTION_FORWARD = '''
def forward(self, x: torch.Tensor, shared_rel_pos_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Forward pass of attention module.

    Args:
        x: Input tensor of shape (batch_size, num_tokens, dim).
        shared_rel_pos_bias: Optional shared relative position bias from parent module.

    Returns:
        Output tensor of shape (batch_size, num_tokens, dim).
    """
    B, N, C = x.shape

    if self.q_bias is None:
        qkv = self.qkv(x)
    else:
        qkv_bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        if self.qkv_bias_separate:
            qkv = self.qkv(x)
            qkv += qkv_bias
        else:
            qkv = F.linear(x, weight=self.qkv.weight, bias=qkv_bias)
    qkv = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # B, num_heads, N, head_dim

    if self.fused_attn:
        rel_pos_bias = None
        if self.relative_position_bias_table is not None:
            rel_pos_bias = self._get_rel_pos_bias()
            if shared_rel_pos_bias is not None:
                rel_pos_bias = rel_pos_bias + shared_rel_pos_bias
        elif shared_rel_pos_bias is not None:
            rel_pos_bias = shared_rel_pos_bias

        x = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=rel_pos_bias,
            dropout_p=self.attn_drop.p if self.training else 0.,
        )
    else:
        q = q * self.scale
        attn = (q @ k.transpose(-2, -1))

        if self.relative_position_bias_table is not None:
            attn = attn + self._get_rel_pos_bias()
        if shared_rel_pos_bias is not None:
            attn = attn + shared_rel_pos_bias

        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = attn @ v

    x = x.transpose(1, 2).reshape(B, N, C)
    x = self.proj(x)
    x = self.proj_drop(x)
    return x
'''
BLOCK_FORWARD = '''
def forward(self, x: torch.Tensor, shared_rel_pos_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Forward pass of transformer block.

    Args:
        x: Input tensor of shape (batch_size, num_tokens, dim).
        shared_rel_pos_bias: Optional shared relative position bias.

    Returns:
        Output tensor of shape (batch_size, num_tokens, dim).
    """
    if self.gamma_1 is None:
        x = x + self.drop_path1(self.attn(self.norm1(x), shared_rel_pos_bias=shared_rel_pos_bias))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
    else:
        x = x + self.drop_path1(self.gamma_1 * self.attn(self.norm1(x), shared_rel_pos_bias=shared_rel_pos_bias))
        x = x + self.drop_path2(self.gamma_2 * self.mlp(self.norm2(x)))
    return x
'''


class DivisionBeitAttention(DivisionLayer, BeitAttention):
    """BEiT's attention: its qkv input a token record, its fused attention recomputed in backward
    (its own relative position bias gathered again from its table, the model's shared one kept)."""

    COMPUTES_CHILDREN = True  # with q_bias it runs its qkv Linear's weight itself

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.compressor.cfg
        if (x.dim() != 3 or not _needs_saving(self, x, recurse=True) or not self.fused_attn
                or (self.attn_drop.p and self.training) or not cfg.compress_attention
                or cfg.backward_mode == "exact" or torch.compiler.is_compiling()):
            return BeitAttention.forward(self, x, shared_rel_pos_bias)
        b, n, c = x.shape
        if self.q_bias is None:
            qkv = self.qkv(x)
        elif self.qkv_bias_separate:
            qkv = self.qkv(x)
            qkv += torch.cat((self.q_bias, self.k_bias, self.v_bias))
        else:
            qkv = saving_linear(x, self.qkv.weight, torch.cat((self.q_bias, self.k_bias, self.v_bias)), self.compressor, TOKENS)
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias, remake = shared_rel_pos_bias, None  # the model's shared bias: kept
        if self.relative_position_bias_table is not None:
            bias = self._get_rel_pos_bias() if bias is None else self._get_rel_pos_bias() + bias
            remake = self._get_rel_pos_bias if shared_rel_pos_bias is None else None  # a gather: made again
        x = AttentionFn.apply(q, k, v, self.compressor, bias, remake)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


class DivisionBeitBlock(DivisionLayer, BeitBlock):
    """BEiT's block with layer scales (`init_values`): `gamma * y` saves y as a token record."""

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.gamma_1 is None or x.dim() != 3 or not _needs_saving(self, x, recurse=True):
            return BeitBlock.forward(self, x, shared_rel_pos_bias)
        y = self.attn(self.norm1(x), shared_rel_pos_bias=shared_rel_pos_bias)
        x = x + self.drop_path1(ScaleFn.apply(y, self.gamma_1, self.compressor, TOKENS))
        return x + self.drop_path2(ScaleFn.apply(self.mlp(self.norm2(x)), self.gamma_2, self.compressor, TOKENS))


# (timm class, converted class, {method: timm's source that the converted class follows}); timm_blocks.followed_conversions
FOLLOWED = ((BeitAttention, DivisionBeitAttention, {"forward": ATTENTION_FORWARD}),
            (BeitBlock, DivisionBeitBlock, {"forward": BLOCK_FORWARD}))
