"""timm's learned scales and the GELUs of its conv MLPs, converted (division/timm_scales.py); skipped
where timm is not installed."""

from __future__ import annotations

import copy

import pytest
import torch
from test_timm import grads
from torch import nn
from transformer_checks import count_applies, faithful_grads, grads_of

import division
from division.functional import CONV, RecomputeFn, ScaleFn

timm = pytest.importorskip("timm")


def assert_exact_mode_is_timms(stock: nn.Module, x: torch.Tensor) -> None:
    exact = division.convert_model(copy.deepcopy(stock), division.DivisionConfig(backward_mode="exact"))
    (y0, g0), (y1, g1) = grads(stock, x), grads(exact, x)
    assert torch.equal(y0, y1) and g0.keys() == g1.keys() and all(torch.equal(g0[k], g1[k]) for k in g0)


def test_a_vit_with_layer_scales_saves_token_records() -> None:
    """DeiT-3 (a ViT with init_values: `x * gamma` after each attention and MLP) kept those inputs
    whole (5.2x at 224 px); converted, each is a token record; exact mode is timm's bit for bit."""
    torch.manual_seed(0)
    stock = timm.create_model("deit3_small_patch16_224", num_classes=10, img_size=128, drop_path_rate=0.0)
    x = torch.randn(2, 3, 128, 128)  # an 8x8 patch grid
    assert_exact_mode_is_timms(stock, x)
    model = division.convert_model(copy.deepcopy(stock))
    assert type(model.blocks[0].ls1).__name__ == "DivisionLayerScale"
    assert count_applies(ScaleFn, lambda: grads_of(model, x)) == 2 * len(stock.blocks)
    assert division.summary(model, x).ratio > 8  # 8.4x here, 4.7x with the layer scales excluded


@pytest.mark.parametrize("kind", ["layers", "fastvit"])
def test_layer_scale_2d_saves_a_conv_map_record(kind: str) -> None:
    """timm's LayerScale2d and FastViT's own (gamma shaped (C, 1, 1)) on (N, C, H, W) maps."""
    from timm.models.fastvit import LayerScale2d as FastVitLayerScale2d

    torch.manual_seed(0)
    scale = timm.layers.LayerScale2d(8, 0.5) if kind == "layers" else FastVitLayerScale2d(8, 0.5)
    stock = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), scale)
    x = torch.randn(2, 3, 32, 32)
    assert_exact_mode_is_timms(stock, x)
    report = division.summary(division.convert_model(copy.deepcopy(stock)), x)
    row = next(r for r in report.rows if r.name == "1")
    assert row.converted and 0 < row.saved_bytes * 8 < row.vanilla_bytes


@pytest.mark.parametrize("name", ["convnextv2_atto", "convnextv2_nano"])
def test_convnext_v2_saves_its_response_norm_and_conv_mlp_records(name: str) -> None:
    """ConvNeXt-V2's global response norm keeps x whole for its norms and `x * x_n`: converted, a
    record (RecomputeFn differentiates timm's expression at the rebuilt x); its atto..nano blocks
    run their MLP as 1x1 convolutions, whose GELU takes conv maps. Exact mode is timm's bit for
    bit; a faithful codec (B = 1, float32 LFC) gives timm's gradients to rounding."""
    torch.manual_seed(0)
    stock = timm.create_model(name, num_classes=10, drop_path_rate=0.0)
    x = torch.randn(2, 3, 64, 64)
    assert_exact_mode_is_timms(stock, x)
    y0, g0 = grads_of(stock, x)
    applies, y1, g1 = faithful_grads(stock, x, RecomputeFn)
    assert applies == sum(len(stage.blocks) for stage in stock.stages) and torch.equal(y0, y1)
    assert all(torch.allclose(g1[k], g0[k], rtol=1e-4, atol=1e-6 * g0[k].abs().max()) for k in g0)
    model = division.convert_model(copy.deepcopy(stock))
    assert model.stages[0].blocks[0].mlp.act.map_layout == CONV
    assert division.summary(model, torch.randn(2, 3, 128, 128)).ratio > 9


def test_gelu_tanh_converts_and_reverts_to_timms() -> None:
    from timm.layers.activations import GELUTanh

    stock = nn.Sequential(nn.Conv2d(3, 8, 3), GELUTanh())
    model = division.convert_model(copy.deepcopy(stock))
    assert type(model[1]).__name__ == "DivisionTimmGELUTanh" and model[1].approximate == "tanh"
    assert_exact_mode_is_timms(stock, torch.randn(2, 3, 16, 16))
    assert type(division.revert_model(model)[1]) is GELUTanh


@pytest.mark.parametrize(("name", "before", "after"), [("efficientformer_l1", 2.6, 9.4), ("fastvit_t8", 2.7, 11.2)])
def test_gelus_of_conv_mlps_save_conv_map_records(name: str, before: float, after: float) -> None:
    """EfficientFormer's and FastViT's GELUs act on what their convolutions and batch norms give,
    inside MLP classes of their own: a GELU whose input is, as it is, a converted convolution's or
    norm's output in this forward saves a conv map record (FastViT's blocks say so of their
    branch sums); with their layer scales, 2.6x and 2.7x become 9.4x and 11.2x (224 and 256 px)."""
    torch.manual_seed(0)
    stock = timm.create_model(name, num_classes=10)
    x = torch.randn(1, 3, 224, 224)  # EfficientFormer's last stage is built for 7x7
    assert_exact_mode_is_timms(stock, x)
    model = division.convert_model(copy.deepcopy(stock))
    report = division.summary(model, x)
    gelus = [r for r in report.rows if r.kind == "DivisionGELU" and r.saved_bytes]
    assert gelus and all(r.saved_bytes * 3 < r.vanilla_bytes for r in gelus)  # 4-bit records, 7x7 planes and up
