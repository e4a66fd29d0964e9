"""Pure-PyTorch reference codec: the executable definition of the bit format in `format.py`.

Runs on any device. It is the fallback when the CUDA extension is absent and the spec the kernels
are tested against, so every operation below mirrors one line of the format description; change
one and you change the format. Work is done a few samples at a time so that the float64 and int64
temporaries stay bounded for large activations.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .format import (
    FLT_MAX,
    SHIFT_MAX,
    SHIFT_MIN,
    TINY,
    CompressedActivation,
    block_shape,
    lfc_shape,
    plane_bytes,
)
from .hashing import uniforms

CHUNK_ELEMENTS = 1 << 24  # elements processed per piece


def _sample_chunks(n: int, per_sample: int) -> list[tuple[int, int]]:
    step = max(1, CHUNK_ELEMENTS // max(per_sample, 1))
    return [(i, min(n, i + step)) for i in range(0, n, step)]


def block_means(x: torch.Tensor, blocks: tuple[int, ...]) -> torch.Tensor:
    """float64 means of aligned blocks, partial edge blocks averaging what they cover (NaN or +-inf
    where a block holds a non-finite value)."""
    spatial = tuple(x.shape[2:])
    nblocks = tuple(math.ceil(s / b) for s, b in zip(spatial, blocks))
    pads: list[int] = []
    for s, b, nb in reversed(list(zip(spatial, blocks, nblocks))):
        pads += [0, nb * b - s]
    xd = F.pad(x.double(), pads) if any(pads) else x.double()
    view_shape = list(x.shape[:2])
    for nb, b in zip(nblocks, blocks):
        view_shape += [nb, b]
    sums = xd.reshape(view_shape).sum(dim=tuple(3 + 2 * d for d in range(len(spatial))))
    counts = torch.ones((), dtype=torch.float64, device=x.device)
    for d, (s, b, nb) in enumerate(zip(spatial, blocks, nblocks)):
        cnt = (s - torch.arange(nb, device=x.device, dtype=torch.float64) * b).clamp(max=b)
        shape = [1] * len(spatial)
        shape[d] = nb
        counts = counts * cnt.view(shape)
    return sums / counts


def round_lfc(means: torch.Tensor, lfc_dtype: torch.dtype) -> torch.Tensor:
    """The stored LFC: NaN for a non-finite block, else float32, clamped to the dtype, rounded."""
    top = torch.finfo(lfc_dtype).max
    rounded = means.float().clamp(-top, top).to(lfc_dtype)
    return torch.where(means.isfinite(), rounded, torch.full_like(rounded, math.nan))


def power_of_two(e: torch.Tensor) -> torch.Tensor:
    """float32 2^e for integer e in [-127, 127], exact (built from its bits: no pow rounding)."""
    e = e.to(torch.int32)
    normal = ((e + 127).clamp(min=1) << 23).view(torch.float32)
    return torch.where(e >= -126, normal, torch.full_like(normal, 2.0**-127))


def scale_by_power_of_two(v: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """float64 v * 2^e, exact for |e| <= 1022 (2^e built from its bits)."""
    return v * ((e.to(torch.int64) + 1023) << 52).view(torch.float64)


def plane_shift(r_d: torch.Tensor) -> torch.Tensor:
    """The shift e with r_d * 2^e in [1, 2) (clamped to [SHIFT_MIN, SHIFT_MAX]); 0 where r_d is 0
    or not finite."""
    _, k = torch.frexp(r_d)
    e = (1 - k).clamp(SHIFT_MIN, SHIFT_MAX)
    return torch.where((r_d > 0) & r_d.isfinite(), e, torch.zeros_like(e))


def upsample_blocks(lfc: torch.Tensor, spatial: tuple[int, ...], blocks: tuple[int, ...]) -> torch.Tensor:
    """Nearest upsampling by block: element j of a dim reads block j // b."""
    up = lfc.float()
    for d, (s, b) in enumerate(zip(spatial, blocks)):
        idx = torch.arange(s, device=lfc.device) // b
        up = up.index_select(2 + d, idx)
    return up


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (planes, P) in [0, 2^bits) -> packed uint8 (planes, plane_bytes)."""
    planes, numel = codes.shape
    nbytes = plane_bytes(numel, bits)
    per_byte = 8 // bits
    padded = F.pad(codes, (0, nbytes * per_byte - numel)) if nbytes * per_byte != numel else codes
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    fields = padded.view(planes, nbytes, per_byte) << shifts
    return fields.sum(dim=2, dtype=torch.uint8)  # fields do not overlap: sum == bitwise or


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """packed uint8 (planes, plane_bytes) -> uint8 codes (planes, numel)."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    fields = (packed.unsqueeze(2) >> shifts) & ((1 << bits) - 1)
    return fields.reshape(packed.shape[0], -1)[:, :numel]


def quantize(t: torch.Tensor, levels: int) -> torch.Tensor:
    """uint8 floor(clamp(t, 0, levels)), NaN -> 0 (fmax/fmin return the non-NaN operand)."""
    zero = t.new_zeros(())
    return torch.fmin(torch.fmax(t, zero), zero + levels).floor_().to(torch.uint8)


def compress_reference(
    x: torch.Tensor, block_size: int, bits: int, lfc_dtype: torch.dtype, mode: str,
    seed: torch.Tensor, memory_format: torch.memory_format, first_plane: int = 0,
) -> CompressedActivation:
    """Compress a validated (N, C, *S) float tensor; see format.py for every step.

    `seed` is a 0-d int64 tensor on x's device (hashing.as_seed / draw_seed); plane (n, c) is
    plane first_plane + n*C + c of the hash.
    """
    shape = x.shape
    record = CompressedActivation(shape, x.dtype, memory_format, block_size, bits, mode)
    if mode == "exact":
        record.raw = x
        return record
    n, c = shape[0], shape[1]
    spatial = tuple(shape[2:])
    numel = math.prod(spatial)
    blocks = block_shape(spatial, block_size)
    levels = (1 << bits) - 1
    keep_lfc = mode in ("division", "lfc_only")
    keep_hfc = mode in ("division", "hfc_only")
    lfc = torch.empty((n, c, *lfc_shape(spatial, block_size)), dtype=lfc_dtype, device=x.device)
    if keep_hfc:
        codes = torch.empty((n * c, plane_bytes(numel, bits)), dtype=torch.uint8, device=x.device)
        lo_all = torch.empty((n, c), dtype=torch.float32, device=x.device)
        step_all = torch.empty((n, c), dtype=torch.float32, device=x.device)
        shift_all = torch.empty((n, c), dtype=torch.int8, device=x.device)
    spatial_dims = tuple(range(2, 2 + len(spatial)))
    expand = (...,) + (None,) * len(spatial)
    for n0, n1 in _sample_chunks(n, c * numel):
        xs = x[n0:n1].float()
        lfc_chunk = round_lfc(block_means(xs, blocks), lfc_dtype)
        lfc[n0:n1] = lfc_chunk
        if not keep_hfc:
            continue
        up = upsample_blocks(lfc_chunk, spatial, blocks)
        h_d = xs.double() - up.double()
        lo_d, hi_d = h_d.amin(dim=spatial_dims) + 0.0, h_d.amax(dim=spatial_dims)  # -0 -> +0
        finite = lfc_chunk.isfinite().flatten(2).all(dim=2)  # a non-finite plane has a NaN block
        r_d = hi_d - lo_d
        e = torch.where(finite, plane_shift(r_d), torch.zeros_like(r_d, dtype=torch.int32))
        lo = scale_by_power_of_two(lo_d, e).float()
        r = scale_by_power_of_two(r_d, e).float().clamp(TINY, FLT_MAX)
        scale = torch.full_like(r, levels) / r  # a true division: `levels / r` is r.reciprocal() * levels
        nan = torch.full_like(r, math.nan)
        lo_all[n0:n1] = torch.where(finite, lo, nan)
        step_all[n0:n1] = torch.where(finite, r / torch.full_like(r, levels), nan)  # true division too
        shift_all[n0:n1] = e.to(torch.int8)
        p = power_of_two(e)[expand]
        v = (((xs * p) - (up * p)) - lo[expand]) * scale[expand]
        v = torch.where(finite[expand], v, torch.full_like(v, math.nan))  # codes 0
        u = uniforms(seed, first_plane + n0 * c, (n1 - n0) * c, numel).view(v.shape)
        code = quantize(v + u, levels)
        codes[n0 * c : n1 * c] = pack_codes(code.reshape((n1 - n0) * c, numel), bits)
    if keep_lfc:
        record.lfc = lfc
    if keep_hfc:
        record.codes, record.lo, record.step, record.shift = codes, lo_all, step_all, shift_all
    return record


def decompress_reference(packed: CompressedActivation) -> torch.Tensor:
    """Rebuild the input from a record, in its dtype and memory format."""
    if packed.mode == "exact":
        return packed.raw
    shape = packed.shape
    n, c = shape[0], shape[1]
    spatial = tuple(shape[2:])
    numel = math.prod(spatial)
    blocks = block_shape(spatial, packed.block_size)
    top = torch.finfo(packed.dtype).max
    out = torch.empty(shape, dtype=packed.dtype, device=packed.device).contiguous(
        memory_format=packed.memory_format
    )
    expand = (...,) + (None,) * len(spatial)
    for n0, n1 in _sample_chunks(n, c * numel):
        x_hat = None
        if packed.mode in ("division", "hfc_only"):
            code = unpack_codes(packed.codes[n0 * c : n1 * c], packed.bits, numel)
            code = code.to(torch.float32).view(n1 - n0, c, *spatial)
            q = power_of_two(-packed.shift[n0:n1].to(torch.int32))[expand]
            x_hat = (code * packed.step[n0:n1][expand] + packed.lo[n0:n1][expand]) * q
        if packed.mode in ("division", "lfc_only"):
            up = upsample_blocks(packed.lfc[n0:n1], spatial, blocks)
            x_hat = up if x_hat is None else up + x_hat
        out[n0:n1] = x_hat.clamp(-top, top)  # NaN stays NaN
    return out
