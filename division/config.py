"""DivisionConfig: every knob of DIVISION in one validated, immutable object.

The config is passed to `convert_model` and `compress`; nothing reads a global. Invalid values fail
at construction with a `ValueError` that names the field, the value and what is allowed, so a typo in
a sweep dies before any GPU time is spent.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch

from .format import MODES

HFC_BITS = (1, 2, 4, 8)
BACKENDS = ("auto", "cuda", "torch")
BACKWARD_MODES = MODES  # defined with the bit format
LFC_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"DivisionConfig.{name}={value!r} is invalid: {allowed}")


@dataclass(frozen=True)
class DivisionConfig:
    """Settings of the DIVISION codec and of the patched layers.

    block_size: B, the side of the square (cubic in 3-D) LFC averaging block; B=1 keeps the whole
        input in the LFC (the HFC is then only the LFC's rounding error).
    hfc_bits: Q, bits per HFC code; must divide 8 so codes never straddle a byte.
    lfc_dtype: storage dtype of the LFC ("bfloat16", "float16" or "float32"). A block mean beyond
        float16's range (65504) is stored clamped; the HFC holds the rest, so only lfc_only
        reconstructions (the LFC alone) see the clamp: use bfloat16 or float32 for such inputs.
    backend: "auto" runs the compiled ops of division._C when they are built (the CUDA kernels on
        CUDA tensors, their CPU twin on CPU tensors; bit-identical to the reference), the
        pure-PyTorch reference otherwise; "cuda" insists on the kernels and CUDA tensors; "torch"
        forces the reference (then torch.compile traces the reference's ops instead of one call).
    backward_mode: what backward reconstructs the saved input from: "division" (LFC + quantized
        HFC), "exact" (the input itself is saved), "lfc_only" or "hfc_only" (the paper's observation).
    compress_linear: also compress nn.Linear inputs along their last dimension (off in the paper).
    share_inputs: a tensor read by several converted layers in one forward (a block input read by
        conv1 and the downsample conv) is compressed once and shared.
    compress_attention: a converted MultiheadAttention saves q, k and v as token records and
        recomputes the attention in backward (eager, without attention dropout), in place of what
        scaled_dot_product_attention keeps; False keeps that, as stock.
    activation_bits: Q for the inputs of SiLU, Hardswish and Mish on conv maps, and of a GELU
        right after a convolution or norm in a Sequential (MaxViT's MBConv blocks). Their input
        gradient is the derivative at the rebuilt input, whose error is not averaged away as a
        weight gradient's noise is: EfficientNet-B0's whole-model gradient cosine to the exact one
        is 0.36 with 2 bits there, 0.72 with 4, 0.73 with 8 (0.74 with those inputs kept whole;
        benchmarks/model_zoo.py --activation-bits).
    exclude: patterns (fnmatch, `*` crosses dots) of module names, as `model.named_modules()`
        gives them, that convert_model leaves stock with everything inside them ("conv1",
        "layer4", "features.*.attn"): layers whose gradients you want exact, or that another tool
        handles. A pattern that names no module is an error, so a typo does not pass silently.
    layer_bits: {pattern: Q}: the HFC bits of the records of the modules a pattern names and of
        everything inside them (their activations' too), in place of hfc_bits and activation_bits.
        The nearest enclosing match decides ({"layer4": 4, "layer4.2": 8}); among patterns naming
        the same module, the first. Stored as a tuple of (pattern, Q) pairs, so the config stays
        hashable.
    """

    block_size: int = 8
    hfc_bits: int = 2
    lfc_dtype: str = "bfloat16"
    backend: str = "auto"
    backward_mode: str = "division"
    compress_linear: bool = False
    share_inputs: bool = True
    compress_attention: bool = True
    activation_bits: int = 4
    exclude: tuple[str, ...] = ()
    layer_bits: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "exclude", _patterns(self.exclude))
        object.__setattr__(self, "layer_bits", _pattern_bits(self.layer_bits))
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", int) and (isinstance(value, bool) or not isinstance(value, int)):
                _fail(f.name, value, "expected an integer")
            if f.type in ("bool", bool) and not isinstance(value, bool):
                _fail(f.name, value, "expected True or False")
            if f.type in ("str", str) and not isinstance(value, str):
                _fail(f.name, value, "expected a string")
        for pattern, bits in self.layer_bits:
            if bits not in HFC_BITS:
                _fail("layer_bits", {pattern: bits}, f"expected Q in {HFC_BITS} (Q must divide 8)")
        if self.block_size < 1:
            _fail("block_size", self.block_size, "expected an integer >= 1")
        for name in ("hfc_bits", "activation_bits"):
            if getattr(self, name) not in HFC_BITS:
                _fail(name, getattr(self, name), f"expected one of {HFC_BITS} (Q must divide 8)")
        if self.lfc_dtype not in LFC_DTYPES:
            _fail("lfc_dtype", self.lfc_dtype, f"expected one of {tuple(LFC_DTYPES)}")
        if self.backend not in BACKENDS:
            _fail("backend", self.backend, f"expected one of {BACKENDS}")
        if self.backward_mode not in BACKWARD_MODES:
            _fail("backward_mode", self.backward_mode, f"expected one of {BACKWARD_MODES}")

    @property
    def lfc_torch_dtype(self) -> torch.dtype:
        return LFC_DTYPES[self.lfc_dtype]

    @property
    def bits_per_element(self) -> float:
        """Storage cost of a large 2-D map: Q bits of HFC plus the LFC spread over a B x B block."""
        lfc_bits = torch.finfo(self.lfc_torch_dtype).bits
        return self.hfc_bits + lfc_bits / self.block_size**2

    def replace(self, **changes: Any) -> DivisionConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _patterns(value: Any) -> tuple[str, ...]:
    """exclude as a tuple of non-empty strings (a lone string is one pattern, not its letters)."""
    items = (value,) if isinstance(value, str) else value
    if not isinstance(items, Iterable) or not all(isinstance(p, str) and p for p in items):
        _fail("exclude", value, "expected a list of module name patterns (non-empty strings)")
    return tuple(items)


def _pattern_bits(value: Any) -> tuple[tuple[str, int], ...]:
    """layer_bits as (pattern, Q) pairs, from a mapping or from pairs."""
    if isinstance(value, Mapping):
        pairs = tuple(value.items())
    elif isinstance(value, Iterable) and not isinstance(value, str):
        pairs = tuple(tuple(item) if isinstance(item, (tuple, list)) else (item,) for item in value)
    else:
        pairs = ((),)
    if not all(len(pair) == 2 and isinstance(pair[0], str) and pair[0] for pair in pairs):
        _fail("layer_bits", value, "expected a mapping {module name pattern: Q}")
    for pattern, bits in pairs:
        if isinstance(bits, bool) or not isinstance(bits, int):
            _fail("layer_bits", {pattern: bits}, "expected an integer Q")
    return pairs
