"""division.summary: which layers were converted, which were not and why, and what they save.

With an example input, the bytes are measured, not estimated: a copy of the model runs one
training-mode forward under saved-tensor hooks that record every tensor autograd keeps, each
storage counted once, attributed to the innermost module running at the time. The same is done
for a reverted copy (stock layers), which gives the vanilla figure the ratio compares with.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from .convert import STATE_ATTR, conversion_for, revert_model, uncompiled
from .layers import DivisionLayer
from .plan import LayerPlan, layer_plan
from .saved import SavedBytes


@dataclass
class LayerRow:
    name: str
    kind: str
    converted: bool
    reason: str = ""
    bits: int | None = None  # Q of its records where DivisionConfig.layer_bits sets it
    input_shape: tuple[int, ...] | None = None
    saved_bytes: int = 0
    vanilla_bytes: int = 0


@dataclass
class ModelSummary:
    rows: list[LayerRow] = field(default_factory=list)
    total_saved_bytes: int | None = None
    total_vanilla_bytes: int | None = None
    config: object = None

    @property
    def converted(self) -> list[LayerRow]:
        return [r for r in self.rows if r.converted]

    @property
    def unconverted(self) -> list[LayerRow]:
        return [r for r in self.rows if not r.converted]

    @property
    def ratio(self) -> float | None:
        if not self.total_saved_bytes or self.total_vanilla_bytes is None:
            return None
        return self.total_vanilla_bytes / self.total_saved_bytes

    def __str__(self) -> str:
        measured = self.total_saved_bytes is not None
        head = ["layer", "type", "status"] + (["input", "saved", "stock"] if measured else [])
        lines = []
        for r in self.rows:
            status = ("converted" + (f" (Q={r.bits})" if r.bits is not None else "")) if r.converted else f"kept: {r.reason}"
            cells = [r.name or "(root)", r.kind, status]
            if measured:
                shape = "x".join(map(str, r.input_shape)) if r.input_shape else "-"
                cells += [shape, _fmt_bytes(r.saved_bytes), _fmt_bytes(r.vanilla_bytes)]
            lines.append(cells)
        widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in enumerate(head)]
        out = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
        out += ["  ".join(c.ljust(w) for c, w in zip(cells, widths)) for cells in lines]
        out.append(f"{len(self.converted)} layers converted, {len(self.unconverted)} kept")
        if measured:
            ratio = self.ratio
            out.append(
                f"activation memory saved for backward: {_fmt_bytes(self.total_saved_bytes)} "
                f"(stock layers: {_fmt_bytes(self.total_vanilla_bytes)}"
                + (f", {ratio:.1f}x smaller)" if ratio else ")")
            )
        return "\n".join(out)


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _measure(model: nn.Module, example_input: torch.Tensor) -> tuple[dict[str, int], dict[str, tuple[int, ...]], int]:
    """Bytes autograd saves per module name (innermost running module) for one forward."""
    stack: list[str] = []
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name, module in model.named_modules():
        def pre(mod, args, name=name):
            stack.append(name)
            if args and isinstance(args[0], torch.Tensor) and name not in shapes:
                shapes[name] = tuple(args[0].shape)

        def post(mod, args, out):
            stack.pop()

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    saved = SavedBytes(exclude=model.parameters(), owner=lambda: stack[-1] if stack else "")
    model.train()
    try:
        with torch.enable_grad(), saved.counting():
            out = model(example_input)
        del out
    finally:
        for h in handles:
            h.remove()
    return saved.per_owner, shapes, saved.total


def summary(model: nn.Module, example_input: torch.Tensor | None = None) -> ModelSummary:
    """Table of converted and kept layers; with `example_input`, measured bytes saved per layer
    (of a torch.compile wrapper: its module's, run eagerly, where per-layer hooks fire)."""
    model = uncompiled(model)
    compressor = getattr(model, STATE_ATTR, None)
    cfg = compressor.cfg if compressor is not None else None
    result = ModelSummary(config=cfg)
    from .config import DivisionConfig

    probe_cfg = cfg if cfg is not None else DivisionConfig()
    plan = layer_plan(model, cfg) if cfg is not None else LayerPlan()
    for name, module in model.named_modules():
        if isinstance(module, DivisionLayer):
            bits = plan.bits.get(name) if module.HFC_RECORDS else None
            result.rows.append(LayerRow(name, type(module).__name__, True, bits=bits[0] if bits else None))
            continue
        if next(module.children(), None) is not None:
            continue
        _, reason = conversion_for(module, probe_cfg, getattr(compressor, "token_grid", None))
        if name in plan.excluded:
            reason = f"excluded by DivisionConfig.exclude {plan.excluded[name]!r}"
        if not reason:  # convertible, yet stock
            reason = "model not converted" if cfg is None else "added or changed after convert_model"
        result.rows.append(LayerRow(name, type(module).__name__, False, reason))
    if example_input is None:
        return result
    converted = copy.deepcopy(model)
    saved, shapes, total = _measure(converted, example_input)
    stock, _, stock_total = _measure(revert_model(converted), example_input)
    rows = {r.name: r for r in result.rows}
    for name in set(saved) | set(stock):
        if name not in rows:  # functional ops inside a container
            rows[name] = LayerRow(name, "(functional ops)", False, "ops outside converted modules")
            result.rows.append(rows[name])
    for r in result.rows:
        r.input_shape = shapes.get(r.name)
        r.saved_bytes = saved.get(r.name, 0)
        r.vanilla_bytes = stock.get(r.name, 0)
    result.total_saved_bytes, result.total_vanilla_bytes = total, stock_total
    return result
