"""Converted layers: subclasses of the torch.nn layers whose forward saves less for backward.

A converted layer takes over the original module's attributes (its parameter and buffer dicts
included), so weights, `state_dict` keys, hooks and optimizer references all stay the same. In
eval mode, under no_grad, or when nothing needs a gradient the stock forward runs.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from .compressor import Compressor
from .functional import BatchNormFn, ConvFn, DropoutFn, LinearFn, MaxPool2dFn, ReLUFn


def _needs_saving(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether the layer runs its own Function; otherwise the stock forward (eval, no_grad, nothing
    needing a gradient, or an empty input: there is nothing to compress, and stock's handling of
    empty tensors is kept)."""
    if not (module.training and torch.is_grad_enabled()) or x.numel() == 0:
        return False
    return x.requires_grad or any(p.requires_grad for p in module.parameters(recurse=False))


def _unbatched(x: torch.Tensor, batched_dims: int) -> bool:
    """An input without its batch dimension, which stock layers accept (and process as a batch of 1)."""
    return x.dim() == batched_dims - 1


def _autocast(x: torch.Tensor, *tensors: torch.Tensor | None) -> tuple[list[Any], contextlib.AbstractContextManager]:
    """Cast as autocast would for conv/linear, then let the Function run with autocast off."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return [x, *tensors], contextlib.nullcontext()
    dtype = torch.get_autocast_dtype(device)
    cast = [t.to(dtype) if t is not None and t.is_floating_point() else t for t in (x, *tensors)]
    return cast, torch.autocast(device, enabled=False)


class DivisionLayer:
    """Mixin: how a converted layer is made from an original one."""

    compressor: Compressor

    @classmethod
    def from_module(cls, module: nn.Module, compressor: Compressor) -> nn.Module:
        new = cls.__new__(cls)
        new.__dict__.update(module.__dict__)
        new.compressor = compressor
        return new

    def extra_repr(self) -> str:  # type: ignore[override]
        base = super().extra_repr()  # type: ignore[misc]
        cfg = self.compressor.cfg
        return f"{base}, division=(B={cfg.block_size}, Q={cfg.hfc_bits}, {cfg.backward_mode})"


class _DivisionConvNd(DivisionLayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _needs_saving(self, x):
            return super().forward(x)  # type: ignore[misc]
        if _unbatched(x, self.weight.dim()):
            return self.forward(x.unsqueeze(0)).squeeze(0)
        dims = x.dim() - 2
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = (0,) * dims
        elif isinstance(padding, str):
            x, padding = _explicit_padding(x, padding, self.kernel_size, self.dilation)
        (x, weight, bias), autocast_off = _autocast(x, self.weight, self.bias)
        with autocast_off:
            return ConvFn.apply(
                x, weight, bias, list(self.stride), list(padding), list(self.dilation),
                self.groups, self.compressor,
            )


def _explicit_padding(
    x: torch.Tensor, padding: str, kernel: tuple[int, ...], dilation: tuple[int, ...]
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """padding='valid'/'same' as integers; an odd 'same' total pads the extra element on the right."""
    if padding == "valid":
        return x, (0,) * len(kernel)
    totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
    left = tuple(t // 2 for t in totals)
    extra = [t - 2 * lt for t, lt in zip(totals, left)]
    if any(extra):
        pads: list[int] = []
        for e in reversed(extra):
            pads += [0, e]
        x = F.pad(x, pads)
    return x, left


class DivisionConv1d(_DivisionConvNd, nn.Conv1d):
    pass


class DivisionConv2d(_DivisionConvNd, nn.Conv2d):
    pass


class DivisionConv3d(_DivisionConvNd, nn.Conv3d):
    pass


class _DivisionBatchNorm(DivisionLayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not _needs_saving(self, x):
            return super().forward(x)  # type: ignore[misc]
        if x.numel() // x.shape[1] == 1:  # stock's check (F.batch_norm): a variance of one value
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {x.size()}"
            )
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        # (N, C) inputs have no spatial extent to split into LFC and HFC: they are kept as they are
        mode = "exact" if x.dim() == 2 else None
        return BatchNormFn.apply(
            x, self.weight, self.bias,
            self.running_mean if self.track_running_stats else None,
            self.running_var if self.track_running_stats else None,
            factor, self.eps, self.compressor, mode,
        )


class DivisionBatchNorm1d(_DivisionBatchNorm, nn.BatchNorm1d):
    pass


class DivisionBatchNorm2d(_DivisionBatchNorm, nn.BatchNorm2d):
    pass


class DivisionBatchNorm3d(_DivisionBatchNorm, nn.BatchNorm3d):
    pass


class DivisionReLU(DivisionLayer, nn.ReLU):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _needs_saving(self, x):
            return super().forward(x)
        return ReLUFn.apply(x, self.inplace, self.compressor.kernels)


class DivisionDropout(DivisionLayer, nn.Dropout):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p in (0.0, 1.0) or not _needs_saving(self, x):  # p = 1: stock keeps no mask either
            return super().forward(x)
        return DropoutFn.apply(x, self.p, self.inplace, self.compressor.kernels)


class DivisionMaxPool2d(DivisionLayer, nn.MaxPool2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _needs_saving(self, x):
            return super().forward(x)
        if _unbatched(x, 4):
            return self.forward(x.unsqueeze(0)).squeeze(0)
        stride = self.stride if self.stride is not None else self.kernel_size
        return MaxPool2dFn.apply(
            x, _pair(self.kernel_size), _pair(stride), _pair(self.padding), _pair(self.dilation),
            self.ceil_mode, self.compressor.kernels,
        )


class DivisionLinear(DivisionLayer, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _needs_saving(self, x) or x.dim() < 2:
            return super().forward(x)
        (x, weight, bias), autocast_off = _autocast(x, self.weight, self.bias)
        with autocast_off:
            return LinearFn.apply(x, weight, bias, self.compressor)


CONVERSIONS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: DivisionConv1d,
    nn.Conv2d: DivisionConv2d,
    nn.Conv3d: DivisionConv3d,
    nn.BatchNorm1d: DivisionBatchNorm1d,
    nn.BatchNorm2d: DivisionBatchNorm2d,
    nn.BatchNorm3d: DivisionBatchNorm3d,
    nn.ReLU: DivisionReLU,
    nn.Dropout: DivisionDropout,
    nn.MaxPool2d: DivisionMaxPool2d,
    nn.Linear: DivisionLinear,
}
