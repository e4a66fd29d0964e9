"""Memory-saving methods applied to a model, so that train.py and the benchmarks compare them alike.

One registry: a method is one decorated function here, and nothing else names the list. The Hydra
group `method=NAME` (harness/schema.py) and the benchmarks' choices are generated from it.

vanilla: the model as it is. division: `division.convert_model`. checkpoint: torch.utils.checkpoint
around every block of the model's block sequences (recompute in backward; the recomputation leaves
BatchNorm's running statistics as the step's one forward left them). swap: saved tensors go
to host memory (`torch.autograd.graph.save_on_cpu`). actnn: the same layers as DIVISION saving a
Q-bit per-group stochastic quantization of the input without the LFC (the paper's main competitor).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import division


@dataclass
class PreparedModel:
    """The model to train and the context its forward (and loss) must run in."""

    model: nn.Module
    method: str
    forward_context: Callable[[], contextlib.AbstractContextManager] = field(
        default=contextlib.nullcontext
    )
    settings: dict = field(default_factory=dict)


@dataclass(frozen=True)
class MethodOptions:
    """The method section's options (harness/schema.MethodConfig), as plain values."""

    actnn_bits: int = 2
    actnn_group_size: int = 256
    swap_pin_memory: bool = True


Prepare = Callable[[nn.Module, division.DivisionConfig, MethodOptions], PreparedModel]
_METHODS: dict[str, Prepare] = {}


def register_method(fn: Prepare) -> Prepare:
    """Register `fn(model, division_config, options) -> PreparedModel` under its name (without a
    leading underscore)."""
    _METHODS[fn.__name__.strip("_")] = fn
    return fn


def method_names() -> list[str]:
    """The registered methods, in registration order (vanilla first)."""
    return list(_METHODS)


def prepare(
    model: nn.Module, method: str, division_cfg: division.DivisionConfig,
    options: MethodOptions | None = None,
) -> PreparedModel:
    if method not in _METHODS:
        raise ValueError(f"method={method!r} is invalid: expected one of {', '.join(_METHODS)}")
    return _METHODS[method](model, division_cfg, options or MethodOptions())


def options_of(section: Any) -> MethodOptions:
    """MethodOptions from a config's method section (an OmegaConf node or anything with the fields)."""
    return MethodOptions(**{k: getattr(section, k) for k in MethodOptions.__dataclass_fields__})


# ---- the methods ------------------------------------------------------------------------------


@register_method
def vanilla(model: nn.Module, cfg: division.DivisionConfig, opts: MethodOptions) -> PreparedModel:
    return PreparedModel(model, "vanilla")


@register_method
def _division(model: nn.Module, cfg: division.DivisionConfig, opts: MethodOptions) -> PreparedModel:
    division.convert_model(model, cfg)
    return PreparedModel(model, "division", settings=cfg.to_dict())


def block_sequences(model: nn.Module) -> list[nn.Sequential]:
    """nn.Sequential containers whose children are all blocks (themselves containers).

    That is ResNet's layer1..layer4 and the stage lists of our CIFAR models: the units
    checkpointing recomputes one at a time.
    """
    found = []
    for module in model.modules():
        if isinstance(module, nn.Sequential) and len(module) > 0:
            if all(next(child.children(), None) is not None for child in module):
                found.append(module)
    return found


@contextlib.contextmanager
def buffers_kept(module: nn.Module) -> Iterator[None]:
    """Puts the module's buffers back as they were on entry when the block leaves.

    Recomputation in backward runs a block's forward a second time, and in training mode
    BatchNorm updates its running statistics (and num_batches_tracked) again on the same batch:
    plain torch.utils.checkpoint ends a step with the statistics of two updates, so the baseline's
    evaluation would not be the model it trained. The buffers are tiny next to the activations.
    """
    saved = [(b, b.clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def _checkpointed(block: nn.Module) -> Callable:
    forward = block.forward

    def contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        return contextlib.nullcontext(), buffers_kept(block)  # (forward, recomputation)

    def run(*args: torch.Tensor) -> torch.Tensor:
        if not (block.training and torch.is_grad_enabled()):
            return forward(*args)
        if torch.compiler.is_compiling():
            # the compiled graph recomputes only what backward needs, never a buffer's update (and
            # takes no context_fn but dispatch modes)
            return checkpoint(forward, *args, use_reentrant=False)
        return checkpoint(forward, *args, use_reentrant=False, context_fn=contexts)

    return run


def apply_checkpointing(model: nn.Module) -> int:
    """Recompute each block in backward; the instance's forward is wrapped so state_dict keys stay."""
    blocks = [block for seq in block_sequences(model) for block in seq]
    if not blocks:
        raise ValueError(
            f"method=checkpoint found no nn.Sequential of blocks in {type(model).__name__}; it "
            "checkpoints the children of such sequences (ResNet's layer1..layer4)"
        )
    for block in blocks:
        block.forward = _checkpointed(block)  # type: ignore[method-assign]
    return len(blocks)


@register_method
def _checkpoint(model: nn.Module, cfg: division.DivisionConfig, opts: MethodOptions) -> PreparedModel:
    return PreparedModel(model, "checkpoint", settings={"blocks": apply_checkpointing(model)})


@register_method
def swap(model: nn.Module, cfg: division.DivisionConfig, opts: MethodOptions) -> PreparedModel:
    pin = opts.swap_pin_memory and torch.cuda.is_available()
    return PreparedModel(
        model, "swap", forward_context=lambda: torch.autograd.graph.save_on_cpu(pin_memory=pin),
        settings={"pin_memory": pin},
    )


@register_method
def actnn(model: nn.Module, cfg: division.DivisionConfig, opts: MethodOptions) -> PreparedModel:
    from division.groupquant import convert_model_actnn

    convert_model_actnn(model, bits=opts.actnn_bits, group_size=opts.actnn_group_size)
    return PreparedModel(model, "actnn", settings={"bits": opts.actnn_bits, "group_size": opts.actnn_group_size})
