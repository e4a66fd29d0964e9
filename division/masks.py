"""Compact saved state of the cheap layers: 1-bit masks (ReLU, Dropout) and max-pool window offsets.

A mask is packed in the memory order of the tensor it describes (a channels_last activation needs
no transpose), one bit per element with the HFC codes' little-endian bit order (`format.py`), in
ceil(numel / 32) 32-bit words. Max-pool argmaxes are kept as their offset kh * KW + kw inside the
window ((kd * KH + kh) * KW + kw in 3-d), `offset_bits` bits each, in the memory order of the
pooled output, padded to a word. The kernels pool 2-d maps; 3-d ones run the reference.

Each function runs the fused kernels (torch.ops.division.*, cuda_ext/mask_phases.h) when `kernels`
is true and the pure-PyTorch reference otherwise; the two give the same bits and the same values,
which are stock PyTorch's (NaN and -0 included): ReLU passes the gradient where !(y <= 0), Dropout
multiplies it by mask * scale, max pooling routes it to the first maximum of each window (the last
NaN) and sums where windows overlap in increasing output order.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .format import memory_format_of, plane_bytes
from .reference import pack_codes, unpack_codes

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def mask_bytes(numel: int) -> int:
    return plane_bytes(numel, 1)


def offset_bits(window: int) -> int:
    """Bits per saved max-pool offset: the smallest code width (1, 2, 4, 8) holding the window."""
    for bits in (1, 2, 4, 8):
        if window <= 1 << bits:
            return bits
    raise ValueError(f"max-pool window of {window} elements is larger than 256")


def pool_output_size(
    hw: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int],
    padding: tuple[int, int], dilation: tuple[int, int], ceil_mode: bool,
) -> tuple[int, int]:
    """ATen's pooling_output_shape: with ceil_mode the last window starts inside input or left pad."""
    out = []
    for size, k, s, p, d in zip(hw, kernel, stride, padding, dilation):
        n = (size + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)) // s + 1
        if ceil_mode and (n - 1) * s >= size + p:
            n -= 1
        out.append(n)
    return out[0], out[1]


def _memory_order_dims(dims: int, fmt: torch.memory_format) -> tuple[int, ...]:
    if fmt == torch.channels_last:
        return (0, 2, 3, 1)
    if fmt == torch.channels_last_3d:
        return (0, 2, 3, 4, 1)
    return tuple(range(dims))


def _to_memory_order(t: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    return t.permute(_memory_order_dims(t.dim(), fmt)).reshape(-1)


def _from_memory_order(flat: torch.Tensor, shape: torch.Size, fmt: torch.memory_format) -> torch.Tensor:
    order = _memory_order_dims(len(shape), fmt)
    t = flat.view([shape[d] for d in order])
    return t.permute([order.index(d) for d in range(len(shape))])


def pack_bits_reference(mask: torch.Tensor) -> torch.Tensor:
    flat = _to_memory_order(mask, memory_format_of(mask))
    return pack_codes(flat.to(torch.uint8).view(1, -1), 1).view(-1)


def unpack_bits_reference(bits: torch.Tensor, shape: torch.Size, fmt: torch.memory_format) -> torch.Tensor:
    flat = unpack_codes(bits.view(1, -1), 1, math.prod(shape)).view(-1).bool()
    return _from_memory_order(flat, shape, fmt)


def dense(t: torch.Tensor) -> torch.Tensor:
    """t itself when it is contiguous or channels_last (what masks describe), else a contiguous copy."""
    return t.contiguous(memory_format=memory_format_of(t))


def use_kernels(t: torch.Tensor, allowed: bool) -> bool:
    """`allowed`: the extension is loaded and the config lets it run (Compressor.kernels)."""
    return allowed and t.dtype in KERNEL_DTYPES


def backward_kernels(gy: torch.Tensor, allowed: bool) -> bool:
    """use_kernels for a backward op, unless autograd will differentiate its result (a backward
    with create_graph=True, whose gy has history: gradient penalties, MAML). The kernels are not
    differentiable ops; the reference's are, so it runs then."""
    return use_kernels(gy, allowed) and not (torch.is_grad_enabled() and gy.requires_grad)


# ---- ReLU ---------------------------------------------------------------------------------------


def relu_forward(x: torch.Tensor, inplace: bool, kernels: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(relu(x), its mask); in place (x is returned) when `inplace` and x is dense."""
    if use_kernels(x, kernels):
        # not under torch.compile: inductor fuses and reuses buffers itself, and torch 2.11's
        # scheduler fails on the in-place op's mutation (pytorch/pytorch#189271)
        if inplace and x is dense(x) and not torch.compiler.is_compiling():
            return x, torch.ops.division.relu_pack_(x)
        return torch.ops.division.relu_pack(dense(x))
    y = x.relu_() if inplace else torch.relu(x)
    return y, pack_bits_reference(~(y <= 0))


def relu_backward(gy: torch.Tensor, bits: torch.Tensor, fmt: torch.memory_format, kernels: bool) -> torch.Tensor:
    gy = gy.contiguous(memory_format=fmt)
    if backward_kernels(gy, kernels):
        return torch.ops.division.relu_backward(gy, bits)
    return torch.where(unpack_bits_reference(bits, gy.shape, fmt), gy, gy.new_zeros(()))


# ---- Dropout ------------------------------------------------------------------------------------


def pack_mask(keep: torch.Tensor, kernels: bool) -> torch.Tensor:
    if kernels:
        return torch.ops.division.pack_bool(dense(keep))
    return pack_bits_reference(keep)


def dropout_backward(
    gy: torch.Tensor, bits: torch.Tensor, fmt: torch.memory_format, scale: float, kernels: bool
) -> torch.Tensor:
    """grad * mask * scale, as native_dropout_backward (a dropped inf gives NaN, as stock)."""
    gy = gy.contiguous(memory_format=fmt)
    if backward_kernels(gy, kernels):
        return torch.ops.division.dropout_backward(gy, bits, scale)
    return gy * unpack_bits_reference(bits, gy.shape, fmt) * scale


# ---- MaxPool2d and MaxPool3d ---------------------------------------------------------------------


def _windows(
    out_shape: tuple[int, ...], in_shape: tuple[int, ...], kernel: tuple[int, ...], stride: tuple[int, ...],
    padding: tuple[int, ...], dilation: tuple[int, ...], device: torch.device,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per spatial axis the windows' origins (shaped to broadcast over the output's spatial dims),
    and the empty windows: those none of whose taps lie in the input. Stock allows them where the
    dilation spans the input; its index then points past the plane (and its CPU backward writes
    into the next one). Here they get offset 0, a tap outside the input, and no gradient."""
    dims = len(out_shape)
    origins, empty = [], torch.zeros((), dtype=torch.bool, device=device)
    for axis in range(dims):
        origin = torch.arange(out_shape[axis], device=device) * stride[axis] - padding[axis]
        origins.append(origin.view([-1 if a == axis else 1 for a in range(dims)]))
        taps = origin.view(-1, 1) + torch.arange(kernel[axis], device=device) * dilation[axis]
        none = ~((taps >= 0) & (taps < in_shape[axis])).any(dim=1)
        empty = empty | none.view([-1 if a == axis else 1 for a in range(dims)])
    return origins, empty


def max_pool_reference(
    x: torch.Tensor, kernel: tuple[int, ...], stride: tuple[int, ...], padding: tuple[int, ...],
    dilation: tuple[int, ...], ceil_mode: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(max_pool2d or max_pool3d of x, packed window offsets of the argmaxes): stock's pooling, its
    int64 indices turned into offsets inside their windows."""
    pool = F.max_pool2d if len(kernel) == 2 else F.max_pool3d
    y, indices = pool(x, kernel, stride, padding, dilation, ceil_mode, return_indices=True)
    origins, empty = _windows(tuple(indices.shape[2:]), tuple(x.shape[2:]), kernel, stride, padding, dilation, x.device)
    coords, rest = [], indices
    for size in reversed(x.shape[2:]):
        coords.insert(0, rest % size)
        rest = rest // size
    # stock's CUDA channels_last 2-d and CPU channels_last 3-d kernels point a window whose
    # maximum is -inf outside the window (at element 0 of the plane; in the first depth plane): the
    # window's first tap in the input here, as every other stock kernel and the division kernels
    local, first, inside = torch.zeros_like(indices), torch.zeros_like(indices), ~empty
    for axis, (coord, origin) in enumerate(zip(coords, origins)):
        tap = (coord - origin) // dilation[axis]
        inside = inside & (tap >= 0) & (tap < kernel[axis])
        local = local * kernel[axis] + tap
        first = first * kernel[axis] + origin.div(dilation[axis], rounding_mode="floor").neg().clamp(min=0)
    local = torch.where(inside, local, torch.where(empty, 0, first))
    flat = _to_memory_order(local, memory_format_of(y)).to(torch.uint8)
    return y, pack_codes(flat.view(1, -1), offset_bits(math.prod(kernel))).view(-1)


def max_pool_backward_reference(
    gy: torch.Tensor, offsets: torch.Tensor, input_shape: torch.Size, kernel: tuple[int, ...],
    stride: tuple[int, ...], padding: tuple[int, ...], dilation: tuple[int, ...], ceil_mode: bool,
    fmt: torch.memory_format,
) -> torch.Tensor:
    """The input gradient from the output gradient and the offsets: stock's own backward on the
    int64 indices rebuilt from them (its order and precision of the sums where windows overlap)."""
    gy = gy.contiguous(memory_format=fmt)
    local = unpack_codes(offsets.view(1, -1), offset_bits(math.prod(kernel)), gy.numel()).view(-1).long()
    local = _from_memory_order(local, gy.shape, fmt)
    origins, empty = _windows(tuple(gy.shape[2:]), tuple(input_shape[2:]), kernel, stride, padding, dilation, gy.device)
    indices = torch.zeros_like(local)
    for axis, origin in enumerate(origins):
        tap = local // math.prod(kernel[axis + 1 :]) % kernel[axis]
        indices = indices * input_shape[2 + axis] + origin + tap * dilation[axis]
    # empty windows' gradient goes nowhere: 0 added to element 0 (stock's sums start from +0)
    gy = gy.masked_fill(empty, 0).contiguous(memory_format=fmt)
    indices = indices.masked_fill(empty, 0).contiguous(memory_format=fmt)
    like = torch.empty(input_shape, dtype=gy.dtype, device=gy.device, memory_format=fmt)  # shape, dtype, layout
    backward = torch.ops.aten.max_pool2d_with_indices_backward if len(kernel) == 2 else torch.ops.aten.max_pool3d_with_indices_backward
    return backward(gy, like, kernel, stride, padding, dilation, ceil_mode, indices)


def max_pool_forward(
    x: torch.Tensor, kernel: tuple[int, ...], stride: tuple[int, ...], padding: tuple[int, ...],
    dilation: tuple[int, ...], ceil_mode: bool, kernels: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(max_pool2d or max_pool3d of x, packed window offsets of the argmaxes); the kernel pools
    2-d maps, the reference 3-d ones too."""
    if len(kernel) == 2 and use_kernels(x, kernels):
        return torch.ops.division.max_pool2d(dense(x), kernel, stride, padding, dilation, ceil_mode)
    return max_pool_reference(x, kernel, stride, padding, dilation, ceil_mode)


def max_pool_backward(
    gy: torch.Tensor, offsets: torch.Tensor, input_shape: torch.Size, kernel: tuple[int, ...],
    stride: tuple[int, ...], padding: tuple[int, ...], dilation: tuple[int, ...], ceil_mode: bool,
    fmt: torch.memory_format, kernels: bool,
) -> torch.Tensor:
    """The input gradient from the output gradient and the offsets (fmt: the input's layout, which
    the output and the gradient returned share, as stock). The kernel sums overlapping windows in
    float32 and rounds once, as stock's CUDA kernel; stock's CPU kernel rounds every add of a
    half-precision gradient, so there stock's own backward runs (on indices rebuilt from offsets)."""
    gy = gy.contiguous(memory_format=fmt)
    if len(kernel) == 2 and backward_kernels(gy, kernels) and (gy.is_cuda or gy.dtype == torch.float32):
        return torch.ops.division.max_pool2d_backward(
            gy, offsets, list(input_shape), kernel, stride, padding, dilation, ceil_mode,
            fmt == torch.channels_last,
        )
    return max_pool_backward_reference(gy, offsets, input_shape, kernel, stride, padding, dilation, ceil_mode, fmt)
