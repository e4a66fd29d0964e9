"""timm's MaxViT and CoAtNet (division/timm_maxxvit.py, timm_layouts.py) and its 'same'-padded
layers (timm_convs.py), converted; skipped where timm is not installed."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformer_checks import (
    assert_exact_mode_is_stock,
    assert_same_gradients,
    faithful_grads,
    grads_of,
)

import division
from division.functional import MAP, AttentionFn

timm = pytest.importorskip("timm")
from timm.layers import Conv2dSame  # noqa: E402
from timm.layers.pool2d_same import AvgPool2dSame, MaxPool2dSame  # noqa: E402

# the smallest of each family, at the size it is built for (its attention's relative positions)
MODELS = {"maxvit_rmlp_pico_rw_256": 256, "coatnet_pico_rw_224": 224}


@pytest.mark.parametrize("layer", [lambda: Conv2dSame(4, 8, 3, stride=2), lambda: AvgPool2dSame(3, 2),
                                   lambda: MaxPool2dSame(3, 2)], ids=["conv", "avg_pool", "max_pool"])
def test_same_padded_layers_pad_as_timm_then_save_what_converted_layers_save(layer: object) -> None:
    """timm's 'same' layers (TensorFlow-ported weights) pad in their forward, then convolve or
    pool: converted, the same padding of an odd map, then a compressed input, nothing, or a window
    offset; exact mode is timm's bit for bit."""
    torch.manual_seed(0)
    stock = nn.Sequential(nn.Conv2d(3, 4, 1), layer())  # type: ignore[operator]
    x = torch.randn(2, 3, 15, 15)
    model = division.convert_model(copy.deepcopy(stock))
    assert type(model[1]).__name__.startswith("Division") and type(model[1]).__name__.endswith("Same")
    exact = division.convert_model(copy.deepcopy(stock), division.DivisionConfig(backward_mode="exact"))
    leaf0, leaf1 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y0, y1 = stock(leaf0), exact(leaf1)
    gy = torch.randn(y0.shape)
    y0.backward(gy)
    y1.backward(gy)
    assert torch.equal(y0, y1) and torch.equal(leaf0.grad, leaf1.grad)
    row = next(r for r in division.summary(model, torch.randn(2, 3, 64, 64)).rows if r.name == "1")
    assert row.converted and row.saved_bytes * 8 < row.vanilla_bytes


@pytest.mark.parametrize("name", MODELS)
def test_maxvit_and_coatnet_attention_saves_q_k_v_records(name: str) -> None:
    """Their fused attention with its relative position bias is recomputed in backward from q, k, v
    records (AttentionFn, the bias kept): a faithful codec gives timm's gradients, the bias table's
    included; exact mode is timm's model bit for bit; MaxViT's channels-last norms, MLPs and
    projections save map records."""
    size = MODELS[name]
    torch.manual_seed(0)
    stock = timm.create_model(name, num_classes=10, drop_path_rate=0.0)
    x = torch.randn(1, 3, size, size)
    assert_exact_mode_is_stock(stock, x)
    y0, g0 = grads_of(stock, x)
    applies, y1, g1 = faithful_grads(stock, x, AttentionFn)
    attentions = [m for m in stock.modules() if type(m).__name__ in ("AttentionCl", "Attention2d")]
    assert applies == len(attentions) > 0 and torch.equal(y0, y1)
    assert_same_gradients(g1, g0)
    model = division.convert_model(copy.deepcopy(stock))
    if name.startswith("maxvit"):
        block = next(m for m in model.modules() if type(m).__name__ == "PartitionAttentionCl")
        assert block.norm1.map_layout == block.mlp.fc1.map_layout == block.attn.qkv.map_layout == MAP
    report = division.summary(model, x)
    assert report.ratio > 5, report.ratio


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_coatnet_on_cuda() -> None:
    """On a GPU: CoAtNet's attention with its bias (SDPA with a float mask), exact and faithful."""
    from transformer_checks import check_on_cuda

    torch.manual_seed(0)
    stock = timm.create_model("coatnet_pico_rw_224", num_classes=10, drop_path_rate=0.0).cuda()
    check_on_cuda(stock, torch.randn(2, 3, 224, 224, device="cuda"), "stages.", min_cosine=0.9)
