"""division._C, the CUDA kernels and their CPU twin, against the pure-PyTorch reference codec.

    .venv/bin/pytest tests/test_cuda_ext.py -q     # CPU twin here; the `gpu` tests where CUDA is

The CPU twin runs the kernels' own phase functions (cuda_ext/codec_phases.h) thread by thread and
block by block, so the CPU tests check the kernels' indexing, work split, min/max reduction and bit
packing, not a rewrite of them; the tests marked `gpu` run the CUDA kernels on CUDA tensors against
the reference run on the same tensors. Tolerance: none. lfc, codes, lo, step and the reconstruction
must be bit-identical: the LFC's float64 block sums are exact for these inputs (magnitudes within a
block span far less than 2^20), so the backends' different summation orders cannot show. Known,
documented differences: NaN payloads, and the sign of `lo` when a plane's smallest HFC value is a
zero of mixed signs (the reference's depends on its reduction order; the kernels give +0).
"""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

import division
from division.backend import load_extension
from division.format import memory_format_of, plane_bytes
from division.hashing import uniform
from division.reference import compress_reference, decompress_reference

_C, WHY = load_extension()
needs_ext = pytest.mark.skipif(_C is None, reason=f"division._C is not built ({WHY})")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LFC_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MODES = ("division", "lfc_only", "hfc_only")
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


# ---------------------------------------------------------------------------------------------
# helpers


def make_input(
    shape: tuple[int, ...], dtype: torch.dtype, layout: str, device: str, seed: int = 0
) -> torch.Tensor:
    """Random activations (mean 1, std 3) in `layout`: contiguous, channels_last or strided."""
    g = torch.Generator().manual_seed(seed)
    if layout == "strided":  # a non-dense view: every other element of a wider tensor
        wide = (torch.randn((*shape[:-1], 2 * shape[-1]), generator=g) * 3 + 1).to(dtype)
        return wide.to(device)[..., ::2]
    x = (torch.randn(shape, generator=g) * 3 + 1).to(dtype).to(device)
    if layout == "channels_last":
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    return x


def bits_of(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits (so -0 != +0 and NaN == NaN of the same payload)."""
    return t.contiguous().view(INT_VIEW[t.dtype]) if t.dtype in INT_VIEW else t


def assert_identical(got: torch.Tensor | None, want: torch.Tensor | None, what: str) -> None:
    assert (got is None) == (want is None), f"{what}: {got is None=} but {want is None=}"
    if got is None:
        return
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.device == want.device, f"{what}: device {got.device} != {want.device}"
    same = bits_of(got) == bits_of(want)
    if not bool(same.all()):
        bad = (~same).nonzero()[0].tolist()
        raise AssertionError(
            f"{what}: {int((~same).sum())} of {same.numel()} elements differ, first at {bad}: "
            f"{got[tuple(bad)].item()!r} != {want[tuple(bad)].item()!r}"
        )


def check_against_reference(
    x: torch.Tensor, block: int, bits: int, mode: str, lfc_dtype: torch.dtype, seed: int,
    launch: tuple[int, bool] | None = None,
) -> None:
    """_C.compress / _C.decompress == the reference, bit for bit (launch: (T, plane_minor))."""
    fmt = memory_format_of(x)
    ref = compress_reference(x, block, bits, lfc_dtype, mode, seed, fmt)
    if launch is None:
        got = _C.compress(x, block, bits, lfc_dtype, mode, seed)
    else:
        got = _C._compress_with(x, block, bits, lfc_dtype, mode, seed, *launch)
    for name, g, w in zip(("lfc", "codes", "lo", "step"), got, (ref.lfc, ref.codes, ref.lo, ref.step)):
        assert_identical(g, w, f"compress {name}")
    args = (ref.lfc, ref.codes, ref.lo, ref.step, list(x.shape), x.dtype,
            fmt == torch.contiguous_format, block, bits, mode)
    out = _C.decompress(*args) if launch is None else _C._decompress_with(*args, *launch)
    want = decompress_reference(ref)
    assert_identical(out, want, "decompress")
    assert out.stride() == want.stride(), f"decompress strides {out.stride()} != {want.stride()}"


def random_cases(count: int, seed: int) -> list[tuple]:
    """(shape, block, bits, dtype, layout, mode, lfc_dtype, seed) drawn over every axis."""
    rng = random.Random(seed)
    sides = [1, 2, 3, 5, 7, 8, 9, 13, 16, 17, 24]
    cases = []
    for _ in range(count):
        dims = rng.choice([1, 2, 2, 2, 3])
        spatial = tuple(rng.choice(sides) for _ in range(dims))
        if dims == 1:
            spatial = (rng.randint(1, 70),)
        shape = (rng.choice([1, 2, 3]), rng.choice([1, 2, 5]), *spatial)
        layouts = ["contiguous", "strided"] + (["channels_last"] * 2 if dims >= 2 else [])
        cases.append((
            shape, rng.choice([1, 2, 3, 4, 8, 8, 8, 16, 100]), rng.choice([1, 2, 4, 8]),
            rng.choice(DTYPES), rng.choice(layouts), rng.choice(MODES), rng.choice(LFC_DTYPES),
            rng.randrange(2**63),
        ))
    return cases


# the shapes the brief names, each in both 4-D layouts
EDGE_SHAPES = [
    (2, 3, 1, 9),  # H = 1
    (2, 3, 9, 1),  # W = 1
    (2, 3, 7, 7),  # B = 8 larger than the map
    (2, 3, 7, 12),  # H != W, W not a multiple of B
    (1, 1, 13, 11),  # N = C = 1, odd sizes
    (3, 5, 17, 9),  # partial last blocks in both dims
    (1, 1, 1, 1),  # one element
    (2, 2, 33, 40),  # more LFC blocks than a warp
    (1, 2, 300, 257),  # more LFC blocks than a thread block: several per thread
]


# ---------------------------------------------------------------------------------------------
# CPU twin


@needs_ext
@pytest.mark.parametrize(
    "shape, block, bits, dtype, layout, mode, lfc_dtype, seed", random_cases(300, seed=1)
)
def test_cpu_twin_is_bit_identical_to_the_reference(
    shape, block, bits, dtype, layout, mode, lfc_dtype, seed
) -> None:
    x = make_input(shape, dtype, layout, "cpu", seed=seed % 1000)
    check_against_reference(x, block, bits, mode, lfc_dtype, seed)


@needs_ext
@pytest.mark.parametrize("shape", EDGE_SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_cpu_twin_on_edge_shapes(shape: tuple, layout: str, bits: int) -> None:
    for dtype, mode in zip(DTYPES, MODES):
        x = make_input(shape, dtype, layout, "cpu", seed=bits)
        check_against_reference(x, 8, bits, mode, torch.bfloat16, seed=12345 + bits)


@needs_ext
@pytest.mark.parametrize("shape, layout", [
    ((3, 5, 13, 11), "contiguous"), ((3, 5, 13, 11), "channels_last"), ((2, 3, 40), "contiguous"),
    ((2, 3, 5, 6, 7), "channels_last"), ((1, 2, 30, 30), "contiguous"),
    ((2, 3, 5000), "contiguous"),
])
def test_results_do_not_depend_on_the_launch_shape(shape: tuple, layout: str) -> None:
    """Every work split (threads per plane, thread order) the kernels could be launched with."""
    x = make_input(shape, torch.bfloat16, layout, "cpu")
    for threads, minor in itertools.product([1, 2, 4, 8, 16, 32, 64, 128, 256], [False, True]):
        check_against_reference(x, 4, 2, "division", torch.bfloat16, seed=7, launch=(threads, minor))


@needs_ext
def test_automatic_launch_shapes() -> None:
    for shape, cl in [((256, 64, 112, 112), False), ((256, 2048, 7, 7), True), ((2, 3, 50), False)]:
        for threads, planes, minor in _C.launch_shapes(list(shape), 8, 2, cl):
            assert threads * planes == _C.BLOCK_THREADS and threads & (threads - 1) == 0
            assert minor == cl


def special_values() -> torch.Tensor:
    """Constant and zero planes (range floored at TINY), values beyond float16 (a float16 LFC
    clamps to 65504) and near FLT_MAX, infinities (LFC clamped, range clamped to FLT_MAX),
    denormals."""
    x = torch.randn(4, 6, 9, 10, generator=torch.Generator().manual_seed(5)) * 3
    x[0, 0] = 0.0
    x[0, 1] = 2.5
    x[0, 2, :4] = 7e4
    x[0, 3] = torch.randn(9, 10) * 1e-40
    x[1, 0, 2, 3] = math.inf
    x[1, 1, 4, 4] = -math.inf
    x[2, 0] = 3e38
    return x


def check_nan_propagation(x: torch.Tensor, lfc_dtype: torch.dtype) -> None:
    """A NaN, or +inf and -inf in one LFC block: the same codes; NaN LFC, lo and step where the
    reference has them (NaN payloads may differ); the same reconstruction, NaN for NaN."""
    x = x.clone()
    x[3, 4, 5, 5] = math.nan
    x[1, 2, 0, 0], x[1, 2, 0, 1] = math.inf, -math.inf
    ref = compress_reference(x, 8, 2, lfc_dtype, "division", 5, torch.contiguous_format)
    got = _C.compress(x, 8, 2, lfc_dtype, "division", 5)
    assert_identical(got[1], ref.codes, "codes")
    out = _C.decompress(*got, list(x.shape), x.dtype, True, 8, 2, "division")
    for g, w in ((got[0], ref.lfc), (got[2], ref.lo), (got[3], ref.step),
                 (out, decompress_reference(ref))):
        assert torch.equal(g.isnan(), w.isnan()) and g.isnan().any()
        assert torch.equal(g.nan_to_num(), w.nan_to_num())


@needs_ext
@pytest.mark.parametrize("lfc_dtype", LFC_DTYPES)
def test_cpu_twin_on_special_values(lfc_dtype: torch.dtype) -> None:
    x = special_values()
    for mode, bits in itertools.product(MODES, [1, 8]):
        check_against_reference(x, 8, bits, mode, lfc_dtype, seed=99)
    check_nan_propagation(x, lfc_dtype)


@needs_ext
def test_hash_matches_hashing_uniform() -> None:
    for seed in (0, 1, 0x0123_4567_89AB_CDEF, 2**63 - 1):
        for start in (0, 2**31 - 5, 2**32 - 7, 3 * 2**32 + 11):
            assert torch.equal(_C._uniform(seed, start, 20), uniform(seed, start, 20))


@needs_ext
def test_empty_batch_and_record_shapes() -> None:
    x = torch.randn(0, 3, 5, 5)
    lfc, codes, lo, step = _C.compress(x, 8, 2, torch.bfloat16, "division", 0)
    assert lfc.shape == (0, 3, 1, 1) and codes.shape == (0, plane_bytes(25, 2))
    assert lo.shape == step.shape == (0, 3)
    out = _C.decompress(lfc, codes, lo, step, [0, 3, 5, 5], torch.float32, True, 8, 2, "division")
    assert out.shape == (0, 3, 5, 5)
    assert _C.compress(torch.randn(2, 3, 4), 8, 2, torch.bfloat16, "lfc_only", 0)[1:] == (None,) * 3
    assert _C.compress(torch.randn(2, 3, 4), 8, 2, torch.bfloat16, "hfc_only", 0)[0] is None


@needs_ext
def test_extension_rejects_bad_input_with_clear_messages() -> None:
    x = torch.randn(2, 3, 4, 4)
    bad = [
        ((x, 8, 3, torch.bfloat16, "division", 0), "bits must be 1, 2, 4 or 8"),
        ((x.double(), 8, 2, torch.bfloat16, "division", 0), "unsupported dtype"),
        ((x, 8, 2, torch.bfloat16, "exact", 0), "mode 'exact' is not one of"),
        ((x, 8, 2, torch.int8, "division", 0), "LFC dtype must be"),
        ((x, 0, 2, torch.bfloat16, "division", 0), "block_size must be >= 1"),
        ((x, 8, 2, torch.bfloat16, "division", -1), "seed must be in"),
        ((torch.randn(4, 4), 8, 2, torch.bfloat16, "division", 0), "1 to 3 spatial dims"),
        ((torch.randn(2, 3, 0, 4), 8, 2, torch.bfloat16, "division", 0), "spatial sizes must be"),
    ]
    for args, message in bad:
        with pytest.raises(RuntimeError, match=message):
            _C.compress(*args)
    lfc, codes, lo, step = _C.compress(x, 8, 2, torch.bfloat16, "division", 0)
    with pytest.raises(RuntimeError, match="needs the codes"):
        _C.decompress(lfc, None, None, None, [2, 3, 4, 4], torch.float32, True, 8, 2, "division")
    with pytest.raises(RuntimeError, match="do not match"):
        _C.decompress(lfc, codes, lo, step, [2, 3, 4, 8], torch.float32, True, 8, 2, "division")
    with pytest.raises(RuntimeError, match="channels_last output needs a 4-D or 5-D"):
        _C.decompress(lfc, codes, lo, step, [2, 3, 16], torch.float32, False, 8, 2, "division")


# ---------------------------------------------------------------------------------------------
# CUDA kernels


@pytest.mark.gpu
@needs_ext
@needs_gpu
@pytest.mark.parametrize(
    "shape, block, bits, dtype, layout, mode, lfc_dtype, seed", random_cases(120, seed=2)
)
def test_cuda_kernels_are_bit_identical_to_the_reference(
    shape, block, bits, dtype, layout, mode, lfc_dtype, seed
) -> None:
    x = make_input(shape, dtype, layout, "cuda", seed=seed % 1000)
    check_against_reference(x, block, bits, mode, lfc_dtype, seed)


@pytest.mark.gpu
@needs_ext
@needs_gpu
@pytest.mark.parametrize("shape", EDGE_SHAPES + [(2, 3, 40), (2, 3, 5, 6, 7)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cuda_kernels_on_edge_shapes_and_launch_shapes(shape: tuple, layout: str) -> None:
    if layout == "channels_last" and len(shape) == 3:
        pytest.skip("no channels_last layout for 3-D tensors")
    for dtype, mode, bits in zip(DTYPES, MODES, [1, 2, 8]):
        x = make_input(shape, dtype, layout, "cuda", seed=bits)
        check_against_reference(x, 8, bits, mode, torch.bfloat16, seed=4321)
    x = make_input(shape, torch.float32, layout, "cuda")
    for threads, minor in itertools.product([1, 4, 32, 256], [False, True]):
        check_against_reference(x, 3, 4, "division", torch.float16, seed=8, launch=(threads, minor))


@pytest.mark.gpu
@needs_ext
@needs_gpu
@pytest.mark.parametrize("lfc_dtype", LFC_DTYPES)
def test_cuda_kernels_on_special_values(lfc_dtype: torch.dtype) -> None:
    x = special_values().cuda()
    for mode, bits in itertools.product(MODES, [1, 8]):
        check_against_reference(x, 8, bits, mode, lfc_dtype, seed=99)
    check_nan_propagation(x, lfc_dtype)


@pytest.mark.gpu
@needs_ext
@needs_gpu
@pytest.mark.parametrize("shape", [(8, 64, 112, 112), (8, 256, 56, 56), (8, 512, 28, 28),
                                   (8, 1024, 14, 14), (8, 2048, 7, 7)])
def test_cuda_kernels_on_resnet50_shapes(shape: tuple) -> None:
    for dtype, layout in itertools.product([torch.float32, torch.bfloat16],
                                           ["contiguous", "channels_last"]):
        check_against_reference(make_input(shape, dtype, layout, "cuda"), 8, 2, "division",
                                torch.bfloat16, seed=2023)


@pytest.mark.gpu
@needs_ext
@needs_gpu
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_public_api_cuda_backend_equals_torch_backend(layout: str) -> None:
    x = make_input((4, 16, 20, 20), torch.bfloat16, layout, "cuda")
    fast = division.compress(x, division.DivisionConfig(backend="cuda"), seed=3)
    slow = division.compress(x, division.DivisionConfig(backend="torch"), seed=3)
    assert fast.backend == "cuda" and slow.backend == "torch"
    for name in ("lfc", "codes", "lo", "step"):
        assert_identical(getattr(fast, name), getattr(slow, name), name)
    out = division.decompress(fast)
    assert_identical(out, decompress_reference(slow), "decompress")
    assert out.is_contiguous(memory_format=memory_format_of(x))


@pytest.mark.gpu
@pytest.mark.slow
@needs_ext
@needs_gpu
def test_cuda_indexing_beyond_2_32_elements() -> None:
    """Global element indices past 2^31 (int64 offsets) and 2^32 (the hash key changes)."""
    shape = (64, 64, 1024, 1025)  # 4.3e9 elements, 8.6 GB in bfloat16
    free, _ = torch.cuda.mem_get_info()
    if free < 48 * 2**30:
        pytest.skip(f"needs 48 GiB of free GPU memory, {free / 2**30:.0f} GiB free")
    x = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    for n in range(shape[0]):  # in pieces: randn's float32 temporary of all of x would not fit
        x[n] = torch.randn(shape[1:], generator=g, device="cuda").mul_(3).add_(1)
    seed = 2**62 + 12345
    fmt = torch.contiguous_format
    lfc, codes, lo, step = _C.compress(x, 8, 2, torch.bfloat16, "division", seed)
    ref = compress_reference(x, 8, 2, torch.bfloat16, "division", seed, fmt)
    for name, got, want in zip(("lfc", "codes", "lo", "step"), (lfc, codes, lo, step),
                               (ref.lfc, ref.codes, ref.lo, ref.step)):
        assert torch.equal(got, want), name
    del lfc, codes, lo, step
    out = _C.decompress(ref.lfc, ref.codes, ref.lo, ref.step, list(shape), x.dtype, True, 8, 2,
                        "division")
    del x
    assert torch.equal(out, decompress_reference(ref))


@pytest.mark.gpu
@pytest.mark.slow
@needs_ext
@needs_gpu
def test_cuda_backend_trains_like_the_torch_backend() -> None:
    """A converted ResNet-18 on CIFAR-sized inputs, 20 SGD steps per backend from the same seeds:
    the codes are identical, so only cuDNN's float reassociation separates the loss curves."""
    torchvision = pytest.importorskip("torchvision")
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
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves[backend] = torch.tensor(losses)
    cuda, ref = curves["cuda"], curves["torch"]
    assert torch.isfinite(cuda).all()
    assert cuda[0] == pytest.approx(ref[0], rel=1e-4)  # same init, same data, forward untouched
    assert (cuda - ref).abs().max() < 0.05 * ref[0], f"{cuda.tolist()} vs {ref.tolist()}"
    assert cuda[-1] < 0.5 * cuda[0]  # and it learns
