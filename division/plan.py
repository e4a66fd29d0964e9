"""Which modules a config's name patterns pick: DivisionConfig.exclude and layer_bits.

A pattern is matched (fnmatch, case-sensitive, `*` crossing dots) against the names that
`model.named_modules()` gives, and what it says holds for the module it names and everything
inside it: the nearest enclosing match decides, so {"layer4": 4, "layer4.2": 8} gives layer4's
last block 8 bits and the rest of layer4 4. Exclusion wins over bits.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from torch import nn

from .config import DivisionConfig


@dataclass
class LayerPlan:
    """Per module name: the exclude pattern that leaves it stock, or the (Q, pattern) of its bits."""

    excluded: dict[str, str] = field(default_factory=dict)
    bits: dict[str, tuple[int, str]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.excluded or self.bits)

    def inside(self, name: str) -> list[str]:
        """Names below `name` that the plan mentions."""
        prefix = f"{name}."
        return [n for n in (*self.excluded, *self.bits) if n.startswith(prefix)]


def layer_plan(model: nn.Module, cfg: DivisionConfig) -> LayerPlan:
    """The plan of `model` under cfg's patterns; a pattern that names no module is an error."""
    plan = LayerPlan()
    if not cfg.exclude and not cfg.layer_bits:
        return plan
    names = [name for name, _ in model.named_modules() if name]
    _check_all_used(model, names, cfg)
    for name in names:  # parents come before their children
        parent = name.rpartition(".")[0]
        own = next((p for p in cfg.exclude if fnmatchcase(name, p)), None)
        excluded = own or plan.excluded.get(parent)
        if excluded is not None:
            plan.excluded[name] = excluded
            continue
        own_bits = next(((q, p) for p, q in cfg.layer_bits if fnmatchcase(name, p)), None)
        bits = own_bits or plan.bits.get(parent)
        if bits is not None:
            plan.bits[name] = bits
    return plan


def describe_plan(layer_bits: Iterable[Sequence[Any]], exclude: Iterable[str]) -> str:
    """A config's patterns in the one short form that run logs and result tables give them:
    "layer4=4; conv1=8; stock: fc" ("" without patterns). Plain pairs and names, as a run's
    saved settings hold them too."""
    parts = [f"{pattern}={bits}" for pattern, bits in layer_bits]
    stock = ", ".join(exclude)
    return "; ".join(parts + ([f"stock: {stock}"] if stock else []))


def _check_all_used(model: nn.Module, names: list[str], cfg: DivisionConfig) -> None:
    patterns = [("exclude", p) for p in cfg.exclude] + [("layer_bits", p) for p, _ in cfg.layer_bits]
    unused = [(key, p) for key, p in patterns if not any(fnmatchcase(n, p) for n in names)]
    if unused:
        key, pattern = unused[0]
        top = [n for n in names if "." not in n][:8]
        raise ValueError(
            f"DivisionConfig.{key}: the pattern {pattern!r} names no module of this "
            f"{type(model).__name__}; patterns match the names of model.named_modules() "
            f"(its top level: {', '.join(top) or 'no submodules'}), `*` also across dots"
        )
