"""Converted layers: subclasses of the torch.nn layers whose forward saves less for backward.

A converted layer takes over the original module's attributes (its parameter and buffer dicts
included), so weights, `state_dict` keys, hooks and optimizer references all stay the same. In
eval mode, under no_grad, or when nothing needs a gradient the stock forward runs.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair, _triple

from .compressor import Compressor
from .format import memory_format_of
from .functional import (
    CONV,
    HEADS,
    MAP,
    ROWS,
    TOKENS,
    TOKENS_SEQ_FIRST,
    ActivationFn,
    AttentionFn,
    AvgPoolFn,
    BatchNormFn,
    ClampMaskFn,
    ConvFn,
    DropoutFn,
    GELUFn,
    GroupNormFn,
    LayerNormFn,
    Layout,
    LeakyReLUFn,
    LinearFn,
    MaxPoolFn,
    ReLUFn,
    ScaleFn,
    WeightRecipe,
)

try:  # torchvision's blocks with layers of their own, converted when torchvision is there
    from torchvision.models.convnext import CNBlock, LayerNorm2d
    from torchvision.ops.misc import Permute, SqueezeExcitation
except ImportError:  # pragma: no cover
    CNBlock = LayerNorm2d = Permute = SqueezeExcitation = None


def _needs_saving(module: nn.Module, x: torch.Tensor, recurse: bool = False) -> bool:
    """Whether the layer runs its own Function; otherwise the stock forward (eval, no_grad, nothing
    needing a gradient, or an empty input: there is nothing to compress, and stock's handling of
    empty tensors is kept). `recurse`: the parameters of its submodules count too."""
    if not (module.training and torch.is_grad_enabled()) or x.numel() == 0:
        return False
    return x.requires_grad or any(p.requires_grad for p in module.parameters(recurse=recurse))


def _unbatched(x: torch.Tensor, batched_dims: int) -> bool:
    """An input without its batch dimension, which stock layers accept (and process as a batch of 1)."""
    return x.dim() == batched_dims - 1


def _autocast(x: torch.Tensor, *tensors: torch.Tensor | None) -> tuple[list[Any], contextlib.AbstractContextManager]:
    """Cast as autocast would for conv/linear, then let the Function run with autocast off."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return [x, *tensors], contextlib.nullcontext()
    dtype = torch.get_autocast_dtype(device)
    cast = [t.to(dtype) if t is not None and t.is_floating_point() else t for t in (x, *tensors)]
    return cast, torch.autocast(device, enabled=False)


def _master(weight: torch.Tensor, parameter: torch.Tensor) -> torch.Tensor | None:
    """The parameter a weight was cast from under autocast (saved in its place: ConvFn), else None."""
    return None if weight is parameter else parameter


def saving_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, compressor: Compressor,
                  layout: Any) -> torch.Tensor:
    """F.linear(x, weight, bias) saving x in `layout` (LinearFn), cast as autocast would cast it."""
    (x, cast_weight, cast_bias), autocast_off = _autocast(x, weight, bias)
    with autocast_off:
        return LinearFn.apply(x, cast_weight, cast_bias, compressor, layout, _master(cast_weight, weight))


def _own_containers(module: nn.Module | None) -> nn.Module | None:
    """`module` if it has no children, else a shallow copy whose containers are copied the same way:
    its layers, parameters and hooks are the original's, the dicts that hold its children its own."""
    if module is None or not module._modules:
        return module
    new = copy.copy(module)
    new._modules = {name: _own_containers(child) for name, child in module._modules.items()}
    return new


class DivisionLayer:
    """Mixin: how a converted layer is made from an original one."""

    compressor: Compressor
    # what a conversion adds to the module's attributes (revert_model drops them again)
    CONVERSION_ATTRIBUTES = ("compressor", "map_layout")
    # its forward runs its children's weights itself (an attention's projections), so they are
    # converted, excluded and given bits with it (convert._check_plan_applies)
    COMPUTES_CHILDREN = False
    # its records hold HFC codes (False: masks or window offsets only, which take no bits)
    HFC_RECORDS = True
    # the class revert_model gives back, where it is not the first stock class of the MRO
    STOCK_CLASS: type[nn.Module] | None = None

    @classmethod
    def reason_to_keep(cls, module: nn.Module) -> str:
        """Why this stock `module` stays as it is though its class converts ("" where it converts):
        for a class that converts some of its uses only (timm's patch embedding: Swin's, not ViT's)."""
        return ""

    @classmethod
    def from_module(cls, module: nn.Module, compressor: Compressor) -> nn.Module:
        new = cls.__new__(cls)
        new.__dict__.update(module.__dict__)
        # a container's layers convert in the new one alone, nested containers' too
        new._modules = {name: _own_containers(child) for name, child in module._modules.items()}
        new.compressor = compressor
        return new

    def extra_repr(self) -> str:  # type: ignore[override]
        base = super().extra_repr()  # type: ignore[misc]
        cfg = self.compressor.cfg
        return f"{base}, division=(B={cfg.block_size}, Q={cfg.hfc_bits}, {cfg.backward_mode})"


class _DivisionConvNd(DivisionLayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _needs_saving(self, x):
            return super().forward(x)  # type: ignore[misc]
        return self.saving_conv(x, self.weight)

    def saving_conv(self, x: torch.Tensor, weight: torch.Tensor, recipe: WeightRecipe | None = None) -> torch.Tensor:
        """The layer's convolution of x with `weight` (its parameter, or a weight made from it by
        `recipe`, which backward follows again: timm's standardized convolutions), x saved
        compressed (ConvFn)."""
        if _unbatched(x, weight.dim()):
            return self.saving_conv(x.unsqueeze(0), weight, recipe).squeeze(0)
        dims = x.dim() - 2
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = (0,) * dims
        elif isinstance(padding, str):
            x, padding = _explicit_padding(x, padding, self.kernel_size, self.dilation)
        (x, cast_weight, bias), autocast_off = _autocast(x, weight, self.bias)
        with autocast_off:
            y = ConvFn.apply(
                x, cast_weight, bias, list(self.stride), list(padding), list(self.dilation),
                self.groups, self.compressor, recipe or _master(cast_weight, weight),
            )
        return self.compressor.mark_conv_map(y)


def _explicit_padding(
    x: torch.Tensor, padding: str, kernel: tuple[int, ...], dilation: tuple[int, ...]
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """padding='valid'/'same' as integers; an odd 'same' total pads the extra element on the right."""
    if padding == "valid":
        return x, (0,) * len(kernel)
    totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
    left = tuple(t // 2 for t in totals)
    extra = [t - 2 * lt for t, lt in zip(totals, left)]
    if any(extra):
        pads: list[int] = []
        for e in reversed(extra):
            pads += [0, e]
        x = F.pad(x, pads)
    return x, left


class _DivisionConvTransposeNd(DivisionLayer):
    """Transposed convolution (decoders, U-Nets, generators) saving a compressed input, as ConvFn
    does for a convolution; the output padding as stock's forward works it out (`output_size`)."""

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if not _needs_saving(self, x) or self.padding_mode != "zeros":  # stock's error for the others
            return super().forward(x, output_size)  # type: ignore[misc]
        dims = self.weight.dim() - 2
        output_padding = self._output_padding(  # type: ignore[attr-defined]
            x, output_size, self.stride, self.padding, self.kernel_size, dims, self.dilation)
        if _unbatched(x, dims + 2):
            return self._transposed(x.unsqueeze(0), list(output_padding)).squeeze(0)
        return self._transposed(x, list(output_padding))

    def _transposed(self, x: torch.Tensor, output_padding: list[int]) -> torch.Tensor:
        (x, weight, bias), autocast_off = _autocast(x, self.weight, self.bias)
        with autocast_off:
            y = ConvFn.apply(
                x, weight, bias, list(self.stride), list(self.padding), list(self.dilation),
                self.groups, self.compressor, _master(weight, self.weight), True, output_padding,
            )
        return self.compressor.mark_conv_map(y)


class DivisionConvTranspose1d(_DivisionConvTransposeNd, nn.ConvTranspose1d):
    pass


class DivisionConvTranspose2d(_DivisionConvTransposeNd, nn.ConvTranspose2d):
    pass


class DivisionConvTranspose3d(_DivisionConvTransposeNd, nn.ConvTranspose3d):
    pass


class DivisionConv1d(_DivisionConvNd, nn.Conv1d):
    pass


class DivisionConv2d(_DivisionConvNd, nn.Conv2d):
    pass


class DivisionConv3d(_DivisionConvNd, nn.Conv3d):
    pass


class _DivisionBatchNorm(DivisionLayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not _needs_saving(self, x):
            return super().forward(x)  # type: ignore[misc]
        return self.training_batch_norm(x)

    def training_batch_norm(self, x: torch.Tensor) -> torch.Tensor:
        """Stock's training-mode batch norm (statistics, running averages, counter and errors),
        saving x compressed (BatchNormFn)."""
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        if x.numel() // x.shape[1] == 1:  # stock's check (F.batch_norm, after it counted the batch)
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {x.size()}"
            )
        # (N, C) inputs have no spatial extent to split into LFC and HFC: they are kept as they are
        mode = "exact" if x.dim() == 2 else None
        y = BatchNormFn.apply(
            x, self.weight, self.bias,
            self.running_mean if self.track_running_stats else None,
            self.running_var if self.track_running_stats else None,
            factor, self.eps, self.compressor, mode,
        )
        return self.compressor.mark_conv_map(y)


class DivisionBatchNorm1d(_DivisionBatchNorm, nn.BatchNorm1d):
    pass


class DivisionBatchNorm2d(_DivisionBatchNorm, nn.BatchNorm2d):
    pass


class DivisionBatchNorm3d(_DivisionBatchNorm, nn.BatchNorm3d):
    pass


class DivisionGroupNorm(DivisionLayer, nn.GroupNorm):
    """Group norm saving its (N, C, *spatial) input compressed (GroupNormFn), where stock keeps it
    whole: the norms of diffusion U-Nets' and detection heads' blocks. The input takes stock's
    layout first (on the CPU its own, channels_last or contiguous; contiguous elsewhere: group_norm's
    own copy), so values and gradients are stock's in exact mode; (N, C) inputs, which have no spatial
    extent, are kept exact; inputs stock rejects go to stock's forward, for its error."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.saves(x):
            return super().forward(x)
        return self.saving_group_norm(x)

    def saves(self, x: torch.Tensor) -> bool:
        """Whether the norm of x saves a record (else stock's forward runs)."""
        return (_needs_saving(self, x) and x.dim() >= 2 and x.shape[1] == self.num_channels
                and self.num_channels % self.num_groups == 0 and x.numel() // self.num_groups != 1)

    def saving_group_norm(self, x: torch.Tensor) -> torch.Tensor:
        (x, weight, bias), autocast_off = _fp32_under_cuda_autocast(x, self.weight, self.bias)
        x = x.contiguous(memory_format=memory_format_of(x)) if x.device.type == "cpu" else x.contiguous()
        with autocast_off:
            y = GroupNormFn.apply(x, weight, bias, self.num_groups, self.eps, self.compressor,
                                  "exact" if x.dim() == 2 else None)
        return self.compressor.mark_conv_map(y)


class DivisionReLU(DivisionLayer, nn.ReLU):
    HFC_RECORDS = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _needs_saving(self, x):
            return super().forward(x)
        return ReLUFn.apply(x, self.inplace, self.compressor.kernels)


class DivisionDropout(DivisionLayer, nn.Dropout):
    HFC_RECORDS = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p in (0.0, 1.0) or not _needs_saving(self, x):  # p = 1: stock keeps no mask either
            return super().forward(x)
        return DropoutFn.apply(x, self.p, self.inplace, self.compressor.kernels)


def _pool_geometry(pool: Any) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """A pooling layer's kernel, stride (the kernel's when None, as stock's) and padding, one
    entry per spatial dimension."""
    expand = _pair if pool.dims == 2 else _triple
    stride = pool.stride if pool.stride is not None else pool.kernel_size
    return expand(pool.kernel_size), expand(stride), expand(pool.padding)


class _DivisionMaxPool(DivisionLayer):
    """Max pooling keeping a few-bit window offset per output (MaxPoolFn), where stock keeps the
    input and int64 indices."""

    HFC_RECORDS = False

    dims: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _needs_saving(self, x):
            return super().forward(x)  # type: ignore[misc]
        if _unbatched(x, self.dims + 2):
            return self.forward(x.unsqueeze(0)).squeeze(0)
        kernel, stride, padding = _pool_geometry(self)
        pool = F.max_pool2d if self.dims == 2 else F.max_pool3d
        if torch.is_autocast_enabled(x.device.type):  # stock's dtype: CPU autocast runs max_pool3d in float32
            x = x.to(pool(x.new_zeros((1,) * x.dim()), 1).dtype)
        dilation = (_pair if self.dims == 2 else _triple)(self.dilation)  # type: ignore[attr-defined]
        return MaxPoolFn.apply(x, kernel, stride, padding, dilation, self.ceil_mode, self.compressor.kernels)  # type: ignore[attr-defined]


class DivisionMaxPool2d(_DivisionMaxPool, nn.MaxPool2d):
    dims = 2


class DivisionMaxPool3d(_DivisionMaxPool, nn.MaxPool3d):
    dims = 3


class _DivisionAvgPool(DivisionLayer):
    """Average pooling saving nothing of its input (AvgPoolFn), where stock keeps all of it."""

    HFC_RECORDS = False
    dims: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _needs_saving(self, x) or x.dim() != self.dims + 2:
            return super().forward(x)  # type: ignore[misc]
        kernel, stride, padding = _pool_geometry(self)
        return AvgPoolFn.apply(
            x, list(kernel), list(stride), list(padding),
            self.ceil_mode, self.count_include_pad, self.divisor_override,  # type: ignore[attr-defined]
        )


class DivisionAvgPool2d(_DivisionAvgPool, nn.AvgPool2d):
    dims = 2


class DivisionAvgPool3d(_DivisionAvgPool, nn.AvgPool3d):
    dims = 3


class _ClampMask(DivisionLayer):
    """Hardtanh / ReLU6 keeping a 1-bit mask of where the gradient passes (ClampMaskFn)."""

    HFC_RECORDS = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _needs_saving(self, x):
            return super().forward(x)  # type: ignore[misc]
        return ClampMaskFn.apply(x, self.min_val, self.max_val, self.inplace, self.compressor.kernels)


class DivisionLeakyReLU(DivisionLayer, nn.LeakyReLU):
    """LeakyReLU keeping a 1-bit mask of where its input is positive (LeakyReLUFn), where stock
    keeps the input (GANs' discriminators, YOLO-style detectors). In place with a negative slope,
    which stock's backward refuses, it runs stock's layer, for stock's error."""

    HFC_RECORDS = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _needs_saving(self, x) or (self.inplace and self.negative_slope < 0):
            return super().forward(x)
        return LeakyReLUFn.apply(x, self.negative_slope, self.inplace, self.compressor.kernels)


class DivisionHardtanh(_ClampMask, nn.Hardtanh):
    pass


class DivisionReLU6(_ClampMask, nn.ReLU6):
    pass


class _CompressedActivation(DivisionLayer):
    """An elementwise activation saving its (N, C, *spatial) input compressed (ActivationFn);
    other inputs as stock."""

    activation: str

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _needs_saving(self, x) or not 3 <= x.dim() <= 5:
            return super().forward(x)  # type: ignore[misc]
        return ActivationFn.apply(x, self.activation, self.inplace, self.compressor)


class DivisionSiLU(_CompressedActivation, nn.SiLU):
    activation = "silu"


class DivisionHardswish(_CompressedActivation, nn.Hardswish):
    activation = "hardswish"


class DivisionMish(_CompressedActivation, nn.Mish):
    activation = "mish"


if SqueezeExcitation is not None:

    class DivisionSqueezeExcitation(DivisionLayer, SqueezeExcitation):
        """torchvision's squeeze-and-excitation block (EfficientNet, MobileNetV3, RegNet): its
        layers are converted as any others, and its `scale * x` saves x compressed (ScaleFn)
        where stock keeps it whole."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not _needs_saving(self, x, recurse=True) or not 3 <= x.dim() <= 5:
                return super().forward(x)
            return ScaleFn.apply(x, self._scale(x), self.compressor)


class DivisionLinear(DivisionLayer, nn.Linear):
    """(N, T, D) token inputs are saved as token records (over the patch grid when the model has
    one), the 4-D and 5-D inputs of a map layer (`map_layout`: set_map_layers) as maps;
    other inputs along their last dimension when compress_linear, else exactly as stock."""

    # how a 4-D or 5-D input lies (set_map_layers sets it): MAP, or MaxViT's partitions
    map_layout: Layout | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _needs_saving(self, x) or x.dim() < 2:
            return super().forward(x)
        layout = _input_layout(self, x)
        if x.dim() > 3 and layout is not None:
            return saving_linear(x, self.weight, self.bias, self.compressor, layout)
        tokens = x.dim() == 3
        if not (tokens or self.compressor.cfg.compress_linear):
            # kept exact, as stock; but a view such as a ViT head's x[:, 0] would keep its whole
            # token tensor alive for backward: save a copy of just the view (same values; under
            # torch.compile the partitioner chooses what is saved)
            if not torch.compiler.is_compiling() and x.untyped_storage().nbytes() > 2 * x.numel() * x.element_size():
                x = x.clone()
            return super().forward(x)
        return saving_linear(x, self.weight, self.bias, self.compressor, TOKENS if tokens else ROWS)


def _fp32_under_cuda_autocast(*tensors: torch.Tensor | None) -> tuple[list[Any], contextlib.AbstractContextManager]:
    """layer_norm and group_norm are on CUDA autocast's float32 list (CPU autocast leaves them
    alone): cast as stock."""
    if not (tensors[0].is_cuda and torch.is_autocast_enabled("cuda")):
        return list(tensors), contextlib.nullcontext()
    cast = [t.float() if t is not None and t.is_floating_point() else t for t in tensors]
    return cast, torch.autocast("cuda", enabled=False)


def _input_layout(module: nn.Module, x: torch.Tensor) -> Layout | None:
    """How x lies, by what the module was told (`map_layout`) and x's shape: CONV for the
    (N, C, *spatial) inputs of an activation after a convolution; HEADS for the (N, heads, T, d)
    inputs of a layer told so (MViT's pooling norms); TOKENS for other 3-D inputs; the
    map layout of a 4-D or 5-D input (MAP; a PartitionGrid that x fits); else None (stock's forward)."""
    layout = getattr(module, "map_layout", None)
    if layout == CONV:
        return CONV if 3 <= x.dim() <= 5 else None
    if layout == HEADS:
        return HEADS if x.dim() == 4 else None
    if x.dim() == 3:
        return TOKENS
    if x.dim() not in (4, 5) or layout is None:
        return None
    return layout if layout == MAP or layout.fits(x) else None


class DivisionLayerNorm(DivisionLayer, nn.LayerNorm):
    """(N, T, D) token inputs normalized over D are saved as token records, the 4-D and 5-D inputs of a
    map layer (set_map_layers: ConvNeXt's, Swin's and MaxViT's blocks) as maps; others as stock."""

    map_layout: Layout | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layout = _input_layout(self, x)
        if not _needs_saving(self, x) or layout is None or len(self.normalized_shape) != 1:
            return super().forward(x)
        (x, weight, bias), autocast_off = _fp32_under_cuda_autocast(x, self.weight, self.bias)
        with autocast_off:
            return LayerNormFn.apply(x, list(self.normalized_shape), weight, bias, self.eps, self.compressor, layout)


if LayerNorm2d is not None:

    class DivisionLayerNorm2d(DivisionLayer, LayerNorm2d):
        """torchvision's LayerNorm2d (ConvNeXt's stem and downsampling): a layer norm over the
        channels of an (N, C, H, W) map, run on its (N, H, W, C) permutation as stock runs it, the
        input saved as a map record."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not _needs_saving(self, x) or x.dim() != 4 or len(self.normalized_shape) != 1:
                return super().forward(x)
            return channel_layer_norm(self, x)


def channel_layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """A layer norm over the channels of an (N, C, H, W) map, run on its (N, H, W, C) permutation
    as torchvision's and timm's LayerNorm2d run it, the input saved as a map record."""
    (x, weight, bias), autocast_off = _fp32_under_cuda_autocast(x.permute(0, 2, 3, 1), norm.weight, norm.bias)
    with autocast_off:
        y = LayerNormFn.apply(x, list(norm.normalized_shape), weight, bias, norm.eps, norm.compressor, MAP)  # type: ignore[attr-defined]
    return y.permute(0, 3, 1, 2)


class DivisionGELU(DivisionLayer, nn.GELU):
    """(N, T, D) token inputs are saved as token records, the 4-D and 5-D inputs of a map layer
    (set_map_layers: ConvNeXt's, Swin's and MaxViT's blocks) as maps, the (N, C, *spatial) inputs
    of a GELU after a convolution (set_conv_activations, set_conv_gelus, or an input that is, as it
    is, what a converted convolution or norm gave in this forward: Compressor.is_conv_map) as
    SiLU's are (ActivationFn); others as stock (a lone 4-D input could be either kind of map)."""

    map_layout: Layout | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.map_layout is None and 3 <= x.dim() <= 5 and self.compressor.is_conv_map(x):
            layout: Layout | None = CONV  # (a Conv1d's (N, C, L) output too, which would pass for tokens)
        else:
            layout = _input_layout(self, x)
        if not _needs_saving(self, x) or layout is None:
            return super().forward(x)
        if layout == CONV:
            name = "gelu" if self.approximate == "none" else f"gelu_{self.approximate}"
            return ActivationFn.apply(x, name, False, self.compressor)
        return GELUFn.apply(x, self.approximate, self.compressor, layout)


class DivisionMultiheadAttention(DivisionLayer, nn.MultiheadAttention):
    """Self-attention on batch-first (N, T, E) tokens without weights returned (what torchvision's
    ViT runs): the input and output projections save their inputs as token records, and (eager,
    without attention dropout) q, k and v are saved as token records in place of what
    scaled_dot_product_attention keeps (AttentionFn: recomputed in backward). The op order is
    stock's (F.multi_head_attention_forward), so exact mode is stock bit for bit. Other calls
    (masks, attention weights, cross-attention) run stock's forward."""

    COMPUTES_CHILDREN = True

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        plain = (
            self.batch_first and query is key and key is value and query.dim() == 3
            and self._qkv_same_embed_dim and self.bias_k is None and not self.add_zero_attn
            and not need_weights and key_padding_mask is None and attn_mask is None and not is_causal
        )
        if not (plain and _needs_saving(self, query)):
            return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, is_causal)
        n, t, e = query.shape
        heads = self.num_heads
        (x, w_in, b_in, w_out, b_out), autocast_off = _autocast(
            query.transpose(1, 0), self.in_proj_weight, self.in_proj_bias, self.out_proj.weight, self.out_proj.bias
        )
        with autocast_off:
            proj = LinearFn.apply(x, w_in, b_in, self.compressor, TOKENS_SEQ_FIRST, _master(w_in, self.in_proj_weight))
        proj = proj.unflatten(-1, (3, e)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
        q, k, v = (p.view(t, n * heads, -1).transpose(0, 1).view(n, heads, t, -1) for p in proj)
        dropout = self.dropout if self.training else 0.0
        cfg = self.compressor.cfg
        if dropout == 0.0 and cfg.compress_attention and cfg.backward_mode != "exact" and not torch.compiler.is_compiling():
            out = AttentionFn.apply(q, k, v, self.compressor)  # q, k, v as token records
        else:  # stock's attention saves what it saves: when asked, in exact mode; under dropout,
            # whose mask cannot be redrawn in backward; under torch.compile, which cannot trace the
            # recomputation's nested autograd
            out = F.scaled_dot_product_attention(q, k, v, None, dropout, False)
        out = out.permute(2, 0, 1, 3).contiguous().view(t, n, e)
        with autocast_off:
            out = LinearFn.apply(out, w_out, b_out, self.compressor, TOKENS_SEQ_FIRST, _master(w_out, self.out_proj.weight))
        return out.transpose(1, 0), None


def set_map_layers(container: nn.Module, compressor: Compressor, names: set[str] | None = None,
                   layout: Layout = MAP) -> None:
    """After convert_model has converted a block's layers: its LayerNorm, Linear and GELU children
    (those in `names`, default all) told how their 4-D and 5-D inputs lie (MAP: channels-last maps; a
    PartitionGrid), the Linears converted too (whatever compress_linear says: on a map they are
    pointwise convolutions)."""
    for name, layer in list(container.named_children()):
        if names is not None and name not in names:
            continue
        if type(layer) is nn.Linear:
            layer = DivisionLinear.from_module(layer, compressor)
            setattr(container, name, layer)
        if isinstance(layer, (DivisionLinear, DivisionLayerNorm, DivisionGELU)):
            layer.map_layout = layout


def set_maps_after_permute(sequential: nn.Sequential, compressor: Compressor) -> None:
    """In a Sequential, the layers between torchvision's Permute([0, 2, 3, 1]) (N, C, H, W ->
    N, H, W, C) and the next Permute run on maps (Swin's patch embedding: conv, permute, norm)."""
    names, on_map = set(), False
    for name, layer in sequential.named_children():
        if Permute is not None and type(layer) is Permute:
            on_map = list(layer.dims) == [0, 2, 3, 1]
        elif on_map:
            names.add(name)
    if names:
        set_map_layers(sequential, compressor, names)


# layers whose output is an (N, C, *spatial) map, as a convolution gives it
CONV_OUTPUTS = (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm)


def set_conv_activations(sequential: nn.Sequential) -> None:
    """In a Sequential, a GELU right after a convolution or a batch, instance or group norm takes
    (N, C, *spatial) maps (torchvision's Conv2dNormActivation: MaxViT's MBConv blocks and stem)."""
    before: nn.Module | None = None
    for layer in sequential.children():
        if isinstance(layer, DivisionGELU) and isinstance(before, CONV_OUTPUTS):
            layer.map_layout = CONV
        before = layer


def set_conv_gelus(container: nn.Module, names: tuple[str, ...]) -> None:
    """The GELUs of `container` named act on (N, C, *spatial) maps, as convolutions give them, and
    save records of them (ActivationFn), where a lone GELU's 4-D input keeps stock's (it could be an
    (N, H, W, C) map)."""
    for name in names:
        layer = getattr(container, name, None)
        if isinstance(layer, DivisionGELU):
            layer.map_layout = CONV


# what a container that is not converted itself (a whole model) says of how its converted layers'
# inputs lie (timm's NFNet: its final GELU's is a conv map), applied once they are converted
CONTAINER_LAYOUTS: dict[type[nn.Module], Callable[[nn.Module, Compressor], None]] = {}


if CNBlock is not None:

    class DivisionCNBlock(DivisionLayer, CNBlock):
        """torchvision's ConvNeXt block: its depthwise conv is converted as any other; its
        LayerNorm, two Linears (pointwise convolutions) and GELU run on an (N, H, W, C) map and save
        their inputs as map records (map_layout); `layer_scale * block(x)` saves the block's output
        compressed for the scale's gradient (ScaleFn) where stock keeps it whole."""

        def convert_inner(self) -> None:
            set_map_layers(self.block, self.compressor)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not _needs_saving(self, x, recurse=True):
                return super().forward(x)
            result = ScaleFn.apply(self.block(x), self.layer_scale, self.compressor)
            result = self.stochastic_depth(result)
            result += x
            return result


CONVERSIONS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: DivisionConv1d,
    nn.Conv2d: DivisionConv2d,
    nn.Conv3d: DivisionConv3d,
    nn.ConvTranspose1d: DivisionConvTranspose1d,
    nn.ConvTranspose2d: DivisionConvTranspose2d,
    nn.ConvTranspose3d: DivisionConvTranspose3d,
    nn.BatchNorm1d: DivisionBatchNorm1d,
    nn.BatchNorm2d: DivisionBatchNorm2d,
    nn.BatchNorm3d: DivisionBatchNorm3d,
    nn.ReLU: DivisionReLU,
    nn.Dropout: DivisionDropout,
    nn.MaxPool2d: DivisionMaxPool2d,
    nn.MaxPool3d: DivisionMaxPool3d,
    nn.AvgPool2d: DivisionAvgPool2d,
    nn.AvgPool3d: DivisionAvgPool3d,
    nn.Linear: DivisionLinear,
    nn.LayerNorm: DivisionLayerNorm,
    nn.GroupNorm: DivisionGroupNorm,
    nn.GELU: DivisionGELU,
    nn.MultiheadAttention: DivisionMultiheadAttention,
    nn.Hardtanh: DivisionHardtanh,
    nn.LeakyReLU: DivisionLeakyReLU,
    nn.ReLU6: DivisionReLU6,
    nn.SiLU: DivisionSiLU,
    nn.Hardswish: DivisionHardswish,
    nn.Mish: DivisionMish,
}
if SqueezeExcitation is not None:
    CONVERSIONS[SqueezeExcitation] = DivisionSqueezeExcitation
if CNBlock is not None:
    CONVERSIONS[CNBlock] = DivisionCNBlock
    CONVERSIONS[LayerNorm2d] = DivisionLayerNorm2d

from .inception import INCEPTION_CONVERSIONS  # noqa: E402  (built on the layers above)
from .maxvit import MAXVIT_CONVERSIONS  # noqa: E402
from .mvit import MVIT_CONVERSIONS  # noqa: E402
from .swin import SWIN_CONVERSIONS  # noqa: E402

CONVERSIONS.update(INCEPTION_CONVERSIONS)
CONVERSIONS.update(SWIN_CONVERSIONS)
CONVERSIONS.update(MAXVIT_CONVERSIONS)
CONVERSIONS.update(MVIT_CONVERSIONS)
