"""Memory-saving methods applied to a model, so that train.py and the benchmarks compare them alike.

vanilla: the model as it is. division: `division.convert_model`. checkpoint: torch.utils.checkpoint
around every block of the model's block sequences (recompute in backward). swap: saved tensors go
to host memory (`torch.autograd.graph.save_on_cpu`). actnn: the same layers as DIVISION saving a
Q-bit per-group stochastic quantization of the input without the LFC (the paper's main competitor).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import division

METHODS = ("vanilla", "division", "checkpoint", "swap", "actnn")


@dataclass
class PreparedModel:
    """The model to train and the context its forward (and loss) must run in."""

    model: nn.Module
    method: str
    forward_context: Callable[[], contextlib.AbstractContextManager] = field(
        default=contextlib.nullcontext
    )
    settings: dict = field(default_factory=dict)


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


def _checkpointed(block: nn.Module) -> Callable:
    forward = block.forward

    def run(*args: torch.Tensor) -> torch.Tensor:
        if block.training and torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False)
        return forward(*args)

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


def prepare(
    model: nn.Module,
    method: str,
    division_cfg: division.DivisionConfig,
    *,
    actnn_bits: int = 2,
    actnn_group_size: int = 256,
    swap_pin_memory: bool = True,
) -> PreparedModel:
    if method == "vanilla":
        return PreparedModel(model, method)
    if method == "division":
        division.convert_model(model, division_cfg)
        return PreparedModel(model, method, settings=division_cfg.to_dict())
    if method == "checkpoint":
        count = apply_checkpointing(model)
        return PreparedModel(model, method, settings={"blocks": count})
    if method == "swap":
        pin = swap_pin_memory and torch.cuda.is_available()
        return PreparedModel(
            model, method,
            forward_context=lambda: torch.autograd.graph.save_on_cpu(pin_memory=pin),
            settings={"pin_memory": pin},
        )
    if method == "actnn":
        from division.groupquant import convert_model_actnn

        convert_model_actnn(model, bits=actnn_bits, group_size=actnn_group_size)
        return PreparedModel(model, method, settings={"bits": actnn_bits, "group_size": actnn_group_size})
    raise ValueError(f"method={method!r} is invalid: expected one of {METHODS}")
