"""division._C's codec ops, the CUDA kernels and their CPU twin, against the pure-PyTorch reference.

    .venv/bin/pytest tests/test_cuda_ext.py -q     # CPU twin here; the `gpu` tests where CUDA is

The CPU twin runs the kernels' own phase functions (cuda_ext/exec.h) thread by thread and block by
block, so the CPU tests check the kernels' indexing, work split, staging, reductions and bit
packing, not a rewrite of them; the tests marked `gpu` run the CUDA kernels on CUDA tensors against
the reference run on the same tensors. Every kernel path is forced in turn (staged and generic
compress; vec, tile, channel and generic decompress), with several staging budgets. Tolerance: none. lfc,
codes, lo, step and the reconstruction must be bit-identical: the LFC's float64 block sums are exact
for these inputs (magnitudes within a block span far less than 2^20), so the backends' different
summation orders cannot show. Known, documented differences: NaN payloads, and the sign of `lo` when
a plane's smallest HFC value is a zero of mixed signs (the reference's depends on its reduction
order; the kernels give +0).
"""

from __future__ import annotations

import itertools
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import division
from division.backend import load_extension
from division.format import FORMAT_VERSION, memory_format_of, plane_bytes
from division.hashing import as_seed, uniforms
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
    """Random activations (mean 1, std 3) in `layout`: contiguous, channels_last, strided, or
    `offset` (contiguous but one element past a 16-byte boundary: no vector loads)."""
    g = torch.Generator().manual_seed(seed)
    if layout == "strided":  # a non-dense view: every other element of a wider tensor
        wide = (torch.randn((*shape[:-1], 2 * shape[-1]), generator=g) * 3 + 1).to(dtype)
        return wide.to(device)[..., ::2]
    if layout == "offset":
        flat = (torch.randn(math.prod(shape) + 1, generator=g) * 3 + 1).to(dtype).to(device)
        return flat[1:].view(shape)
    x = (torch.randn(shape, generator=g) * 3 + 1).to(dtype).to(device)
    if layout == "channels_last":
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    return x


def bits_of(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits (so -0 != +0 and NaN == NaN of the same payload)."""
    return t.contiguous().view(INT_VIEW[t.dtype]) if t.dtype in INT_VIEW else t


def assert_identical(got: torch.Tensor | None, want: torch.Tensor | None, what: str) -> None:
    if want is None:  # an absent part: a 0-element tensor from the ops
        assert got is None or got.numel() == 0, f"{what}: expected an absent part, got {tuple(got.shape)}"
        return
    assert got is not None, f"{what}: missing"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.device == want.device, f"{what}: device {got.device} != {want.device}"
    same = bits_of(got) == bits_of(want)
    if got.is_floating_point():  # NaN payloads may differ (see the module docstring)
        same |= got.isnan() & want.isnan()
    if not bool(same.all()):
        bad = (~same).nonzero()[0].tolist()
        raise AssertionError(
            f"{what}: {int((~same).sum())} of {same.numel()} elements differ, first at {bad}: "
            f"{got[tuple(bad)].item()!r} != {want[tuple(bad)].item()!r}"
        )


def compress_options(x: torch.Tensor, block: int = 8, bits: int = 2) -> list[dict]:
    """Every compress kernel x can take: the automatic one, the generic one, and the staged one
    (when its planes fit in shared memory) with one plane per block and with several."""
    options = [{}, {"path": "generic"}]
    if _C.compress_plan(x.contiguous(memory_format=memory_format_of(x)), block, bits)[0] == "staged":
        options += [{"path": "staged", "smem_target": 1}, {"path": "staged", "smem_target": 4096}]
    return options


def word_applies(shape: tuple[int, ...], esize: int, block: int, bits: int) -> bool:
    """The NCHW word kernel's condition, restated: planes of whole code words, a word whole
    16-byte stores, W and the block width multiples of 4."""
    run, w = 32 // bits, shape[-1]
    return math.prod(shape[2:]) % run == 0 and run * esize % 16 == 0 and w % 4 == 0 and min(block, w) % 4 == 0


def plane_words_applies(shape: tuple[int, ...], esize: int) -> bool:
    """The NCHW plane_words kernel's condition, restated: P % 4 == 0, planes of at most 6 KB."""
    numel = math.prod(shape[2:])
    return numel % 4 == 0 and 4 * numel * esize <= 24 * 1024


def decompress_paths(x: torch.Tensor, block: int, bits: int) -> list[str]:
    """Every decompress kernel that can write x's layout: channel needs 16 bytes of channels, word
    (staged through shared memory) and word_direct whole code words per plane, plane planes of at
    most 256 bytes, plane_words planes of a multiple of 4 elements and at most 6 KB."""
    fmt = memory_format_of(x)
    paths = ["auto", "generic"]
    if fmt == torch.contiguous_format:
        word = word_applies(x.shape, x.element_size(), block, bits)
        plane = math.prod(x.shape[2:]) * x.element_size() <= 256
        plane_words = plane_words_applies(x.shape, x.element_size())
        return (paths + ["vec"] + (["word", "word_direct"] if word else []) + (["plane"] if plane else [])
                + (["plane_words"] if plane_words else []))
    if x.dim() == 4:
        paths.append("tile")
    if x.shape[1] % (16 // x.element_size()) == 0:
        paths.append("channel")
    return paths


def check_against_reference(
    x: torch.Tensor, block: int, bits: int, mode: str, lfc_dtype: torch.dtype, seed: int,
    launch: tuple[int, bool] | None = None,
) -> None:
    """Every compress kernel and every decompress kernel == the reference, bit for bit.
    launch: a forced (threads_per_plane, plane_minor) of the generic kernels. A third of the seeds
    number the planes from 0, the others from a first_plane above 2^32."""
    fmt = memory_format_of(x)
    s = as_seed(seed, x.device)
    first = (seed % 3) * (2**33 + 5)
    ref = compress_reference(x, block, bits, lfc_dtype, mode, s, fmt, first)
    want_parts = (ref.lfc, ref.codes, ref.lo, ref.step, ref.shift)
    options = compress_options(x, block, bits) if launch is None else [
        {"path": "generic", "threads_per_plane": launch[0], "plane_minor": launch[1]}]
    for opt in options:
        got = _C._compress_with(x, s, block, bits, lfc_dtype, mode, first_plane=first, **opt)
        for name, g, w in zip(("lfc", "codes", "lo", "step", "shift"), got, want_parts):
            assert_identical(g, w, f"compress {opt} {name}")
    none = torch.empty(0, device=x.device)
    parts = [t if t is not None else none for t in want_parts]
    want = decompress_reference(ref)
    paths = decompress_paths(x, block, bits) if launch is None else ["generic"]
    for path in paths:
        extra = {} if launch is None else {"threads_per_plane": launch[0], "plane_minor": launch[1]}
        out = _C._decompress_with(*parts, list(x.shape), x.dtype, fmt != torch.contiguous_format,
                                  block, bits, mode, path=path, **extra)
        assert_identical(out, want, f"decompress {path}")
        assert out.stride() == want.stride(), f"decompress {path} strides {out.stride()} != {want.stride()}"


def random_cases(count: int, seed: int) -> list[tuple]:
    """(shape, block, bits, dtype, layout, mode, lfc_dtype, seed) drawn over every axis; some
    with many planes per block (C up to 300) and with sizes that defeat 16-byte loads."""
    rng = random.Random(seed)
    sides = [1, 2, 3, 5, 7, 8, 9, 13, 16, 17, 24]
    cases = []
    for _ in range(count):
        dims = rng.choice([1, 2, 2, 2, 3])
        spatial = tuple(rng.choice(sides) for _ in range(dims))
        if dims == 1:
            spatial = (rng.randint(1, 70),)
        shape = (rng.choice([1, 2, 3]), rng.choice([1, 2, 5, 8, 16, 48, 300]), *spatial)
        layouts = ["contiguous", "strided", "offset"] + (["channels_last"] * 2 if dims >= 2 else [])
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
    (2, 600, 1, 1),  # more planes than threads in one staged block
    (4, 96, 2, 3),  # channels_last: planes per block must divide C
    (2, 8, 7, 7),  # NCHW: 16-byte chunks span planes (P = 49)
    (2, 4, 14, 14),  # the same for 16-bit dtypes (P % 8 == 4), blocks of 8 and 6
    (2, 6, 3, 4),  # runs of four in one-block planes of P % 8 == 4: bfloat16 chunks span planes
]


# ---------------------------------------------------------------------------------------------
# CPU twin


@needs_ext
def test_extension_speaks_this_bit_format() -> None:
    assert _C.FORMAT_VERSION == FORMAT_VERSION == 3


def test_an_extension_of_another_bit_format_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stale build (another FORMAT_VERSION) is not loaded: the reference runs, with the reason."""
    import sys
    import types

    import division.backend as backend

    stale = types.ModuleType("division._C")
    stale.FORMAT_VERSION = FORMAT_VERSION - 1
    monkeypatch.setitem(sys.modules, "division._C", stale)
    monkeypatch.setattr(division, "_C", stale, raising=False)
    backend.load_extension.cache_clear()
    try:
        module, why = backend.load_extension()
        assert module is None
        assert f"built for bit format {FORMAT_VERSION - 1}, this division needs {FORMAT_VERSION}" in why
        assert "rebuild" in why
    finally:
        monkeypatch.undo()
        backend.load_extension.cache_clear()



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
def test_generic_kernels_do_not_depend_on_the_launch_shape(shape: tuple, layout: str) -> None:
    """Every work split (threads per plane, thread order) the generic kernels could run with."""
    x = make_input(shape, torch.bfloat16, layout, "cpu")
    for threads, minor in itertools.product([1, 2, 4, 8, 16, 32, 64, 128, 256], [False, True]):
        check_against_reference(x, 4, 2, "division", torch.bfloat16, seed=7, launch=(threads, minor))


@needs_ext
def test_cpu_twin_in_reverse_thread_order() -> None:
    """A GPU runs a phase's threads in no set order: the twin and mask-kernel tests pass again with
    every phase's threads and warps run in reverse (DIVISION_TWIN_ORDER=reverse, cuda_ext/exec.h),
    so a kernel that reads within a phase what another of its threads writes there fails in one
    of the two orders."""
    env = {**os.environ, "DIVISION_TWIN_ORDER": "reverse"}
    order = subprocess.run([sys.executable, "-c", "from division import _C; print(_C._twin_thread_order())"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert order.stdout.strip() == "reverse", order.stderr[-2000:]
    assert _C._twin_thread_order() == "forward"
    here = Path(__file__)
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k",
                          "not reverse_thread_order", str(here), str(here.with_name("test_mask_kernels.py"))],
                         env=env, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-4000:]


@needs_ext
@pytest.mark.parametrize("sequence", ["tt", "ww", "tw", "wt", "tstt", "twst"])
def test_cpu_twin_refuses_phases_without_a_barrier_between_them(sequence: str) -> None:
    """What neither thread order shows: on a GPU a thread runs two phases without a barrier between
    them back to back, so the second may read what other threads have not written yet. The twin
    throws at such a second phase (cuda_ext/exec.h) instead of running the phases whole."""
    with pytest.raises(RuntimeError, match="two phases of a block without a barrier between them"):
        _C._twin_phases(sequence)


@needs_ext
@pytest.mark.parametrize("sequence, ran", [("t", 32), ("w", 1), ("tst", 64), ("tswst", 65), ("tss", 32)])
def test_cpu_twin_runs_phases_separated_by_barriers(sequence: str, ran: int) -> None:
    """Every thread (32) of a per-thread phase and every warp (1) of a per-warp phase runs."""
    assert _C._twin_phases(sequence) == ran


# (shape, B, run): the staged codes phase takes runs of 4 when each aligned run of 4 lies in one
# LFC block (W and B multiples of 4, or one block per plane, and P % 4 == 0), pairs otherwise:
# one lookup and load a pair where W and B are even, no lookup in one-block planes, else two.
# The LFC sums (block_stats_*): rows in runs of 4 where W and B are multiples of 4, a flat walk
# where a block spans whole rows, else rows in runs of 2 where W and B are even, else the element
# walk; the comments name which.
STAGED_RUN_SHAPES = [
    ((2, 5, 16, 24), 8, 4),  # sums: runs of 4
    ((2, 3, 12, 20), 4, 4),  # partial last block columns, still whole runs; sums: runs of 4
    ((2, 3, 4, 6), 8, 4),  # one LFC block per plane, W % 4 != 0: runs cross rows; sums: flat
    ((2, 3, 2, 2), 8, 4),  # one run per plane; sums: flat
    ((2, 5, 14, 14), 8, 1),  # the block edge at 8 splits the run 12..15 across rows; pairs whole; sums: runs of 2
    ((2, 3, 16, 16), 2, 1),  # B = 2 splits every run; pairs whole; sums: runs of 2
    ((2, 3, 7, 7), 8, 1),  # P % 4 != 0; pairs in a one-block plane; sums: flat, odd count
    ((2, 3, 9, 10), 3, 1),  # pairs looked up element by element; sums: the element walk (B odd)
    ((2, 3, 40), 8, 4),  # 1-D; sums: runs of 4
    ((2, 3, 42), 8, 1),  # 1-D, the last block 40..41 shares a run; sums: runs of 2
]


@needs_ext
@pytest.mark.parametrize("shape, block, run", STAGED_RUN_SHAPES)
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_cpu_twin_staged_code_runs(shape: tuple, block: int, run: int, bits: int) -> None:
    for dtype, layout, mode in zip(DTYPES, ["contiguous", "channels_last", "contiguous"], ["division", "hfc_only", "division"]):
        x = make_input(shape, dtype, layout if len(shape) == 4 else "contiguous", "cpu", seed=bits)
        plan = _C.compress_plan(x, block, bits)
        assert plan[0] == "staged" and plan[5] == run, plan
        check_against_reference(x, block, bits, mode, torch.bfloat16, seed=777 + bits)


# (shape, B): NCHW planes of at most 256 bytes that are not whole code words, a thread per plane
PLANE_SHAPES = [
    ((2, 300, 7, 7), 8),  # one LFC block; 600 planes: three blocks of threads, the last partial
    ((3, 5, 7, 7), 4),  # four LFC blocks of unequal sizes: the element table
    ((2, 3, 5, 6), 8),  # W = 6: not runs of four
    ((4, 70, 1, 1), 8),  # one element a plane
    ((2, 3, 2, 3, 3), 2),  # 3-D
    ((2, 3, 30), 8),  # 1-D
]


def check_plane(shape: tuple, block: int, bits: int, device: str) -> None:
    for dtype, mode in zip(DTYPES, MODES):
        x = make_input(shape, dtype, "contiguous", device, seed=bits)
        if not word_applies(shape, x.element_size(), block, bits):
            assert _C.decompress_plan(list(shape), dtype, False, block, bits)[0] == "plane", (shape, dtype, bits)
        check_against_reference(x, block, bits, mode, torch.bfloat16, seed=2424 + bits)


@needs_ext
@pytest.mark.parametrize("shape, block", PLANE_SHAPES)
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_cpu_twin_plane_decompress(shape: tuple, block: int, bits: int) -> None:
    check_plane(shape, block, bits, "cpu")


# (shape, B): NCHW planes above 256 bytes that are not whole code words (or W, B not multiples of
# 4), staged whole in shared memory and decoded a thread per code word
PLANE_WORDS_SHAPES = [
    ((2, 70, 14, 14), 8),  # ResNet-50's 14x14: 140 planes, several blocks of planes, the last partial
    ((1, 5, 14, 14), 8),  # 16-bit planes of 392 bytes: blocks of an even number of planes; 5 is odd
    ((3, 5, 10, 12), 4),  # W a multiple of 4, P = 120 not whole 16-code words
    ((2, 3, 12, 10), 3),  # partial last blocks in both dims
    ((2, 3, 9, 8), 1),  # B = 1: an LFC value per element
    ((2, 3, 3, 5, 8), 2),  # 3-D
    ((2, 3, 100), 8),  # 1-D
]


def check_plane_words(shape: tuple, block: int, bits: int, device: str) -> None:
    for dtype, mode in zip(DTYPES, MODES):
        x = make_input(shape, dtype, "contiguous", device, seed=bits)
        assert plane_words_applies(shape, x.element_size()), (shape, dtype)
        if not word_applies(shape, x.element_size(), block, bits) and math.prod(shape[2:]) * x.element_size() > 256:
            assert _C.decompress_plan(list(shape), dtype, False, block, bits) == ("plane_words", 32 // bits, False)
        check_against_reference(x, block, bits, mode, torch.bfloat16, seed=5353 + bits)


@needs_ext
@pytest.mark.parametrize("shape, block", PLANE_WORDS_SHAPES)
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_cpu_twin_plane_words_decompress(shape: tuple, block: int, bits: int) -> None:
    check_plane_words(shape, block, bits, "cpu")


# (shape, B): NCHW planes of whole code words, decompressed a thread per word
WORD_SHAPES = [
    ((2, 3, 56, 56), 8),  # words cross row ends (56 % 16 == 8 at Q = 2)
    ((2, 2, 28, 28), 8),  # partial last block column (28 = 3 * 8 + 4)
    ((1, 3, 12, 16), 4),  # a 16-element word in four LFC blocks
    ((2, 3, 8, 4), 100),  # one block per plane, W = 4
    ((2, 2, 4, 8, 8), 8),  # 3-D: a row end moves to the next depth slice
    ((2, 3, 64), 8),  # 1-D
]


def check_word(shape: tuple, block: int, bits: int, device: str) -> None:
    for dtype, mode in zip(DTYPES, MODES):
        x = make_input(shape, dtype, "contiguous", device, seed=bits)
        applies = word_applies(shape, x.element_size(), block, bits)
        assert applies or bits in (1, 8), (shape, dtype, bits)  # every shape is whole 16-code words
        if applies:
            assert _C.decompress_plan(list(shape), dtype, False, block, bits) == ("word", 32 // bits, True)
        check_against_reference(x, block, bits, mode, torch.bfloat16, seed=4242 + bits)


@needs_ext
@pytest.mark.parametrize("shape, block", WORD_SHAPES)
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_cpu_twin_word_decompress(shape: tuple, block: int, bits: int) -> None:
    check_word(shape, block, bits, "cpu")


@needs_ext
def test_compress_plans() -> None:
    """ResNet-50's activations are staged (one read of x); planes that would leave one block per
    multiprocessor (the 224x224 input, channels_last 112x112 at 16-byte pixel loads) are split
    in strips over a cluster of blocks; what cannot be staged is generic."""
    for shape in [(2, 64, 112, 112), (2, 256, 56, 56), (2, 512, 28, 28), (2, 1024, 14, 14),
                  (2, 2048, 7, 7), (2, 3, 224, 224)]:
        for dtype, layout in itertools.product([torch.float32, torch.bfloat16], ["contiguous", "channels_last"]):
            x = torch.empty(shape, dtype=dtype).contiguous(
                memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
            path, planes, smem, blocks, vec, run, ranks = _C.compress_plan(x, 8, 2)
            assert path == "staged", (shape, dtype, layout)
            per16 = 16 // x.element_size()
            assert 1 <= planes and smem <= 227 * 1024
            if layout == "channels_last":  # one 16-byte load per pixel where C allows
                assert shape[1] % planes == 0 and vec == (per16 if shape[1] % per16 == 0 else 1)
            else:  # a block's planes are whole 16-byte vectors
                assert vec == per16 and (planes * math.prod(shape[2:]) * x.element_size()) % 16 == 0
            assert blocks // ranks * planes >= shape[0] * shape[1] and blocks % ranks == 0
            # codes in runs of 4 (one load and one LFC lookup each) where W and B allow
            assert run == (4 if shape[-1] % 4 == 0 and shape[-1] != 14 else 1), (shape, run)
            split = shape[-1] == 224 or (shape[-1] == 112 and layout == "channels_last")
            assert (ranks > 1) == split, (shape, dtype, layout, ranks)
            assert smem <= (48 * 1024 if split else 227 * 1024) and 1 <= ranks <= 8
    big = torch.empty(1, 1, 300, 300)  # 360 KB: more than a block's shared memory, split in 8
    assert _C.compress_plan(big, 8, 2)[0] == "staged" and _C.compress_plan(big, 8, 2)[6] == 8
    huge = torch.empty(1, 1, 1200, 1200)  # strips of 730 KB even in a cluster of 8
    assert _C.compress_plan(huge, 8, 2)[0] == "generic"
    assert _C.compress_plan(torch.empty(2, 3, 4, 5, 6), 8, 2)[0] == "generic"  # 3-D
    assert _C.compress_plan(torch.empty(2, 3, 8, 8), 8, 2, smem_limit=64)[0] == "generic"
    with pytest.raises(RuntimeError, match="staged kernel cannot take"):
        _C._compress_with(huge, as_seed(0, "cpu"), 8, 2, torch.bfloat16, "division", path="staged")


SPLIT_CASES = [  # (shape, layout, block, shared-memory limit that forces a split)
    ((2, 3, 40, 24), "contiguous", 8, 4096),
    ((1, 2, 37, 20), "contiguous", 4, 2048),  # a shorter last strip
    ((2, 8, 24, 16), "channels_last", 8, 8192),
    ((1, 16, 19, 12), "channels_last", 4, 4096),  # 16-byte pixel loads, a shorter last strip
    ((3, 1, 64, 9), "contiguous", 8, 2048),  # W not a multiple of 4: pairs, element walk
]


def check_split(shape: tuple, layout: str, block: int, limit: int, bits: int, device: str) -> None:
    """Planes split over a cluster of blocks (strips of whole LFC block rows and code words, the
    plane's range combined from every strip's) are bit-identical to the reference."""
    for dtype, mode in zip(DTYPES, MODES):
        x = make_input(shape, dtype, layout, device, seed=bits)
        s = as_seed(99 + bits, device)
        plan = _C.compress_plan(x, block, bits, smem_limit=limit)
        if plan[0] != "staged" or plan[6] < 2:
            continue  # this Q's strips cannot be whole words: checked below that some split
        ref = compress_reference(x, block, bits, torch.bfloat16, mode, s, memory_format_of(x))
        got = _C._compress_with(x, s, block, bits, torch.bfloat16, mode, path="staged", smem_limit=limit)
        for name, g, w in zip(("lfc", "codes", "lo", "step", "shift"), got, (ref.lfc, ref.codes, ref.lo, ref.step, ref.shift)):
            assert_identical(g, w, f"split {plan} {name}")
    x = make_input(shape, torch.float32, layout, device)
    assert _C.compress_plan(x, block, 2, smem_limit=limit)[6] >= 2, "the case does not split"


@needs_ext
@pytest.mark.parametrize("shape, layout, block, limit", SPLIT_CASES)
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_cpu_twin_split_planes(shape: tuple, layout: str, block: int, limit: int, bits: int) -> None:
    check_split(shape, layout, block, limit, bits, "cpu")


@needs_ext
def test_decompress_plans() -> None:
    """NCHW: word, a thread per code word, where planes are whole words (P % (32 / Q) == 0) of
    whole 16-byte stores and W and B are multiples of 4; else plane, a thread per plane, for planes
    of at most 256 bytes (7x7); else plane_words, planes staged whole and a thread per code word,
    where P % 4 == 0 and a plane is at most 6 KB (14x14); else vec, a 16-byte store per thread
    wherever N * C * P allows (a chunk may span planes), in runs of four where W and B allow;
    channels_last: 16-byte stores of channels straight from the codes where C allows (every
    ResNet-50 activation but the 3-channel input), else the transpose tile (4-D) or the generic
    kernel (5-D)."""
    for shape in [(2, 64, 112, 112), (2, 256, 56, 56), (2, 512, 28, 28), (2, 1024, 14, 14), (2, 2048, 7, 7)]:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            per16 = 16 // torch.empty(0, dtype=dtype).element_size()
            if shape[-1] in (112, 56, 28):  # P a multiple of 16
                assert _C.decompress_plan(list(shape), dtype, False, 8, 2) == ("word", 16, True)
            elif shape[-1] == 7:  # 98 or 196 bytes, one LFC block
                assert _C.decompress_plan(list(shape), dtype, False, 8, 2) == ("plane", 49, True)
            else:  # 14x14: W = 14, P = 196 not whole 16-code words
                assert _C.decompress_plan(list(shape), dtype, False, 8, 2) == ("plane_words", 16, False)
            assert _C.decompress_plan(list(shape), dtype, True, 8, 2) == ("channel", per16 * 16, True)
    assert _C.decompress_plan([2, 4, 56, 56], torch.float32, False, 8, 8) == ("word", 4, True)
    assert _C.decompress_plan([2, 4, 56, 56], torch.bfloat16, False, 8, 8) == ("vec", 8, True)  # a word is 8 bytes
    assert _C.decompress_plan([2, 4, 8, 6], torch.float32, False, 8, 2) == ("plane", 48, True)  # one block, W = 6
    assert _C.decompress_plan([2, 4, 16, 6], torch.float32, False, 16, 2) == ("plane_words", 16, False)  # 384 bytes
    assert _C.decompress_plan([2, 4, 8, 12], torch.float32, False, 6, 2) == ("plane_words", 16, False)  # B = 6
    assert _C.decompress_plan([2, 4, 40, 40], torch.float32, False, 6, 2) == ("vec", 4, False)  # 6400 bytes
    assert _C.decompress_plan([2, 4, 5, 15], torch.float32, False, 8, 2) == ("vec", 4, False)  # P % 4 != 0
    assert _C.decompress_plan([1, 3, 7, 7], torch.float32, False, 8, 2) == ("plane", 49, True)
    assert _C.decompress_plan([1, 3, 7, 7], torch.float32, False, 4, 2) == ("plane", 49, False)  # 4 blocks
    assert _C.decompress_plan([1, 3, 9, 9], torch.float32, False, 8, 2) == ("vec", 1, False)  # 324 bytes
    assert _C.decompress_plan([2, 3, 224, 224], torch.bfloat16, True, 8, 2) == ("tile", 1, True)
    assert _C.decompress_plan([2, 4, 9, 9], torch.float32, True, 8, 1) == ("channel", 128, True)
    assert _C.decompress_plan([2, 4, 9, 9], torch.bfloat16, True, 8, 1) == ("tile", 1, False)
    assert _C.decompress_plan([2, 4, 3, 9, 9], torch.bfloat16, True, 8, 1) == ("generic", 1, False)
    x = make_input((2, 12, 5, 5), torch.bfloat16, "channels_last", "cpu")
    ref = compress_reference(x, 8, 2, torch.bfloat16, "division", as_seed(0, "cpu"), torch.channels_last)
    with pytest.raises(RuntimeError, match="channel kernel writes channels_last outputs whose C"):
        _C._decompress_with(ref.lfc, ref.codes, ref.lo, ref.step, ref.shift, [2, 12, 5, 5], torch.bfloat16,
                            True, 8, 2, "division", path="channel")
    with pytest.raises(RuntimeError, match="word kernel writes NCHW outputs whose planes are whole code words"):
        _C._decompress_with(ref.lfc, ref.codes, ref.lo, ref.step, ref.shift, [2, 12, 5, 5], torch.bfloat16,
                            False, 8, 2, "division", path="word")


# (4, 6, 9, 10) takes the generic, vec, tile and plane decompress paths; (4, 8, 8, 16) the word,
# word_direct and channel paths (planes of whole code words, W and C multiples of 4)
SPECIAL_SHAPES = [(4, 6, 9, 10), (4, 8, 8, 16)]


def special_values(dtype: torch.dtype = torch.float32, shape: tuple[int, ...] = SPECIAL_SHAPES[0]) -> torch.Tensor:
    """Constant and zero planes (normalized range floored at TINY), values beyond float16 (a float16
    LFC clamps to 65504), infinities (non-finite planes), subnormal and tiny ranges (large shifts),
    and planes at the dtype's maximum, of both signs in one block (shift -126)."""
    g = torch.Generator().manual_seed(5)
    top = torch.finfo(dtype).max
    plane = shape[2:]
    x = torch.randn(*shape, generator=g) * 3
    x[0, 0] = 0.0
    x[0, 1] = 2.5
    x[0, 2, :4] = 7e4
    x[0, 3] = torch.randn(*plane, generator=g) * 1e-40
    x[0, 4] = 1 + torch.randn(*plane, generator=g) * 1e-6
    x[0, 5] = torch.randn(*plane, generator=g) * 1e-33
    x[1, 0, 2, 3] = math.inf
    x[1, 1, 4, 4] = -math.inf
    x[2, 0] = min(3e38, top)
    x[2, 1] = top * (1 - 2 * torch.rand(*plane, generator=g))
    x[2, 2, :, :5], x[2, 2, :, 5:] = top, -top
    x[2, 3] = top
    return x.to(dtype)


def check_nan_propagation(x: torch.Tensor, lfc_dtype: torch.dtype) -> None:
    """A NaN, or +inf and -inf in one LFC block: the same codes; NaN LFC, lo and step where the
    reference has them (NaN payloads may differ); the same reconstruction, NaN for NaN."""
    x = x.clone()
    x[3, 4, 5, 5] = math.nan
    x[1, 2, 0, 0], x[1, 2, 0, 1] = math.inf, -math.inf
    s = as_seed(5, x.device)
    ref = compress_reference(x, 8, 2, lfc_dtype, "division", s, torch.contiguous_format)
    for opt in compress_options(x):
        got = _C._compress_with(x, s, 8, 2, lfc_dtype, "division", **opt)
        assert_identical(got[1], ref.codes, f"codes {opt}")
        out = torch.ops.division.decompress(*got, list(x.shape), x.dtype, False, 8, 2, "division")
        assert_identical(got[4], ref.shift, f"shift {opt}")
        for g, w in ((got[0], ref.lfc), (got[2], ref.lo), (got[3], ref.step),
                     (out, decompress_reference(ref))):
            assert torch.equal(g.isnan(), w.isnan()) and g.isnan().any()
            assert torch.equal(g.nan_to_num(), w.nan_to_num())


@needs_ext
@pytest.mark.parametrize("lfc_dtype", LFC_DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SPECIAL_SHAPES)
def test_cpu_twin_on_special_values(shape: tuple[int, ...], lfc_dtype: torch.dtype, dtype: torch.dtype) -> None:
    x = special_values(dtype, shape)
    for mode, bits in itertools.product(MODES, [1, 2, 8]):
        check_against_reference(x, 8, bits, mode, lfc_dtype, seed=99)
    for layout in ("channels_last", "offset"):
        check_against_reference(make_like(x, layout), 4, 2, "division", lfc_dtype, seed=98)
    check_nan_propagation(x, lfc_dtype)


def make_like(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x's values in another layout (see make_input)."""
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    flat = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
    flat[1:] = x.reshape(-1)
    return flat[1:].view(x.shape)


@needs_ext
def test_hash_matches_hashing_uniforms() -> None:
    for seed in (0, 1, 0x0123_4567_89AB_CDEF, 2**63 - 1):
        for first in (0, 2**31 - 5, 2**32 - 2):
            assert torch.equal(_C._uniforms(seed, first, 3, 21), uniforms(as_seed(seed, "cpu"), first, 3, 21))


def check_first_plane(device: str) -> None:
    """Every compress kernel numbers plane (n, c) first_plane + n*C + c in the hash, high word
    included, as the reference does (a converted model's compressions share one seed this way)."""
    for shape, layout in (((3, 5, 12, 12), "contiguous"), ((2, 8, 9, 10), "channels_last"), ((2, 3, 40), "contiguous")):
        x = make_input(shape, torch.float32, layout, device)
        s = as_seed(5, device)
        planes = shape[0] * shape[1]
        for first in (7, 2**32 - 3, 2**63 - planes):
            ref = compress_reference(x, 4, 2, torch.bfloat16, "division", s, memory_format_of(x), first)
            for opt in compress_options(x, 4, 2):
                got = _C._compress_with(x, s, 4, 2, torch.bfloat16, "division", first_plane=first, **opt)
                assert_identical(got[1], ref.codes, f"{shape} {layout} first_plane={first} {opt}")
            op = torch.ops.division.compress(x, s, 4, 2, torch.bfloat16, "division", first)
            assert_identical(op[1], ref.codes, f"{shape} {layout} first_plane={first} op")
            assert not torch.equal(op[1], torch.ops.division.compress(x, s, 4, 2, torch.bfloat16, "division")[1])


@needs_ext
def test_cpu_twin_numbers_planes_from_first_plane() -> None:
    check_first_plane("cpu")


@needs_ext
def test_empty_batch_and_absent_parts() -> None:
    seed = as_seed(0, "cpu")
    x = torch.randn(0, 3, 5, 5)
    lfc, codes, lo, step, shift = torch.ops.division.compress(x, seed, 8, 2, torch.bfloat16, "division")
    assert lfc.shape == (0, 3, 1, 1) and codes.shape == (0, plane_bytes(25, 2))
    assert lo.shape == step.shape == shift.shape == (0, 3) and shift.dtype == torch.int8
    out = torch.ops.division.decompress(lfc, codes, lo, step, shift, [0, 3, 5, 5], torch.float32, False, 8, 2, "division")
    assert out.shape == (0, 3, 5, 5)
    y = torch.randn(2, 3, 4)
    parts = torch.ops.division.compress(y, seed, 8, 2, torch.bfloat16, "lfc_only")
    assert parts[0].shape == (2, 3, 1) and all(t.numel() == 0 for t in parts[1:])
    parts = torch.ops.division.compress(y, seed, 8, 2, torch.bfloat16, "hfc_only")
    assert parts[0].numel() == 0 and parts[1].shape == (6, 4)


@needs_ext
def test_ops_reject_bad_input_with_clear_messages() -> None:
    x = torch.randn(2, 3, 4, 4)
    s = as_seed(0, "cpu")
    compress = torch.ops.division.compress
    bad = [
        ((x, s, 8, 3, torch.bfloat16, "division"), "bits must be 1, 2, 4 or 8"),
        ((x.double(), s, 8, 2, torch.bfloat16, "division"), "unsupported dtype"),
        ((x, s, 8, 2, torch.bfloat16, "exact"), "mode 'exact' is not one of"),
        ((x, s, 8, 2, torch.int8, "division"), "LFC dtype must be"),
        ((x, s, 0, 2, torch.bfloat16, "division"), "block_size must be >= 1"),
        ((x, s.float(), 8, 2, torch.bfloat16, "division"), "seed must be a one-element int64"),
        ((torch.randn(4, 4), s, 8, 2, torch.bfloat16, "division"), "1 to 3 spatial dims"),
        ((torch.randn(2, 3, 0, 4), s, 8, 2, torch.bfloat16, "division"), "spatial sizes must be"),
        ((x, s, 8, 2, torch.bfloat16, "division", -1), "first_plane must be >= 0"),
    ]
    for args, message in bad:
        with pytest.raises(RuntimeError, match=message):
            compress(*args)
    parts = compress(x, s, 8, 2, torch.bfloat16, "division")
    none = torch.empty(0)
    decompress = torch.ops.division.decompress
    with pytest.raises(RuntimeError, match="do not match"):
        decompress(parts[0], none, none, none, none, [2, 3, 4, 4], torch.float32, False, 8, 2, "division")
    with pytest.raises(RuntimeError, match="do not match"):
        decompress(*parts, [2, 3, 4, 8], torch.float32, False, 8, 2, "division")
    with pytest.raises(RuntimeError, match="channels_last output needs a 4-D or 5-D"):
        decompress(*parts, [2, 3, 16], torch.float32, True, 8, 2, "division")
    with pytest.raises(RuntimeError, match="shift int8"):
        decompress(*parts[:4], parts[4].float(), [2, 3, 4, 4], torch.float32, False, 8, 2, "division")


def opcheck_cases(device: str) -> list[tuple]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 9, 10, generator=g).to(device)
    seed = as_seed(11, device)
    cases = []
    for mode, layout in itertools.product(MODES, ["contiguous", "channels_last"]):
        xi = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
        cases.append((torch.ops.division.compress.default, (xi, seed, 4, 2, torch.bfloat16, mode)))
        parts = torch.ops.division.compress(xi, seed, 4, 2, torch.bfloat16, mode)
        cases.append((torch.ops.division.decompress.default,
                      (*parts, list(x.shape), torch.float32, layout == "channels_last", 4, 2, mode)))
    return cases


@needs_ext
@pytest.mark.parametrize("case", range(12))
def test_opcheck_codec_ops(case: int) -> None:
    """Schema, fake (meta) implementation and tracing of the codec ops (torch.library.opcheck)."""
    op, args = opcheck_cases("cpu")[case]
    torch.library.opcheck(op, args)


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
@pytest.mark.parametrize("shape, block", WORD_SHAPES)
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_cuda_word_decompress(shape: tuple, block: int, bits: int) -> None:
    check_word(shape, block, bits, "cuda")


@pytest.mark.gpu
@needs_ext
@needs_gpu
@pytest.mark.parametrize("shape, block", PLANE_SHAPES)
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_cuda_plane_decompress(shape: tuple, block: int, bits: int) -> None:
    check_plane(shape, block, bits, "cuda")


@pytest.mark.gpu
@needs_ext
@needs_gpu
@pytest.mark.parametrize("shape, block", PLANE_WORDS_SHAPES)
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_cuda_plane_words_decompress(shape: tuple, block: int, bits: int) -> None:
    check_plane_words(shape, block, bits, "cuda")


@pytest.mark.gpu
@needs_ext
@needs_gpu
@pytest.mark.parametrize("lfc_dtype", LFC_DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SPECIAL_SHAPES)
def test_cuda_kernels_on_special_values(shape: tuple[int, ...], lfc_dtype: torch.dtype, dtype: torch.dtype) -> None:
    x = special_values(dtype, shape).cuda()
    for mode, bits in itertools.product(MODES, [1, 2, 8]):
        check_against_reference(x, 8, bits, mode, lfc_dtype, seed=99)
    for layout in ("channels_last", "offset"):
        check_against_reference(make_like(x, layout), 4, 2, "division", lfc_dtype, seed=98)
    check_nan_propagation(x, lfc_dtype)


@pytest.mark.gpu
@needs_ext
@needs_gpu
@pytest.mark.parametrize("shape", [(8, 64, 112, 112), (8, 256, 56, 56), (8, 512, 28, 28),
                                   (8, 1024, 14, 14), (8, 2048, 7, 7), (8, 3, 224, 224)])
def test_cuda_kernels_on_resnet50_shapes(shape: tuple) -> None:
    for dtype, layout in itertools.product([torch.float32, torch.bfloat16],
                                           ["contiguous", "channels_last"]):
        check_against_reference(make_input(shape, dtype, layout, "cuda"), 8, 2, "division",
                                torch.bfloat16, seed=2023)


@pytest.mark.gpu
@needs_ext
@needs_gpu
@pytest.mark.parametrize("shape, layout, block, limit", SPLIT_CASES)
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_cuda_split_planes(shape: tuple, layout: str, block: int, limit: int, bits: int) -> None:
    """The cluster kernel (distributed shared memory between the strips' blocks) on the device."""
    check_split(shape, layout, block, limit, bits, "cuda")


@pytest.mark.gpu
@needs_ext
@needs_gpu
@pytest.mark.parametrize("case", range(12))
def test_opcheck_codec_ops_on_cuda(case: int) -> None:
    op, args = opcheck_cases("cuda")[case]
    torch.library.opcheck(op, args)


@pytest.mark.gpu
@needs_ext
@needs_gpu
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_public_api_kernels_equal_torch_backend(layout: str) -> None:
    x = make_input((4, 16, 20, 20), torch.bfloat16, layout, "cuda")
    fast = division.compress(x, division.DivisionConfig(backend="cuda"), seed=3)
    slow = division.compress(x, division.DivisionConfig(backend="torch"), seed=3)
    assert fast.backend == "kernels" and slow.backend == "torch"
    for name in ("lfc", "codes", "lo", "step", "shift"):
        assert_identical(getattr(fast, name), getattr(slow, name), name)
    out = division.decompress(fast)
    assert_identical(out, decompress_reference(slow), "decompress")
    assert out.is_contiguous(memory_format=memory_format_of(x))


@pytest.mark.gpu
@needs_ext
@needs_gpu
def test_cuda_kernels_number_planes_from_first_plane() -> None:
    check_first_plane("cuda")


@pytest.mark.gpu
@needs_ext
@needs_gpu
def test_seed_is_drawn_on_the_device_without_a_sync() -> None:
    """The default seed comes from the CUDA generator (no .item()): compress and decompress never
    synchronize, give the same codes under manual_seed, and can be captured in a CUDA graph whose
    replays draw fresh seeds."""
    x = make_input((4, 8, 16, 16), torch.float32, "contiguous", "cuda")
    cfg = division.DivisionConfig(backend="cuda")
    division.decompress(division.compress(x, cfg))  # first call: lazy initialisation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        torch.manual_seed(5)
        a = division.compress(x, cfg)
        division.decompress(a)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.manual_seed(5)
    assert torch.equal(a.codes, division.compress(x, cfg).codes)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        division.compress(x, cfg)  # warm-up outside the capture
        with torch.cuda.graph(graph, stream=stream):
            packed = division.compress(x, cfg)
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    first = packed.codes.clone()
    graph.replay()
    assert not torch.equal(first, packed.codes)  # a new seed per replay (the philox offset advances)


@pytest.mark.gpu
@pytest.mark.slow
@needs_ext
@needs_gpu
def test_cuda_plane_indices_beyond_2_32() -> None:
    """More than 2^32 planes is out of reach; plane indices past 2^31 and element offsets past 2^32
    (int64 addressing) are not: 2^31 + 2^20 one-element planes."""
    free, _ = torch.cuda.mem_get_info()
    if free < 40 * 2**30:
        pytest.skip(f"needs 40 GiB of free GPU memory, {free / 2**30:.0f} GiB free")
    n = 2**31 + 2**20
    x = torch.randn(n, 1, 1, device="cuda", dtype=torch.bfloat16)
    seed = as_seed(2**62 + 12345, "cuda")
    got = torch.ops.division.compress(x, seed, 8, 2, torch.bfloat16, "division")
    tail = slice(n - 2**20, n)
    ref = compress_reference(x[tail], 8, 2, torch.bfloat16, "division", seed, torch.contiguous_format)
    # the reference's plane indices restart at 0 for the slice: compare what does not hash
    assert torch.equal(got[0][tail], ref.lfc)
    assert torch.equal(got[2].view(-1)[tail], ref.lo.view(-1))
    out = torch.ops.division.decompress(*got, [n, 1, 1], x.dtype, False, 8, 2, "division")
    err = (out[tail].float() - x[tail].float()).abs()
    assert (err <= got[3].view(n, 1, 1)[tail] * 1.001 + 1e-6).all()


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
