"""What the harness needs to know about a data set besides its samples."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetInfo:
    """Model shape (classes, channels, size), normalisation, and the split sizes for the log."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pad_mode: str = "constant"  # how the random crop pads: "constant" (zeros) or "reflect"
    num_train: int = 0
    num_val: int = 0
