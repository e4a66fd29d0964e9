"""division._C against the pure-PyTorch reference: bit-identical packed bytes and reconstructions.

The CPU twin (same per-element code as the kernels, cuda_ext/division_math.h) runs wherever the
extension is built; the CUDA kernels run where a GPU is (tests marked `gpu`). Tolerance: none. The
LFC is a float64 sum of at most B^d float32 values, exact in either summation order unless a
block's magnitudes span more than about 2^20, which these inputs do not.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch

import division
from division.backend import load_extension
from division.format import memory_format_of
from division.reference import compress_reference, decompress_reference

_C, WHY = load_extension()
needs_ext = pytest.mark.skipif(_C is None, reason=f"division._C is not built ({WHY})")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
SEED = 0x0123_4567_89AB_CDEF & (2**63 - 1)

SHAPES = [(2, 3, 13, 11), (1, 1, 1, 1), (2, 3, 7, 7), (3, 2, 16, 16), (2, 3, 1, 20), (2, 3, 50), (2, 3, 5, 9, 10)]


def cases() -> list[tuple]:
    rng = random.Random(0)
    grid = list(itertools.product(
        SHAPES, [8, 3, 1], [1, 2, 4, 8], [torch.float32, torch.float16, torch.bfloat16], [False, True],
        ["division", "lfc_only", "hfc_only"], ["bfloat16", "float16", "float32"],
    ))
    grid = [c for c in grid if not (c[4] and len(c[0]) != 4)]
    return rng.sample(grid, 120)


def make_input(shape: tuple, dtype: torch.dtype, channels_last: bool, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(hash(shape) % 1000)
    x = (torch.randn(shape, generator=g) * 3 + 1).to(dtype).to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.cpu(), b.cpu())


def check_against_reference(x: torch.Tensor, block: int, bits: int, mode: str, lfc_dtype: str) -> None:
    lfc_t = division.DivisionConfig(lfc_dtype=lfc_dtype).lfc_torch_dtype
    ref = compress_reference(x, block, bits, lfc_t, mode, SEED, memory_format_of(x))
    lfc, codes, lo, step = _C.compress(x, block, bits, lfc_t, mode, SEED)
    assert same(lfc, ref.lfc) and same(codes, ref.codes)
    assert same(lo, ref.lo) and same(step, ref.step)
    out = _C.decompress(ref.lfc, ref.codes, ref.lo, ref.step, list(x.shape), x.dtype,
                        memory_format_of(x) == torch.contiguous_format, block, bits, mode)
    expect = decompress_reference(ref)
    assert torch.equal(out.cpu(), expect.cpu()) and out.stride() == expect.stride()


@needs_ext
@pytest.mark.parametrize("shape, block, bits, dtype, channels_last, mode, lfc_dtype", cases())
def test_cpu_twin_is_bit_identical_to_the_reference(shape, block, bits, dtype, channels_last, mode, lfc_dtype) -> None:
    check_against_reference(make_input(shape, dtype, channels_last, "cpu"), block, bits, mode, lfc_dtype)


@needs_ext
def test_extension_rejects_bad_input_with_clear_messages() -> None:
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match="bits must be 1, 2, 4 or 8"):
        _C.compress(x, 8, 3, torch.bfloat16, "division", 0)
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        _C.compress(x.int(), 8, 2, torch.bfloat16, "division", 0)
    with pytest.raises(RuntimeError, match="mode 'exact' is not one of"):
        _C.compress(x, 8, 2, torch.bfloat16, "exact", 0)
    with pytest.raises(RuntimeError, match="LFC dtype must be"):
        _C.compress(x, 8, 2, torch.int8, "division", 0)
    with pytest.raises(RuntimeError, match="1 to 3 spatial dims"):
        _C.compress(torch.randn(4, 4), 8, 2, torch.bfloat16, "division", 0)


@needs_ext
@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("shape, block, bits, dtype, channels_last, mode, lfc_dtype", cases())
def test_cuda_kernels_are_bit_identical_to_the_reference(shape, block, bits, dtype, channels_last, mode, lfc_dtype) -> None:
    check_against_reference(make_input(shape, dtype, channels_last, "cuda"), block, bits, mode, lfc_dtype)


@needs_ext
@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(64, 64, 56, 56), (32, 256, 28, 28), (8, 64, 112, 112), (16, 2048, 7, 7)])
def test_cuda_kernels_on_resnet_shapes(shape: tuple) -> None:
    for dtype, cl in itertools.product([torch.float32, torch.bfloat16], [False, True]):
        check_against_reference(make_input(shape, dtype, cl, "cuda"), 8, 2, "division", "bfloat16")


@needs_ext
@needs_gpu
@pytest.mark.gpu
@pytest.mark.slow
def test_cuda_indexing_beyond_2_31_elements() -> None:
    shape = (33, 1024, 256, 256)  # 2.2e9 elements: the last planes' indices exceed 2^31
    if torch.cuda.get_device_properties(0).total_memory < 20 * 2**30:
        pytest.skip("needs 20 GiB of GPU memory")
    x = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    check_against_reference(x, 8, 2, "division", "bfloat16")


@needs_ext
@needs_gpu
@pytest.mark.gpu
@pytest.mark.slow
def test_cuda_path_trains_like_the_reference_path() -> None:
    import torchvision

    curves = {}
    for backend in ("cuda", "torch"):
        torch.manual_seed(0)
        model = torchvision.models.resnet18(num_classes=10).cuda()
        division.convert_model(model, division.DivisionConfig(backend=backend))
        opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(64, 3, 32, 32, generator=g).cuda()
        y = torch.randint(0, 10, (64,), generator=g).cuda()
        losses = []
        for _ in range(20):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves[backend] = torch.tensor(losses)
    # the same seeds give the same codes, so only float reassociation in cuDNN separates the curves
    assert (curves["cuda"] - curves["torch"]).abs().max() < 0.05 * curves["torch"][0]
    assert curves["cuda"][-1] < 0.5 * curves["cuda"][0]
