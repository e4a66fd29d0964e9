"""`compress` / `decompress`: validation and dispatch to the compiled ops or the reference."""

from __future__ import annotations

import math

import torch

from .backend import select_backend
from .config import DivisionConfig
from .format import MODES, SUPPORTED_DTYPES, CompressedActivation, memory_format_of
from .hashing import as_seed, draw_seed
from .reference import compress_reference, decompress_reference

MAX_KERNEL_PLANE = 2**31 - 64  # elements of one (n, c) plane the kernels accept
PLANE_INDEX_END = 2**63  # the hash's plane indices are below this (int64 in the reference)


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


def check_first_plane(first_plane: object, planes: int) -> None:
    """The hash numbers planes with 63-bit indices: first_plane + planes must stay below 2^63."""
    if isinstance(first_plane, bool) or not isinstance(first_plane, int):
        raise TypeError(f"division.compress: first_plane must be an int, got {type(first_plane).__name__}")
    if first_plane != 0 and not 0 <= first_plane <= PLANE_INDEX_END - planes:
        raise ValueError(
            f"division.compress: first_plane={first_plane} must lie in [0, 2^63 - {planes}] for "
            f"{planes} planes (plane indices of the hash are below 2^63)"
        )


def compress(
    x: torch.Tensor, cfg: DivisionConfig, *, seed: int | torch.Tensor | None = None,
    mode: str | None = None, first_plane: int = 0,
) -> CompressedActivation:
    """Compress an (N, C, *spatial) activation as the format in `format.py` describes.

    `mode` defaults to cfg.backward_mode; `seed` (an int in [0, 2^63) or a 0-d int64 tensor) to a
    draw from the generator of x's device, which costs no host sync. Plane (n, c) is numbered
    first_plane + n*C + c in the random-number hash, so calls that share a seed give distinct
    first_plane ranges. Exact mode keeps x itself (any shape and floating dtype) and draws nothing.
    The record holds no reference to x except in exact mode, and no autograd history.
    """
    if not isinstance(cfg, DivisionConfig):
        raise TypeError(f"division.compress: cfg must be a division.DivisionConfig, got {type(cfg).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"division.compress: expected a torch.Tensor, got {type(x).__name__}")
    if x.requires_grad:  # an exact record holds x itself: an alias without its history
        x = x.detach()
    with torch.no_grad():
        return encode(x, cfg, cfg.backward_mode if mode is None else mode,
                      select_backend(x, cfg) == "kernels", seed, first_plane)


def encode(
    x: torch.Tensor, cfg: DivisionConfig, mode: str, kernels: bool,
    seed: int | torch.Tensor | None = None, first_plane: int = 0,
) -> CompressedActivation:
    """compress() once the implementation is chosen: what the layers call, also under compile."""
    if mode not in MODES:
        raise ValueError(f"division.compress: mode={mode!r} is not one of {', '.join(MODES)}")
    fmt = memory_format_of(x)
    if mode == "exact":  # the input itself: nothing to check, nothing drawn
        return CompressedActivation(x.shape, x.dtype, fmt, cfg.block_size, cfg.hfc_bits, mode, raw=x)
    check_input(x)
    check_first_plane(first_plane, x.shape[0] * x.shape[1])
    seed = draw_seed(x.device) if seed is None else as_seed(seed, x.device)
    # the kernels index within a plane in 32 bits; a single (n, c) plane that large takes the reference
    if kernels and math.prod(x.shape[2:]) < MAX_KERNEL_PLANE:
        lfc, *hfc = torch.ops.division.compress(
            x, seed, cfg.block_size, cfg.hfc_bits, cfg.lfc_torch_dtype, mode, first_plane
        )
        codes, lo, step, shift = hfc if mode != "lfc_only" else (None,) * 4
        return CompressedActivation(
            x.shape, x.dtype, fmt, cfg.block_size, cfg.hfc_bits, mode,
            lfc if mode != "hfc_only" else None, codes, lo, step, shift, backend="kernels",
        )
    return compress_reference(x, cfg.block_size, cfg.hfc_bits, cfg.lfc_torch_dtype, mode, seed, fmt,
                              first_plane)


def decompress(packed: CompressedActivation) -> torch.Tensor:
    """Rebuild x (LFC + dequantized HFC) with x's shape, dtype and memory format."""
    if not isinstance(packed, CompressedActivation):  # another codec's record (groupquant.py)
        return packed.decompress()
    if packed.mode == "exact":
        return packed.raw
    if packed.backend == "kernels":
        absent = None if packed.mode == "division" else torch.empty(0, device=packed.device)
        parts = [t if t is not None else absent for t in packed.tensors()[:5]]
        return torch.ops.division.decompress(
            *parts, list(packed.shape), packed.dtype, packed.memory_format != torch.contiguous_format,
            packed.block_size, packed.bits, packed.mode,
        )
    return decompress_reference(packed)
