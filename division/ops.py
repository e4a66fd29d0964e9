"""Shapes of the compiled ops (torch.ops.division.*) for torch.compile and FakeTensor tracing.

division._C defines the ops with torch.library and implements them for CPU (the kernels' CPU
twin) and CUDA tensors (cuda_ext/ops.cpp). Here each op gets its fake implementation: the outputs'
shapes, dtypes, devices and memory formats computed from the inputs without running anything, so
that torch.compile can trace a converted model with the kernels as single opaque calls. Absent
parts of a record (the LFC in hfc_only mode, the HFC in lfc_only mode) are 0-element tensors, since
an op cannot return None.
"""

from __future__ import annotations

import math

import torch

from .format import lfc_shape, plane_bytes
from .masks import mask_bytes, offset_bits, pool_output_size


def _absent(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return like.new_empty((0,), dtype=dtype)


def _layout(channels_last: bool, dims: int) -> torch.memory_format:
    if not channels_last:
        return torch.contiguous_format
    return torch.channels_last if dims == 4 else torch.channels_last_3d


def register_fakes() -> None:
    """Called once, by backend.load_extension, after division._C has defined the ops."""
    lib = "division::"

    @torch.library.register_fake(lib + "compress")
    def _compress(x, seed, block_size, bits, lfc_dtype, mode, first_plane=0):
        n, c, spatial = x.shape[0], x.shape[1], tuple(x.shape[2:])
        lfc = x.new_empty((n, c, *lfc_shape(spatial, block_size)), dtype=lfc_dtype)
        if mode == "hfc_only":
            lfc = _absent(x, lfc_dtype)
        if mode == "lfc_only":
            return (lfc, _absent(x, torch.uint8), _absent(x, torch.float32), _absent(x, torch.float32),
                    _absent(x, torch.int8))
        codes = x.new_empty((n * c, plane_bytes(math.prod(spatial), bits)), dtype=torch.uint8)
        return (lfc, codes, x.new_empty((n, c), dtype=torch.float32),
                x.new_empty((n, c), dtype=torch.float32), x.new_empty((n, c), dtype=torch.int8))

    @torch.library.register_fake(lib + "decompress")
    def _decompress(lfc, codes, lo, step, shift, shape, dtype, channels_last, block_size, bits, mode):
        on = codes if mode == "hfc_only" else lfc
        return torch.empty(shape, dtype=dtype, device=on.device,
                           memory_format=_layout(channels_last, len(shape)))

    @torch.library.register_fake(lib + "relu_pack")
    def _relu_pack(x):
        return torch.empty_like(x), x.new_empty((mask_bytes(x.numel()),), dtype=torch.uint8)

    @torch.library.register_fake(lib + "relu_pack_")
    def _relu_pack_(x):
        return x.new_empty((mask_bytes(x.numel()),), dtype=torch.uint8)

    @torch.library.register_fake(lib + "pack_bool")
    def _pack_bool(mask):
        return mask.new_empty((mask_bytes(mask.numel()),), dtype=torch.uint8)

    @torch.library.register_fake(lib + "relu_backward")
    def _relu_backward(grad, mask):
        return torch.empty_like(grad)

    @torch.library.register_fake(lib + "dropout_backward")
    def _dropout_backward(grad, mask, scale):
        return torch.empty_like(grad)

    @torch.library.register_fake(lib + "max_pool2d")
    def _max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode):
        oh, ow = pool_output_size(tuple(x.shape[2:]), kernel_size, stride, padding, dilation, ceil_mode)
        channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        y = torch.empty((x.shape[0], x.shape[1], oh, ow), dtype=x.dtype, device=x.device,
                        memory_format=_layout(channels_last, 4))
        bits = offset_bits(kernel_size[0] * kernel_size[1])
        return y, x.new_empty((plane_bytes(y.numel(), bits),), dtype=torch.uint8)

    @torch.library.register_fake(lib + "max_pool2d_backward")
    def _max_pool2d_backward(grad, offsets, input_shape, kernel_size, stride, padding, dilation,
                             ceil_mode, channels_last):
        return torch.empty(input_shape, dtype=grad.dtype, device=grad.device,
                           memory_format=_layout(channels_last, 4))
