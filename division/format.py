"""The DIVISION bit format (version 3): the one place that defines what a compressed activation is.

Both backends (the pure-PyTorch reference in `reference.py` and the CUDA kernels in `cuda_ext/`)
produce and consume exactly this layout; for the same seed their outputs are bit-identical except
where the LFC block sums round differently (see "LFC" below).

An activation x of shape (N, C, *S), S = 1 to 3 spatial sizes, is split into N*C *planes*; plane
p = n*C + c holds the P = prod(S) elements of x[n, c] in row-major order of S, whatever x's memory
format.

LFC (low-frequency component)
    Block size per spatial dim d: b_d = min(B, S_d); blocks per dim: L_d = ceil(S_d / b_d). Block j
    covers elements [j*b_d, min((j+1)*b_d, S_d)) in that dim, so blocks align with the upsampling
    and a partial last block averages only the elements it covers. The block mean is the float64
    sum of the float32-converted elements divided by their count. A block holding a NaN or an
    infinity has a non-finite sum: its LFC is NaN. Otherwise the mean is rounded to float32, clamped
    to the finite range of the LFC dtype and rounded to it. `lfc` is a contiguous (N, C, *L) tensor.
    Float64 sums of at most 512 float32 values are exact unless the block's magnitudes span more
    than ~2^23, so summation order (which differs between backends) almost never changes a bit.

Non-finite planes: a plane with a NaN LFC block (it holds a NaN or an infinity) stores lo = step =
NaN, shift 0 and codes 0: it reconstructs as NaN everywhere (in lfc_only mode, its non-finite
blocks do), so the gradients it feeds are non-finite, as stock's would be, and GradScaler sees it.

HFC (high-frequency component) of a finite plane, changed in version 3 so that no finite input
overflows and tiny ranges keep their precision: the plane is quantized in a power-of-two scaled
domain where its range lies in [1, 2). Per plane in float64, per element in float32, every
operation rounded on its own:
    up[i]   = float32(lfc[block of i])                     (nearest upsampling by block)
    lo_d    = min over the plane of float64(x[i]) - float64(up[i]), plus 0.0 (-0 -> +0);
    hi_d    = the max;  r_d = hi_d - lo_d
    shift e = 1 - k for r_d = m * 2^k, m in [0.5, 1) (frexp), clamped to [-126, 127]; 0 if r_d = 0
    p       = 2^e (float32, exact);  lo = float32(lo_d * 2^e);  r = clamp(float32(r_d * 2^e), TINY, FLT_MAX)
    scale   = (2^Q - 1) / r ;  step = r / (2^Q - 1)        (float32, one each per plane)
    v[i]    = ((x[i] * p - up[i] * p) - lo) * scale
    code[i] = floor(fmin(fmax(v[i] + u[i], 0), 2^Q - 1))   (unbiased stochastic rounding; NaN -> 0)
    `lo`, `step` are stored as float32 (N, C) tensors, `shift` as an int8 (N, C) tensor. Rounding
    is monotone, so lo_d and hi_d are also min/max over the LFC blocks of float64(min or max of x
    in the block) - float64(up): the kernels take them that way, in the same pass as the sums.

Random numbers (changed in version 2, so that a hash serves two elements and no per-element
64-bit arithmetic is needed): with s0, s1 the low and high 32-bit words of the 63-bit seed and p0,
p1 those of the plane index p, each plane has a key
    K_p  = mix32(mix32(mix32(s1 ^ p1) ^ s0) ^ p0)
element q of plane p takes a 16-bit half of the hash of its pair m = q >> 1:
    H    = mix32(m ^ K_p);  k = H & 0xFFFF for even q, H >> 16 for odd q
    u[i] = k * 2^-16 + 2^-17                            (in (0, 1); exact in float32)
    mix32(x): x ^= x >> 16; x *= 0x21F0AAAD; x ^= x >> 15; x *= 0x735A2D97; x ^= x >> 15
(all mod 2^32; mix32 is a permutation of 32-bit words with TheIronBorn's constants from Wellons'
hash-prospector). u takes the midpoints of 2^16 equal intervals, so E[code] differs from v by at
most 2^-17 of a step: unbiased far below float32 rounding of the reconstruction. The seed is a
0-d int64 tensor drawn from the activation's device generator (no host sync, safe under CUDA graph
capture), so `torch.manual_seed` makes runs reproducible; pass `seed=` to compare backends. The
plane index is p = first_plane + n*C + c: 0-based for a single `compress` call; a converted model
draws one seed per forward and gives each compression the next range of plane indices
(compressor.py), so no two planes of a forward share a key. Under torch.compile it numbers every
tensor's planes from 0 under the forward's seed mixed with a key of the tensor's content
(hashing.content_seed), so that a tensor read twice is compressed once; two tensors share keys
only if the 256 elements the key reads are bit for bit the same.

Codes: `codes` is a uint8 tensor of shape (N*C, plane_bytes). Within a plane, the code of element q
occupies bits [(Q*q) mod 8, (Q*q) mod 8 + Q) of byte (Q*q) div 8 (little-endian bit order, so a
plane read as 32-bit little-endian words has code q at bit (Q*q) mod 32 of word (Q*q) div 32).
plane_bytes = ceil(P*Q/8) rounded up to a multiple of 4, so every plane starts on a 32-bit word and
one thread block can own whole planes; padding bits are zero.

Reconstruction (float32), with q = 2^-e (exact), then clamped to the finite range of x's dtype
(NaN stays NaN: a finite plane never reconstructs to an infinity) and cast to it and its layout:
    division: x_hat[i] = up[i] + ((code[i] * step + lo) * q)
    lfc_only: x_hat[i] = up[i]
    hfc_only: x_hat[i] = (code[i] * step + lo) * q
    exact:    the input itself is kept (`raw`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import torch

FORMAT_VERSION = 3  # the compiled kernels must report the same (backend.load_extension)
TINY = 1e-30  # floor of a plane's normalized range: keeps scale finite when max == min
SHIFT_MIN, SHIFT_MAX = -126, 127  # 2^shift and 2^-shift are exact float32 values
FLT_MAX = torch.finfo(torch.float32).max
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MODES = ("division", "exact", "lfc_only", "hfc_only")


def block_shape(spatial: tuple[int, ...], block_size: int) -> tuple[int, ...]:
    """Per-dimension block sides: a dimension smaller than B gets one block covering it."""
    return tuple(min(block_size, s) for s in spatial)


def lfc_shape(spatial: tuple[int, ...], block_size: int) -> tuple[int, ...]:
    return tuple(math.ceil(s / b) for s, b in zip(spatial, block_shape(spatial, block_size)))


def plane_bytes(plane_numel: int, bits: int) -> int:
    """Bytes per plane of packed codes, padded to a 32-bit word."""
    return (plane_numel * bits + 31) // 32 * 4


PLANE_CONSTANT_BYTES = 9  # lo and step (float32) and shift (int8) of each plane


@lru_cache(maxsize=1024)
def division_plane_bytes(spatial: tuple[int, ...], block_size: int, bits: int, lfc_dtype: torch.dtype) -> int:
    """Bytes a division-mode record holds per (n, c) plane of this spatial shape: its LFC blocks,
    its packed codes and its constants (cached: converted layers ask on every call)."""
    lfc = math.prod(lfc_shape(spatial, block_size)) * torch.finfo(lfc_dtype).bits // 8
    return lfc + plane_bytes(math.prod(spatial), bits) + PLANE_CONSTANT_BYTES


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """The layout decompress must give back: channels_last only when x is that and not plain."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


@dataclass
class CompressedActivation:
    """What a layer keeps of its input for backward.

    Tensors absent in a mode are None: `lfc` in hfc_only, the HFC parts (codes, lo, step, shift) in
    lfc_only, all but `raw` in exact. `nbytes` counts the bytes of the tensors held.
    """

    shape: torch.Size
    dtype: torch.dtype
    memory_format: torch.memory_format
    block_size: int
    bits: int
    mode: str
    lfc: torch.Tensor | None = None
    codes: torch.Tensor | None = None
    lo: torch.Tensor | None = None
    step: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    raw: torch.Tensor | None = None
    backend: str = field(default="torch", compare=False)

    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        return (self.lfc, self.codes, self.lo, self.step, self.shift, self.raw)

    def with_tensors(self, tensors: tuple[torch.Tensor | None, ...]) -> CompressedActivation:
        """The same record over other tensor objects (those autograd hands back from saving)."""
        lfc, codes, lo, step, shift, raw = tensors
        return CompressedActivation(
            self.shape, self.dtype, self.memory_format, self.block_size, self.bits, self.mode,
            lfc, codes, lo, step, shift, raw, self.backend,
        )

    @property
    def quantization_step(self) -> torch.Tensor:
        """Each plane's quantization step in x's units, float64 (N, C): step * 2^-shift."""
        return self.step.double() * torch.exp2(-self.shift.double())  # exact: 2^-shift in float64

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors() if t is not None)

    @property
    def device(self) -> torch.device:
        return next(t for t in self.tensors() if t is not None).device

    @property
    def spatial(self) -> tuple[int, ...]:
        return tuple(self.shape[2:])

    @property
    def num_planes(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def plane_numel(self) -> int:
        return math.prod(self.spatial)
