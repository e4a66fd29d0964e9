"""Activation memory, peak memory and throughput, measured the same way for every method.

Activation memory follows the paper (reference.md section 5) on the first batch: allocated memory
just before backward minus allocated memory before the batch was fetched, minus the output and
loss tensors (the input batch therefore counts, as in the paper). The honest figure next to it is
the peak allocated during that whole step (forward, backward, optimizer) above the same start.
On a CPU there is no allocator to read: activation memory is then the bytes of the distinct
tensors autograd saved for backward (parameters excluded), and the peak is the process's peak RSS.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections.abc import Iterator

import torch
from torch import nn

from division.saved import SavedBytes

GIB = 2.0**30


def tensor_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class ActivationProbe:
    """Measures one training step; call the methods at the points their names give."""

    def __init__(self, device: torch.device, model: nn.Module) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.start = 0
        self.activation_bytes: int | None = None
        self.peak_bytes: int | None = None
        self._saved = SavedBytes(exclude=model.parameters())

    def before_fetch(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)

    @contextlib.contextmanager
    def forward(self) -> Iterator[None]:
        """On CPU, count what autograd saves (a swap method's own hooks take precedence)."""
        if self.cuda:
            yield
            return
        with self._saved.counting():
            yield

    def before_backward(self, output: torch.Tensor, loss: torch.Tensor) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            held = torch.cuda.memory_allocated(self.device) - self.start
            self.activation_bytes = held - tensor_bytes(output, loss)
        else:
            self.activation_bytes = self._saved.total

    def after_step(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self.start


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory since the last reset, or the process's peak RSS on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / GIB * (1 if sys.platform == "darwin" else 1024)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Throughput:
    """Images per second of an epoch's training steps, timed with synchronisation at both ends.

    The first step of every epoch is left out (loader start-up, cuDNN autotuning) and evaluation is
    never inside. Only the two ends synchronise, so the GPU queue stays full. `data_fraction` is the
    share of the timed wall time the host spent waiting for the next batch: when it is large, the
    input pipeline, not the model, sets the pace.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.images = 0
        self.seconds = 0.0
        self.data_seconds = 0.0
        self._t0: float | None = None

    def start(self) -> None:
        synchronize(self.device)
        self._t0 = time.perf_counter()

    @property
    def running(self) -> bool:
        return self._t0 is not None

    def add(self, images: int, data_seconds: float) -> None:
        if self.running:
            self.images += images
            self.data_seconds += data_seconds

    def stop(self) -> None:
        if self._t0 is not None:
            synchronize(self.device)
            self.seconds += time.perf_counter() - self._t0
            self._t0 = None

    @property
    def img_per_s(self) -> float | None:
        return self.images / self.seconds if self.seconds > 0 and self.images else None

    @property
    def data_fraction(self) -> float:
        return self.data_seconds / self.seconds if self.seconds > 0 else 0.0


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """Number of samples whose target is among the top k logits, for each k (k capped at classes)."""
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    hits = pred.eq(target[:, None])
    return [int(hits[:, : min(k, maxk)].any(dim=1).sum()) for k in ks]
