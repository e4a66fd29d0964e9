"""Converted layers against the stock torch.nn layers: outputs, gradients, running stats, modes."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import division
from division.functional import CONV, MAP
from division.layers import DivisionLayer

FAITHFUL = [
    division.DivisionConfig(block_size=1, lfc_dtype="float32"),  # LFC is x: exact
    division.DivisionConfig(block_size=1),  # bf16 LFC, HFC holds its rounding error
    division.DivisionConfig(block_size=8, hfc_bits=8),
]


def run(module: nn.Module, x: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output and gradients (input and parameters) for a fixed random upstream gradient."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1000 + seed)).to(y.device)
    y.backward(g)
    grads = {"input": x.grad}
    grads.update({n: p.grad for n, p in module.named_parameters()})
    return y.detach(), grads


def converted_pair(make: Callable[[], nn.Module], cfg: division.DivisionConfig) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    stock = make()
    layer = division.convert_model(copy.deepcopy(stock), cfg)
    return stock, layer


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


CONV_CASES = {
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, padding=1), (3, 4, 13, 11)),
    "conv2d_stride_groups": (lambda: nn.Conv2d(4, 8, 3, stride=2, groups=2, bias=False), (2, 4, 17, 16)),
    "conv2d_dilation_reflect": (lambda: nn.Conv2d(3, 5, 3, dilation=2, padding=2, padding_mode="reflect"), (2, 3, 12, 12)),
    "conv2d_same": (lambda: nn.Conv2d(3, 4, 4, padding="same"), (2, 3, 10, 9)),
    "conv2d_1x1": (lambda: nn.Conv2d(6, 3, 1), (2, 6, 7, 7)),
    "conv1d": (lambda: nn.Conv1d(3, 4, 5, padding=2), (2, 3, 40)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 3, padding=1), (2, 2, 6, 9, 8)),
    "batchnorm1d": (lambda: nn.BatchNorm1d(5), (4, 5, 30)),
    "batchnorm2d": (lambda: nn.BatchNorm2d(5), (4, 5, 9, 10)),
    "batchnorm2d_affine_off": (lambda: nn.BatchNorm2d(5, affine=False), (4, 5, 9, 10)),
    "batchnorm3d": (lambda: nn.BatchNorm3d(3), (2, 3, 4, 8, 8)),
    "linear3d": (lambda: nn.Linear(12, 5), (3, 7, 12)),
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1), (2, 4, 9, 8)),
    "conv_transpose1d_groups": (lambda: nn.ConvTranspose1d(4, 6, 4, stride=2, groups=2, bias=False), (2, 4, 30)),
    "conv_transpose3d": (lambda: nn.ConvTranspose3d(3, 2, 2, stride=2, dilation=2), (2, 3, 4, 6, 5)),
    "groupnorm2d": (lambda: nn.GroupNorm(3, 6), (3, 6, 9, 10)),
    "groupnorm1d_affine_off": (lambda: nn.GroupNorm(2, 4, affine=False), (4, 4, 30)),
    "groupnorm3d": (lambda: nn.GroupNorm(1, 4), (2, 4, 4, 8, 8)),
}


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("cfg", FAITHFUL, ids=["B1_fp32lfc", "B1", "Q8"])
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_gradients_match_autograd_when_the_codec_is_faithful(case: str, cfg: division.DivisionConfig) -> None:
    make, shape = CONV_CASES[case]
    cfg = cfg.replace(compress_linear=True)
    stock, layer = converted_pair(make, cfg)
    assert type(layer) is not type(stock)
    x = torch.randn(shape) * 2 + 0.5
    y0, g0 = run(stock, x)
    y1, g1 = run(layer, x)
    assert torch.allclose(y1, y0, atol=1e-5, rtol=1e-5)  # forward is the exact op
    tol = 1e-5 if cfg.lfc_dtype == "float32" else 2e-2
    for name in g0:
        assert g1[name] is not None and torch.isfinite(g1[name]).all()
        assert rel_err(g1[name], g0[name]) < tol, name


@pytest.mark.parametrize("case", ["conv2d", "conv2d_stride_groups", "batchnorm2d", "conv1d", "groupnorm2d"])
def test_gradient_mean_converges_at_default_settings(case: str) -> None:
    make, shape = CONV_CASES[case]
    stock, layer = converted_pair(make, division.DivisionConfig(block_size=8, hfc_bits=2))
    torch.manual_seed(1)
    x = torch.randn(shape) + torch.linspace(-1, 1, shape[-1])  # some low-frequency content
    _, exact = run(stock, x)
    single: list[float] = []
    total: dict[str, torch.Tensor] = {k: torch.zeros_like(v) for k, v in exact.items()}
    runs = 64
    for _ in range(runs):
        _, g = run(layer, x)
        for k in total:
            total[k] += g[k]
        single.append(rel_err(g["input" if case.startswith("batch") else "weight"], exact["input" if case.startswith("batch") else "weight"]))
    key = "input" if case.startswith("batch") else "weight"
    mean_err = rel_err(total[key] / runs, exact[key])
    # unbiased noise falls as 1/sqrt(runs) = 1/8; bias would not fall at all
    assert mean_err < sum(single) / runs / 4
    assert mean_err < 0.15


def test_batchnorm_running_stats_update_once_like_stock() -> None:
    for momentum in (0.1, None):
        stock, layer = converted_pair(lambda m=momentum: nn.BatchNorm2d(4, momentum=m), division.DivisionConfig())
        for step in range(3):
            x = torch.randn(5, 4, 6, 6) * (step + 1) + step
            run(stock, x)
            run(layer, x)
        assert torch.allclose(layer.running_mean, stock.running_mean, atol=1e-6)
        assert torch.allclose(layer.running_var, stock.running_var, atol=1e-6)
        assert layer.num_batches_tracked.item() == stock.num_batches_tracked.item() == 3


@pytest.mark.parametrize("inplace", [False, True])
def test_relu_mask_gives_the_exact_gradient(inplace: bool) -> None:
    stock, layer = converted_pair(lambda: nn.ReLU(inplace=inplace), division.DivisionConfig())
    x = torch.randn(3, 4, 9, 7)
    x[0, 0, 0, :3] = 0.0  # ties at zero get no gradient, as in torch
    # an in-place ReLU needs a non-leaf input
    def go(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        leaf = x.clone().requires_grad_(True)
        y = m(leaf * 1.0)
        y.backward(torch.arange(y.numel(), dtype=torch.float32).view(y.shape))
        return y.detach(), leaf.grad
    y0, g0 = go(stock)
    y1, g1 = go(layer)
    assert torch.equal(y0, y1) and torch.equal(g0, g1)


def test_relu_saves_one_bit_per_element() -> None:
    layer = division.convert_model(nn.ReLU(), division.DivisionConfig())
    x = torch.randn(8, 16, 32, 32, requires_grad=True)
    sizes: list[int] = []
    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.numel() * t.element_size())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x * 1.0)
    assert sum(sizes) == x.numel() // 8


def test_dropout_mask_and_gradient() -> None:
    layer = division.convert_model(nn.Dropout(p=0.3), division.DivisionConfig())
    x = torch.randn(4, 3, 10, 10).abs() + 0.1
    y, g = run(layer, x, seed=2)
    keep = y != 0
    assert 0.6 < keep.float().mean().item() < 0.8
    assert torch.allclose(y[keep], x[keep] / 0.7)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(1002))
    assert torch.allclose(g["input"], upstream * keep / 0.7)
    layer.eval()
    assert torch.equal(layer(x), x)


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_is_stock_dropout_bit_for_bit(backend: str, inplace: bool, dtype: torch.dtype) -> None:
    """The same random draws, outputs and gradients as nn.Dropout under the same seed."""
    stock, layer = converted_pair(lambda: nn.Dropout(p=0.3, inplace=inplace), division.DivisionConfig(backend=backend))
    x = torch.randn(4, 3, 10, 10).to(dtype)
    upstream = torch.randn(4, 3, 10, 10).to(dtype)
    upstream[0, 0, 0] = torch.inf  # a dropped inf gradient is NaN in stock, kept is inf
    outs = []
    for m in (stock, layer):
        leaf = x.clone().requires_grad_(True)
        torch.manual_seed(7)
        y = m(leaf * 1.0)  # a non-leaf, as an in-place dropout needs
        y.backward(upstream)
        outs.append((y.detach(), leaf.grad))
    (y0, g0), (y1, g1) = outs
    assert torch.equal(y0, y1)
    assert torch.equal(g0.isnan(), g1.isnan()) and torch.equal(g0.nan_to_num(), g1.nan_to_num())


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_relu_gradient_passes_nan_and_blocks_negative_zero_like_stock(backend: str) -> None:
    stock, layer = converted_pair(nn.ReLU, division.DivisionConfig(backend=backend))
    x = torch.tensor([[[[-0.0, 0.0, float("nan"), -1.0, 2.0, -float("inf"), float("inf")]]]])
    y0, g0 = run(stock, x)
    y1, g1 = run(layer, x)
    assert torch.equal(y0.isnan(), y1.isnan()) and torch.equal(y0.nan_to_num().signbit(), y1.nan_to_num().signbit())
    assert torch.equal(g0["input"], g1["input"])


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=3, stride=2, padding=1),
        dict(kernel_size=2),
        dict(kernel_size=3, stride=2, ceil_mode=True),
        dict(kernel_size=3, stride=1, dilation=2),
    ],
)
def test_maxpool_compact_indices_give_the_exact_gradient(kwargs: dict) -> None:
    stock, layer = converted_pair(lambda: nn.MaxPool2d(**kwargs), division.DivisionConfig())
    x = torch.randn(2, 3, 15, 14)
    y0, g0 = run(stock, x)
    y1, g1 = run(layer, x)
    assert torch.equal(y0, y1) and torch.equal(g0["input"], g1["input"])


POOL3D_CASES = [
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),  # S3D's
    dict(kernel_size=2),
    dict(kernel_size=3, stride=2, ceil_mode=True),
    dict(kernel_size=(2, 3, 5), stride=1, dilation=(1, 2, 2), padding=(0, 1, 2)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
@pytest.mark.parametrize("kwargs", POOL3D_CASES)
def test_maxpool3d_keeps_window_offsets_and_gives_stocks_gradient(kwargs: dict, layout: torch.memory_format,
                                                                  dtype: torch.dtype) -> None:
    """MaxPool3d keeps each argmax as its offset in the window (a byte or less per output) where
    stock keeps the input and int64 indices: stock's output and gradient bit for bit, overlapping
    windows, ties, -inf and NaN included, in either layout (the output and gradient in the input's,
    as stock's). A window whose maximum is -inf sends its gradient to its first tap in the input,
    as stock's contiguous kernel; stock's channels_last_3d kernel sends it into the first depth
    plane, outside the window, so there stock's contiguous gradient is the witness."""
    stock, layer = converted_pair(lambda: nn.MaxPool3d(**kwargs), division.DivisionConfig())
    x = torch.randn(2, 3, 7, 9, 10).to(dtype)
    x[:, :, ::2, ::2, ::2] = 3.0  # ties shared by overlapping windows
    x[0, 0, :3, :4] = -float("inf")
    x[1, 2, 1, 1, 1] = float("nan")
    x = x.contiguous(memory_format=layout)
    outs = []
    for m, inputs in ((stock, x.contiguous()), (layer, x)):
        leaf = inputs.clone().requires_grad_(True)
        y = m(leaf * 1.0)
        y.backward(torch.linspace(-1, 1, y.numel()).view(y.shape).to(dtype).contiguous(memory_format=layout))
        outs.append((y.detach(), leaf.grad))
    (y0, g0), (y1, g1) = outs
    assert torch.equal(y0.nan_to_num(), y1.nan_to_num()) and torch.equal(y0.isnan(), y1.isnan())
    assert torch.equal(g0, g1) and g1.is_contiguous(memory_format=layout) and y1.is_contiguous(memory_format=layout)
    finite = x.nan_to_num(0.0, 4.0, 0.0)  # without -inf windows stock's own layout agrees too
    (y2, g2), (y3, g3) = run(stock, finite), run(layer, finite)
    assert torch.equal(y2, y3) and torch.equal(g2["input"], g3["input"]) and g3["input"].stride() == g2["input"].stride()
    assert saved_bytes(layer, x) <= y0.numel() + 4 < saved_bytes(stock, x) / 8


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
@pytest.mark.parametrize("kwargs", POOL3D_CASES)
def test_maxpool3d_gives_stocks_gradient_on_cuda(kwargs: dict, layout: torch.memory_format) -> None:
    """On a GPU (the reference's ops on CUDA tensors; no kernel pools 3-d maps): stock's output bit
    for bit and its gradient, whose overlapping windows stock's CUDA backward sums with atomics in
    no set order (so to float32 rounding), in either layout."""
    stock, layer = converted_pair(lambda: nn.MaxPool3d(**kwargs), division.DivisionConfig())
    x = torch.randn(2, 3, 7, 9, 10, device="cuda").contiguous(memory_format=layout)
    (y0, g0), (y1, g1) = run(stock, x), run(layer, x)
    assert torch.equal(y0, y1) and g1["input"].stride() == g0["input"].stride()
    torch.testing.assert_close(g1["input"], g0["input"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dims", [2, 3])
def test_maxpool_under_cpu_autocast_runs_at_stocks_dtype(dims: int) -> None:
    """CPU autocast runs max_pool3d in float32 (not max_pool2d, nor the variants returning indices):
    the converted layers give stock's output dtype, values and gradient."""
    make = (lambda: nn.MaxPool2d(3, 2, 1)) if dims == 2 else (lambda: nn.MaxPool3d(3, 2, 1))  # noqa: E731
    stock, layer = converted_pair(make, division.DivisionConfig())
    x = torch.randn(2, 3, *(9,) * dims).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (y0, g0), (y1, g1) = run(stock, x), run(layer, x)
    assert y1.dtype == y0.dtype == (torch.float32 if dims == 3 else torch.bfloat16)
    assert torch.equal(y0, y1) and torch.equal(g0["input"], g1["input"]) and g1["input"].dtype == torch.bfloat16


def test_maxpool3d_unbatched_and_with_indices_as_stock() -> None:
    """An unbatched (C, D, H, W) input pools as stock's; return_indices=True stays stock's layer."""
    stock, layer = converted_pair(lambda: nn.MaxPool3d(2), division.DivisionConfig())
    x = torch.randn(3, 4, 6, 6)
    (y0, g0), (y1, g1) = run(stock, x), run(layer, x)
    assert torch.equal(y0, y1) and torch.equal(g0["input"], g1["input"])
    kept = division.convert_model(nn.Sequential(nn.MaxPool3d(2, return_indices=True)))
    assert type(kept[0]) is nn.MaxPool3d
    assert division.summary(kept).rows[0].reason == "MaxPool3d(return_indices=True) is not converted"


@pytest.mark.parametrize("mode", ["exact", "lfc_only", "hfc_only"])
def test_backward_modes(mode: str) -> None:
    stock, layer = converted_pair(lambda: nn.Conv2d(3, 4, 3, padding=1), division.DivisionConfig(backward_mode=mode))
    x = torch.randn(2, 3, 16, 16)
    _, g0 = run(stock, x)
    _, g1 = run(layer, x)
    assert torch.equal(g1["input"], g0["input"])  # the input gradient needs only the weight
    err = rel_err(g1["weight"], g0["weight"])
    if mode == "exact":
        assert err == 0.0
    else:
        assert 0.0 < err < 1.5


def test_eval_and_no_grad_run_the_stock_forward() -> None:
    stock, layer = converted_pair(lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), division.DivisionConfig())
    compressor = layer._division_compressor
    x = torch.randn(2, 3, 8, 8)
    calls: list[int] = []
    original = compressor.compress
    compressor.compress = lambda *a, **k: calls.append(1) or original(*a, **k)  # type: ignore[method-assign]
    with torch.no_grad():
        assert torch.equal(layer(x), stock(x))
    stock.eval()
    layer.eval()
    assert torch.equal(layer(x.requires_grad_(True)), stock(x))
    assert calls == []
    layer.train()
    layer(x).sum().backward()
    assert len(calls) == 2  # conv input and BN input


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_matches_stock_autocast(dtype: torch.dtype) -> None:
    make = lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))  # noqa: E731
    stock, layer = converted_pair(make, division.DivisionConfig(block_size=1, hfc_bits=8))
    x = torch.randn(2, 3, 12, 12)
    with torch.autocast("cpu", dtype=dtype):
        y0, g0 = run(stock, x)
        y1, g1 = run(layer, x)
    assert y1.dtype == y0.dtype == dtype
    assert torch.allclose(y1.float(), y0.float(), atol=1e-2, rtol=1e-2)
    for name in g0:
        assert g1[name].dtype == g0[name].dtype
        assert rel_err(g1[name].float(), g0[name].float()) < 3e-2, name


@pytest.mark.parametrize("kind", ["conv", "linear", "attention"])
def test_autocast_weight_copies_are_not_kept_for_backward(kind: str) -> None:
    """Under autocast a converted layer saves its float32 parameter and casts it again in
    backward, where stock keeps the bf16 copy until backward: in exact mode the gradients are
    still stock's bit for bit, and what the layer saves is its input alone."""
    make, shape = {
        "conv": (lambda: nn.Conv2d(16, 32, 3, padding=1), (2, 16, 6, 6)),
        "linear": (lambda: nn.Linear(48, 64), (2, 5, 48)),
        "attention": (lambda: nn.MultiheadAttention(32, 4, batch_first=True), (2, 5, 32)),
    }[kind]
    cfg = division.DivisionConfig(backward_mode="exact", compress_linear=True, compress_attention=False)
    stock, layer = converted_pair(make, cfg)
    x = torch.randn(shape)
    saved = {}
    for name, module in (("stock", stock), ("division", layer)):
        call = (lambda m, t: m(t, t, t, need_weights=False)[0]) if kind == "attention" else (lambda m, t: m(t))
        counter = division.saved.SavedBytes(exclude=list(module.parameters()))
        module.zero_grad(set_to_none=True)
        leaf = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16), counter.counting():
            y = call(module, leaf)
        y.float().square().sum().backward()
        saved[name] = (counter.total, y.detach(), leaf.grad, {n: q.grad for n, q in module.named_parameters()})
    (_, y0, gx0, g0), (total, y1, gx1, g1) = saved["stock"], saved["division"]
    assert torch.equal(y1, y0) and torch.equal(gx1, gx0)
    assert g0.keys() == g1.keys() and all(torch.equal(g1[n], g0[n]) and g1[n].dtype == torch.float32 for n in g0)
    weights = sum(q.numel() * 2 for n, q in stock.named_parameters() if "weight" in n)
    assert saved["stock"][0] >= weights  # stock keeps the bf16 copies
    assert total < saved["stock"][0] - weights + 1024  # the converted layer does not


def test_channels_last_stays_channels_last() -> None:
    stock, layer = converted_pair(lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), division.DivisionConfig(block_size=1, lfc_dtype="float32"))
    stock = stock.to(memory_format=torch.channels_last)
    layer = layer.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 10, 10).contiguous(memory_format=torch.channels_last)
    y0, g0 = run(stock, x)
    y1, g1 = run(layer, x)
    assert y1.is_contiguous(memory_format=torch.channels_last)
    for name in g0:
        assert rel_err(g1[name], g0[name]) < 1e-5


def test_linear_is_kept_unless_compress_linear() -> None:
    model = division.convert_model(nn.Sequential(nn.Linear(4, 3)), division.DivisionConfig())
    assert type(model[0]) is nn.Linear
    model = division.convert_model(nn.Sequential(nn.Linear(4, 3)), division.DivisionConfig(compress_linear=True))
    assert type(model[0]).__name__ == "DivisionLinear"


# ---------------------------------------------------------------------------------------------
# what stock accepts, rejects and returns at the edges


def stock_and_converted(make: Callable[[], nn.Module], x: torch.Tensor, cfg: division.DivisionConfig):
    """(output, input grad, parameter grads) of the stock layer and of its converted copy."""
    stock, layer = converted_pair(make, cfg)
    out = []
    for m in (stock, layer):
        leaf = x.detach().clone().requires_grad_(True)
        y = m(leaf * 1.0)
        y.backward(torch.ones_like(y) if y.numel() else y)
        out.append((y.detach(), leaf.grad, [p.grad for p in m.parameters()]))
    return out


@pytest.mark.parametrize("make, shape", [
    (lambda: nn.Conv1d(3, 4, 3), (3, 10)),
    (lambda: nn.Conv2d(3, 4, 3, padding=1), (3, 8, 8)),
    (lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), (3, 8, 8)),
    (lambda: nn.MaxPool2d(3, 2, 1), (3, 9, 9)),
])
def test_unbatched_inputs_train_as_in_stock(make: Callable[[], nn.Module], shape: tuple) -> None:
    (y0, g0, p0), (y1, g1, p1) = stock_and_converted(make, torch.randn(shape), division.DivisionConfig(backward_mode="exact"))
    assert y0.shape == y1.shape == y1.shape and torch.equal(y0, y1) and torch.equal(g0, g1)
    assert all(torch.equal(a, b) for a, b in zip(p0, p1))


@pytest.mark.parametrize("make, shape", [
    (lambda: nn.Conv2d(3, 4, 3), (0, 3, 8, 8)),
    (lambda: nn.BatchNorm2d(3), (0, 3, 8, 8)),
    (lambda: nn.ReLU(), (2, 0, 8, 8)),
    (lambda: nn.Dropout(0.5), (0, 5)),
])
def test_empty_inputs_run_as_in_stock(make: Callable[[], nn.Module], shape: tuple) -> None:
    (y0, g0, _), (y1, g1, _) = stock_and_converted(make, torch.randn(shape), division.DivisionConfig())
    assert y0.shape == y1.shape and g0.shape == g1.shape


def test_batchnorm1d_on_n_by_c_inputs_is_stock() -> None:
    """MLP and projection heads: (N, C) inputs have no plane to split, they are kept as they are."""
    (y0, g0, p0), (y1, g1, p1) = stock_and_converted(lambda: nn.BatchNorm1d(5), torch.randn(4, 5), division.DivisionConfig())
    assert torch.equal(y0, y1) and torch.equal(g0, g1) and all(torch.equal(a, b) for a, b in zip(p0, p1))


@pytest.mark.parametrize("make, shape", [(lambda: nn.BatchNorm2d(3), (1, 3, 1, 1)), (lambda: nn.BatchNorm1d(3), (1, 3))])
def test_batchnorm_with_one_value_per_channel_raises_like_stock(make: Callable[[], nn.Module], shape: tuple[int, ...]) -> None:
    stock, layer = converted_pair(make, division.DivisionConfig())
    x = torch.randn(*shape, requires_grad=True)
    with pytest.raises(ValueError) as stock_err:
        stock(x)
    with pytest.raises(ValueError) as ours:
        layer(x)
    assert str(ours.value) == str(stock_err.value)
    assert torch.isfinite(layer.running_var).all()
    assert layer.num_batches_tracked.item() == stock.num_batches_tracked.item() == 1  # counted, as stock does


def test_float64_models_run_in_exact_mode_and_say_why_not_otherwise() -> None:
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    torch.manual_seed(0)
    stock = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Dropout(0.3), nn.Flatten(), nn.Linear(36, 5), nn.BatchNorm1d(5),
    ).double()
    converted = division.convert_model(copy.deepcopy(stock), division.DivisionConfig(backward_mode="exact"))
    results = []
    for model in (stock, converted):
        torch.manual_seed(1)  # the same dropout draws
        leaf = x.clone().requires_grad_(True)
        y = model(leaf)
        y.backward(torch.randn_like(y))
        results.append((y.detach(), leaf.grad, [p.grad for p in model.parameters()]))
    (y0, g0, p0), (y1, g1, p1) = results
    assert torch.equal(y0, y1) and torch.equal(g0, g1) and all(torch.equal(a, b) for a, b in zip(p0, p1))
    assert torch.equal(stock[1].running_var, converted[1].running_var)
    layer = division.convert_model(nn.Conv2d(3, 4, 3).double(), division.DivisionConfig())
    with pytest.raises(TypeError, match="unsupported dtype torch.float64.*backward_mode='exact'"):
        layer(x.requires_grad_(True))


def test_an_infinite_input_gives_non_finite_weight_gradients_as_stock() -> None:
    """What GradScaler needs to skip the step: stock's weight gradient is not finite, nor is ours."""
    x = torch.randn(2, 3, 8, 8)
    x[0, 1, 2, 2] = torch.inf
    (_, _, p0), (_, _, p1) = stock_and_converted(lambda: nn.Conv2d(3, 4, 3), x, division.DivisionConfig())
    assert not torch.isfinite(p0[0]).all() and not torch.isfinite(p1[0]).all()
    assert torch.isfinite(p1[1]).all()  # the bias gradient does not read x


def test_public_compress_checks_its_config_and_keeps_no_history() -> None:
    x = torch.randn(2, 3, 8, 8, requires_grad=True) * 2
    with pytest.raises(TypeError, match="cfg must be a division.DivisionConfig, got NoneType"):
        division.compress(x, None)  # type: ignore[arg-type]
    for mode in division.format.MODES:
        packed = division.compress(x, division.DivisionConfig(), mode=mode)
        assert all(t.grad_fn is None and not t.requires_grad for t in packed.tensors() if t is not None), mode
        assert not division.decompress(packed).requires_grad, mode


def test_which_gradients_are_unbiased() -> None:
    """Linear in the reconstruction (conv weight): the mean of many draws stays within its noise;
    BatchNorm's input gradient (not linear in it) keeps a small bias, as the README states."""
    from benchmarks.gradient_bias import CASES, measure

    cfg = division.DivisionConfig()
    conv = measure(*CASES["Conv2d weight, 32 per channel"], draws=1000, cfg=cfg)
    assert conv["bias"] < 2 * conv["noise_floor"]
    bn_input = measure(*CASES["BatchNorm2d input, 32 per channel"], draws=1000, cfg=cfg)
    assert 2 * bn_input["noise_floor"] < bn_input["bias"] < 0.03


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_overlapping_max_pool_gradients_are_stock_bit_for_bit(dtype: torch.dtype) -> None:
    """3x3 windows at stride 1 overlap: each input sums up to 9 gradients in stock's order and
    precision (on the CPU stock rounds each add of a half-precision gradient; so does the layer)."""
    stock, layer = converted_pair(lambda: nn.MaxPool2d(3, 1, 1), division.DivisionConfig())
    x = torch.randn(2, 3, 9, 9).to(dtype)
    x[:, :, ::2, ::2] = 3.0  # maxima shared by up to nine windows
    upstream = torch.randn(2, 3, 9, 9).to(dtype)
    outs = []
    for m in (stock, layer):
        leaf = x.clone().requires_grad_(True)
        y = m(leaf * 1.0)
        y.backward(upstream)
        outs.append((y.detach(), leaf.grad))
    (y0, g0), (y1, g1) = outs
    assert torch.equal(y0, y1) and torch.equal(g0, g1)


def saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd saves for one forward of `module` on a non-leaf copy of x."""
    sizes: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.numel() * t.element_size())
        return t

    leaf = x.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(leaf * 1.0)
    return sum(sizes)


def bits(t: torch.Tensor) -> torch.Tensor:
    """A float tensor's bit patterns (so -0 != +0 and NaN == NaN)."""
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


CLAMPS = {"relu6": lambda inplace: nn.ReLU6(inplace), "hardtanh": lambda inplace: nn.Hardtanh(-0.5, 1.5, inplace)}


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", list(CLAMPS))
def test_relu6_and_hardtanh_masks_are_stock_bit_for_bit(kind: str, dtype: torch.dtype, inplace: bool, backend: str) -> None:
    """A 1-bit mask of where the gradient passes: outputs and input gradients equal stock's bit
    for bit, at the clamp's ends, -0, NaN and infinities included, in channels_last too."""
    stock, layer = converted_pair(lambda: CLAMPS[kind](inplace), division.DivisionConfig(backend=backend))
    assert type(layer).__name__ == {"relu6": "DivisionReLU6", "hardtanh": "DivisionHardtanh"}[kind]
    x = torch.randn(3, 8, 6, 5) * 4
    x.view(-1)[:10] = torch.tensor([-0.0, 0.0, 6.0, -0.5, 1.5, float("nan"), float("inf"), -float("inf"), 5.999, -0.4999])
    x = x.to(dtype).contiguous(memory_format=torch.channels_last)
    upstream = torch.randn(x.shape).to(dtype)
    upstream.view(-1)[10:12] = -0.0
    outs = []
    for m in (stock, layer):
        leaf = x.clone().requires_grad_(True)
        y = m(leaf * 1.0)  # a non-leaf, as an in-place layer needs
        y.backward(upstream)
        outs.append((y.detach(), leaf.grad))
    (y0, g0), (y1, g1) = outs
    assert torch.equal(bits(y0), bits(y1)) and torch.equal(bits(g0), bits(g1))
    assert y1.is_contiguous(memory_format=torch.channels_last)
    assert saved_bytes(layer, x) == (x.numel() + 31) // 32 * 4  # one bit per element, in whole words


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("slope", [0.01, 0.2, 0.0, -0.3, 1.5])
def test_leaky_relu_mask_is_stock_bit_for_bit(slope: float, dtype: torch.dtype, inplace: bool,
                                              layout: torch.memory_format) -> None:
    """A 1-bit mask of x > 0: outputs, input gradients and their layouts equal stock's bit for bit,
    -0, NaN and infinities included; in place with a negative slope stock's own layer runs (and
    its backward raises stock's error)."""
    stock, layer = converted_pair(lambda: nn.LeakyReLU(slope, inplace), division.DivisionConfig())
    assert type(layer).__name__ == "DivisionLeakyReLU"
    x = torch.randn(3, 8, 6, 5) * 4
    x.view(-1)[:6] = torch.tensor([-0.0, 0.0, float("nan"), float("inf"), -float("inf"), 1e-30])
    x = x.to(dtype).contiguous(memory_format=layout)
    upstream = torch.randn(x.shape).to(dtype)
    outs = []
    for m in (stock, layer):
        leaf = x.clone().requires_grad_(True)
        y = m(leaf * 1.0)  # a non-leaf, as an in-place layer needs
        if inplace and slope < 0:
            with pytest.raises(RuntimeError, match="In-place leakyReLu backward calculation is triggered with a negative slope"):
                y.backward(upstream)
            continue
        y.backward(upstream)
        outs.append((y.detach(), leaf.grad))
    if outs:
        (y0, g0), (y1, g1) = outs
        assert torch.equal(bits(y0), bits(y1)) and torch.equal(bits(g0), bits(g1))
        assert y0.stride() == y1.stride() and g0.stride() == g1.stride()
        assert saved_bytes(layer, x) == (x.numel() + 31) // 32 * 4  # one bit per element, in whole words


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_leaky_relu_mask_on_cuda(dtype: torch.dtype) -> None:
    """The mask packed by the pack_bool kernel, unpacked by the reference's ops: stock's CUDA
    values and gradients bit for bit, in both layouts."""
    for layout in (torch.contiguous_format, torch.channels_last):
        stock, layer = (m.cuda() for m in converted_pair(lambda: nn.LeakyReLU(0.1), division.DivisionConfig()))
        x = (torch.randn(4, 16, 33, 31, device="cuda") * 4).to(dtype).contiguous(memory_format=layout)
        x.view(-1)[:3] = torch.tensor([-0.0, float("nan"), -float("inf")])
        outs = []
        for m in (stock, layer):
            leaf = x.clone().requires_grad_(True)
            y = m(leaf)
            y.backward(torch.ones_like(y))
            outs.append((y.detach(), leaf.grad))
        (y0, g0), (y1, g1) = outs
        assert torch.equal(bits(y0), bits(y1)) and torch.equal(bits(g0), bits(g1)) and g0.stride() == g1.stride()


ACTIVATION_LAYERS = {"silu": nn.SiLU, "hardswish": nn.Hardswish, "mish": nn.Mish}


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("kind", list(ACTIVATION_LAYERS))
def test_elementwise_activations_save_their_input_compressed(kind: str, inplace: bool) -> None:
    """SiLU, Hardswish and Mish of a conv map: stock's output; exact mode stock's gradient bit for
    bit (in place too: the input is copied before it is overwritten, as stock's autograd does);
    DIVISION saves cfg.activation_bits (not hfc_bits) per element, with aten's derivative at the
    rebuilt input: the more bits, the nearer stock's gradient."""
    make = lambda: ACTIVATION_LAYERS[kind](inplace=inplace)  # noqa: E731
    x = torch.randn(4, 6, 16, 16) * 3

    def go(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        leaf = x.clone().requires_grad_(True)
        y = m(leaf * 1.0)
        y.backward(torch.linspace(-1, 1, y.numel()).view(y.shape))
        return y.detach(), leaf.grad

    stock, exact = converted_pair(make, division.DivisionConfig(backward_mode="exact"))
    (y0, g0), (y1, g1) = go(stock), go(exact)
    assert torch.equal(y0, y1) and torch.equal(g0, g1)
    _, faithful = converted_pair(make, FAITHFUL[0])  # B = 1, float32 LFC: the input itself
    y2, g2 = go(faithful)
    assert torch.equal(y0, y2) and torch.equal(g0, g2)
    errors = {}
    for bits in (2, 4, 8):
        _, layer = converted_pair(make, division.DivisionConfig(activation_bits=bits))
        y3, g3 = go(layer)
        assert torch.equal(y0, y3)
        errors[bits] = rel_err(g3, g0)
        assert saved_bytes(layer, x) * 32 < saved_bytes(stock, x) * (bits + 1)  # bits + 16/64 per element, and constants
    assert 0 < errors[8] < 0.05 and errors[8] < errors[4] < errors[2], errors  # activation_bits, not hfc_bits
    assert saved_bytes(layer, x[:, :, 0, 0]) == saved_bytes(stock, x[:, :, 0, 0])  # (N, C): stock's


GELU_AFTER = {
    "conv1d": (lambda: nn.Conv1d(3, 6, 3, padding=1), (4, 3, 512)),
    "conv2d": (lambda: nn.Conv2d(3, 6, 3, padding=1), (4, 3, 16, 16)),
    "batchnorm2d": (lambda: nn.BatchNorm2d(3), (4, 3, 16, 16)),
    "conv3d": (lambda: nn.Conv3d(3, 6, 3, padding=1), (2, 3, 16, 16, 16)),
}


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("before", list(GELU_AFTER))
def test_gelu_after_a_convolution_saves_its_conv_map_as_silu_does(before: str, approximate: str) -> None:
    """In a Sequential, a GELU right after a convolution or a norm of conv maps takes
    (N, C, *spatial) maps (torchvision's Conv2dNormActivation): it saves its input as SiLU does
    (activation_bits per element), exact mode stock's bit for bit, a faithful codec stock's gradient,
    DIVISION's near it; a lone GELU or one after a Linear keeps stock's (a 4-D input is ambiguous)."""
    make_before, shape = GELU_AFTER[before]
    make = lambda: nn.Sequential(make_before(), nn.GELU(approximate))  # noqa: E731
    x = torch.randn(shape) * 2
    go = lambda m: run(m, x)  # noqa: E731
    stock, exact = converted_pair(make, division.DivisionConfig(backward_mode="exact"))
    assert exact[1].map_layout == CONV
    (y0, g0), (y1, g1) = go(stock), go(exact)
    assert torch.equal(y0, y1) and all(torch.equal(g0[k], g1[k]) for k in g0)
    _, faithful = converted_pair(make, FAITHFUL[0])
    y2, g2 = go(faithful)
    assert torch.equal(y0, y2) and all(torch.equal(g0[k], g2[k]) for k in g0)
    _, layer = converted_pair(make, division.DivisionConfig())
    y3, g3 = go(layer)
    assert torch.equal(y0, y3) and rel_err(g3["input"], g0["input"]) < 0.3
    gelu_input = layer[0](x)
    lfc_bits = 16 / 8 ** (x.dim() - 2)  # a bf16 LFC value per block of 8, 8 x 8 or 8 x 8 x 8
    assert saved_bytes(layer[1], gelu_input) * 8 < gelu_input.numel() * (4 + lfc_bits + 0.5)  # activation_bits = 4
    for other in (nn.Sequential(nn.GELU()), nn.Sequential(nn.Linear(16, 16), nn.GELU())):
        converted = division.convert_model(other, division.DivisionConfig(compress_linear=True))
        assert converted[-1].map_layout is None
        assert saved_bytes(converted[-1], torch.randn(2, 3, 16, 16)) == 2 * 3 * 16 * 16 * 4


class ConvGeluBlock(nn.Module):
    """A block that applies its GELU to what its convolution gave (not a Sequential: nothing says
    the GELU's 4-D input is a conv map but where it came from), then to a channels-last view."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.GELU()
        self.act_hwc = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.conv(x))
        return y + self.act_hwc(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def test_a_gelu_of_a_converted_convolutions_output_saves_a_conv_map_record() -> None:
    """A GELU whose input is, as it is, a converted convolution's output in this forward takes it
    as an (N, C, H, W) map (as after a convolution in a Sequential); one on a permuted view of it
    keeps stock's; exact mode is stock's bit for bit. Only a model with such a GELU tracks outputs
    (a copy too)."""
    from division.functional import ActivationFn

    x = torch.randn(2, 3, 16, 16)
    stock, exact = converted_pair(ConvGeluBlock, division.DivisionConfig(backward_mode="exact"))
    (y0, g0), (y1, g1) = run(stock, x), run(exact, x)
    assert torch.equal(y0, y1) and all(torch.equal(g0[k], g1[k]) for k in g0)
    _, model = converted_pair(ConvGeluBlock, division.DivisionConfig())
    compressor = model._division_compressor
    assert compressor.track_conv_maps and copy.deepcopy(model)._division_compressor.track_conv_maps
    calls: list[int] = []
    apply = ActivationFn.apply
    ActivationFn.apply = lambda *a: calls.append(1) or apply(*a)  # type: ignore[method-assign]
    try:
        run(model, x)
    finally:
        ActivationFn.apply = apply  # type: ignore[method-assign]
    assert len(calls) == 1  # act; act_hwc's input is a view, which keeps stock's
    rows = {r.name: r for r in division.summary(model, x).rows}
    assert rows["act"].saved_bytes * 4 < rows["act"].vanilla_bytes and rows["act_hwc"].saved_bytes == 2 * 16 * 16 * 8 * 4
    import torchvision

    resnet = division.convert_model(torchvision.models.resnet18())
    assert not resnet._division_compressor.track_conv_maps  # no GELU: nothing to track


class Conv1dGelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.act = nn.Conv1d(4, 8, 3), nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


def test_a_gelu_of_a_conv1d_output_takes_it_as_a_conv_map_not_as_tokens() -> None:
    """A Conv1d's (N, C, L) output would pass for (N, T, D) tokens by its shape; as a converted
    convolution's output it is a conv map (ActivationFn, activation_bits), stock's in exact mode."""
    from division.functional import ActivationFn, GELUFn

    x = torch.randn(2, 4, 130)
    stock, exact = converted_pair(Conv1dGelu, division.DivisionConfig(backward_mode="exact"))
    (y0, g0), (y1, g1) = run(stock, x), run(exact, x)
    assert torch.equal(y0, y1) and all(torch.equal(g0[k], g1[k]) for k in g0)
    _, model = converted_pair(Conv1dGelu, division.DivisionConfig())
    used: list[str] = []

    def recording(apply: Callable, name: str) -> Callable:
        return lambda *a: used.append(name) or apply(*a)

    originals = {fn: fn.apply for fn in (ActivationFn, GELUFn)}
    for fn, apply in originals.items():
        fn.apply = recording(apply, fn.__name__)  # type: ignore[method-assign]
    try:
        run(model, x)
    finally:
        for fn, apply in originals.items():
            fn.apply = apply  # type: ignore[method-assign]
    assert used == ["ActivationFn"]


def test_squeeze_excitation_saves_its_input_compressed_and_converts_its_layers() -> None:
    """torchvision's SE block: exact mode is stock's bit for bit (input and parameter gradients),
    a faithful codec gives stock's gradients to its precision, and DIVISION keeps a compressed copy
    of x for `scale * x` where stock keeps x whole; convert and revert leave the original block's
    own layers alone."""
    from torchvision.ops.misc import SqueezeExcitation

    make = lambda: SqueezeExcitation(16, 4, activation=nn.SiLU)  # noqa: E731
    x = torch.randn(4, 16, 12, 12)
    stock, exact = converted_pair(make, division.DivisionConfig(backward_mode="exact"))
    assert type(exact).__name__ == "DivisionSqueezeExcitation"
    assert {type(m).__name__ for m in exact.children()} == {"AdaptiveAvgPool2d", "DivisionConv2d", "DivisionSiLU", "Sigmoid"}
    assert type(stock.fc1) is nn.Conv2d  # the original's layers are not converted in place
    (y0, g0), (y1, g1) = run(stock, x), run(exact, x)
    assert torch.equal(y0, y1) and all(torch.equal(g0[k], g1[k]) for k in g0)
    _, fine = converted_pair(make, FAITHFUL[2])  # 8-bit HFC: the record holds x to 1/255 of its range
    y2, g2 = run(fine, x)
    assert torch.equal(y0, y2) and all(0 < rel_err(g2[k], g0[k]) < 0.05 for k in g0), {k: rel_err(g2[k], g0[k]) for k in g0}
    _, layer = converted_pair(make, division.DivisionConfig())
    assert saved_bytes(layer, x) * 7 < saved_bytes(stock, x)  # x's record, and the small tensors whole
    reverted = division.revert_model(layer)
    assert type(reverted) is SqueezeExcitation and type(reverted.fc1) is nn.Conv2d and type(reverted.activation) is nn.SiLU


def test_planes_too_small_to_compress_are_kept_whole() -> None:
    """Where a division record would hold at least the input's own bytes (1x1 planes: an LFC value,
    a code word and three constants for one element), the input is kept as stock keeps it: the same
    bytes and stock's gradient, in place too (SiLU then keeps a copy, not the overwritten input)."""
    x = torch.randn(4, 32, 1, 1)
    for make in (lambda: nn.Conv2d(32, 8, 1), nn.SiLU, lambda: nn.SiLU(inplace=True)):
        stock, layer = converted_pair(make, division.DivisionConfig())
        assert saved_bytes(layer, x) == saved_bytes(stock, x)
    for make in (lambda: nn.Conv2d(32, 8, 1), nn.SiLU):
        stock, layer = converted_pair(make, division.DivisionConfig())
        (y0, g0), (y1, g1) = run(stock, x), run(layer, x)
        assert torch.equal(y0, y1) and all(torch.equal(g0[k], g1[k]) for k in g0)
    stock, layer = converted_pair(lambda: nn.SiLU(inplace=True), division.DivisionConfig())
    leaves = [x.clone().requires_grad_(True) for _ in range(2)]
    for m, leaf in zip((stock, layer), leaves):
        m(leaf * 1.0).sum().backward()
    assert torch.equal(leaves[0].grad, leaves[1].grad)
    # 2x2 planes and up are compressed (16 bytes of float32 against a 15-byte record)
    big = torch.randn(4, 32, 2, 2)
    stock, layer = converted_pair(lambda: nn.Conv2d(32, 8, 1), division.DivisionConfig())
    assert saved_bytes(layer, big) < saved_bytes(stock, big)


def test_convnext_block_saves_its_map_layers_and_layer_scale_input_compressed() -> None:
    """torchvision's ConvNeXt block: LayerNorm, the two Linears and GELU run on an (N, H, W, C) map
    and save it as a map record, `layer_scale * block(x)` saves the block's output compressed;
    exact mode is stock's bit for bit, an 8-bit HFC near it, and revert gives stock's layers."""
    from torchvision.models.convnext import CNBlock

    make = lambda: CNBlock(16, layer_scale=0.5, stochastic_depth_prob=0.0)  # noqa: E731
    x = torch.randn(4, 16, 12, 12)
    stock, exact = converted_pair(make, division.DivisionConfig(backward_mode="exact"))
    kinds = [type(m).__name__ for m in exact.block]
    assert kinds == ["DivisionConv2d", "Permute", "DivisionLayerNorm", "DivisionLinear", "DivisionGELU",
                     "DivisionLinear", "Permute"]
    assert all(m.map_layout == MAP for m in exact.block if type(m).__name__ in ("DivisionLayerNorm", "DivisionLinear", "DivisionGELU"))
    (y0, g0), (y1, g1) = run(stock, x), run(exact, x)
    assert torch.equal(y0, y1) and all(torch.equal(g0[k], g1[k]) for k in g0)
    _, fine = converted_pair(make, FAITHFUL[2])
    y2, g2 = run(fine, x)
    assert torch.equal(y0, y2)
    assert all(rel_err(g2[k], g0[k]) < 0.05 for k in g0), {k: rel_err(g2[k], g0[k]) for k in g0}
    _, layer = converted_pair(make, division.DivisionConfig())
    assert saved_bytes(layer, x) * 6 < saved_bytes(stock, x)
    alone = division.revert_model(copy.deepcopy(layer), recurse=False)  # the block alone
    assert type(alone) is CNBlock and type(alone.block[0]).__name__ == "DivisionConv2d"
    reverted = division.revert_model(layer)
    assert type(reverted) is CNBlock and [type(m) for m in reverted.block][2:6] == [nn.LayerNorm, nn.Linear, nn.GELU, nn.Linear]
    assert "map_layout" not in vars(reverted.block[3])


def test_layer_norm_2d_and_layers_after_a_permute_save_map_records() -> None:
    """torchvision's LayerNorm2d (ConvNeXt's stem and downsampling) and the LayerNorm / Linear /
    GELU between a Permute([0, 2, 3, 1]) and the next Permute of a Sequential (Swin's patch
    embedding) save their inputs as map records: exact mode is stock's bit for bit, a faithful
    codec gives stock's gradients, DIVISION saves several times less; layers past the permute back
    keep their rules (a Linear on (N, C) rows stays exact)."""
    from torchvision.models.convnext import LayerNorm2d
    from torchvision.ops.misc import Permute

    make = lambda: nn.Sequential(  # noqa: E731
        LayerNorm2d(16), nn.Conv2d(16, 16, 1), Permute([0, 2, 3, 1]), nn.LayerNorm(16), nn.Linear(16, 16), nn.GELU(),
        Permute([0, 3, 1, 2]), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )
    x = torch.randn(4, 16, 12, 12)
    stock, exact = converted_pair(make, division.DivisionConfig(backward_mode="exact"))
    assert [type(m).__name__ for m in exact][:6] == [
        "DivisionLayerNorm2d", "DivisionConv2d", "Permute", "DivisionLayerNorm", "DivisionLinear", "DivisionGELU"]
    assert all(exact[i].map_layout == MAP for i in (3, 4, 5)) and type(exact[9]) is nn.Linear
    (y0, g0), (y1, g1) = run(stock, x), run(exact, x)
    assert torch.equal(y0, y1) and all(torch.equal(g0[k], g1[k]) for k in g0)
    _, faithful = converted_pair(make, FAITHFUL[0])
    y2, g2 = run(faithful, x)
    assert torch.equal(y0, y2) and all(rel_err(g2[k], g0[k]) < 1e-5 for k in g0)
    _, layer = converted_pair(make, division.DivisionConfig())
    assert saved_bytes(layer, x) * 6 < saved_bytes(stock, x)
    reverted = division.revert_model(layer)
    assert type(reverted[0]) is LayerNorm2d and type(reverted[4]) is nn.Linear and "map_layout" not in vars(reverted[4])


AVG_POOLS = [
    dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=3, stride=2, ceil_mode=True),
    dict(kernel_size=(3, 2), stride=1, padding=1, count_include_pad=False), dict(kernel_size=2, divisor_override=3),
]
AVG_POOLS_3D = [
    dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=(2, 3, 3), stride=(1, 2, 2), ceil_mode=True),
    dict(kernel_size=(3, 2, 2), stride=1, padding=1, count_include_pad=False), dict(kernel_size=2, divisor_override=3),
]
AVG_POOL_CASES = [(2, p) for p in AVG_POOLS] + [(3, p) for p in AVG_POOLS_3D]


@pytest.mark.parametrize("dims, pool", AVG_POOL_CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_average_pooling_saves_nothing_and_gives_stocks_gradients(dims: int, pool: dict, channels_last: bool) -> None:
    check_average_pooling(dims, pool, channels_last, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dims, pool", AVG_POOL_CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_average_pooling_saves_nothing_and_gives_stocks_gradients_on_cuda(dims: int, pool: dict, channels_last: bool) -> None:
    check_average_pooling(dims, pool, channels_last, "cuda")


def check_average_pooling(dims: int, pool: dict, channels_last: bool, device: str) -> None:
    """AvgPool2d and AvgPool3d keep nothing of their input (stock keeps it all, for its shape): the
    same output and gradient as stock bit for bit, in the input's layout, under bf16 autocast too
    (where the CPU runs avg_pool3d in float32)."""
    x = torch.randn(3, 5, 11, 9, device=device) if dims == 2 else torch.randn(2, 3, 7, 11, 9, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if dims == 2 else torch.channels_last_3d)
    kind = nn.AvgPool2d if dims == 2 else nn.AvgPool3d
    stock, layer = converted_pair(lambda: kind(**pool), division.DivisionConfig())
    assert type(layer).__name__ == f"DivisionAvgPool{dims}d"
    for autocast in (False, True):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            (y0, g0), (y1, g1) = run(stock, x.bfloat16() if autocast else x), run(layer, x.bfloat16() if autocast else x)
        assert torch.equal(y0, y1) and torch.equal(g0["input"], g1["input"])
        assert g1["input"].stride() == g0["input"].stride() and g1["input"].dtype == g0["input"].dtype
    assert saved_bytes(layer, x) == 0 < saved_bytes(stock, x)
    assert type(division.revert_model(layer)) is kind


@pytest.mark.parametrize("family", ["inception", "googlenet"])
def test_basic_conv_keeps_a_mask_of_its_functional_relu(family: str) -> None:
    """torchvision's BasicConv2d (conv, batch norm, F.relu in place): its layers converted, and the
    ReLU's output, which stock keeps whole, kept as a 1-bit mask: stock's gradients bit for bit in
    exact mode (the same ops), less saved than by its converted layers plus a float32 output."""
    import importlib

    basic = importlib.import_module(f"torchvision.models.{family}").BasicConv2d
    make = lambda: basic(8, 16, kernel_size=3, padding=1)  # noqa: E731
    x = torch.randn(4, 8, 12, 12)
    stock, exact = converted_pair(make, division.DivisionConfig(backward_mode="exact"))
    assert [type(m).__name__ for m in exact.children()] == ["DivisionConv2d", "DivisionBatchNorm2d"]
    (y0, g0), (y1, g1) = run(stock, x), run(exact, x)
    assert torch.equal(y0, y1) and all(torch.equal(g0[k], g1[k]) for k in g0)
    _, layer = converted_pair(make, division.DivisionConfig())
    whole = x.numel() * 4 + 2 * y0.numel() * 4  # stock: the input, the conv's output and the ReLU's
    assert saved_bytes(stock, x) > whole and saved_bytes(layer, x) * 8 < saved_bytes(stock, x)
    assert type(division.revert_model(layer)) is basic


@pytest.mark.parametrize("block", ["InceptionA", "InceptionB", "InceptionC", "InceptionD", "InceptionE"])
def test_inception_blocks_pool_through_division(block: str) -> None:
    """Inception v3's blocks pool in a branch of their own with F.avg_pool2d / F.max_pool2d, which
    keep the block input whole (and int64 indices): converted, the same branches in the same order
    with DIVISION's pools (nothing kept / a few bits per output), so exact mode is stock's bit for
    bit and DIVISION keeps several times less than stock."""
    from torchvision.models import inception

    args = {"InceptionA": (8, 4), "InceptionC": (8, 4)}.get(block, (8,))
    make = lambda: getattr(inception, block)(*args)  # noqa: E731
    x = torch.randn(2, 8, 9, 9)
    stock, exact = converted_pair(make, division.DivisionConfig(backward_mode="exact"))
    assert type(exact).__name__ == f"Division{block}"
    (y0, g0), (y1, g1) = run(stock, x), run(exact, x)
    assert torch.equal(y0, y1) and all(torch.equal(g0[k], g1[k]) for k in g0)
    _, layer = converted_pair(make, division.DivisionConfig())
    # activations only, each storage once; an input that needs a gradient, as inside a model
    report = division.summary(layer, torch.randn(2, 8, 17, 17).requires_grad_())
    assert report.ratio > 8, report.ratio
    pools = next(r for r in report.rows if r.name == "")  # the block's own (functional) ops
    assert pools.saved_bytes * 8 <= pools.vanilla_bytes  # max-pool: offsets, not the input and int64 indices
    assert type(division.revert_model(layer)) is getattr(inception, block)


# ---- gradients of gradients (backward with create_graph=True) ------------------------------------

SECOND_ORDER_LAYERS = {
    "conv": lambda: nn.Conv2d(4, 4, 3, padding=1),
    "batch_norm": lambda: nn.BatchNorm2d(4),
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "hardtanh": lambda: nn.Hardtanh(-0.5, 0.5),
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "max_pool": lambda: nn.MaxPool2d(3, 1, 1),
    "avg_pool": lambda: nn.AvgPool2d(3, 1, 1),
    "dropout": lambda: nn.Dropout(0.3),
    "gelu": nn.GELU,
    "hardswish": nn.Hardswish,
    "squeeze_excitation": lambda: __import__("torchvision").ops.SqueezeExcitation(4, 2),
}


def penalty_gradients(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A gradient penalty's gradients (input and parameters): |d loss / d (x, params)|^2 backward."""
    x = x.clone().requires_grad_(True)
    params = list(model.parameters())
    torch.manual_seed(5)  # dropout's draw
    grads = torch.autograd.grad(model(x).sin().sum(), [x, *params], create_graph=True)
    sum(g.square().sum() for g in grads).backward()
    return torch.cat([x.grad.flatten(), *(p.grad.flatten() for p in params)])


@pytest.mark.parametrize("layer", list(SECOND_ORDER_LAYERS))
def test_exact_mode_gives_stocks_gradients_of_gradients(layer: str) -> None:
    """Between two convolutions (a conv map in, and the next layer's gradient out): the mask
    layers' backward runs differentiable ops when its gradients will be differentiated (the
    kernels are not differentiable ops: the ReLU's gave a penalty gradient 92% off), the others
    read their exact records with their history."""
    def make() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), SECOND_ORDER_LAYERS[layer](), nn.Conv2d(4, 2, 3, padding=1))

    stock, converted = converted_pair(make, division.DivisionConfig(backward_mode="exact"))
    assert sum(isinstance(m, DivisionLayer) for m in converted.modules()) >= 3
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(penalty_gradients(converted, x), penalty_gradients(stock, x), rtol=1e-5, atol=1e-6)


def test_gradients_of_gradients_through_compressed_records_are_refused() -> None:
    """A rebuilt input is a constant to autograd: the terms through it would be missing, silently.
    The mask layers keep exact masks in every mode, so a model of them alone still differentiates."""
    model = division.convert_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3)))
    with pytest.raises(RuntimeError, match=r"DIVISION's ConvFn: a backward with create_graph=True .*\(backward_mode='exact'\)"):
        penalty_gradients(model, torch.randn(2, 3, 8, 8))
    penalty_gradients(division.convert_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), division.DivisionConfig(exclude=("0",))),
                      torch.randn(2, 3, 8, 8))  # stock conv, converted ReLU: runs
    stock, masks = converted_pair(lambda: nn.Sequential(nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.3)), division.DivisionConfig())
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(penalty_gradients(masks, x), penalty_gradients(stock, x))


def test_layers_without_gradients_of_gradients_say_so_in_exact_mode() -> None:
    """Linear, LayerNorm and GELU on tokens save a reshaped input (no history), attention recomputes
    on detached q, k, v: refused even when exact, with the way out (exclude)."""
    cfg = division.DivisionConfig(backward_mode="exact", compress_linear=True)
    model = division.convert_model(nn.Sequential(nn.Linear(6, 5), nn.ReLU()), cfg)
    with pytest.raises(RuntimeError, match=r"DIVISION's LinearFn does not support .* DivisionConfig.exclude"):
        penalty_gradients(model, torch.randn(2, 3, 6))
    stock, kept = converted_pair(lambda: nn.Sequential(nn.Linear(6, 5), nn.ReLU()), cfg.replace(exclude=("0",)))
    x = torch.randn(2, 3, 6)
    torch.testing.assert_close(penalty_gradients(kept, x), penalty_gradients(stock, x))


# ---- GroupNorm ----------------------------------------------------------------------------------

GROUP_NORM_SHAPES = [((4, 8, 6, 6), torch.contiguous_format), ((4, 8, 6, 6), torch.channels_last), ((4, 8, 10), None),
                     ((2, 8, 3, 4, 5), torch.channels_last_3d), ((4, 8), None), ((3, 8, 1, 1), None)]


def group_norm_pair(cfg: division.DivisionConfig, affine: bool = True) -> tuple[nn.Module, nn.Module]:
    def make() -> nn.Module:
        norm = nn.GroupNorm(4, 8, affine=affine)
        if affine:
            nn.init.normal_(norm.weight)
            nn.init.normal_(norm.bias)
        return norm
    return converted_pair(make, cfg)


def group_norm_input(shape: tuple[int, ...], layout: torch.memory_format | None, device: str = "cpu") -> torch.Tensor:
    x = torch.randn(shape, device=device) * 3 + 1
    return x if layout is None else x.contiguous(memory_format=layout)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize(("shape", "layout"), GROUP_NORM_SHAPES)
def test_group_norm_in_exact_mode_is_stock_bit_for_bit(shape: tuple[int, ...], layout: torch.memory_format | None,
                                                        affine: bool) -> None:
    """Output (values and layout), input and parameter gradients: stock's native_group_norm and its
    backward on the same layout; (N, C) inputs, which have no spatial extent, are kept exact."""
    stock, layer = group_norm_pair(division.DivisionConfig(backward_mode="exact"), affine)
    assert type(layer).__name__ == "DivisionGroupNorm"
    x = group_norm_input(shape, layout)
    (y0, g0), (y1, g1) = run(stock, x), run(layer, x)
    assert torch.equal(y0, y1) and y0.stride() == y1.stride()
    assert g0.keys() == g1.keys() and all(torch.equal(g0[k], g1[k]) for k in g0)


@pytest.mark.parametrize(("shape", "layout"), [((4, 8, 32, 32), torch.contiguous_format), ((4, 8, 32, 32), torch.channels_last),
                                               ((4, 8, 512), None), ((2, 8, 8, 16, 16), torch.channels_last_3d)])
def test_group_norm_saves_its_input_compressed(shape: tuple[int, ...], layout: torch.memory_format | None) -> None:
    """At the defaults the record is about a tenth of the input stock keeps; in a single draw the
    input gradient stays near the exact one and the bias gradient (no input in it) is exact. (The
    weight gradient sums the rebuilt input's noise against a random gradient: on white-noise
    inputs, which give the LFC nothing, one draw is far from it; its mean is what converges.)"""
    stock, layer = group_norm_pair(division.DivisionConfig())
    x = group_norm_input(shape, layout)
    (y0, g0), (y1, g1) = run(stock, x), run(layer, x)
    assert torch.equal(y0, y1)
    assert saved_bytes(layer, x) < saved_bytes(stock, x) / 7
    assert F.cosine_similarity(g0["input"].flatten(), g1["input"].flatten(), dim=0) > 0.95
    assert torch.equal(g0["bias"], g1["bias"])


def test_group_norm_under_cpu_autocast_and_stocks_errors() -> None:
    """CPU autocast leaves group_norm at the input's dtype, as stock; inputs stock refuses get its error."""
    stock, layer = group_norm_pair(division.DivisionConfig(backward_mode="exact"))
    x = torch.randn(2, 8, 5, 5).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (y0, g0), (y1, g1) = run(stock, x), run(layer, x)
    assert y1.dtype == y0.dtype == torch.bfloat16 and torch.equal(y0, y1) and torch.equal(g0["input"], g1["input"])
    for bad in (torch.randn(2, 6, 5, 5), torch.randn(1, 4, 1, 1)):
        with pytest.raises((RuntimeError, ValueError)) as stock_error:
            run(stock, bad)
        with pytest.raises(type(stock_error.value), match=re.escape(str(stock_error.value))):
            run(layer, bad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize(("shape", "layout"), GROUP_NORM_SHAPES)
def test_group_norm_on_cuda(shape: tuple[int, ...], layout: torch.memory_format | None, autocast: bool) -> None:
    """On a GPU stock's group_norm runs on a contiguous copy (its output contiguous too) and CUDA
    autocast runs it in float32: exact mode gives stock's values, layout and gradients bit for bit;
    DIVISION keeps a tenth of the input, gradients near stock's."""
    for cfg in (division.DivisionConfig(backward_mode="exact"), division.DivisionConfig()):
        stock, layer = group_norm_pair(cfg)
        stock, layer = stock.cuda(), layer.cuda()
        x = group_norm_input(shape, layout, "cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            (y0, g0), (y1, g1) = run(stock, x), run(layer, x)
        assert y1.dtype == y0.dtype and torch.equal(y0, y1) and y0.stride() == y1.stride()
        if cfg.backward_mode == "exact":
            assert all(torch.equal(g0[name], g1[name]) for name in g0)
        elif len(shape) > 2:
            assert F.cosine_similarity(g0["input"].flatten(), g1["input"].flatten(), dim=0) > 0.9


# ---- transposed convolutions ---------------------------------------------------------------------

CONV_TRANSPOSE_CASES = {
    "stride2_output_padding": (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1), (2, 4, 7, 7), None),
    "output_size": (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1), (2, 4, 7, 7), [14, 14]),
    "groups_dilation_no_bias": (lambda: nn.ConvTranspose2d(4, 8, 4, stride=2, groups=2, dilation=2, bias=False), (2, 4, 6, 5), None),
    "unbatched": (lambda: nn.ConvTranspose2d(4, 6, 2, stride=2), (4, 7, 7), None),
    "1d": (lambda: nn.ConvTranspose1d(4, 6, 4, stride=2, padding=1), (2, 4, 20), None),
    "3d": (lambda: nn.ConvTranspose3d(4, 2, 2, stride=2), (2, 4, 3, 4, 5), None),
}


def run_transposed(module: nn.Module, x: torch.Tensor, output_size: list[int] | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    module.zero_grad(set_to_none=True)
    x = x.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
    y = module(x, output_size=output_size)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y.device))
    return y.detach(), {"input": x.grad, **{n: p.grad for n, p in module.named_parameters()}}


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("case", list(CONV_TRANSPOSE_CASES))
def test_transposed_convolutions_in_exact_mode_are_stock_bit_for_bit(case: str, channels_last: bool) -> None:
    """Decoders' and generators' layers: output (values and layout), input and parameter gradients
    as stock's (aten's convolution and its backward, transposed, with stock's output padding,
    `output_size` included); DIVISION's input gradient, which needs no input, is stock's too."""
    make, shape, output_size = CONV_TRANSPOSE_CASES[case]
    if channels_last and len(shape) != 4:
        pytest.skip("channels_last is a 4-d layout")
    x = torch.randn(shape)
    for cfg in (division.DivisionConfig(backward_mode="exact"), division.DivisionConfig()):
        stock, layer = converted_pair(make, cfg)
        if channels_last:
            x, stock, layer = (t.to(memory_format=torch.channels_last) for t in (x, stock, layer))
        assert type(layer).__name__.startswith("DivisionConvTranspose")
        (y0, g0), (y1, g1) = run_transposed(stock, x, output_size), run_transposed(layer, x, output_size)
        assert torch.equal(y0, y1) and y0.stride() == y1.stride()
        exact = g0 if cfg.backward_mode == "exact" else {"input": g0["input"]}
        assert all(torch.equal(g0[k], g1[k]) for k in exact)


def test_transposed_convolution_saves_its_input_compressed() -> None:
    stock, layer = converted_pair(lambda: nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1), division.DivisionConfig())
    x = torch.randn(2, 16, 32, 32)
    weight = layer.weight.numel() * 4  # both keep the weight (8 KiB)
    assert saved_bytes(layer, x) - weight < (saved_bytes(stock, x) - weight) / 12  # 128 KiB -> 9.3 KiB


def test_transposed_convolution_under_autocast_and_stocks_errors() -> None:
    stock, layer = converted_pair(lambda: nn.ConvTranspose2d(4, 6, 3, stride=2), division.DivisionConfig(backward_mode="exact"))
    x = torch.randn(2, 4, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (y0, g0), (y1, g1) = run_transposed(stock, x, None), run_transposed(layer, x, None)
    assert y1.dtype == y0.dtype == torch.bfloat16 and torch.equal(y0, y1) and all(torch.equal(g0[k], g1[k]) for k in g0)
    with pytest.raises(ValueError, match='Only "zeros" padding mode is supported for ConvTranspose2d'):
        run_transposed(division.convert_model(nn.Sequential(nn.ConvTranspose2d(4, 6, 3, padding_mode="reflect")))[0], x, None)
    with pytest.raises(ValueError, match="requested an output size of"):
        run_transposed(layer, x, [40, 40])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("case", ["stride2_output_padding", "groups_dilation_no_bias", "3d"])
def test_transposed_convolutions_on_cuda(case: str, autocast: bool) -> None:
    """cuDNN's transposed convolution and its backward through aten, deterministic (or stock would
    not repeat itself bit for bit): exact mode is stock's; DIVISION's input gradient too."""
    make, shape, output_size = CONV_TRANSPOSE_CASES[case]
    x = torch.randn(shape, device="cuda")
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
        for cfg in (division.DivisionConfig(backward_mode="exact"), division.DivisionConfig()):
            stock, layer = (m.cuda() for m in converted_pair(make, cfg))
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                (y0, g0), (y1, g1) = run_transposed(stock, x, output_size), run_transposed(layer, x, output_size)
            assert torch.equal(y0, y1)
            exact = g0 if cfg.backward_mode == "exact" else {"input": g0["input"]}
            assert all(torch.equal(g0[k], g1[k]) for k in exact)
