"""What autograd keeps for backward, counted: `division.summary` and the harness's activation probe
both measure with this.

Every tensor autograd saves passes through a saved-tensor hook; its storage is counted once (views
and tensors saved by several nodes share one), parameters are left out (they are weights, not
activations), and so are empty storages. `owner` attributes each storage to a name (summary: the
innermost module running when it was saved).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch


class SavedBytes:
    """Counts, while `counting()` is active, the bytes of what autograd saves."""

    def __init__(self, exclude: Iterable[torch.Tensor] = (), owner: Callable[[], str] = lambda: "") -> None:
        self._seen = {t.untyped_storage().data_ptr() for t in exclude}
        self._owner = owner
        self.per_owner: dict[str, int] = {}

    @property
    def total(self) -> int:
        return sum(self.per_owner.values())

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in self._seen and storage.nbytes() > 0:
            self._seen.add(key)
            owner = self._owner()
            self.per_owner[owner] = self.per_owner.get(owner, 0) + storage.nbytes()
        # detached: a saved output kept with its grad_fn would be a reference cycle through C++
        # that no gc breaks when the graph dies without a backward, as summary's forward does
        # (pytorch/pytorch#115255); autograd restores the grad_fn on unpacking
        return t.detach()

    @contextlib.contextmanager
    def counting(self) -> Iterator[SavedBytes]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield self
