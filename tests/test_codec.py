"""The reference codec against the bit format of format.py: bounds, bias, sizes, shapes, errors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import division
from division.format import lfc_shape, plane_bytes
from division.hashing import (
    KEY_PROBES,
    KEY_STRIDE,
    MASK32,
    as_seed,
    content_seed,
    mix32_int,
    uniforms,
)
from division.reference import block_means, pack_codes, unpack_codes


def plane_step(packed: division.CompressedActivation) -> torch.Tensor:
    """Per-element quantization step in x's units (step * 2^-shift), broadcast to x's shape."""
    expand = (...,) + (None,) * len(packed.spatial)
    return packed.quantization_step.float()[expand].expand(packed.shape)


def assert_within_one_step(x: torch.Tensor, packed: division.CompressedActivation) -> None:
    x_hat = division.decompress(packed)
    err = (x_hat.float() - x.float()).abs()
    # one quantization step, plus the rounding of the output to x's dtype
    out_eps = torch.finfo(x.dtype).eps * x.float().abs() if x.dtype != torch.float32 else 0
    bound = plane_step(packed) * (1 + 1e-5) + 1e-6 + out_eps
    assert torch.isfinite(x_hat).all()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item()}"


# ---------------------------------------------------------------------------------------------
# config


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("block_size", 0, ">= 1"),
        ("block_size", 2.5, "integer"),
        ("hfc_bits", 3, "(1, 2, 4, 8)"),
        ("lfc_dtype", "int8", "bfloat16"),
        ("backend", "triton", "auto"),
        ("backward_mode", "lfc", "lfc_only"),
        ("compress_linear", "yes", "True or False"),
        ("exclude", [1], "module name patterns"),
        ("exclude", ["conv1", ""], "non-empty"),
        ("layer_bits", {"layer4": 3}, "(1, 2, 4, 8)"),
        ("layer_bits", {"layer4": "4"}, "integer Q"),
        ("layer_bits", ["layer4"], "{module name pattern: Q}"),
    ],
)
def test_bad_config_names_field_value_and_allowed(field: str, value: object, allowed: str) -> None:
    with pytest.raises(ValueError) as err:
        division.DivisionConfig(**{field: value})
    msg = str(err.value)
    assert f"DivisionConfig.{field}={value!r}" in msg
    assert allowed in msg


def test_config_defaults_and_cost() -> None:
    cfg = division.DivisionConfig()
    assert (cfg.block_size, cfg.hfc_bits, cfg.lfc_torch_dtype) == (8, 2, torch.bfloat16)
    assert cfg.bits_per_element == pytest.approx(2.25)
    assert cfg.replace(hfc_bits=4).hfc_bits == 4
    with pytest.raises(ValueError, match="hfc_bits"):
        cfg.replace(hfc_bits=5)


# ---------------------------------------------------------------------------------------------
# random numbers and bit packing


def format_uniform(seed: int, plane: int, q: int) -> float:
    """u of element q of plane p, written out from format.py's formula."""
    key = mix32_int(mix32_int(mix32_int((seed >> 32) ^ (plane >> 32)) ^ (seed & MASK32)) ^ (plane & MASK32))
    h = mix32_int((q >> 1) ^ key)
    k = h >> 16 if q & 1 else h & 0xFFFF
    return k * 2.0**-16 + 2.0**-17


def test_hash_matches_format_formula_across_the_2_32_plane_boundary() -> None:
    seed = 0x1234_5678_9ABC_DEF0 & (2**63 - 1)
    first = 2**32 - 2  # plane indices whose high word changes
    got = uniforms(as_seed(seed, "cpu"), first, 4, 7)
    for p in range(4):
        for q in range(7):
            assert got[p, q].item() == format_uniform(seed, first + p, q)


def test_uniforms_look_uniform_and_independent() -> None:
    u = uniforms(as_seed(7, "cpu"), 0, 4, 1 << 14).double()
    assert 2.0**-17 <= u.min().item() and u.max().item() <= 1 - 2.0**-17  # interval midpoints
    assert abs(u.mean().item() - 0.5) < 0.01
    hist = torch.histc(u.float(), bins=16, min=0, max=1)
    assert (hist - 4096).abs().max().item() < 400
    c = u - 0.5
    # the two halves of one hash, neighbouring pairs, neighbouring planes: no correlation beyond
    # sampling noise (|r| ~ 1/sqrt(n) = 0.008 here)
    assert abs((c[:, 0::2] * c[:, 1::2]).mean().item()) / c.var().item() < 0.03
    assert abs((c[:, :-2] * c[:, 2:]).mean().item()) / c.var().item() < 0.03
    assert abs((c[:-1] * c[1:]).mean().item()) / c.var().item() < 0.03


def test_consecutive_seeds_give_unrelated_streams() -> None:
    a, b = uniforms(as_seed(0, "cpu"), 0, 1, 4096), uniforms(as_seed(1, "cpu"), 0, 1, 4096)
    c = (a - 0.5) * (b - 0.5)
    assert abs(c.mean().item()) < 0.01 and not torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_content_seed_keys_a_tensor_by_its_content(dtype: torch.dtype) -> None:
    """What torch.compile's compressions are seeded with (compressor.py): the same for a tensor,
    its copies and its other layouts (a pure function of the values, read in logical order), a
    valid seed, and different for another base seed or a change of one probed element."""
    base = as_seed(12345, "cpu")
    x = torch.randn(4, 8, 6, 6).to(dtype)
    seed = content_seed(base, x)
    assert seed.dtype == torch.int64 and seed.shape == () and 0 <= seed.item() < 2**63
    assert content_seed(base, x.clone()).item() == seed.item()
    assert content_seed(base, x.contiguous(memory_format=torch.channels_last)).item() == seed.item()
    assert content_seed(as_seed(12346, "cpu"), x).item() != seed.item()
    for k in (0, 1, KEY_PROBES - 1):  # a probed element one bit up
        y = x.clone()
        flat = y.view(-1)
        i = k * KEY_STRIDE % x.numel()
        bits = flat.view(torch.int32 if dtype == torch.float32 else torch.int16)
        bits[i] ^= 1
        assert content_seed(base, y).item() != seed.item(), k
    small = torch.randn(1, 2, 3, 1).to(dtype)  # fewer elements than probes
    assert content_seed(base, small).item() == content_seed(base, small.clone()).item()
    assert content_seed(base, small).item() != content_seed(base, small + 1).item()


def test_seeds_are_checked() -> None:
    for bad in (-1, 2**63, 1.5, True):
        with pytest.raises(ValueError, match="seed"):
            as_seed(bad, "cpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one int64"):
        as_seed(torch.ones(2, dtype=torch.int64), "cpu")
    assert as_seed(torch.tensor([5]), "cpu").shape == ()


def test_packing_layout_is_little_endian_within_bytes() -> None:
    codes = torch.tensor([[1, 2, 3, 0, 3]], dtype=torch.uint8)
    packed = pack_codes(codes, 2)
    assert packed.shape == (1, 4)  # 10 bits -> 2 bytes, padded to a 32-bit word
    assert packed.tolist() == [[1 | 2 << 2 | 3 << 4, 3, 0, 0]]
    assert torch.equal(unpack_codes(packed, 2, 5), codes)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_pack_unpack_round_trip(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (3, 37), generator=g, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (3, plane_bytes(37, bits))
    assert torch.equal(unpack_codes(packed, bits, 37), codes)


# ---------------------------------------------------------------------------------------------
# round trip


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_round_trip_within_one_step(bits: int) -> None:
    x = torch.randn(4, 3, 16, 16) * 3 + 1
    packed = division.compress(x, division.DivisionConfig(hfc_bits=bits), seed=1)
    assert_within_one_step(x, packed)


@pytest.mark.parametrize(
    "shape, block",
    [
        ((1, 1, 8, 8), 8),  # N=1, C=1
        ((2, 3, 1, 1), 8),  # a single pixel
        ((2, 3, 1, 9), 8),  # H=1
        ((2, 3, 7, 7), 8),  # map smaller than B
        ((3, 2, 14, 14), 8),  # H not a multiple of B: partial last block
        ((2, 5, 12, 20), 8),  # H != W
        ((2, 2, 10, 6), 4),
        ((5, 3, 13, 11), 3),
        ((2, 4, 16, 16), 1),
        ((2, 3, 50), 8),  # 1-D maps
        ((2, 3, 5, 9, 10), 4),  # 3-D maps
    ],
)
def test_odd_shapes_round_trip(shape: tuple[int, ...], block: int) -> None:
    x = torch.randn(shape)
    cfg = division.DivisionConfig(block_size=block)
    packed = division.compress(x, cfg, seed=3)
    assert packed.lfc.shape == (*shape[:2], *lfc_shape(shape[2:], block))
    assert packed.codes.shape == (shape[0] * shape[1], plane_bytes(math.prod(shape[2:]), 2))
    assert_within_one_step(x, packed)


def test_partial_blocks_average_what_they_cover() -> None:
    x = torch.arange(2 * 3 * 10 * 7, dtype=torch.float32).view(2, 3, 10, 7)
    means = block_means(x, (4, 4))
    assert means.shape == (2, 3, 3, 2)
    for bi, (r0, r1) in enumerate([(0, 4), (4, 8), (8, 10)]):
        for bj, (c0, c1) in enumerate([(0, 4), (4, 7)]):
            expect = x[:, :, r0:r1, c0:c1].double().mean(dim=(2, 3)).float()
            assert torch.equal(means[:, :, bi, bj], expect)


def test_reconstruction_is_unbiased() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    cfg = division.DivisionConfig(block_size=4, hfc_bits=1)
    runs = 400
    total = torch.zeros_like(x, dtype=torch.float64)
    for seed in range(runs):
        total += division.decompress(division.compress(x, cfg, seed=seed)).double()
    packed = division.compress(x, cfg, seed=0)
    step = plane_step(packed).double()
    err = (total / runs - x.double()) / step
    # each reconstruction errs by at most one step with std <= step/2; the mean of 400 has
    # std <= step/40 per element. Rounding to nearest or down would leave ~0.25-0.5 step of bias.
    assert err.abs().max().item() < 0.15
    assert abs(err.mean().item()) < 0.01


def test_constant_planes_reconstruct_exactly() -> None:
    x = torch.empty(2, 3, 9, 9)
    for n in range(2):
        for c in range(3):
            x[n, c] = [0.0, 0.3, -1.7e5, 1e-20, 7.0, 123.456][n * 3 + c]
    for mode_bits in (1, 2, 8):
        packed = division.compress(x, division.DivisionConfig(hfc_bits=mode_bits), seed=5)
        x_hat = division.decompress(packed)
        assert torch.isfinite(packed.step).all()
        assert torch.equal(x_hat, x)


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MODES_WITH_HFC = ["division", "hfc_only"]


def extreme_planes(dtype: torch.dtype) -> torch.Tensor:
    """Finite planes at the edges of the dtype: at and near its maximum, blocks of both huge signs,
    huge values beside small ones."""
    top = torch.finfo(dtype).max
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 9, 10, generator=g)
    x[0, 0] = top
    x[0, 1] = -top
    x[0, 2] = torch.rand(9, 10, generator=g) * top
    x[0, 3, :, :5], x[0, 3, :, 5:] = top, -top
    x[1, 0] = top * (1 - 2 * torch.rand(9, 10, generator=g))
    x[1, 1, ::2] = top * 0.999
    x[1, 2, 0, 0] = top
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lfc_dtype", ["bfloat16", "float16", "float32"])
def test_finite_in_finite_out_up_to_the_dtype_maximum(dtype: torch.dtype, lfc_dtype: str) -> None:
    x = extreme_planes(dtype)
    for mode, bits in itertools.product(["division", "lfc_only", "hfc_only"], [1, 2, 8]):
        cfg = division.DivisionConfig(hfc_bits=bits, lfc_dtype=lfc_dtype, backward_mode=mode)
        x_hat = division.decompress(division.compress(x, cfg, seed=bits))
        assert torch.isfinite(x_hat).all(), (mode, bits)
    packed = division.compress(x, division.DivisionConfig(lfc_dtype=lfc_dtype), seed=3)
    err = (division.decompress(packed).double() - x.double()).abs()
    assert (err <= plane_step(packed).double() * (1 + 1e-6) + x.double().abs() * torch.finfo(dtype).eps).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_planes_reconstruct_as_nan_and_no_others(dtype: torch.dtype) -> None:
    """A plane holding inf or NaN feeds non-finite gradients, as stock's would (GradScaler sees it)."""
    x = (torch.randn(2, 4, 9, 10) * 3).to(dtype)
    x[0, 0, 1, 1] = math.inf
    x[0, 1, 2, 2] = -math.inf
    x[1, 0, 3, 3] = math.nan
    x[1, 1, 0, 0], x[1, 1, 8, 9] = math.inf, -math.inf  # in different blocks
    bad = torch.zeros(2, 4, dtype=torch.bool)
    bad[0, :2] = bad[1, :2] = True
    for mode in MODES_WITH_HFC:
        packed = division.compress(x, division.DivisionConfig(backward_mode=mode), seed=4)
        x_hat = division.decompress(packed)
        assert x_hat[bad].isnan().all() and torch.isfinite(x_hat[~bad]).all()
        assert packed.lo[bad].isnan().all() and packed.step[bad].isnan().all()
        assert (packed.shift[bad] == 0).all()
    up = division.decompress(division.compress(x, division.DivisionConfig(backward_mode="lfc_only"), seed=4))
    assert up[0, 0, :8, :8].isnan().all() and torch.isfinite(up[0, 0, :8, 8:]).all()  # its block only


@pytest.mark.parametrize("name, scale, offset", [
    ("tiny range around 1", 1e-6, 1.0),
    ("below the old 1e-30 floor", 1e-33, 0.0),
    ("subnormal", 1e-41, 0.0),
    ("tiny range around 1e30", 1e24, 1e30),
])
def test_tiny_and_subnormal_ranges_keep_their_precision(name: str, scale: float, offset: float) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64).mul(scale).add(offset).float()
    assert (x != offset).any() and torch.isfinite(x).all()
    for bits in (2, 8):
        packed = division.compress(x, division.DivisionConfig(hfc_bits=bits), seed=bits)
        x_hat = division.decompress(packed).double()
        step = plane_step(packed).double()
        span = x.double().flatten(2).amax(2) - x.double().flatten(2).amin(2)
        # the step is the plane's own range (of x - up) over 2^Q - 1, not a floor's
        assert (step.flatten(2)[..., 0] <= 2 * span / (2**bits - 1) + 1e-300).all(), name
        tiny = torch.finfo(torch.float32).tiny * 2**-23  # the float32 grid near subnormals
        assert ((x_hat - x.double()).abs() <= step * (1 + 1e-6) + tiny).all(), name


def test_no_nan_from_extreme_finite_input() -> None:
    x = torch.randn(2, 3, 8, 8)
    x[0, 0, 0, 0] = 3e38
    x[0, 0, 5, 5] = -3e38
    x[1, 2] = 1e-39  # subnormal
    for lfc_dtype in ("bfloat16", "float16", "float32"):
        packed = division.compress(x, division.DivisionConfig(lfc_dtype=lfc_dtype), seed=2)
        x_hat = division.decompress(packed)
        assert not torch.isnan(x_hat).any()
        assert torch.isfinite(x_hat).all()
        assert not torch.isnan(packed.lfc.float()).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_dtype_and_memory_format_come_back(dtype: torch.dtype, channels_last: bool) -> None:
    x = torch.randn(3, 5, 11, 9).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    packed = division.compress(x, division.DivisionConfig(), seed=11)
    x_hat = division.decompress(packed)
    assert x_hat.dtype == dtype and x_hat.shape == x.shape
    assert x_hat.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert_within_one_step(x, packed)
    # the format is defined on logical indices: the layout never changes the bits
    plain = division.compress(x.contiguous(), division.DivisionConfig(), seed=11)
    assert torch.equal(plain.codes, packed.codes) and torch.equal(plain.lfc, packed.lfc)


def test_exact_mode_consumes_no_randomness() -> None:
    x = torch.randn(2, 3, 8, 8)
    torch.manual_seed(3)
    division.compress(x, division.DivisionConfig(backward_mode="exact"))
    after_exact = torch.rand(4)
    torch.manual_seed(3)
    assert torch.equal(torch.rand(4), after_exact)


def test_a_seed_tensor_gives_the_same_bits_as_its_int() -> None:
    x = torch.randn(2, 4, 16, 16)
    cfg = division.DivisionConfig()
    a = division.compress(x, cfg, seed=2**40 + 3)
    b = division.compress(x, cfg, seed=torch.tensor(2**40 + 3))
    assert torch.equal(a.codes, b.codes)


def test_same_seed_same_bits_and_manual_seed_reproduces() -> None:
    x = torch.randn(2, 4, 16, 16)
    cfg = division.DivisionConfig()
    a, b = division.compress(x, cfg, seed=9), division.compress(x, cfg, seed=9)
    assert torch.equal(a.codes, b.codes)
    assert not torch.equal(a.codes, division.compress(x, cfg, seed=10).codes)
    torch.manual_seed(4)
    c = division.compress(x, cfg)
    torch.manual_seed(4)
    assert torch.equal(c.codes, division.compress(x, cfg).codes)


@pytest.mark.parametrize("mode", ["division", "hfc_only"])
def test_first_plane_numbers_planes_across_calls(mode: str) -> None:
    """Planes are coded independently and plane (n, c) hashes as first_plane + n*C + c: the two
    parts of a batch compressed under one seed with consecutive plane ranges give the whole
    batch's bits, and another range gives other bits."""
    x = torch.randn(5, 3, 12, 12)
    cfg = division.DivisionConfig(backward_mode=mode, backend="torch")
    whole = division.compress(x, cfg, seed=7)
    head = division.compress(x[:2], cfg, seed=7)
    tail = division.compress(x[2:], cfg, seed=7, first_plane=2 * 3)
    assert torch.equal(torch.cat([head.codes, tail.codes]), whole.codes)
    assert not torch.equal(tail.codes, division.compress(x[2:], cfg, seed=7).codes)


def test_first_plane_is_checked() -> None:
    x, cfg = torch.randn(2, 3, 4, 4), division.DivisionConfig()
    last = 2**63 - 6  # the last start that leaves room for 2 x 3 planes
    assert division.compress(x, cfg, seed=1, first_plane=last).codes.shape == (6, 4)
    for bad in (-1, last + 1):
        with pytest.raises(ValueError, match=r"first_plane=.* must lie in \[0, 2\^63 - 6\]"):
            division.compress(x, cfg, seed=1, first_plane=bad)
    for bad in (1.0, True):
        with pytest.raises(TypeError, match="first_plane must be an int"):
            division.compress(x, cfg, seed=1, first_plane=bad)  # type: ignore[arg-type]


def test_size_of_a_resnet_activation_is_below_one_thirteenth() -> None:
    x = torch.randn(32, 64, 56, 56)
    packed = division.compress(x, division.DivisionConfig(block_size=8, hfc_bits=2), seed=0)
    held = sum(t.untyped_storage().nbytes() for t in packed.tensors() if t is not None)
    assert packed.nbytes == held  # nbytes is what is really held, not a formula
    assert packed.nbytes <= x.numel() * x.element_size() / 13
    # 2 bits per element + one bf16 per 8x8 block + 9 bytes per plane (lo, step, shift)
    assert packed.nbytes == 32 * 64 * (56 * 56 * 2 // 8 + 7 * 7 * 2 + 9)


@pytest.mark.parametrize("mode", ["lfc_only", "hfc_only", "exact"])
def test_backward_modes_reconstruct_their_part(mode: str) -> None:
    x = torch.randn(2, 3, 16, 16)
    full = division.compress(x, division.DivisionConfig(), seed=8)
    packed = division.compress(x, division.DivisionConfig(backward_mode=mode), seed=8)
    x_hat = division.decompress(packed)
    up = division.decompress(division.compress(x, division.DivisionConfig(), seed=8, mode="lfc_only"))
    if mode == "exact":
        assert x_hat is x and packed.nbytes == x.numel() * 4
    elif mode == "lfc_only":
        assert packed.codes is None and torch.equal(packed.lfc, full.lfc)
        assert (x_hat.view(2, 3, 2, 8, 2, 8).std(dim=(3, 5)) == 0).all()  # constant per block
    else:
        assert packed.lfc is None and torch.equal(packed.codes, full.codes)
        assert torch.allclose(x_hat + up, division.decompress(full), atol=1e-6)


def test_unsupported_inputs_give_clear_errors() -> None:
    cfg = division.DivisionConfig()
    with pytest.raises(TypeError, match="unsupported dtype torch.int64"):
        division.compress(torch.ones(2, 3, 4, 4, dtype=torch.int64), cfg)
    with pytest.raises(TypeError, match="expected a torch.Tensor"):
        division.compress([1.0, 2.0], cfg)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\(N, C, \*spatial\)"):
        division.compress(torch.ones(4, 4), cfg)
    with pytest.raises(ValueError, match="spatial sizes must be positive"):
        division.compress(torch.ones(2, 3, 0, 4), cfg)
    with pytest.raises(ValueError, match="seed"):
        division.compress(torch.ones(2, 3, 4, 4), cfg, seed=-1)


def test_backend_cuda_needs_the_extension_and_cuda_tensors() -> None:
    cfg = division.DivisionConfig(backend="cuda")
    if division.cuda_extension_available():
        with pytest.raises(ValueError, match="need CUDA tensors"):
            division.compress(torch.ones(2, 3, 4, 4), cfg)
    else:
        with pytest.raises(RuntimeError, match="extension division._C is not built"):
            division.compress(torch.ones(2, 3, 4, 4), cfg)
