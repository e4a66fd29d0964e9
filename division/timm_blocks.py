"""timm's layers that fuse a converted layer with others in one forward, converted.

timm (pytorch-image-models) builds most of its conv nets' norms as BatchNormAct2d: a BatchNorm2d
whose forward runs F.batch_norm itself, then its `drop` and `act` children. Stock keeps the norm's
input whole; converted, the norm saves it compressed, as a converted BatchNorm2d does, and the
children are converted as any others (an act of ReLU keeps a 1-bit mask, SiLU its compressed input).
Its squeeze-and-excitation modules end in `x * gate`, which keeps x whole: converted, x is saved
compressed (ScaleFn), as for torchvision's, and so does ResNeSt's split attention. Its ViT's
LayerNorm, GELU and attention are converted as torchvision's are (token records over the patch
grid that tokens.infer_token_grid reads from timm's model; the attention recomputed from q, k, v
records), its ConvNeXt block and LayerNorm2d as torchvision's (map records, `x * gamma`
compressed). In modules of their own: its Swin
(timm_swin.py); its weight-standardized and 'same'-padded convolutions, pools and GroupNormAct
(timm_convs.py); its layer scales and ConvNeXt-V2's response norm (timm_scales.py); MaxViT's and
CoAtNet's attention (timm_maxxvit.py) and the layouts its blocks say (timm_layouts.py); BEiT
(timm_beit.py).
Where a forward is written out again here, the module is converted only while timm's own forward
reads as the one written out (a later timm that changes it keeps its module stock, not a stale
copy). Registered once timm is imported (convert.py).
"""

from __future__ import annotations

import inspect
import textwrap
from collections.abc import Callable

import torch
from torch import nn

from .compressor import Compressor
from .functional import AttentionFn, ScaleFn
from .layers import (
    DivisionGELU,
    DivisionLayer,
    DivisionLayerNorm,
    _DivisionBatchNorm,
    _needs_saving,
    channel_layer_norm,
    set_conv_gelus,
    set_map_layers,
)

try:
    from timm.layers import BatchNormAct2d
    from timm.layers import LayerNorm as TimmLayerNorm
    from timm.layers import LayerNorm2d as TimmLayerNorm2d
    from timm.layers.activations import GELU as TimmGELU
    from timm.layers.activations import GELUTanh as TimmGELUTanh
    from timm.layers.split_attn import SplitAttn
    from timm.layers.squeeze_excite import EffectiveSEModule, SEModule
    from timm.models._efficientnet_blocks import SqueezeExcite
    from timm.models.convnext import ConvNeXtBlock
    from timm.models.vision_transformer import Attention as TimmAttention
except ImportError:  # timm is optional
    BatchNormAct2d = None

TIMM_CONVERSIONS: dict[type[nn.Module], type[nn.Module]] = {}
TIMM_CONTAINER_LAYOUTS: dict[type[nn.Module], Callable[[nn.Module, Compressor], None]] = {}

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
SPLIT_ATTN_FORWARD = """
def forward(self, x):
    x = self.conv(x)
    x = self.bn0(x)
    x = self.drop(x)
    x = self.act0(x)

    B, RC, H, W = x.shape
    if self.radix > 1:
        x = x.reshape((B, self.radix, RC // self.radix, H, W))
        x_gap = x.sum(dim=1)
    else:
        x_gap = x
    x_gap = x_gap.mean((2, 3), keepdim=True)
    x_gap = self.fc1(x_gap)
    x_gap = self.bn1(x_gap)
    x_gap = self.act1(x_gap)
    x_attn = self.fc2(x_gap)

    x_attn = self.rsoftmax(x_attn).view(B, -1, 1, 1)
    if self.radix > 1:
        out = (x * x_attn.reshape((B, self.radix, RC // self.radix, 1, 1))).sum(dim=1)
    else:
        out = x * x_attn
    return out.contiguous()
"""

LAYER_NORM_FORWARD = """
def forward(self, x: torch.Tensor) -> torch.Tensor:
    if self._fast_norm:
        x = fast_layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
    else:
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
    return x
"""
LAYER_NORM_2D_FORWARD = """
def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = x.permute(0, 2, 3, 1)
    if self._fast_norm:
        x = fast_layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
    else:
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
    x = x.permute(0, 3, 1, 2)
    return x
"""
ATTENTION_FORWARD = """
def forward(
        self,
        x: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
) -> torch.Tensor:
    B, N, C = x.shape
    gate = self.gate(x).sigmoid() if self.gate is not None else None
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)

    if self.fused_attn:
        x = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=attn_mask,
            dropout_p=self.attn_drop.p if self.training else 0.,
            is_causal=is_causal,
        )
    else:
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        attn_bias = resolve_self_attn_mask(N, attn, attn_mask, is_causal)
        attn = maybe_add_mask(attn, attn_bias)
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = attn @ v

    x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
    x = self.norm(x)
    if gate is not None:
        x = x * gate
    x = self.proj(x)
    x = self.proj_drop(x)
    return x
"""

TIMM_GELU_FORWARD = """
def forward(self, input: torch.Tensor) -> torch.Tensor:
    return F.gelu(input)
"""
TIMM_GELU_TANH_FORWARD = """
def forward(self, input: torch.Tensor) -> torch.Tensor:
    return F.gelu(input, approximate='tanh')
"""
CONVNEXT_BLOCK_FORWARD = """
def forward(self, x: torch.Tensor) -> torch.Tensor:
    \"\"\"Forward pass.\"\"\"
    shortcut = x
    x = self.conv_dw(x)
    if self.use_conv_mlp:
        x = self.norm(x)
        x = self.mlp(x)
    else:
        x = x.permute(0, 2, 3, 1)
        x = self.norm(x)
        x = self.mlp(x)
        x = x.permute(0, 3, 1, 2)
    if self.gamma is not None:
        x = x.mul(self.gamma.reshape(1, -1, 1, 1))

    x = self.drop_path(x) + self.shortcut(shortcut)
    return x
"""


Followed = tuple[tuple[type[nn.Module], type[nn.Module], dict[str, str]], ...]


def followed_conversions(followed: Followed, reads: Callable[..., bool] | None = None) -> dict[type[nn.Module], type[nn.Module]]:
    """The conversions of `followed` (timm class, converted class, {method: timm's source that the
    converted class follows}) whose timm methods all read as the ones followed (`reads`:
    forward_reads); one that follows none always converts."""
    reads = reads or forward_reads
    return {timm_cls: division_cls for timm_cls, division_cls, sources in followed
            if all(reads(timm_cls, source, method) for method, source in sources.items())}


def forward_reads(cls: type[nn.Module], expected: str, method: str = "forward") -> bool:
    """Whether `cls.forward` (or another `method`) is, line for line, the one a converted version follows."""
    try:
        source = textwrap.dedent(inspect.getsource(getattr(cls, method)))
    except (OSError, TypeError):  # no source to read
        return False
    return [ln.strip() for ln in source.strip().splitlines()] == [ln.strip() for ln in expected.strip().splitlines()]


if BatchNormAct2d is not None:

    class DivisionBatchNormAct2d(_DivisionBatchNorm, BatchNormAct2d):
        """timm's BatchNormAct2d: in training, stock's batch norm saving its input compressed
        (_DivisionBatchNorm), then its `drop` and `act` layers; otherwise timm's own forward."""

        def convert_inner(self) -> None:
            set_conv_gelus(self, ("act",))  # a GELU act takes the norm's (N, C, H, W) map

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

    class DivisionSplitAttn(DivisionLayer, SplitAttn):
        """ResNeSt's split attention, x saved compressed for `x * attention` (its layers converted as
        any others); the product taken on the (N, radix x C, H, W) map, whose record is then a
        conv map's, then summed over the radix as stock sums it."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.dim() != 4 or not _needs_saving(self, x, recurse=True):
                return SplitAttn.forward(self, x)
            x = self.act0(self.drop(self.bn0(self.conv(x))))
            b, rc, h, w = x.shape
            x_gap = x.reshape(b, self.radix, rc // self.radix, h, w).sum(dim=1) if self.radix > 1 else x
            x_attn = self.fc2(self.act1(self.bn1(self.fc1(x_gap.mean((2, 3), keepdim=True)))))
            out = ScaleFn.apply(x, self.rsoftmax(x_attn).view(b, -1, 1, 1), self.compressor)
            if self.radix > 1:
                out = out.reshape(b, self.radix, rc // self.radix, h, w).sum(dim=1)
            return out.contiguous()

    class DivisionTimmLayerNorm(DivisionLayerNorm, TimmLayerNorm):
        """timm's LayerNorm (its transformers' norms): as nn.LayerNorm converted (token and map
        records), unless timm runs its fast (APEX) kernel, then timm's forward."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self._fast_norm:
                return TimmLayerNorm.forward(self, x)
            return DivisionLayerNorm.forward(self, x)

    class DivisionTimmLayerNorm2d(DivisionLayer, TimmLayerNorm2d):
        """timm's LayerNorm2d (ConvNeXt's stem and downsampling), as torchvision's converted: a map
        record of its input; with timm's fast (APEX) kernel, timm's forward."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self._fast_norm or x.dim() != 4 or len(self.normalized_shape) != 1 or not _needs_saving(self, x):
                return TimmLayerNorm2d.forward(self, x)
            return channel_layer_norm(self, x)

    class DivisionTimmAttention(DivisionLayer, TimmAttention):
        """timm's ViT attention: its qkv and proj Linears convert as any others (token records);
        its fused attention, without mask, causality or dropout, saves q, k and v as token records
        and is recomputed in backward (AttentionFn), as MultiheadAttention's; otherwise (and in
        exact mode, where records would be exact copies) timm's forward."""

        def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
            cfg = self.compressor.cfg
            dropout = self.attn_drop.p if self.training else 0.0
            if (not _needs_saving(self, x, recurse=True) or not self.fused_attn or attn_mask is not None or is_causal
                    or dropout or self.gate is not None or not cfg.compress_attention or cfg.backward_mode == "exact"
                    or torch.compiler.is_compiling() or x.dim() != 3):
                return TimmAttention.forward(self, x, attn_mask, is_causal)
            b, n, _ = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            out = AttentionFn.apply(self.q_norm(q), self.k_norm(k), v, self.compressor)
            out = self.norm(out.transpose(1, 2).reshape(b, n, self.attn_dim))
            return self.proj_drop(self.proj(out))

    class DivisionTimmGELU(DivisionGELU, TimmGELU):
        """timm's GELU (F.gelu, exact form; its MLPs'): as nn.GELU converted (token, map and conv-map
        records), and reverted to timm's class."""

        STOCK_CLASS = TimmGELU
        approximate = "none"

    class DivisionTimmGELUTanh(DivisionGELU, TimmGELUTanh):
        """timm's GELUTanh (F.gelu, tanh form; timm's MaxViT, CoAtNet): as nn.GELU('tanh') converted,
        and reverted to timm's class."""

        STOCK_CLASS = TimmGELUTanh
        approximate = "tanh"

    class DivisionConvNeXtBlock(DivisionLayer, ConvNeXtBlock):
        """timm's ConvNeXt block, as torchvision's (DivisionCNBlock): its LayerNorm and MLP run on
        an (N, H, W, C) map and save map records (its Linears converted: pointwise convolutions),
        and `x * gamma` saves x compressed (ScaleFn) where stock keeps it whole."""

        def convert_inner(self) -> None:
            if self.use_conv_mlp:  # (N, C, H, W) maps and 1x1 convolutions (ConvNeXt-V2's atto..nano)
                set_conv_gelus(self.mlp, ("act",))
            else:
                set_map_layers(self, self.compressor, {"norm"})
                set_map_layers(self.mlp, self.compressor)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.gamma is None or not _needs_saving(self, x, recurse=True):
                return ConvNeXtBlock.forward(self, x)
            shortcut = x
            x = self.conv_dw(x)
            if self.use_conv_mlp:
                x = self.mlp(self.norm(x))
            else:
                x = self.mlp(self.norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
            x = ScaleFn.apply(x, self.gamma.reshape(1, -1, 1, 1), self.compressor)
            return self.drop_path(x) + self.shortcut(shortcut)

    FOLLOWED: Followed = (
        (BatchNormAct2d, DivisionBatchNormAct2d, {}),  # nothing of its forward written out
        (SqueezeExcite, DivisionSqueezeExcite, {"forward": SQUEEZE_EXCITE_FORWARD}),
        (SEModule, DivisionSEModule, {"forward": SE_MODULE_FORWARD}),
        (EffectiveSEModule, DivisionEffectiveSEModule, {"forward": EFFECTIVE_SE_FORWARD}),
        (SplitAttn, DivisionSplitAttn, {"forward": SPLIT_ATTN_FORWARD}),
        (TimmLayerNorm, DivisionTimmLayerNorm, {"forward": LAYER_NORM_FORWARD}),
        (TimmLayerNorm2d, DivisionTimmLayerNorm2d, {"forward": LAYER_NORM_2D_FORWARD}),
        (TimmAttention, DivisionTimmAttention, {"forward": ATTENTION_FORWARD}),
        (ConvNeXtBlock, DivisionConvNeXtBlock, {"forward": CONVNEXT_BLOCK_FORWARD}),
        (TimmGELU, DivisionTimmGELU, {"forward": TIMM_GELU_FORWARD}),
        (TimmGELUTanh, DivisionTimmGELUTanh, {"forward": TIMM_GELU_TANH_FORWARD}),
    )

    from . import timm_beit, timm_convs, timm_maxxvit, timm_scales, timm_swin
    from .timm_convs import NFNET_LAYOUTS
    from .timm_layouts import LAYOUTS
    from .timm_swin import SWIN_LAYOUTS

    for _followed in (FOLLOWED, timm_convs.FOLLOWED, timm_scales.FOLLOWED, timm_maxxvit.FOLLOWED, timm_beit.FOLLOWED,
                      timm_swin.FOLLOWED):
        TIMM_CONVERSIONS.update(followed_conversions(_followed))
    TIMM_CONTAINER_LAYOUTS.update(NFNET_LAYOUTS)
    TIMM_CONTAINER_LAYOUTS.update(SWIN_LAYOUTS)
    TIMM_CONTAINER_LAYOUTS.update(LAYOUTS)
