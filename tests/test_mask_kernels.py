"""The fused mask and max-pool ops (torch.ops.division.relu_pack, pack_bool, relu_backward,
dropout_backward, max_pool2d, max_pool2d_backward) against the pure-PyTorch references of
division/masks.py and against stock PyTorch.

    .venv/bin/pytest tests/test_mask_kernels.py -q   # CPU twin here; the `gpu` tests where CUDA is

Bits must be identical to the reference's, values and gradients identical to stock's (NaN, -0,
ties and overlapping windows included).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from division import masks
from division.backend import load_extension
from division.format import memory_format_of

_C, WHY = load_extension()
needs_ext = pytest.mark.skipif(_C is None, reason=f"division._C is not built ({WHY})")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LAYOUTS = ("contiguous", "channels_last", "offset")
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (the sign of zero included) where not NaN, NaN at the same places
    (NaN payloads and signs differ between conversions, as in the codec tests); layouts may differ."""
    a, b = a.contiguous(), b.contiguous()
    if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a.isnan(), b.isnan()):
        return False
    a, b = a.nan_to_num(0.0, math.inf, -math.inf), b.nan_to_num(0.0, math.inf, -math.inf)
    return torch.equal(a.view(INT_VIEW[a.dtype]), b.view(INT_VIEW[b.dtype]))


def activations(shape: tuple[int, ...], dtype: torch.dtype, layout: str, device: str, seed: int = 0) -> torch.Tensor:
    """Random values with zeros of both signs, NaN and infinities, in `layout` (`offset`:
    contiguous but not 16-byte aligned, so the kernels take their scalar path)."""
    g = torch.Generator().manual_seed(seed)
    flat = torch.randn(math.prod(shape) + 1, generator=g)
    flat[1::7] = 0.0
    flat[2::11] = -0.0
    flat[3::13] = math.nan
    flat[4::17] = math.inf
    flat[5::19] = -math.inf
    flat = flat.to(dtype).to(device)
    if layout == "offset":
        return flat[1:].view(shape)
    x = flat[:-1].view(shape)
    if layout == "channels_last" and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


SHAPES = [(2, 3, 5, 7), (4, 32, 8, 8), (1, 1, 1, 33), (3, 5, 17, 13)]


# ---------------------------------------------------------------------------------------------
# ReLU and Dropout masks


def check_relu(x: torch.Tensor) -> None:
    y_ref, bits_ref = masks.relu_forward(x, False, kernels=False)
    y, bits = torch.ops.division.relu_pack(x)
    assert same_bits(y, torch.relu(x)) and same_bits(y, y_ref)
    assert y.stride() == x.stride()
    assert torch.equal(bits, bits_ref)
    grad = activations(tuple(x.shape), x.dtype, "contiguous", str(x.device), seed=9)
    grad = grad.contiguous(memory_format=memory_format_of(x))
    stock = torch.ops.aten.threshold_backward(grad, torch.relu(x), 0)
    assert same_bits(torch.ops.division.relu_backward(grad, bits), stock)
    assert same_bits(masks.relu_backward(grad, bits_ref, memory_format_of(x), kernels=False), stock)
    inplace = x.clone()
    bits_inplace = torch.ops.division.relu_pack_(inplace)
    assert same_bits(inplace, y) and torch.equal(bits_inplace, bits)


@needs_ext
@pytest.mark.parametrize("shape, dtype, layout", list(itertools.product(SHAPES, DTYPES, LAYOUTS)))
def test_relu_pack_and_backward_match_stock(shape: tuple, dtype: torch.dtype, layout: str) -> None:
    check_relu(activations(shape, dtype, layout, "cpu"))


def check_dropout_mask(keep: torch.Tensor, grad: torch.Tensor, scale: float) -> None:
    bits = torch.ops.division.pack_bool(keep)
    assert torch.equal(bits, masks.pack_bits_reference(keep))
    fmt = memory_format_of(keep)
    got = torch.ops.division.dropout_backward(grad.contiguous(memory_format=fmt), bits, scale)
    stock = torch.ops.aten.native_dropout_backward(grad, keep, scale)
    assert same_bits(got, stock)
    assert same_bits(masks.dropout_backward(grad, bits, fmt, scale, kernels=False), stock)


@needs_ext
@pytest.mark.parametrize("shape, dtype, layout", list(itertools.product(SHAPES, DTYPES, LAYOUTS)))
def test_pack_bool_and_dropout_backward_match_stock(shape: tuple, dtype: torch.dtype, layout: str) -> None:
    g = torch.Generator().manual_seed(3)
    keep = activations(shape, torch.float32, layout, "cpu").isfinite() & (torch.rand(shape, generator=g) < 0.7)
    keep = keep.contiguous(memory_format=memory_format_of(keep))
    grad = activations(shape, dtype, "contiguous", "cpu", seed=4)
    check_dropout_mask(keep, grad, 1 / 0.7)


@needs_ext
def test_mask_ops_reject_what_they_cannot_describe() -> None:
    with pytest.raises(RuntimeError, match="contiguous or channels_last"):
        torch.ops.division.relu_pack(torch.randn(4, 6)[:, ::2])
    with pytest.raises(RuntimeError, match="expected a bool tensor"):
        torch.ops.division.pack_bool(torch.ones(3))
    with pytest.raises(RuntimeError, match="does not match a gradient"):
        torch.ops.division.relu_backward(torch.randn(100), torch.zeros(4, dtype=torch.uint8))


def check_mask_at_odd_byte(device: str) -> None:
    """A mask handed over as a view at an odd byte offset (the kernels read 32-bit words) gives the
    gradient of the aligned mask."""
    x = activations((3, 5, 7, 9), torch.float32, "contiguous", device)
    grad = activations(tuple(x.shape), torch.float32, "contiguous", device, seed=2)
    bits = torch.ops.division.relu_pack(x)[1]
    held = torch.zeros(bits.numel() + 1, dtype=torch.uint8, device=device)
    held[1:] = bits
    odd = held[1:]
    assert odd.data_ptr() % 4 != 0
    assert same_bits(torch.ops.division.relu_backward(grad, odd), torch.ops.division.relu_backward(grad, bits))
    assert same_bits(torch.ops.division.dropout_backward(grad, odd, 2.0), torch.ops.division.dropout_backward(grad, bits, 2.0))


@needs_ext
def test_mask_backward_takes_a_mask_at_an_odd_byte_offset() -> None:
    check_mask_at_odd_byte("cpu")


# ---------------------------------------------------------------------------------------------
# MaxPool2d


POOLS = [
    dict(kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), dilation=(1, 1), ceil_mode=False),  # ResNet
    dict(kernel_size=(2, 2), stride=(2, 2), padding=(0, 0), dilation=(1, 1), ceil_mode=False),
    dict(kernel_size=(3, 3), stride=(2, 2), padding=(0, 0), dilation=(1, 1), ceil_mode=True),
    dict(kernel_size=(3, 2), stride=(1, 1), padding=(1, 0), dilation=(2, 1), ceil_mode=False),
    dict(kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), ceil_mode=False),  # overlaps
    dict(kernel_size=(1, 1), stride=(1, 1), padding=(0, 0), dilation=(1, 1), ceil_mode=False),
    dict(kernel_size=(16, 16), stride=(16, 16), padding=(0, 0), dilation=(1, 1), ceil_mode=False),  # 8-bit offsets
    # strides and dilations that do not divide each other: windows a position lies between
    dict(kernel_size=(3, 3), stride=(3, 2), padding=(1, 1), dilation=(2, 3), ceil_mode=True),
]


def pool_args(p: dict) -> tuple:
    return (list(p["kernel_size"]), list(p["stride"]), list(p["padding"]), list(p["dilation"]), p["ceil_mode"])


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal where not NaN (+0 == -0), NaN at the same places."""
    return a.shape == b.shape and a.dtype == b.dtype and bool(((a == b) | (a.isnan() & b.isnan())).all())


def check_pool(x: torch.Tensor, p: dict) -> None:
    args = pool_args(p)
    fmt = memory_format_of(x)
    # stock's CUDA channels_last kernels differ from stock's NCHW and CPU kernels where it carries
    # no information: a window whose maximum is -inf points at element 0 of the plane (outside the
    # window), and zero gradients may carry the other sign. The kernels follow the NCHW kernel on
    # every layout, so that is the bit-exact witness there; stock channels_last agrees in value.
    stock_nhwc_cuda = x.is_cuda and fmt == torch.channels_last
    leaf = (x.contiguous() if stock_nhwc_cuda else x).detach().clone().requires_grad_(True)
    y_stock = F.max_pool2d(leaf, *args)
    y, offsets = torch.ops.division.max_pool2d(x, *args)
    assert same_bits(y, y_stock.detach()) and y.is_contiguous(memory_format=fmt)
    y_ref, offsets_ref = masks.max_pool_forward(x, *args, kernels=False)
    assert torch.equal(offsets, offsets_ref)
    grad = activations(tuple(y.shape), x.dtype, "contiguous", str(x.device), seed=5).nan_to_num(0.0, 1.0, -1.0)
    (gx_stock,) = torch.autograd.grad(y_stock, leaf, grad.contiguous(memory_format=memory_format_of(leaf)))
    grad = grad.contiguous(memory_format=fmt)
    gx = torch.ops.division.max_pool2d_backward(grad, offsets, list(x.shape), *args, fmt == torch.channels_last)
    gx_ref = masks.max_pool_backward(grad, offsets_ref, x.shape, *args, fmt, kernels=False)
    assert (same_values if stock_nhwc_cuda else same_bits)(gx_ref, gx_stock)
    if stock_nhwc_cuda:
        finite = torch.where(x == -math.inf, 0.0, x).contiguous(memory_format=fmt).requires_grad_(True)
        (gx_nhwc,) = torch.autograd.grad(F.max_pool2d(finite, *args), finite, grad)
        _, offsets_finite = torch.ops.division.max_pool2d(finite.detach(), *args)
        gx_finite = torch.ops.division.max_pool2d_backward(grad, offsets_finite, list(x.shape), *args, True)
        assert same_values(gx_finite, gx_nhwc) and gx_finite.stride() == gx_nhwc.stride()
    if x.dtype == torch.float32 or x.is_cuda:
        assert same_bits(gx, gx_stock)
    else:  # stock's CPU kernel rounds every add to the narrow dtype; the kernels (as stock's CUDA
        # kernel) sum in float32 and round once
        leaf32 = x.detach().float().requires_grad_(True)
        (gx32,) = torch.autograd.grad(F.max_pool2d(leaf32, *args), leaf32, grad.float())
        assert same_bits(gx, gx32.to(x.dtype))
    assert gx.is_contiguous(memory_format=fmt)


@needs_ext
@pytest.mark.parametrize("pool", range(len(POOLS)))
@pytest.mark.parametrize("dtype, layout", list(itertools.product(DTYPES, LAYOUTS)))
def test_max_pool2d_matches_stock(pool: int, dtype: torch.dtype, layout: str) -> None:
    x = activations((2, 5, 19, 17), dtype, layout, "cpu", seed=pool)
    x[0, 1] = -math.inf  # windows without a finite maximum: the first position, as stock
    check_pool(x, POOLS[pool])


@needs_ext
def test_max_pool2d_ties_pick_the_first_and_nan_the_last() -> None:
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 1, 1] = math.nan
    x[0, 0, 0, 0] = math.nan  # two NaN in one window: stock keeps the last in scan order
    for p in POOLS[:3]:
        check_pool(x, p)


@needs_ext
def test_max_pool2d_rejects_what_stock_rejects() -> None:
    x = torch.randn(1, 2, 8, 8)
    with pytest.raises(RuntimeError, match="pad should be at most half"):
        torch.ops.division.max_pool2d(x, [2, 2], [2, 2], [2, 2], [1, 1], False)
    with pytest.raises(RuntimeError, match="larger than 256"):
        torch.ops.division.max_pool2d(torch.randn(1, 1, 20, 20), [17, 17], [1, 1], [0, 0], [1, 1], False)
    with pytest.raises(RuntimeError, match="too small"):
        torch.ops.division.max_pool2d(torch.randn(1, 1, 2, 2), [3, 3], [1, 1], [0, 0], [1, 1], False)
    # within half the dilated kernel but more than half the kernel (stock's second check)
    x = torch.randn(1, 1, 3, 4)
    for op in (F.max_pool2d, lambda x, *a: torch.ops.division.max_pool2d(x, *a, False)):
        with pytest.raises(RuntimeError, match=r"pad should be smaller than or equal to half of kernel size, "
                           r"but got padW = 0, padH = 2, kW = 2, kH = 2"):
            op(x, [2, 2], [1, 1], [2, 0], [4, 1])
    # a plane of no elements (a batch of none is fine)
    for op in (F.max_pool2d, lambda x, *a: torch.ops.division.max_pool2d(x, *a, False)):
        with pytest.raises(RuntimeError, match=r"4D \(batch mode\) tensor with optional 0 dim batch size"):
            op(torch.randn(1, 1, 0, 0), [2, 2], [2, 2], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match=r"4D \(batch mode\) tensor"):
        torch.ops.division.max_pool2d_backward(torch.randn(1, 1, 1, 1), torch.zeros(4, dtype=torch.uint8),
                                               [1, 1, 0, 0], [2, 2], [2, 2], [1, 1], [1, 1], False, False)
    y, offsets = torch.ops.division.max_pool2d(torch.randn(0, 3, 8, 8), [3, 3], [2, 2], [1, 1], [1, 1], False)
    assert y.shape == F.max_pool2d(torch.randn(0, 3, 8, 8), 3, 2, 1).shape == (0, 3, 4, 4) and offsets.numel() == 0


def check_empty_windows(device: str) -> None:
    """Windows with no tap in the input (a dilation wider than the input, which stock accepts):
    -inf as stock, offset 0, and no gradient (stock's index points past the plane, and its CPU
    backward adds the window's gradient into the next plane). Under stock's checks (pad at most half
    the kernel) such windows fill a whole axis of the output: all or none of a pooling's windows."""
    args = ([2, 1], [1, 1], [1, 0], [3, 1], False)  # rows: taps -1 and 2 of a 2-row input
    x = activations((2, 3, 2, 5), torch.float32, "contiguous", device).nan_to_num(0.0, 1.0, -1.0)
    y, offsets = torch.ops.division.max_pool2d(x, *args)
    y_ref, offsets_ref = masks.max_pool_forward(x, *args, kernels=False)
    assert y.shape == (2, 3, 1, 5) and bool((y == -math.inf).all()) and same_bits(y_ref, y)
    assert torch.equal(offsets, offsets_ref) and not offsets.any()
    grad = torch.ones_like(y)
    gx = torch.ops.division.max_pool2d_backward(grad, offsets, list(x.shape), *args, False)
    gx_ref = masks.max_pool_backward(grad, offsets_ref, x.shape, *args, torch.contiguous_format, kernels=False)
    assert same_bits(gx, torch.zeros_like(x)) and same_bits(gx_ref, gx)


@needs_ext
def test_max_pool2d_windows_without_an_input_tap() -> None:
    check_empty_windows("cpu")


def opcheck_cases(device: str) -> list[tuple]:
    x = activations((2, 8, 9, 10), torch.float32, "contiguous", device).nan_to_num()
    bits = torch.ops.division.relu_pack(x)[1]
    keep = x > 0
    y, offsets = torch.ops.division.max_pool2d(x, [3, 3], [2, 2], [1, 1], [1, 1], False)
    return [
        (torch.ops.division.relu_pack.default, (x,)),
        (torch.ops.division.relu_pack_.default, (x.clone(),)),
        (torch.ops.division.pack_bool.default, (keep,)),
        (torch.ops.division.relu_backward.default, (x, bits)),
        (torch.ops.division.dropout_backward.default, (x, torch.ops.division.pack_bool(keep), 2.0)),
        (torch.ops.division.max_pool2d.default, (x, [3, 3], [2, 2], [1, 1], [1, 1], False)),
        (torch.ops.division.max_pool2d.default, (x.contiguous(memory_format=torch.channels_last), [2, 2], [2, 2], [0, 0], [1, 1], True)),
        (torch.ops.division.max_pool2d_backward.default,
         (torch.randn_like(y), offsets, list(x.shape), [3, 3], [2, 2], [1, 1], [1, 1], False, False)),
    ]


@needs_ext
@pytest.mark.parametrize("case", range(8))
def test_opcheck_mask_ops(case: int) -> None:
    op, args = opcheck_cases("cpu")[case]
    torch.library.opcheck(op, args)


# ---------------------------------------------------------------------------------------------
# CUDA


@pytest.mark.gpu
@needs_ext
@needs_gpu
@pytest.mark.parametrize("shape, dtype, layout", list(itertools.product(SHAPES + [(8, 64, 56, 56)], DTYPES, LAYOUTS)))
def test_cuda_relu_and_dropout_masks_match_stock(shape: tuple, dtype: torch.dtype, layout: str) -> None:
    check_relu(activations(shape, dtype, layout, "cuda"))
    keep = torch.rand(shape, device="cuda") < 0.7
    grad = activations(shape, dtype, "contiguous", "cuda", seed=4)
    check_dropout_mask(keep, grad, 1 / 0.7)


@pytest.mark.gpu
@needs_ext
@needs_gpu
@pytest.mark.parametrize("pool", range(len(POOLS)))
@pytest.mark.parametrize("dtype, layout", list(itertools.product(DTYPES, LAYOUTS)))
def test_cuda_max_pool2d_matches_stock(pool: int, dtype: torch.dtype, layout: str) -> None:
    x = activations((4, 64, 56, 56), dtype, layout, "cuda", seed=pool)
    check_pool(x, POOLS[pool])


@pytest.mark.gpu
@needs_ext
@needs_gpu
@pytest.mark.parametrize("case", range(8))
def test_opcheck_mask_ops_on_cuda(case: int) -> None:
    op, args = opcheck_cases("cuda")[case]
    torch.library.opcheck(op, args)


@pytest.mark.gpu
@needs_ext
@needs_gpu
def test_cuda_mask_backward_takes_a_mask_at_an_odd_byte_offset() -> None:
    check_mask_at_odd_byte("cuda")


@pytest.mark.gpu
@needs_ext
@needs_gpu
def test_cuda_max_pool2d_windows_without_an_input_tap() -> None:
    check_empty_windows("cuda")
