"""Autograd Functions of the converted layers.

Each forward is the exact op; each backward runs the exact gradient formula (public ATen ops) on
the input rebuilt from what forward saved. Saved tensors go through `save_for_backward`, so
saved-tensor hooks (e.g. `torch.autograd.graph.save_on_cpu`) and retain_graph work as usual.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd import Function

from .codec import decompress
from .compressor import Compressor
from .format import CompressedActivation, memory_format_of
from .masks import (
    dropout_backward,
    max_pool_backward,
    max_pool_forward,
    pack_mask,
    relu_backward,
    relu_forward,
    unpack_bits_reference,
)
from .tokens import (
    PartitionGrid,
    WindowGrid,
    compress_tokens,
    decompress_tokens,
    input_map_as_windows,
    map_as_partitions,
    partitions_as_map,
    windows_as_input_map,
)

# aten._batch_norm_impl_index's answer: which kernel ran a batch norm
NATIVE_BATCH_NORM, CUDNN_BATCH_NORM, MIOPEN_BATCH_NORM = 0, 1, 2


def _save(ctx: Any, packed: CompressedActivation | None, *others: torch.Tensor | None) -> None:
    """Save a record's tensors (and others) through autograd; keep its metadata on ctx."""
    _save_records(ctx, [packed], *others)


def _load(ctx: Any, differentiable: bool = True) -> tuple[CompressedActivation | None, tuple[torch.Tensor | None, ...]]:
    (packed,), others = _load_records(ctx, differentiable)
    return packed, others


def _save_records(ctx: Any, records: list[Any], *others: torch.Tensor | None) -> None:
    """Save several records' tensors (None: no record) and others; their metadata stays on ctx."""
    tensors: list[torch.Tensor | None] = []
    ctx.records = []
    for r in records:
        ts = () if r is None else r.tensors()
        ctx.records.append((None if r is None else r.with_tensors((None,) * len(ts)), len(ts)))
        tensors += ts
    ctx.save_for_backward(*tensors, *others)


def _load_records(ctx: Any, differentiable: bool = True) -> tuple[list[Any], tuple[torch.Tensor | None, ...]]:
    """The records and other tensors `_save_records` saved. `differentiable`: the Function's
    backward, run with create_graph=True on exact records, gives stock's gradients of gradients."""
    saved, start, records = ctx.saved_tensors, 0, []
    for record, size in ctx.records:
        records.append(None if record is None else record.with_tensors(saved[start : start + size]))
        start += size
    if differentiated():
        check_double_backward(ctx, records, differentiable)
    return records, saved[start:]


def differentiated() -> bool:
    """Whether this backward's gradients will be differentiated again: a backward with
    create_graph=True (gradient penalties, MAML) runs with grad mode on; a plain one, and
    torch.compile's trace of backward, with it off (the mask layers' backward ops decide the same
    way for themselves: masks.backward_kernels)."""
    return torch.is_grad_enabled()


def check_double_backward(ctx: Any, records: list[Any], differentiable: bool) -> None:
    """Gradients of gradients through a layer need its input with its autograd history. A record
    rebuilt from codes is a constant to autograd, so the terms through the input would be missing,
    silently: refused, as is a Function whose backward does not keep that history even in exact mode."""
    layer = type(ctx).__name__.removesuffix("Backward")
    if not differentiable:
        raise RuntimeError(
            f"DIVISION's {layer} does not support a backward with create_graph=True (gradients of "
            "gradients), even with backward_mode='exact': name the layers such a loss differentiates "
            "through in DivisionConfig.exclude to keep them stock"
        )
    exact = [getattr(getattr(r, "inner", r), "mode", None) == "exact" for r in records if r is not None]
    if not all(exact):  # a TokenRecord holds its codec's record as `inner`
        raise RuntimeError(
            f"DIVISION's {layer}: a backward with create_graph=True (gradients of gradients: a gradient "
            "penalty, MAML) would differentiate through an input rebuilt from its compressed record, which "
            "autograd sees as a constant, so terms of those gradients would be missing. For such a loss, "
            "convert with DivisionConfig(backward_mode='exact'), or name the layers it differentiates "
            "through in DivisionConfig.exclude"
        )


AutocastState = tuple[str, bool, torch.dtype]


def autocast_state(device_type: str) -> AutocastState:
    """Forward's autocast state, for backward to recompute under (recompute_grads)."""
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def rerun(state: AutocastState, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """fn() as forward computed it, under forward's autocast `state`, outside autograd: what a
    Function rebuilds in backward rather than keep (a relative position bias)."""
    device, enabled, dtype = state
    with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
        return fn()


def recompute_grads(fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor | None], needs: Any,
                    state: AutocastState, gy: torch.Tensor) -> list[torch.Tensor | None]:
    """The backward of a Function that saved records in place of what `fn` keeps: `fn` runs again on
    `inputs` (rebuilt from the records, or kept; None for an absent one) under forward's autocast
    `state`, and is differentiated there: the gradients of the inputs that need one (`needs`), None
    for the others."""
    leaves = [None if t is None else t.detach().requires_grad_(bool(need)) for t, need in zip(inputs, needs)]
    device, enabled, dtype = state
    with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
        out = fn(*leaves)
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(out, wanted, gy))
    return [next(grads) if t is not None and t.requires_grad else None for t in leaves]


@dataclass(frozen=True)
class WeightRecipe:
    """A weight made from parameters in forward (timm's standardized weights: `make(*params)`),
    which a layer makes again in backward from the parameters, saved through autograd (whose
    version check then refuses parameters changed in place since forward, as stock's saved
    weight would be)."""

    make: Callable[..., torch.Tensor]
    params: tuple[torch.Tensor, ...]


def _keep_weight(ctx: Any, weight: torch.Tensor, master: torch.Tensor | WeightRecipe | None) -> tuple[torch.Tensor, ...]:
    """What a layer saves of its weight. Under autocast `weight` is a cast copy of the parameter
    `master`: the parameter is saved and cast again in backward (`_weight`), so the copy is freed
    after forward (stock's autocast keeps it until backward: 0.044 GiB for ResNet-50's convolutions
    in bf16, 0.16 for ViT-B/16). The cast is exact, so the gradients are stock's. A WeightRecipe
    `master`: its parameters are saved, and the weight is made again from them in backward (the
    same op on the same values: the same weight; nothing weight-sized kept per layer)."""
    ctx.weight_dtype = weight.dtype
    if isinstance(master, WeightRecipe):
        ctx.remake_weight = master.make
        return master.params
    ctx.remake_weight = None
    return (weight if master is None else master,)


def _weight(ctx: Any, saved: tuple[torch.Tensor, ...]) -> torch.Tensor:
    if ctx.remake_weight is not None:
        with torch.no_grad():
            weight = ctx.remake_weight(*saved)
    else:
        (weight,) = saved
    return weight if weight.dtype == ctx.weight_dtype else weight.to(ctx.weight_dtype)


class ConvFn(Function):
    """N-d convolution, or with `transposed` a transposed one (its `output_padding`), saving a
    compressed input for the weight gradient: aten's convolution and its backward, as stock's
    autograd runs them. `master`: the parameter `weight` was cast from under autocast, or the
    WeightRecipe that makes it (see _keep_weight), else None."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, compressor: Compressor, master=None,
                transposed: bool = False, output_padding=None):
        output_padding = list(output_padding) if transposed else [0] * len(stride)
        y = torch.ops.aten.convolution(x, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
        packed = compressor.compress(x) if ctx.needs_input_grad[1] else None
        _save(ctx, packed, *_keep_weight(ctx, weight, master))
        ctx.conv = (list(stride), list(padding), list(dilation), transposed, output_padding, groups)
        ctx.x_shape = x.shape
        ctx.bias_sizes = None if bias is None else list(bias.shape)
        return y

    @staticmethod
    def backward(ctx, gy):
        packed, saved = _load(ctx)
        weight = _weight(ctx, saved)
        if packed is not None:
            x_hat = decompress(packed)
        else:  # only grad_input is needed: its shape suffices (as torch.nn.grad.conv2d_input)
            x_hat = gy.new_empty(1).expand(ctx.x_shape)
        if torch.compiler.is_compiling() and x_hat.dim() == 4:
            # inductor's layout optimization makes the weight and gy channels_last around an input
            # saved contiguous, and torch 2.11's fake convolution_backward then predicts other
            # strides than cuDNN returns (pytorch/pytorch#171622): give all three one layout
            fmt = memory_format_of(x_hat)
            gy, weight = gy.contiguous(memory_format=fmt), weight.contiguous(memory_format=fmt)
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.bias_sizes is not None and ctx.needs_input_grad[2]]
        gx, gw, gb = torch.ops.aten.convolution_backward(gy, x_hat, weight, ctx.bias_sizes, *ctx.conv, mask)
        return gx, gw, gb, None, None, None, None, None, None, None, None


class BatchNormFn(Function):
    """Training-mode batch norm: exact batch statistics from forward, reused by backward. Forward
    runs the kernel stock chooses (aten._batch_norm_impl_index on CUDA: cuDNN where it applies;
    the native kernel on the CPU, as stock does there) and backward that kernel's own backward, as
    stock's autograd does, so exact mode matches stock bit for bit."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, compressor: Compressor, mode):
        if x.is_cuda:
            y, save_mean, save_var, reserve, impl = torch.ops.aten._batch_norm_impl_index(
                x, weight, bias, running_mean, running_var, True, momentum, eps,
                torch.backends.cudnn.enabled,
            )
        else:
            y, save_mean, save_var = torch.ops.aten.native_batch_norm(
                x, weight, bias, running_mean, running_var, True, momentum, eps
            )
            reserve, impl = None, NATIVE_BATCH_NORM
        packed = compressor.compress(x, mode) if any(ctx.needs_input_grad[:3]) else None
        _save(ctx, packed, weight, save_mean, save_var, reserve)
        ctx.eps, ctx.impl, ctx.x_format = eps, impl, memory_format_of(x)
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        return y

    @staticmethod
    def backward(ctx, gy):
        packed, (weight, save_mean, save_var, reserve) = _load(ctx)
        x_hat = decompress(packed)
        if ctx.impl == CUDNN_BATCH_NORM:  # stock's derivative of cudnn_batch_norm
            gx, gw, gb = torch.ops.aten.cudnn_batch_norm_backward(
                x_hat, gy.contiguous(memory_format=ctx.x_format), weight, None, None, save_mean,
                save_var, ctx.eps, reserve,
            )
        elif ctx.impl == MIOPEN_BATCH_NORM:
            gx, gw, gb = torch.ops.aten.miopen_batch_norm_backward(
                x_hat, gy.contiguous(), weight, None, None, save_mean, save_var, ctx.eps
            )
        else:
            mask = [
                ctx.needs_input_grad[0],
                ctx.has_weight and ctx.needs_input_grad[1],
                ctx.has_bias and ctx.needs_input_grad[2],
            ]
            gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
                gy, x_hat, weight, None, None, save_mean, save_var, True, ctx.eps, mask
            )
        return gx, gw, gb, None, None, None, None, None, None


class GroupNormFn(Function):
    """Group norm of an (N, C, *spatial) input saving it compressed: exact per-group statistics
    from forward; backward is aten's native_group_norm_backward on the rebuilt input, as stock's
    autograd runs it (in the input's layout, which the layer made stock's: see DivisionGroupNorm)."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups: int, eps: float, compressor: Compressor, mode):
        n, c = x.shape[:2]
        hxw = x.numel() // max(n * c, 1)
        y, mean, rstd = torch.ops.aten.native_group_norm(x, weight, bias, n, c, hxw, groups, eps)
        _save(ctx, compressor.compress(x, mode), weight, mean, rstd)
        ctx.group = (n, c, hxw, groups)
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        return y

    @staticmethod
    def backward(ctx, gy):
        # stock's double backward runs another formula (infinitely_differentiable_native_group_norm_backward)
        packed, (weight, mean, rstd) = _load(ctx, differentiable=False)
        x_hat = decompress(packed)
        mask = [ctx.needs_input_grad[0], ctx.has_weight and ctx.needs_input_grad[1],
                ctx.has_bias and ctx.needs_input_grad[2]]
        gx, gw, gb = torch.ops.aten.native_group_norm_backward(
            gy.contiguous(memory_format=memory_format_of(x_hat)), x_hat, mean, rstd, weight, *ctx.group, mask
        )
        return gx, gw, gb, None, None, None, None


def _save_mask(ctx: Any, keep: torch.Tensor, kernels: bool) -> None:
    """Save where the gradient passes as a 1-bit mask, with its layout (which backward's gradient
    takes) and whether the kernels may unpack it."""
    ctx.fmt, ctx.kernels = memory_format_of(keep), kernels
    ctx.save_for_backward(pack_mask(keep, kernels))


class ReLUFn(Function):
    """ReLU keeping a 1-bit mask of where the gradient passes instead of its output."""

    @staticmethod
    def forward(ctx, x, inplace: bool, kernels: bool):
        y, bits = relu_forward(x, inplace, kernels)
        if y is x:
            ctx.mark_dirty(x)
        ctx.fmt, ctx.kernels = memory_format_of(y), kernels
        ctx.save_for_backward(bits)
        return y

    @staticmethod
    def backward(ctx, gy):
        (bits,) = ctx.saved_tensors
        return relu_backward(gy, bits, ctx.fmt, ctx.kernels), None, None


@lru_cache(maxsize=64)
def kept_scale(p: float, dtype: torch.dtype) -> float:
    """The value stock dropout gives a kept element's noise: 1 / (1 - p) divided in x's dtype."""
    return torch.ones((), dtype=dtype).div_(1 - p).item()


class DropoutFn(Function):
    """Dropout keeping its keep-mask at one bit per element; values and random draws are stock's
    (native_dropout where stock fuses it, a bernoulli noise tensor elsewhere)."""

    @staticmethod
    def forward(ctx, x, p: float, inplace: bool, kernels: bool):
        if x.is_cuda and not inplace and x.numel() > 0:  # stock F.dropout's fused path
            y, keep = torch.ops.aten.native_dropout(x, p, True)
            scale = 1.0 / (1.0 - p)
        else:  # stock's _dropout_impl: x * (bernoulli(1 - p) / (1 - p))
            noise = torch.empty_like(x).bernoulli_(1.0 - p).div_(1.0 - p)
            y = x.mul_(noise) if inplace else x * noise
            keep, scale = noise != 0, kept_scale(p, x.dtype)
        if inplace:
            ctx.mark_dirty(x)
        ctx.scale = scale
        _save_mask(ctx, keep, kernels)
        return y

    @staticmethod
    def backward(ctx, gy):
        (bits,) = ctx.saved_tensors
        return dropout_backward(gy, bits, ctx.fmt, ctx.scale, ctx.kernels), None, None, None


class MaxPoolFn(Function):
    """2-d or 3-d max pooling keeping each argmax as a few-bit offset inside its window (stock
    keeps the input and int64 indices)."""

    @staticmethod
    def forward(ctx, x, kernel, stride, padding, dilation, ceil_mode: bool, kernels: bool):
        y, offsets = max_pool_forward(x, kernel, stride, padding, dilation, ceil_mode, kernels)
        ctx.pool = (tuple(kernel), tuple(stride), tuple(padding), tuple(dilation), ceil_mode)
        ctx.x_shape, ctx.fmt, ctx.kernels = x.shape, memory_format_of(x), kernels
        ctx.save_for_backward(offsets)
        return y

    @staticmethod
    def backward(ctx, gy):
        (offsets,) = ctx.saved_tensors
        gx = max_pool_backward(gy, offsets, ctx.x_shape, *ctx.pool, ctx.fmt, ctx.kernels)
        return gx, None, None, None, None, None, None


AVG_POOL_OPS = {2: (torch.ops.aten.avg_pool2d, torch.ops.aten.avg_pool2d_backward),
                3: (torch.ops.aten.avg_pool3d, torch.ops.aten.avg_pool3d_backward)}


class AvgPoolFn(Function):
    """2-d or 3-d average pooling keeping nothing of its input: stock's autograd saves the whole
    input, whose shape and layout are all that avg_pool{2,3}d_backward reads. Backward passes it an
    empty tensor of that shape and layout instead (allocated for the call, never read), so the
    gradient is stock's bit for bit."""

    @staticmethod
    def forward(ctx, x, kernel, stride, padding, ceil_mode: bool, count_include_pad: bool, divisor_override):
        ctx.pool = (kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)
        y = AVG_POOL_OPS[len(kernel)][0](x, *ctx.pool)
        # the dtype the op ran at: autocast runs avg_pool3d in float32 on the CPU (autograd casts
        # the gradient back to x's dtype, as after stock's autocast cast)
        ctx.x_meta = (x.shape, y.dtype, memory_format_of(x))
        return y

    @staticmethod
    def backward(ctx, gy):
        shape, dtype, fmt = ctx.x_meta
        carrier = torch.empty(shape, dtype=dtype, device=gy.device, memory_format=fmt)
        gx = AVG_POOL_OPS[len(ctx.pool[0])][1](gy, carrier, *ctx.pool)
        return gx, None, None, None, None, None, None


# ---- conv nets' other activations ---------------------------------------------------------------


class ClampMaskFn(Function):
    """Hardtanh and ReLU6 (stock's op) keeping a 1-bit mask of where the gradient passes: where
    neither y <= min nor y >= max, the test stock's hardtanh_backward applies to its input (x and y
    agree on it, NaN included), so the gradient is stock's bit for bit."""

    @staticmethod
    def forward(ctx, x, min_val: float, max_val: float, inplace: bool, kernels: bool):
        inplace = inplace and not torch.compiler.is_compiling()  # as relu_forward: inductor fuses
        y = F.hardtanh(x, min_val, max_val, inplace)
        if inplace:
            ctx.mark_dirty(x)
        _save_mask(ctx, ~((y <= min_val) | (y >= max_val)), kernels)
        return y

    @staticmethod
    def backward(ctx, gy):
        (bits,) = ctx.saved_tensors
        return relu_backward(gy, bits, ctx.fmt, ctx.kernels), None, None, None, None


class LeakyReLUFn(Function):
    """LeakyReLU keeping a 1-bit mask of x > 0, the test stock's leaky_relu_backward applies to its
    input (to its output in place, which agrees for the slopes stock allows there: >= 0; NaN fails
    both), so the gradient, gy where x > 0 and gy * slope elsewhere, is stock's bit for bit."""

    @staticmethod
    def forward(ctx, x, slope: float, inplace: bool, kernels: bool):
        inplace = inplace and not torch.compiler.is_compiling()  # as relu_forward: inductor fuses
        keep = x > 0
        y = F.leaky_relu(x, slope, inplace)
        if inplace:
            ctx.mark_dirty(x)
        ctx.slope = slope
        _save_mask(ctx, keep, kernels)
        return y

    @staticmethod
    def backward(ctx, gy):
        (bits,) = ctx.saved_tensors
        gy = gy.contiguous(memory_format=ctx.fmt)
        return torch.where(unpack_bits_reference(bits, gy.shape, ctx.fmt), gy, gy * ctx.slope), None, None, None


def _gelu(approximate: str) -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]:
    """GELU in ACTIVATIONS' form (it has no in-place variant: `inplace` is always False)."""
    return (lambda x, inplace: F.gelu(x, approximate=approximate),
            lambda gy, x: torch.ops.aten.gelu_backward(gy, x, approximate=approximate))


# name: (stock's forward, aten's derivative at the input), as stock's autograd runs them
ACTIVATIONS = {
    "silu": (F.silu, torch.ops.aten.silu_backward),
    "hardswish": (F.hardswish, torch.ops.aten.hardswish_backward),
    "mish": (F.mish, torch.ops.aten.mish_backward),
    "gelu": _gelu("none"),
    "gelu_tanh": _gelu("tanh"),
}


class ActivationFn(Function):
    """An elementwise activation (SiLU, Hardswish, Mish, GELU) of an (N, C, *spatial) map saving its
    input compressed with cfg.activation_bits HFC bits: backward is aten's derivative at the
    rebuilt input. In place, the input is compressed before it is overwritten (an exact record keeps
    a copy, as stock's autograd does for an in-place op whose derivative reads its input)."""

    @staticmethod
    def forward(ctx, x, name: str, inplace: bool, compressor: Compressor):
        inplace = inplace and not torch.compiler.is_compiling()  # as relu_forward: inductor fuses
        bits = compressor.cfg.activation_bits
        mode = compressor.record_mode(x, compressor.cfg.backward_mode, bits)
        keep_copy = inplace and mode == "exact"
        _save(ctx, compressor.compress(x.clone() if keep_copy else x, mode, bits))
        y = ACTIVATIONS[name][0](x, inplace=inplace)
        if inplace:
            ctx.mark_dirty(x)
        ctx.name, ctx.copied = name, keep_copy
        return y

    @staticmethod
    def backward(ctx, gy):
        packed, _ = _load(ctx, differentiable=not ctx.copied)  # a copy made in forward has no history
        return ACTIVATIONS[ctx.name][1](gy, decompress(packed)), None, None, None


ROWS, TOKENS, TOKENS_SEQ_FIRST = "rows", "tokens", "tokens_seq_first"
MAP = "map"  # an (N, H, W, C) or (N, T, H, W, C) map, channels last, as ConvNeXt's and Swin's blocks run them
CONV = "conv"  # an (N, C, *spatial) map, as convolutions give it (an activation's input: ActivationFn)
HEADS = "heads"  # (N, heads, T, d): each head's (N, T, d) tokens (MViT's pooled q, k, v)
# how a layer's input lies; a WindowGrid: (N * R * K, h * w, C) windows; a PartitionGrid: (N, G, P, C)
Layout = str | WindowGrid | PartitionGrid


class ScaleFn(Function):
    """Squeeze-and-excitation's `scale * x` (scale broadcast over x's spatial dims; a layer
    scale's over its tokens or map positions) saving x compressed in `layout` (_compress_layout; an
    (N, C, *spatial) map by default), and the small scale as it is. Backward is stock's mul backward:
    gx = gy * scale, gscale = (gy * x) summed to scale's shape."""

    @staticmethod
    def forward(ctx, x, scale, compressor: Compressor, layout: Layout = CONV):
        packed = _compress_layout(compressor, x, layout) if ctx.needs_input_grad[1] else None
        _save(ctx, packed, scale if ctx.needs_input_grad[0] else None)
        ctx.scale_shape, ctx.layout, ctx.x_shape = scale.shape, layout, x.shape
        return scale * x

    @staticmethod
    def backward(ctx, gy):
        packed, (scale,) = _load(ctx)
        gx = gy * scale if ctx.needs_input_grad[0] else None
        gs = None
        if ctx.needs_input_grad[1]:
            gs = (gy * _decompress_layout(packed, ctx.layout, ctx.x_shape)).sum_to_size(ctx.scale_shape)
        return gx, gs, None, None


class RecomputeFn(Function):
    """`fn(x, *params)` for a small function of x whose backward needs x (ConvNeXt-V2's global
    response norm), saving x compressed in `layout` (_compress_layout) and the parameters as they
    are: backward reruns fn on the rebuilt x under forward's autocast state and
    differentiates it there (stock's backward at the rebuilt input, as every DIVISION layer's)."""

    @staticmethod
    def forward(ctx, x, fn: Callable[..., torch.Tensor], compressor: Compressor, layout: Layout, *params):
        _save(ctx, _compress_layout(compressor, x, layout), *params)
        ctx.fn, ctx.layout, ctx.x_shape = fn, layout, x.shape
        ctx.autocast = autocast_state(x.device.type)
        return fn(x, *params)

    @staticmethod
    def backward(ctx, gy):
        packed, params = _load(ctx, differentiable=False)
        x = _decompress_layout(packed, ctx.layout, ctx.x_shape)
        needs = (ctx.needs_input_grad[0], *ctx.needs_input_grad[4:])
        gx, *gparams = recompute_grads(ctx.fn, [x, *params], needs, ctx.autocast, gy)
        return gx, None, None, None, *gparams


def _compress_layout(compressor: Compressor, x: torch.Tensor, layout: Layout) -> Any:
    """ROWS: rows of the last dimension as 1-d planes; TOKENS: (N, T, D) tokens as a token record
    (TOKENS_SEQ_FIRST: (T, N, D)); MAP: an (N, H, W, C) map as the record of its (N, C, H, W) view
    (a channels_last tensor when x is contiguous; (N, T, H, W, C) maps as 3-d ones); a WindowGrid:
    windows as the block input's
    positions they hold (tokens.windows_as_input_map: the padding is not kept, and comes back as
    zeros, which is what the padding of a qkv projection's input is; an output projection's
    padded positions are cropped after it, so their gradient is zero); a PartitionGrid: MaxViT's
    partitions as the map they tile; CONV: an (N, C, *spatial) map as it is."""
    if layout == CONV:
        return compressor.compress(x)
    if layout == ROWS:
        return compressor.compress(x.reshape(-1, 1, x.shape[-1]))
    if layout == HEADS:
        return compress_tokens(compressor, x.reshape(-1, *x.shape[2:]))
    if layout == MAP:
        return compressor.compress(x.movedim(-1, 1))
    if isinstance(layout, WindowGrid):
        return compressor.compress(windows_as_input_map(x, layout).movedim(-1, 1))
    if isinstance(layout, PartitionGrid):
        return compressor.compress(partitions_as_map(x, layout).movedim(-1, 1))
    return compress_tokens(compressor, x.transpose(0, 1) if layout == TOKENS_SEQ_FIRST else x)


def _decompress_layout(packed: Any, layout: Layout, shape: torch.Size) -> torch.Tensor:
    """The input (of `shape`) rebuilt in its layout (ROWS: as (rows, 1, D))."""
    if layout in (ROWS, CONV):
        return decompress(packed)
    if layout == HEADS:
        return decompress_tokens(packed).view(shape)
    if layout == MAP:
        return decompress(packed).movedim(1, -1)
    if isinstance(layout, WindowGrid):
        return input_map_as_windows(decompress(packed).movedim(1, -1), layout)
    if isinstance(layout, PartitionGrid):
        return map_as_partitions(decompress(packed).movedim(1, -1), layout)
    x = decompress_tokens(packed)
    return x.transpose(0, 1) if layout == TOKENS_SEQ_FIRST else x


class LinearFn(Function):
    """Linear layer saving its input compressed in its layout (_compress_layout): rows of the last
    dimension, (N, T, D) or (T, N, D) tokens (as MultiheadAttention runs its projections), an
    (N, H, W, C) map or windows of one. Backward computes what stock's linear backward computes,
    in the same order: gx = gy @ W, gW = gy^T @ x, gb = gy summed. `master`: as ConvFn's."""

    @staticmethod
    def forward(ctx, x, weight, bias, compressor: Compressor, layout: Layout, master=None):
        y = F.linear(x, weight, bias)
        packed = _compress_layout(compressor, x, layout) if ctx.needs_input_grad[1] else None
        _save(ctx, packed, *_keep_weight(ctx, weight, master))
        ctx.x_shape, ctx.layout, ctx.has_bias = x.shape, layout, bias is not None
        return y

    @staticmethod
    def backward(ctx, gy):
        packed, saved = _load(ctx, differentiable=False)
        gy2 = gy.reshape(-1, gy.shape[-1])
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = gy2.mm(_weight(ctx, saved)).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            x_hat = _decompress_layout(packed, ctx.layout, ctx.x_shape)
            gw = gy2.t().mm(x_hat.reshape(gy2.shape[0], -1))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy2.sum(0)
        return gx, gw, gb, None, None, None


# ---- transformer layers: inputs saved as token records (tokens.py) ----------------------------


class LayerNormFn(Function):
    """Layer norm over the last dimension of (N, T, D) tokens or of a map (MAP, partitions):
    exact per-token statistics from forward, the input saved as a token record or a map record;
    aten's own backward, as stock's autograd runs."""

    @staticmethod
    def forward(ctx, x, normalized_shape, weight, bias, eps, compressor: Compressor, layout: Layout = TOKENS):
        y, mean, rstd = torch.ops.aten.native_layer_norm(x, normalized_shape, weight, bias, eps)
        _save(ctx, _compress_layout(compressor, x, layout), weight, bias, mean, rstd)
        ctx.normalized_shape, ctx.layout = list(normalized_shape), layout
        return y

    @staticmethod
    def backward(ctx, gy):
        packed, (weight, bias, mean, rstd) = _load(ctx, differentiable=False)
        mask = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[2],
                bias is not None and ctx.needs_input_grad[3]]
        gx, gw, gb = torch.ops.aten.native_layer_norm_backward(
            gy, _decompress_layout(packed, ctx.layout, gy.shape), ctx.normalized_shape, mean, rstd, weight, bias, mask
        )
        return gx, None, gw, gb, None, None, None


class GELUFn(Function):
    """GELU on (N, T, D) tokens or an (N, H, W, C) map (MAP, partitions), its input saved as their
    record."""

    @staticmethod
    def forward(ctx, x, approximate: str, compressor: Compressor, layout: Layout = TOKENS):
        _save(ctx, _compress_layout(compressor, x, layout))
        ctx.approximate, ctx.layout = approximate, layout
        return torch.ops.aten.gelu(x, approximate=approximate)

    @staticmethod
    def backward(ctx, gy):
        packed, _ = _load(ctx, differentiable=False)
        gx = torch.ops.aten.gelu_backward(gy, _decompress_layout(packed, ctx.layout, gy.shape), approximate=ctx.approximate)
        return gx, None, None, None


def _heads_to_tokens(t: torch.Tensor) -> torch.Tensor:
    """(N, h, T, d) attention heads as (N, T, h * d) tokens."""
    n, h, t_, d = t.shape
    return t.transpose(1, 2).reshape(n, t_, h * d)


class AttentionFn(Function):
    """scaled_dot_product_attention without dropout, saving q, k and v as token records instead of
    what SDPA saves (q, k, v, its output and statistics): backward recomputes the attention on
    their reconstructions and differentiates it there (stock's SDPA backward), one more attention
    forward for a tenth of the memory. `bias`: an additive attention mask that does not grow with
    the batch (a relative position bias: heads x T x T), given its gradient, in q's dtype as
    autocast would cast it; kept as it is, or made again in backward by `remake_bias` (a function
    of parameters, without randomness: BEiT's gather from its table, 1.9 MiB a block)."""

    @staticmethod
    def forward(ctx, q, k, v, compressor: Compressor, bias=None, remake_bias: Callable[[], torch.Tensor] | None = None):
        out = _biased_attention(q, k, v, bias)
        records = [compress_tokens(compressor, _heads_to_tokens(t)) for t in (q, k, v)]
        _save_records(ctx, records, None if remake_bias is not None else bias)
        ctx.shape, ctx.remake_bias = q.shape, remake_bias
        return out

    @staticmethod
    def backward(ctx, gy):
        records, (bias,) = _load_records(ctx, differentiable=False)
        if ctx.remake_bias is not None:
            with torch.no_grad():
                bias = ctx.remake_bias()
        n, h, t, d = ctx.shape
        qkv = [decompress_tokens(r).view(n, t, h, d).transpose(1, 2) for r in records]
        needs = (*ctx.needs_input_grad[:3], bias is not None and ctx.needs_input_grad[4])
        no_autocast = (gy.device.type, False, None)  # the records' dtype, as forward's q, k, v
        gq, gk, gv, gbias = recompute_grads(_biased_attention, [*qkv, bias], needs, no_autocast, gy)
        return gq, gk, gv, None, gbias, None


def _biased_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """SDPA with an additive mask in q's dtype (as autocast casts it), or none."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype))
