"""Counter-based uniform random numbers that PyTorch ops and CUDA kernels compute bit for bit alike.

Stochastic rounding needs one uniform per element. Drawing them from a hash of (seed, element
index) instead of a stateful generator lets the CUDA kernels reproduce the reference exactly, and
lets the reference run on any device. The formula is in `format.py`.

torch has no usable uint32 arithmetic, so 32-bit words live in int64 tensors; the multipliers are
below 2^31, so a product of a 32-bit word never overflows int64 and one mask gives it mod 2^32.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
MUL1 = 0x21F0AAAD  # both multipliers < 2^31: (x * MUL) of a 32-bit x fits in int64
MUL2 = 0x735A2D97
U24_SCALE = 2.0**-24
PIECE_CPU = 1 << 16  # int64 words per piece: fits in L2
PIECE_OTHER = 1 << 22


def mix32_(x: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """The 32-bit permutation of format.py, in place on int64 words; `tmp` is scratch space."""
    for shift, mul in ((16, MUL1), (15, MUL2)):
        torch.bitwise_right_shift(x, shift, out=tmp)
        x.bitwise_xor_(tmp).mul_(mul).bitwise_and_(MASK32)
    torch.bitwise_right_shift(x, 15, out=tmp)
    return x.bitwise_xor_(tmp)


def mix32_int(x: int) -> int:
    """The same permutation on a Python int (for per-call keys)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * MUL1) & MASK32
    x ^= x >> 15
    x = (x * MUL2) & MASK32
    return x ^ (x >> 15)


def stream_key(seed: int, index_hi: int) -> int:
    """Per-call key for the 2^32-element range whose high index word is `index_hi`.

    The outer mix32 scrambles the seed's low word, so consecutive seeds (0, 1, 2, ...) give
    unrelated streams instead of the same few hashes in another order.
    """
    return mix32_int(mix32_int((seed >> 32) ^ index_hi) ^ (seed & MASK32))


def uniform(seed: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 uniforms in [0, 1) for global element indices start .. start+count-1.

    Works in place on reused pieces: fresh multi-megabyte int64 temporaries per op made this
    fifty times slower on a CPU.
    """
    device = torch.device(device)
    out = torch.empty(count, dtype=torch.float32, device=device)
    piece = PIECE_CPU if device.type == "cpu" else PIECE_OTHER
    words = torch.empty(min(piece, count), dtype=torch.int64, device=device)
    tmp = torch.empty_like(words)
    pos = 0
    while pos < count:
        first = start + pos
        hi = first >> 32  # the key changes at every 2^32 boundary of the index
        n = min(piece, count - pos, ((hi + 1) << 32) - first)
        x, t = words[:n], tmp[:n]
        torch.arange(first & MASK32, (first & MASK32) + n, out=x)
        x.bitwise_xor_(stream_key(seed, hi))
        mix32_(mix32_(x, t), t).bitwise_right_shift_(8)
        out[pos : pos + n].copy_(x).mul_(U24_SCALE)
        pos += n
    return out


def draw_seed(generator: torch.Generator | None = None) -> int:
    """A 63-bit seed from torch's CPU generator: reproducible under torch.manual_seed, no sync."""
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64, generator=generator).item())
