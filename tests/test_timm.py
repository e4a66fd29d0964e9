"""timm's fused layers, converted (division/timm_blocks.py); skipped where timm is not installed."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformer_checks import count_applies

import division

timm = pytest.importorskip("timm")
from timm.layers import BatchNormAct2d  # noqa: E402


def grads(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    leaf = x.clone().requires_grad_(True)
    y = model(leaf)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
    return y.detach(), {"input": leaf.grad, **{n: p.grad for n, p in model.named_parameters()}}


@pytest.mark.parametrize("act", [nn.ReLU, nn.SiLU, nn.Identity])
def test_batch_norm_act_in_exact_mode_is_timms_bit_for_bit(act: type[nn.Module]) -> None:
    """The norm (stock's training batch norm, compressed input), then timm's drop and act layers,
    converted as any others: outputs, gradients and running statistics are timm's."""
    torch.manual_seed(0)
    stock = BatchNormAct2d(6, act_layer=act)
    nn.init.normal_(stock.weight)
    layer = division.convert_model(copy.deepcopy(stock), division.DivisionConfig(backward_mode="exact"))
    assert type(layer).__name__ == "DivisionBatchNormAct2d"
    x = torch.randn(4, 6, 9, 10).contiguous(memory_format=torch.channels_last)
    for _ in range(2):
        (y0, g0), (y1, g1) = grads(stock, x), grads(layer, x)
        assert torch.equal(y0, y1) and all(torch.equal(g0[k], g1[k]) for k in g0)
    assert torch.equal(stock.running_mean, layer.running_mean) and torch.equal(stock.running_var, layer.running_var)
    assert torch.equal(stock.num_batches_tracked, layer.num_batches_tracked)
    stock.eval(), layer.eval()
    assert torch.equal(stock(x), layer(x))  # eval: timm's forward
    with pytest.raises(AssertionError, match="expected 4D input"):
        layer(torch.randn(4, 6, 9))


def test_timm_conv_net_saves_compressed_activations() -> None:
    """timm's CSPDarkNet builds every norm as a BatchNormAct2d: converted, exact mode gives timm's
    gradients and DIVISION keeps 8.5x less activation memory at 64x64 (13.1x at 224x224; 2.2x
    while timm's norms kept their inputs whole)."""
    torch.manual_seed(0)
    stock = timm.create_model("cspdarknet53", num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    exact = division.convert_model(copy.deepcopy(stock), division.DivisionConfig(backward_mode="exact"))
    (y0, g0), (y1, g1) = grads(stock, x), grads(exact, x)
    assert torch.equal(y0, y1) and all(torch.equal(g0[k], g1[k]) for k in g0)
    report = division.summary(division.convert_model(copy.deepcopy(stock)), x)
    assert report.ratio > 7
    assert not [r for r in report.rows if r.kind == "BatchNormAct2d"]


@pytest.mark.parametrize(("name", "block"), [("efficientnet_b0", "SqueezeExcite"), ("regnety_002", "SEModule"),
                                             ("ese_vovnet19b_dw", "EffectiveSEModule"), ("resnest14d", "SplitAttn")])
def test_timm_squeeze_excitation_saves_its_input_compressed(name: str, block: str) -> None:
    """timm's three squeeze-and-excitation modules end in `x * gate`, and ResNeSt's split
    attention in `x * attention` summed over its radix: converted, x is saved compressed; exact
    mode gives timm's outputs and gradients bit for bit."""
    torch.manual_seed(0)
    stock = timm.create_model(name, num_classes=10)
    assert any(type(m).__name__ == block for m in stock.modules())
    x = torch.randn(2, 3, 64, 64)
    exact = division.convert_model(copy.deepcopy(stock), division.DivisionConfig(backward_mode="exact"))
    assert any(type(m).__name__ == f"Division{block}" for m in exact.modules())
    (y0, g0), (y1, g1) = grads(stock, x), grads(exact, x)
    assert torch.equal(y0, y1) and all(torch.equal(g0[k], g1[k]) for k in g0)
    # at 128x128 (at 64x64 the last stages' 2x2 planes are kept whole): 8.6x, 7.6x, 12.3x, 11.6x
    report = division.summary(division.convert_model(copy.deepcopy(stock)), torch.randn(2, 3, 128, 128))
    assert report.ratio > 7 and not [r for r in report.rows if r.reason == "ops outside converted modules"]


def test_a_timm_forward_that_changed_is_not_converted() -> None:
    """The converted SE forwards follow timm's: a timm whose forward reads otherwise keeps the
    module stock rather than run a stale copy of it."""
    from timm.layers.squeeze_excite import SEModule

    from division.timm_blocks import SE_MODULE_FORWARD, SQUEEZE_EXCITE_FORWARD, forward_reads

    assert forward_reads(SEModule, SE_MODULE_FORWARD) and not forward_reads(SEModule, SQUEEZE_EXCITE_FORWARD)

    class Changed(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2

    assert not forward_reads(Changed, SE_MODULE_FORWARD)


def test_timm_vit_tokens_lie_on_its_patch_grid_and_its_layers_save_records() -> None:
    """timm's ViT says its grid through its patch embedding and prefix tokens: its LayerNorms,
    Linears and GELUs save token records and its attention q, k, v records (recomputed in backward);
    exact mode is timm's model bit for bit, DIVISION keeps a tenth of the activations."""
    from division.functional import AttentionFn
    from division.tokens import TokenGrid, infer_token_grid

    torch.manual_seed(0)
    stock = timm.create_model("vit_tiny_patch16_224", num_classes=10)
    assert infer_token_grid(stock) == TokenGrid(14, 14, 1)
    x = torch.randn(2, 3, 224, 224)
    exact = division.convert_model(copy.deepcopy(stock), division.DivisionConfig(backward_mode="exact"))
    kinds = {type(m).__name__ for m in exact.modules()}
    assert {"DivisionTimmLayerNorm", "DivisionTimmAttention", "DivisionLinear", "DivisionGELU"} <= kinds
    (y0, g0), (y1, g1) = grads(stock, x), grads(exact, x)
    assert torch.equal(y0, y1) and all(torch.equal(g0[k], g1[k]) for k in g0)
    model = division.convert_model(copy.deepcopy(stock))
    result = []
    assert count_applies(AttentionFn, lambda: result.append(grads(model, x))) == len(stock.blocks)
    ((y2, g2),) = result
    assert torch.equal(y0, y2)
    flat = [torch.cat([g[k].flatten() for k in g0 if k != "input"]) for g in (g0, g2)]
    assert torch.nn.functional.cosine_similarity(*flat, dim=0) > 0.9
    assert division.summary(model, x).ratio > 9


def test_timm_convnext_blocks_save_map_records_and_revert_to_timms_layers() -> None:
    """timm's ConvNeXt block as torchvision's: its LayerNorm, Linears and (timm's) GELU on the
    (N, H, W, C) map save map records and `x * gamma` saves x compressed, its LayerNorm2d a map
    record; exact mode is timm's
    model bit for bit; revert_model gives back timm's own classes."""
    torch.manual_seed(0)
    stock = timm.create_model("convnext_tiny", num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    exact = division.convert_model(copy.deepcopy(stock), division.DivisionConfig(backward_mode="exact"))
    block = exact.stages[0].blocks[0]
    assert type(block).__name__ == "DivisionConvNeXtBlock" and type(block.mlp.act).__name__ == "DivisionTimmGELU"
    assert type(exact.stem[1]).__name__ == "DivisionTimmLayerNorm2d"  # the stem's and downsampling's norm
    assert block.norm.map_layout == block.mlp.fc1.map_layout == block.mlp.act.map_layout == "map"
    (y0, g0), (y1, g1) = grads(stock, x), grads(exact, x)
    assert torch.equal(y0, y1) and all(torch.equal(g0[k], g1[k]) for k in g0)
    model = division.convert_model(copy.deepcopy(stock))
    assert division.summary(model, torch.randn(2, 3, 128, 128)).ratio > 6
    reverted = division.revert_model(model)
    assert [type(m) for m in reverted.modules()] == [type(m) for m in stock.modules()]


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("kind", ["StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame"])
def test_weight_standardized_convolutions_save_their_inputs_and_are_timms_in_exact_mode(kind: str, autocast: bool) -> None:
    """BiT's and NFNet's convolutions standardize their weight in their forward: converted, timm's
    standardization feeds a convolution that saves its input compressed, and backward standardizes
    the weight again; exact mode is timm's layer bit for bit (output, input, weight and gain
    gradients; 'same' padding of an odd map; under bf16 autocast too)."""
    torch.manual_seed(0)
    conv = getattr(timm.layers, kind)(8, 16, 3, stride=2, **({"padding": "same"} if "Same" in kind else {}))
    stock = nn.Sequential(conv, nn.ReLU())
    x = torch.randn(2, 8, 15, 15)
    exact = division.convert_model(copy.deepcopy(stock), division.DivisionConfig(backward_mode="exact"))
    assert type(exact[0]).__name__ == f"Division{kind}"
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        (y0, g0), (y1, g1) = grads(stock, x), grads(exact, x)
    assert torch.equal(y0, y1) and all(torch.equal(g0[k], g1[k]) for k in g0)
    report = division.summary(division.convert_model(copy.deepcopy(stock)), torch.randn(2, 8, 64, 64))
    row = next(r for r in report.rows if r.name == "0")
    assert row.converted and row.saved_bytes * 8 < row.vanilla_bytes
    assert [type(m) for m in division.revert_model(exact).modules()] == [type(m) for m in stock.modules()]


def test_a_standardized_convolution_keeps_no_weight_sized_tensor() -> None:
    """Stock keeps the standardized weight of every layer until backward (NFNet's 3x3 convolutions:
    more than their inputs at small batches); converted, backward makes it again from the
    parameter, which autograd's version check guards: a weight changed in place before backward
    is refused, as stock refuses it."""
    torch.manual_seed(0)
    stock = nn.Sequential(timm.layers.ScaledStdConv2d(64, 64, 3, padding=1), nn.ReLU())
    model = division.convert_model(copy.deepcopy(stock))
    x = torch.randn(1, 64, 8, 8)  # 16 KiB, its weight 144 KiB
    report = division.summary(model, x)
    assert report.total_vanilla_bytes > 64 * 64 * 9 * 4 > 4 * 1024 > report.total_saved_bytes  # 2.9 KiB
    y = model(x.requires_grad_())
    with torch.no_grad():
        model[0].weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def tiny_bit() -> nn.Module:
    """BiT's ResNetV2 (weight-standardized convolutions, GroupNormAct), small."""
    from functools import partial

    from timm.models.resnetv2 import ResNetV2

    torch.manual_seed(0)
    return ResNetV2(layers=[1, 1, 1, 1], channels=(32, 64, 128, 256), num_classes=10, stem_type="fixed", stem_chs=16,
                    conv_layer=partial(timm.layers.StdConv2d, eps=1e-8),
                    norm_layer=partial(timm.layers.GroupNormAct, num_groups=8))


def tiny_nfnet() -> nn.Module:
    """NFNet (scaled weight-standardized convolutions, GELUs in its blocks, SE), small."""
    from timm.models.nfnet import NfCfg, NormFreeNet

    torch.manual_seed(0)
    cfg = NfCfg(depths=(1, 1, 1, 1), channels=(32, 64, 128, 256), stem_chs=16, group_size=16, bottle_ratio=0.5,
                attn_layer="se", attn_kwargs={"rd_ratio": 0.5}, act_layer="gelu", num_features=256)
    return NormFreeNet(cfg, num_classes=10)


@pytest.mark.parametrize("build", [tiny_bit, tiny_nfnet])
def test_bit_and_nfnet_save_compressed_activations(build: object) -> None:
    """Every layer of BiT and NFNet that keeps an activation converts (their convolutions, BiT's
    GroupNormAct, NFNet's GELUs as conv-map activations); exact mode is timm's model bit for bit."""
    from division.functional import CONV

    stock = build()  # type: ignore[operator]
    x = torch.randn(4, 3, 64, 64)
    exact = division.convert_model(copy.deepcopy(stock), division.DivisionConfig(backward_mode="exact"))
    (y0, g0), (y1, g1) = grads(stock, x), grads(exact, x)
    assert torch.equal(y0, y1) and all(torch.equal(g0[k], g1[k]) for k in g0)
    model = division.convert_model(copy.deepcopy(stock))
    report = division.summary(model, torch.randn(16, 3, 64, 64))
    kept = {r.kind for r in report.rows if not r.converted and r.saved_bytes}
    assert kept <= {"Sigmoid", "Linear", "(functional ops)"}, kept
    assert report.ratio > 4  # 16x16 .. 2x2 planes here; the standardized weights count too
    if build is tiny_nfnet:  # its blocks' GELUs and its last one, after its last convolution
        blocks = [m for m in model.modules() if type(m).__name__ == "DivisionNormFreeBlock"]
        assert blocks and all(b.act2.map_layout == CONV for b in blocks) and model.final_act.map_layout == CONV


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("build", [tiny_bit, tiny_nfnet])
def test_bit_and_nfnet_on_cuda(build: object) -> None:
    """On a GPU: the standardized weight made again in backward (cuDNN's batch norm of the weights)
    gives stock's gradients, exact and faithful."""
    from transformer_checks import check_on_cuda

    check_on_cuda(build().cuda(), torch.randn(4, 3, 64, 64, device="cuda"), "stages.", min_cosine=None)  # type: ignore[operator]
