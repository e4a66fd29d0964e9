"""Counter-based uniform random numbers that PyTorch ops and CUDA kernels compute bit for bit alike.

Stochastic rounding needs one uniform per element. Drawing them from a hash of (seed, plane,
element) instead of a stateful generator lets the CUDA kernels reproduce the reference exactly and
lets the reference run on any device. The formula is in `format.py`.

The seed is a 0-d int64 tensor on the activation's device, drawn from that device's generator
without a host sync (and so safe under CUDA graph capture); every key and hash below is computed
with tensor ops from it. torch has no usable uint32 arithmetic, so 32-bit words live in int64
tensors; the multipliers are below 2^31, so a product of a 32-bit word never overflows int64 and one
mask gives it mod 2^32.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
MUL1 = 0x21F0AAAD  # both multipliers < 2^31: (x * MUL) of a 32-bit x fits in int64
MUL2 = 0x735A2D97
U16_SCALE = 2.0**-16
U16_HALF = 2.0**-17  # uniforms are the midpoints of 2^16 equal intervals of [0, 1)
SEED_HIGH = 2**63 - 1  # seeds are drawn from [0, 2^63 - 1)
PIECE_PAIRS = 1 << 20  # element pairs hashed per piece


def mix32(x: torch.Tensor) -> torch.Tensor:
    """The 32-bit permutation of format.py on int64 words (a new tensor)."""
    x = x ^ (x >> 16)
    x = (x * MUL1) & MASK32
    x = x ^ (x >> 15)
    x = (x * MUL2) & MASK32
    return x ^ (x >> 15)


def mix32_int(x: int) -> int:
    """The same permutation on a Python int (for tests of the formula)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * MUL1) & MASK32
    x ^= x >> 15
    x = (x * MUL2) & MASK32
    return x ^ (x >> 15)


def as_seed(seed: int | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A 0-d int64 seed tensor on `device`; ints are checked to lie in [0, 2^63)."""
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1:
            raise ValueError(f"seed tensor must hold one int64, got {seed.dtype} of shape {tuple(seed.shape)}")
        if seed.dim() == 0 and seed.device == torch.device(device):
            return seed  # as drawn: no view op per compression
        return seed.reshape(()).to(device)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed={seed!r} must be an integer in [0, 2^63)")
    return torch.tensor(seed, dtype=torch.int64, device=device)


def draw_seed(device: torch.device | str = "cpu") -> torch.Tensor:
    """A seed from `device`'s default generator: reproducible under torch.manual_seed, no sync."""
    return torch.randint(0, SEED_HIGH, (), dtype=torch.int64, device=device)


KEY_PROBES = 256  # elements of a tensor its content key reads
KEY_STRIDE = 2654435761  # probe k reads element (k * KEY_STRIDE) mod numel, in logical order
SEED_MASK = 2**63 - 1


def content_seed(seed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`seed` mixed with a key of x's content: the bits of KEY_PROBES elements spread over x
    (logical order, so x's layout does not matter; no copy of x), weighted by odd constants and
    summed mod 2^64. Pure tensor ops of (seed, x): under torch.compile two compressions of one
    tensor get the same seed, and so the same record, which the graph's common-subexpression
    elimination keeps once; tensors whose probed elements differ get different seeds."""
    if x.numel() == 0 or x.element_size() not in (2, 4):
        return seed  # nothing to key (the codec rejects such inputs itself)
    probes = torch.arange(KEY_PROBES, dtype=torch.int64, device=x.device)
    values = torch.take(x.detach(), probes * KEY_STRIDE % x.numel())
    bits = values.view(torch.int32 if x.element_size() == 4 else torch.int16).to(torch.int64) & MASK32
    key = (bits * (probes * 2 + 1) * MUL1).sum()  # wraps mod 2^64
    return (seed ^ key) & SEED_MASK


def plane_keys(seed: torch.Tensor, first_plane: int, count: int) -> torch.Tensor:
    """int64 (count,) keys K_p of planes first_plane .. first_plane+count-1 (format.py)."""
    # first_plane + arange: the end of arange(first, first + count) may be 2^63, past int64
    p = torch.arange(count, dtype=torch.int64, device=seed.device) + first_plane
    k = mix32((seed >> 32) ^ (p >> 32))
    k = mix32(k ^ (seed & MASK32))
    return mix32(k ^ (p & MASK32))


def uniforms(seed: torch.Tensor, first_plane: int, planes: int, numel: int) -> torch.Tensor:
    """float32 (planes, numel) uniforms of elements 0..numel-1 of planes first_plane.. (format.py).

    One hash gives the uniforms of an element pair (2m, 2m+1): its low 16 bits the even one's,
    its high 16 bits the odd one's. Computed a few planes at a time, so that the int64 temporaries
    stay small next to the float32 result.
    """
    out = torch.empty((planes, numel), dtype=torch.float32, device=seed.device)
    pairs = torch.arange((numel + 1) // 2, dtype=torch.int64, device=seed.device)
    step = max(1, PIECE_PAIRS // max(1, pairs.numel()))
    for p0 in range(0, planes, step):
        p1 = min(planes, p0 + step)
        h = mix32(pairs ^ plane_keys(seed, first_plane + p0, p1 - p0).unsqueeze(1))
        k = torch.stack((h & 0xFFFF, h >> 16), dim=2).view(p1 - p0, -1)[:, :numel]
        out[p0:p1] = k
    return out.mul_(U16_SCALE).add_(U16_HALF)
