"""Compact saved state of the cheap layers: 1-bit masks (ReLU, Dropout) and max-pool window offsets.

A mask is packed in the memory order of the tensor it describes (so a channels_last activation
needs no transpose), with the same little-endian bit order as the HFC codes (`format.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .format import memory_format_of
from .reference import pack_codes, unpack_codes


@dataclass
class PackedMask:
    """A boolean tensor at one bit per element."""

    bits: torch.Tensor  # uint8, ceil(numel / 32) * 4 bytes
    shape: torch.Size
    memory_format: torch.memory_format

    def unpack(self) -> torch.Tensor:
        numel = math.prod(self.shape)
        flat = unpack_codes(self.bits.view(1, -1), 1, numel).view(-1).bool()
        return _from_memory_order(flat, self.shape, self.memory_format)


def _memory_order_shape(shape: torch.Size, fmt: torch.memory_format) -> tuple[int, ...]:
    if fmt == torch.channels_last:
        return (shape[0], shape[2], shape[3], shape[1])
    if fmt == torch.channels_last_3d:
        return (shape[0], shape[2], shape[3], shape[4], shape[1])
    return tuple(shape)


def _from_memory_order(flat: torch.Tensor, shape: torch.Size, fmt: torch.memory_format) -> torch.Tensor:
    t = flat.view(_memory_order_shape(shape, fmt))
    if fmt == torch.channels_last:
        return t.permute(0, 3, 1, 2)
    if fmt == torch.channels_last_3d:
        return t.permute(0, 4, 1, 2, 3)
    return t


def pack_mask(mask: torch.Tensor) -> PackedMask:
    fmt = memory_format_of(mask)
    dense = mask.contiguous(memory_format=fmt)
    if fmt == torch.channels_last:
        flat = dense.permute(0, 2, 3, 1).reshape(1, -1)
    elif fmt == torch.channels_last_3d:
        flat = dense.permute(0, 2, 3, 4, 1).reshape(1, -1)
    else:
        flat = dense.reshape(1, -1)
    return PackedMask(pack_codes(flat.to(torch.uint8), 1).view(-1), mask.shape, fmt)


def offset_bits(window: int) -> int:
    """Bits per saved max-pool offset: the smallest code width (1, 2, 4, 8) holding the window."""
    for bits in (1, 2, 4, 8):
        if window <= 1 << bits:
            return bits
    raise ValueError(f"max-pool window of {window} elements is larger than 256")


def _window_origins(out_size: int, stride: int, padding: int, device: torch.device) -> torch.Tensor:
    return torch.arange(out_size, device=device) * stride - padding


@dataclass
class PackedPoolIndices:
    """Max-pool argmax positions as offsets inside each window, at `bits` per output element."""

    codes: torch.Tensor  # uint8 (1, plane_bytes) over all output elements in NCHW order
    out_shape: torch.Size
    input_hw: tuple[int, int]
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    bits: int

    def flat_indices(self) -> torch.Tensor:
        """int64 (N, C, OH, OW) indices into each input plane, as max_pool2d returns them."""
        n, c, oh, ow = self.out_shape
        local = unpack_codes(self.codes, self.bits, n * c * oh * ow).view(n, c, oh, ow).long()
        kh_idx, kw_idx = local // self.kernel[1], local % self.kernel[1]
        dev = local.device
        row = _window_origins(oh, self.stride[0], self.padding[0], dev).view(oh, 1)
        col = _window_origins(ow, self.stride[1], self.padding[1], dev).view(1, ow)
        ih = row + kh_idx * self.dilation[0]
        iw = col + kw_idx * self.dilation[1]
        return ih * self.input_hw[1] + iw


def pack_pool_indices(
    indices: torch.Tensor, input_hw: tuple[int, int], kernel: tuple[int, int],
    stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
) -> PackedPoolIndices:
    """Turn max_pool2d's int64 plane indices into window offsets (kh * KW + kw)."""
    n, c, oh, ow = indices.shape
    dev = indices.device
    row = _window_origins(oh, stride[0], padding[0], dev).view(oh, 1)
    col = _window_origins(ow, stride[1], padding[1], dev).view(1, ow)
    ih, iw = indices // input_hw[1], indices % input_hw[1]
    local = ((ih - row) // dilation[0]) * kernel[1] + (iw - col) // dilation[1]
    bits = offset_bits(kernel[0] * kernel[1])
    codes = pack_codes(local.reshape(1, -1).to(torch.uint8), bits)
    return PackedPoolIndices(codes, indices.shape, input_hw, kernel, stride, padding, dilation, bits)
