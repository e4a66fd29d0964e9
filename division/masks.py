"""Compact saved state of the cheap layers: 1-bit masks (ReLU, Dropout) and max-pool window offsets.

A mask is packed in the memory order of the tensor it describes (a channels_last activation needs
no transpose), one bit per element with the HFC codes' little-endian bit order (`format.py`), in
ceil(numel / 32) 32-bit words. Max-pool argmaxes are kept as their offset kh * KW + kw inside the
window, `offset_bits` bits each, in the memory order of the pooled output, padded to a word.

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
    if use_kernels(gy, kernels):
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
    if use_kernels(gy, kernels):
        return torch.ops.division.dropout_backward(gy, bits, scale)
    return gy * unpack_bits_reference(bits, gy.shape, fmt) * scale


# ---- MaxPool2d ----------------------------------------------------------------------------------


def _window_origins(out_size: int, stride: int, padding: int, device: torch.device) -> torch.Tensor:
    return torch.arange(out_size, device=device) * stride - padding


def _empty_windows(row: torch.Tensor, col: torch.Tensor, shape: tuple[int, int], kernel: tuple[int, int],
                   dilation: tuple[int, int]) -> torch.Tensor:
    """(oh, ow) bool from the window origins (row (oh, 1), col (1, ow)): windows none of whose taps
    lie in the input. Stock allows them where the dilation spans the input; its index then points
    past the plane (and its CPU backward writes into the next one). Here they get offset 0, a tap
    outside the input, and no gradient."""
    def empty(origins: torch.Tensor, axis: int) -> torch.Tensor:
        taps = origins.view(-1, 1) + torch.arange(kernel[axis], device=origins.device) * dilation[axis]
        return ~((taps >= 0) & (taps < shape[axis])).any(dim=1)

    return empty(row, 0).view(-1, 1) | empty(col, 1).view(1, -1)


def max_pool2d_forward(
    x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
    dilation: tuple[int, int], ceil_mode: bool, kernels: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(max_pool2d(x), packed window offsets of the argmaxes)."""
    if use_kernels(x, kernels):
        return torch.ops.division.max_pool2d(dense(x), kernel, stride, padding, dilation, ceil_mode)
    y, indices = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode, return_indices=True)
    oh, ow = indices.shape[2:]
    width = x.shape[3]
    row = _window_origins(oh, stride[0], padding[0], x.device).view(oh, 1)
    col = _window_origins(ow, stride[1], padding[1], x.device).view(1, ow)
    ih, iw = indices // width, indices % width
    local = ((ih - row) // dilation[0]) * kernel[1] + (iw - col) // dilation[1]
    # stock's CUDA channels_last kernel points a window whose maximum is -inf at element 0 of the
    # plane, outside the window: the first position of the window, as every other stock kernel
    inside = (local >= 0) & (local < kernel[0] * kernel[1]) & ~_empty_windows(row, col, tuple(x.shape[2:]), kernel, dilation)
    local = torch.where(inside, local, 0)
    flat = _to_memory_order(local, memory_format_of(y)).to(torch.uint8)
    return y, pack_codes(flat.view(1, -1), offset_bits(kernel[0] * kernel[1])).view(-1)


def max_pool2d_backward(
    gy: torch.Tensor, offsets: torch.Tensor, input_shape: torch.Size, kernel: tuple[int, int],
    stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int], ceil_mode: bool,
    fmt: torch.memory_format, kernels: bool,
) -> torch.Tensor:
    """The input gradient from the output gradient and the offsets (fmt: the input's layout, which
    the output and the gradient returned share, as stock). The kernel sums overlapping windows in
    float32 and rounds once, as stock's CUDA kernel; stock's CPU kernel rounds every add of a
    half-precision gradient, so there stock's own backward runs (on indices rebuilt from offsets)."""
    gy = gy.contiguous(memory_format=fmt)
    if use_kernels(gy, kernels) and (gy.is_cuda or gy.dtype == torch.float32):
        return torch.ops.division.max_pool2d_backward(
            gy, offsets, list(input_shape), kernel, stride, padding, dilation, ceil_mode,
            fmt == torch.channels_last,
        )
    n, c, oh, ow = gy.shape
    bits = offset_bits(kernel[0] * kernel[1])
    local = unpack_codes(offsets.view(1, -1), bits, gy.numel()).view(-1).long()
    local = _from_memory_order(local, gy.shape, fmt)
    row = _window_origins(oh, stride[0], padding[0], gy.device).view(oh, 1)
    col = _window_origins(ow, stride[1], padding[1], gy.device).view(1, ow)
    ih = row + (local // kernel[1]) * dilation[0]
    iw = col + (local % kernel[1]) * dilation[1]
    empty = _empty_windows(row, col, tuple(input_shape[2:]), kernel, dilation)
    # their gradient goes nowhere: 0 added to element 0 (stock's sums start from +0)
    gy = gy.masked_fill(empty, 0).contiguous(memory_format=fmt)
    ih, iw = ih.masked_fill(empty, 0), iw.masked_fill(empty, 0)
    indices = (ih * input_shape[3] + iw).contiguous(memory_format=fmt)
    like = torch.empty(input_shape, dtype=gy.dtype, device=gy.device, memory_format=fmt)  # shape, dtype, layout
    return torch.ops.aten.max_pool2d_with_indices_backward(
        gy, like, kernel, stride, padding, dilation, ceil_mode, indices
    )
