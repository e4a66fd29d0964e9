"""Checks shared by the tests of converted transformer blocks (Swin, Video Swin, MaxViT)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import division


def grads_of(model: nn.Module, x: torch.Tensor, seed: int = 1, autocast: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output and gradients (input and parameters) of a cross-entropy step, under bf16 autocast if asked."""
    model.zero_grad(set_to_none=True)
    leaf = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = model(leaf)
    F.cross_entropy(out.float(), torch.arange(x.shape[0], device=x.device) % 10).backward()
    return out.detach(), {"input": leaf.grad, **{n: p.grad for n, p in model.named_parameters() if p.grad is not None}}


def flat_grads(grads: dict[str, torch.Tensor], part: str) -> torch.Tensor:
    return torch.cat([v.flatten().double() for k, v in grads.items() if part in k])


def assert_exact_mode_is_stock(stock: nn.Module, x: torch.Tensor, autocast: bool = False) -> None:
    """Exact mode runs stock's ops in stock's order: the output and every gradient bit for bit."""
    exact = division.convert_model(copy.deepcopy(stock), division.DivisionConfig(backward_mode="exact"))
    (y0, g0), (y1, g1) = grads_of(stock, x, autocast=autocast), grads_of(exact, x, autocast=autocast)
    assert torch.equal(y0, y1)
    assert g0.keys() == g1.keys() and all(torch.equal(g0[k], g1[k]) for k in g0)


def assert_same_gradients(g1: dict[str, torch.Tensor], g0: dict[str, torch.Tensor], model_scale: bool = False) -> None:
    """g1 is g0 to float32 rounding (the recomputation reorders nothing but its sums): each
    tensor to 1e-6 of its own largest entry, or of the model's largest (`model_scale`: for a
    gradient that is exactly 0, computed as float noise)."""
    assert g0.keys() == g1.keys()
    scale = max(g.abs().max().item() for g in g0.values()) if model_scale else None
    for k in g0:
        atol = 1e-6 * (scale if scale is not None else g0[k].abs().max().item())
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=atol, msg=k)


def check_on_cuda(stock: nn.Module, x: torch.Tensor, part: str, min_cosine: float | None) -> None:
    """On a GPU: exact mode is stock's bit for bit; a faithful codec (B = 1, float32 LFC) gives
    stock's gradients (a recomputed attention included); with `min_cosine`, DIVISION under bf16
    autocast gives finite gradients of `part` near stock's."""
    y0, g0 = grads_of(stock, x)
    for cfg in (division.DivisionConfig(backward_mode="exact"), division.DivisionConfig(block_size=1, lfc_dtype="float32")):
        y1, g1 = grads_of(division.convert_model(copy.deepcopy(stock), cfg), x)
        assert torch.equal(y0, y1)
        assert_same_gradients(g1, g0, model_scale=True)
    if min_cosine is not None:
        check_division_under_autocast(stock, x, part, min_cosine, division.DivisionConfig(backend="cuda"))


def check_division_under_autocast(stock: nn.Module, x: torch.Tensor, part: str, min_cosine: float,
                                  cfg: division.DivisionConfig | None = None) -> None:
    """Under bf16 autocast DIVISION (records of the 16-bit inputs, the attention recomputed as
    forward ran it) gives stock's output and finite gradients of `part` near stock's."""
    y0, g0 = grads_of(stock, x, autocast=True)
    y1, g1 = grads_of(division.convert_model(copy.deepcopy(stock), cfg), x, autocast=True)
    assert torch.equal(y0, y1)
    assert torch.isfinite(flat_grads(g1, part)).all()
    assert F.cosine_similarity(flat_grads(g1, part), flat_grads(g0, part), dim=0) > min_cosine


def check_compiled_keeps_records(base: nn.Module, x: torch.Tensor, part: str, fewer: float,
                                 min_cosine: float = 0.95, slack: float = 1.01) -> None:
    """A converted model traces without a graph break (fullgraph) and keeps its records under
    compile: it saves what eager saves with the attention core left stock's (compress_attention
    False: the recomputation's nested autograd does not trace; up to `slack` times that, what the
    partitioner chooses to save differing a little), `fewer` times less than stock at least; the
    gradient of `part` stays near stock's (one draw: a cosine above `min_cosine`)."""
    from division.saved import SavedBytes

    model = division.convert_model(copy.deepcopy(base), division.DivisionConfig())
    core_kept = division.convert_model(copy.deepcopy(base), division.DivisionConfig(compress_attention=False))
    y = torch.arange(x.shape[0]) % 10
    grads, saved = {}, {}
    for name, run in {"stock": base, "core kept": core_kept, "compiled": torch.compile(model, fullgraph=True)}.items():
        counter = SavedBytes(exclude=run.parameters())
        torch.manual_seed(0)
        with counter.counting():
            loss = F.cross_entropy(run(x), y)
        loss.backward()
        saved[name] = counter.total
        grads[name] = torch.cat([p.grad.flatten() for n, p in run.named_parameters() if part in n])
    assert torch.isfinite(grads["compiled"]).all()
    assert F.cosine_similarity(grads["compiled"], grads["stock"], dim=0) > min_cosine
    assert saved["compiled"] <= slack * saved["core kept"] < saved["stock"] / fewer, saved


def faithful_grads(stock: nn.Module, x: torch.Tensor, function: type, autocast: bool = False
                   ) -> tuple[int, torch.Tensor, dict[str, torch.Tensor]]:
    """With a codec that gives its input back exactly (B = 1, float32 LFC), a converted copy of
    `stock`'s output and gradients (grads_of), and how many times its step applied `function`
    (a recomputed attention: what the gradients then check)."""
    faithful = division.convert_model(copy.deepcopy(stock), division.DivisionConfig(block_size=1, lfc_dtype="float32"))
    results = []
    applies = count_applies(function, lambda: results.append(grads_of(faithful, x, autocast=autocast)))
    ((y, grads),) = results
    return applies, y, grads


def draw_cosines(stock: nn.Module, model: nn.Module, x: torch.Tensor, part: str, draws: int = 8) -> tuple[float, float]:
    """Cosines to stock's gradient of `part`: of one DIVISION draw's, and of the mean of `draws` draws'
    (DIVISION's noise averages away: the second is the larger)."""
    exact = flat_grads(grads_of(stock, x)[1], part)
    runs = [flat_grads(grads_of(model, x, seed=s)[1], part) for s in range(draws)]
    one = F.cosine_similarity(runs[0], exact, dim=0).item()
    return one, F.cosine_similarity(torch.stack(runs).mean(0), exact, dim=0).item()


def count_applies(function: type, run: Callable[[], Any]) -> int:
    """How many times `run()` applies the autograd Function `function`."""
    calls = []
    apply = function.apply
    function.apply = lambda *a: calls.append(1) or apply(*a)  # type: ignore[method-assign]
    try:
        run()
    finally:
        function.apply = apply  # type: ignore[method-assign]
    return len(calls)
