"""ActNN-style baseline: Q-bit per-group stochastic quantization of the input, with no LFC.

The paper's main competitor, run inside the same layers so that a comparison measures the codec and
nothing else. Each sample's elements, in logical (N, C, *S) order, are cut into groups of G; each
group keeps its min and step (float32) and Q-bit codes from the same stochastic rounding and hash as
DIVISION's HFC (format.py), packed the same way. Reference implementation in PyTorch ops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .compressor import Compressor
from .config import DivisionConfig
from .format import FLT_MAX, TINY, memory_format_of
from .hashing import as_seed, draw_seed, uniforms
from .reference import pack_codes, quantize, unpack_codes


@dataclass
class GroupQuantized:
    """What a layer keeps of its input under the ActNN baseline (tensors() as CompressedActivation)."""

    shape: torch.Size
    dtype: torch.dtype
    memory_format: torch.memory_format
    group_size: int
    bits: int
    codes: torch.Tensor | None = None
    lo: torch.Tensor | None = None
    step: torch.Tensor | None = None

    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        return (self.codes, self.lo, self.step, None, None)

    def with_tensors(self, tensors: tuple[torch.Tensor | None, ...]) -> GroupQuantized:
        codes, lo, step = tensors[:3]
        return GroupQuantized(self.shape, self.dtype, self.memory_format, self.group_size, self.bits, codes, lo, step)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors() if t is not None)

    def decompress(self) -> torch.Tensor:
        return group_decompress(self)


def group_compress(
    x: torch.Tensor, bits: int, group_size: int, seed: int | torch.Tensor | None = None
) -> GroupQuantized:
    """Groups play the part of DIVISION's planes: group r of the batch draws its uniforms as plane r."""
    seed = draw_seed(x.device) if seed is None else as_seed(seed, x.device)
    n = x.shape[0]
    per_sample = x[0].numel()
    groups = math.ceil(per_sample / group_size)
    flat = x.reshape(n, per_sample).float()
    pad = groups * group_size - per_sample
    if pad:  # repeat the last value: it neither widens a group's range nor adds a real code
        flat = torch.cat([flat, flat[:, -1:].expand(n, pad)], dim=1)
    g = flat.view(n * groups, group_size)
    levels = (1 << bits) - 1
    lo = g.amin(dim=1)
    r = (g.amax(dim=1) - lo).clamp(TINY, FLT_MAX)
    scale = torch.full_like(r, levels) / r  # one rounding: `levels / r` is r.reciprocal() * levels
    v = (g - lo[:, None]) * scale[:, None]
    codes = quantize(v + uniforms(seed, 0, g.shape[0], group_size), levels)
    return GroupQuantized(
        x.shape, x.dtype, memory_format_of(x), group_size, bits, pack_codes(codes, bits), lo, r / levels
    )


def group_decompress(packed: GroupQuantized) -> torch.Tensor:
    n = packed.shape[0]
    per_sample = math.prod(packed.shape[1:])
    codes = unpack_codes(packed.codes, packed.bits, packed.group_size).float()
    g = codes * packed.step[:, None] + packed.lo[:, None]
    flat = g.view(n, -1)[:, :per_sample]
    out = flat.reshape(packed.shape).to(packed.dtype)
    return out.contiguous(memory_format=packed.memory_format)


class GroupQuantCompressor(Compressor):
    """A Compressor whose records are GroupQuantized; the converted layers stay the same."""

    def __init__(self, bits: int = 2, group_size: int = 256) -> None:
        if bits not in (1, 2, 4, 8):
            raise ValueError(f"actnn bits={bits} is invalid: expected 1, 2, 4 or 8")
        if group_size < 1:
            raise ValueError(f"actnn group_size={group_size} is invalid: expected a positive integer")
        super().__init__(DivisionConfig(hfc_bits=bits, backend="torch"))
        self.bits, self.group_size = bits, group_size

    def encode(self, x: torch.Tensor, mode: str, bits: int | None = None) -> GroupQuantized:  # type: ignore[override]
        return group_compress(x, self.bits, self.group_size)  # the baseline's bits for every input

    def __deepcopy__(self, memo: dict) -> GroupQuantCompressor:
        new = GroupQuantCompressor(self.bits, self.group_size)
        new.token_grid, new.track_conv_maps = self.token_grid, self.track_conv_maps
        return new

    def __getstate__(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "token_grid": self.token_grid,
                "track_conv_maps": self.track_conv_maps}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["bits"], state["group_size"])
        self.token_grid = state.get("token_grid")
        self.track_conv_maps = state.get("track_conv_maps", False)


def convert_model_actnn(model: nn.Module, bits: int = 2, group_size: int = 256) -> nn.Module:
    """convert_model with the ActNN-style codec instead of DIVISION's (same layers, same masks)."""
    from .convert import convert_model

    return convert_model(model, DivisionConfig(hfc_bits=bits), compressor=GroupQuantCompressor(bits, group_size))

