"""Token sequences as DIVISION maps: a transformer's (N, T, D) activations over its patch grid.

A Vision Transformer's T = P + H x W tokens are P prefix tokens (class, register) followed by the
patch tokens in row-major grid order. The patch tokens of a contiguous (N, T, D) tensor are, in
memory, exactly a channels_last (N, D, H, W) map: every feature d of every sample is a plane over
the patch grid, and neighbouring patches are correlated as neighbouring pixels are. So a token
record is the ordinary DIVISION record of that map (LFC = B x B patch blocks, HFC per (sample,
feature) plane) plus the few prefix tokens kept exact. Without a grid, or when T does not match it
(another image size), the whole sequence is one column: (N, D, T, 1), blocks of B tokens.

The grid comes from `convert_model(..., token_grid=...)` or from the model: torchvision's
VisionTransformer and models.vit say it through `image_size`, `patch_size` and `class_token`. A
video's T x H x W patch tokens are a channels_last_3d (N, D, T, H, W) map; a model whose stages
pool their tokens (MViT) has one grid per stage, and each input takes the grid of its length.

A Swin Transformer's attention runs on windows: (N * R * K, h * w, C) tokens cut from an
(N, R * h, K * w, C) map (WindowGrid; a Video Swin's from an (N, T, H, W, C) map). Their records
are those of the map the windows tile, so that planes span the whole image and blocks of B x B
neighbouring positions, not a window's 49.
MaxViT's attention runs on (N, G, P, C) partitions of its map, windows or a dilated grid
(PartitionGrid), recorded the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class TokenGrid:
    """P prefix tokens, then H x W patch tokens in row-major order (a video's T x H x W, time
    first: `time` > 1)."""

    height: int
    width: int
    prefix: int = 0
    time: int = 1

    def __post_init__(self) -> None:
        for name in ("height", "width", "time"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TokenGrid.{name}={value!r} is invalid: expected an integer >= 1")
        if isinstance(self.prefix, bool) or not isinstance(self.prefix, int) or self.prefix < 0:
            raise ValueError(f"TokenGrid.prefix={self.prefix!r} is invalid: expected an integer >= 0")

    @property
    def length(self) -> int:
        return self.prefix + self.time * self.height * self.width


# what a model's tokens lie on: one grid, or several told apart by their length (MViT's stages)
TokenGrids = TokenGrid | tuple[TokenGrid, ...]


def infer_token_grid(model: nn.Module) -> TokenGrid | None:
    """The grid of a model that says it (torchvision's VisionTransformer, models.vit; timm's
    VisionTransformer through its patch embedding's grid and its prefix tokens, where the image
    size is fixed), else None."""
    grid, prefix = getattr(getattr(model, "patch_embed", None), "grid_size", None), getattr(model, "num_prefix_tokens", None)
    if (isinstance(grid, tuple) and len(grid) == 2 and all(isinstance(g, int) and g >= 1 for g in grid)
            and isinstance(prefix, int) and prefix >= 0 and not getattr(model, "dynamic_img_size", False)):
        return TokenGrid(grid[0], grid[1], prefix)
    image, patch = getattr(model, "image_size", None), getattr(model, "patch_size", None)
    if not isinstance(image, int) or not isinstance(patch, int) or patch < 1 or image < patch:
        return None
    prefix = 1 if isinstance(getattr(model, "class_token", None), torch.Tensor) else 0
    return TokenGrid(image // patch, image // patch, prefix)


@dataclass
class TokenRecord:
    """A saved (N, T, D) token tensor: the record of its patch map (or of its 1-d column) and the
    prefix tokens kept exact."""

    shape: torch.Size
    grid: TokenGrid | None  # None: the whole sequence as one column of blocks of B tokens
    inner: Any  # the codec's record (CompressedActivation, or another codec's)
    prefix: torch.Tensor | None = None

    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        return (*self.inner.tensors(), self.prefix)

    def with_tensors(self, tensors: tuple[torch.Tensor | None, ...]) -> TokenRecord:
        return TokenRecord(self.shape, self.grid, self.inner.with_tensors(tensors[:-1]), tensors[-1])

    @property
    def nbytes(self) -> int:
        extra = 0 if self.prefix is None else self.prefix.numel() * self.prefix.element_size()
        return self.inner.nbytes + extra


def grid_for(x: torch.Tensor, grids: TokenGrids | None) -> TokenGrid | None:
    """The grid that applies to this (N, T, D) input: the one of length T; None when no grid, or
    more than one, has that length."""
    if grids is None:
        return None
    fitting = {g for g in (grids if isinstance(grids, tuple) else (grids,)) if g.length == x.shape[1]}
    return fitting.pop() if len(fitting) == 1 else None


def as_map(x: torch.Tensor, grid: TokenGrid | None) -> torch.Tensor:
    """The patch tokens of (N, T, D) x as a channels_last (N, D, H, W) map (a view when x is
    contiguous and has no prefix; a video's as a channels_last_3d (N, D, T, H, W) map), or the
    whole sequence as (N, D, T, 1) without a grid."""
    n, t, d = x.shape
    if grid is None:
        return x.contiguous().view(n, t, 1, d).permute(0, 3, 1, 2)
    patches = (x[:, grid.prefix :] if grid.prefix else x).contiguous()
    if grid.time > 1:
        return patches.view(n, grid.time, grid.height, grid.width, d).permute(0, 4, 1, 2, 3)
    return patches.view(n, grid.height, grid.width, d).permute(0, 3, 1, 2)


def from_map(m: torch.Tensor, prefix: torch.Tensor | None, shape: torch.Size) -> torch.Tensor:
    """Inverse of as_map: (N, T, D) from the map (channels_last) and the prefix tokens."""
    n, t, d = shape
    patches = m.movedim(1, -1).reshape(n, -1, d)
    return patches if prefix is None else torch.cat([prefix, patches], dim=1)


def compress_tokens(compressor: Any, x: torch.Tensor) -> TokenRecord:
    """Compress a (N, T, D) token tensor with `compressor` (a division Compressor) over its
    token_grid."""
    if x.dim() != 3:
        raise ValueError(f"compress_tokens: expected an (N, T, D) tensor, got shape {tuple(x.shape)}")
    x = x.detach()
    if compressor.cfg.backward_mode == "exact":  # x itself, as stock
        return TokenRecord(x.shape, None, compressor.compress(x, "exact"))
    grid = grid_for(x, compressor.token_grid)
    prefix = x[:, : grid.prefix].clone() if grid is not None and grid.prefix else None
    return TokenRecord(x.shape, grid, compressor.compress(as_map(x, grid)), prefix)


def decompress_tokens(record: TokenRecord) -> torch.Tensor:
    """The (N, T, D) reconstruction of a TokenRecord."""
    from .codec import decompress

    out = decompress(record.inner)
    return out if out.dim() == 3 else from_map(out, record.prefix, record.shape)


@dataclass(frozen=True)
class WindowGrid:
    """How (N * prod(counts), prod(window), C) windows tile an (N, *padded, C) map, 2-d (Swin) or
    3-d (Video Swin): torchvision's shifted_window_attention takes the block's (N, *size, C) input,
    pads it at the end of each axis to `counts` whole windows, rolls it by -shift and partitions it;
    timm's Swin block rolls first, then pads (`roll_first`)."""

    counts: tuple[int, ...]  # windows along each axis
    window: tuple[int, ...]  # a window's size along each axis
    size: tuple[int, ...]  # the block input's map, before padding
    shift: tuple[int, ...]
    roll_first: bool = False

    @property
    def padded_size(self) -> tuple[int, ...]:
        return tuple(n * w for n, w in zip(self.counts, self.window))

    @property
    def padded(self) -> bool:
        return self.size != self.padded_size


def map_to_windows(m: torch.Tensor, grid: WindowGrid) -> torch.Tensor:
    """(N, *padded, C) map -> (N * prod(counts), prod(window), C) windows (stock's partition ops)."""
    n, c, d = m.shape[0], m.shape[-1], len(grid.window)
    m = m.view(n, *(v for pair in zip(grid.counts, grid.window) for v in pair), c)
    m = m.permute(0, *range(1, 2 * d, 2), *range(2, 2 * d + 1, 2), 2 * d + 1)
    return m.reshape(n * math.prod(grid.counts), math.prod(grid.window), c)


def windows_to_map(x: torch.Tensor, grid: WindowGrid) -> torch.Tensor:
    """Inverse of map_to_windows (stock's reverse-windows ops)."""
    c, d = x.shape[-1], len(grid.window)
    x = x.view(-1, *grid.counts, *grid.window, c)
    x = x.permute(0, *(a for i in range(d) for a in (1 + i, 1 + d + i)), 2 * d + 1)
    return x.reshape(-1, *grid.padded_size, c)


def _roll(m: torch.Tensor, grid: WindowGrid, sign: int) -> torch.Tensor:
    """m rolled by sign * shift along the map's axes (m itself without a shift)."""
    if not any(grid.shift):
        return m
    return torch.roll(m, shifts=tuple(sign * s for s in grid.shift), dims=tuple(range(1, len(grid.window) + 1)))


def windows_as_input_map(x: torch.Tensor, grid: WindowGrid) -> torch.Tensor:
    """The (N, *size, C) map of the block input's positions that windows hold: rolled back and
    without the padding (what a record keeps of them)."""
    m = windows_to_map(x, grid)
    crop = (slice(None), *(slice(None, s) for s in grid.size))
    if grid.roll_first:
        return _roll(m[crop].contiguous(), grid, 1)
    return _roll(m, grid, 1)[crop].contiguous()


def padded_input_map(m: torch.Tensor, grid: WindowGrid, fill: torch.Tensor | None = None) -> torch.Tensor:
    """The (N, *size, C) block input as the attention partitions it: padded (with zeros, what the
    block input's padding is, or with `fill`, one value per channel: what a projection gives there,
    its bias) and rolled by -shift, in the grid's order."""
    if grid.roll_first:
        m = _roll(m, grid, -1)
    pad = [0, 0]
    for size, padded in zip(reversed(grid.size), reversed(grid.padded_size)):
        pad += [0, padded - size]
    m = torch.nn.functional.pad(m, pad)
    if fill is not None and grid.padded:
        for axis, size in enumerate(grid.size):
            m[(slice(None),) * (axis + 1) + (slice(size, None),)] = fill
    return m if grid.roll_first else _roll(m, grid, -1)


def input_map_as_windows(m: torch.Tensor, grid: WindowGrid, fill: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of windows_as_input_map, the padding as zeros or as `fill` (padded_input_map)."""
    return map_to_windows(padded_input_map(m, grid, fill), grid)


@dataclass(frozen=True)
class PartitionGrid:
    """How MaxViT's (N, rows * cols, size * size, C) partitions tile its (N, C, rows * size,
    cols * size) map (torchvision's WindowPartition: window `size` x `size` positions); `swapped`:
    the two middle axes exchanged, (N, size * size, rows * cols, C), as its grid attention runs."""

    size: int
    rows: int
    cols: int
    swapped: bool = False

    def fits(self, x: torch.Tensor) -> bool:
        """Whether x is an (N, G, P, C) tensor of this grid's partitions."""
        windows, positions = self.rows * self.cols, self.size * self.size
        middle = (positions, windows) if self.swapped else (windows, positions)
        return x.dim() == 4 and tuple(x.shape[1:3]) == middle


def partitions_as_map(x: torch.Tensor, grid: PartitionGrid) -> torch.Tensor:
    """The (N, H, W, C) map that (N, G, P, C) partitions hold (stock's departition: one copy)."""
    n, c, s = x.shape[0], x.shape[-1], grid.size
    if grid.swapped:
        m = x.reshape(n, s, s, grid.rows, grid.cols, c).permute(0, 3, 1, 4, 2, 5)
    else:
        m = x.reshape(n, grid.rows, grid.cols, s, s, c).permute(0, 1, 3, 2, 4, 5)
    return m.reshape(n, grid.rows * s, grid.cols * s, c)


def map_as_partitions(m: torch.Tensor, grid: PartitionGrid) -> torch.Tensor:
    """Inverse of partitions_as_map: the (N, G, P, C) partitions of an (N, H, W, C) map."""
    n, c, s = m.shape[0], m.shape[-1], grid.size
    m = m.reshape(n, grid.rows, s, grid.cols, s, c)
    if grid.swapped:
        return m.permute(0, 2, 4, 1, 3, 5).reshape(n, s * s, grid.rows * grid.cols, c)
    return m.permute(0, 1, 3, 2, 4, 5).reshape(n, grid.rows * grid.cols, s * s, c)
