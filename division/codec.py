"""`compress` / `decompress`: validation and dispatch to the reference or the CUDA kernels."""

from __future__ import annotations

import math

import torch

from .backend import load_extension, select_backend
from .config import DivisionConfig
from .format import MODES, SUPPORTED_DTYPES, CompressedActivation, memory_format_of
from .hashing import draw_seed
from .reference import compress_reference, decompress_reference

MAX_KERNEL_PLANE = 2**31 - 64  # elements of one (n, c) plane the CUDA kernels accept


def check_input(x: object, what: str = "division.compress") -> torch.Tensor:
    """Reject what the codec cannot represent, saying what would be accepted."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{what}: unsupported dtype {x.dtype}; DIVISION compresses float32, float16 and "
            "bfloat16 activations (cast the input, or use backward_mode='exact')"
        )
    if not 3 <= x.dim() <= 5:
        raise ValueError(
            f"{what}: expected an (N, C, *spatial) tensor with 1 to 3 spatial dims, got shape "
            f"{tuple(x.shape)}"
        )
    if any(s == 0 for s in x.shape[2:]):
        raise ValueError(f"{what}: spatial sizes must be positive, got shape {tuple(x.shape)}")
    return x


def compress(
    x: torch.Tensor, cfg: DivisionConfig, *, seed: int | None = None, mode: str | None = None
) -> CompressedActivation:
    """Compress an (N, C, *spatial) activation as the format in `format.py` describes.

    `mode` defaults to cfg.backward_mode; `seed` (0 <= seed < 2^63) to a draw from torch's CPU
    generator. The result holds no reference to x except in "exact" mode.
    """
    check_input(x)
    mode = cfg.backward_mode if mode is None else mode
    if mode not in MODES:
        raise ValueError(f"division.compress: mode={mode!r} is not one of division, exact, lfc_only, hfc_only")
    if seed is None:
        seed = draw_seed()
    elif not 0 <= seed < 2**63:
        raise ValueError(f"division.compress: seed={seed} must be in [0, 2^63)")
    fmt = memory_format_of(x)
    # the kernels index within a plane in 32 bits; a single (n, c) plane that large takes the reference
    small_planes = math.prod(x.shape[2:]) < MAX_KERNEL_PLANE
    if select_backend(x, cfg) == "cuda" and mode != "exact" and small_planes:
        module, _ = load_extension()
        lfc, codes, lo, step = module.compress(
            x, cfg.block_size, cfg.hfc_bits, cfg.lfc_torch_dtype, mode, seed
        )
        return CompressedActivation(
            x.shape, x.dtype, fmt, cfg.block_size, cfg.hfc_bits, mode, lfc, codes, lo, step,
            backend="cuda",
        )
    return compress_reference(x, cfg.block_size, cfg.hfc_bits, cfg.lfc_torch_dtype, mode, seed, fmt)


def decompress(packed: CompressedActivation) -> torch.Tensor:
    """Rebuild x (LFC + dequantized HFC) with x's shape, dtype and memory format."""
    if not isinstance(packed, CompressedActivation):  # another codec's record (groupquant.py)
        return packed.decompress()
    if packed.mode != "exact" and packed.device.type == "cuda" and packed.backend == "cuda":
        module, _ = load_extension()
        if module is not None:
            return module.decompress(
                packed.lfc, packed.codes, packed.lo, packed.step, list(packed.shape),
                packed.dtype, packed.memory_format == torch.contiguous_format,
                packed.block_size, packed.bits, packed.mode,
            )
    return decompress_reference(packed)
