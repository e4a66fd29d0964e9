"""torchvision's Swin Transformer (V1 and V2) converted: (N, H, W, C) map layers and window attention."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformer_checks import (
    assert_exact_mode_is_stock,
    assert_same_gradients,
    check_division_under_autocast,
    check_on_cuda,
    count_applies,
    draw_cosines,
    faithful_grads,
    grads_of,
)

import division
from division import swin
from division.functional import MAP
from division.tokens import (
    WindowGrid,
    input_map_as_windows,
    map_to_windows,
    windows_as_input_map,
    windows_to_map,
)

tv_swin = pytest.importorskip("torchvision.models.swin_transformer")

# 32 px: an 8x8 map in 2x2 windows of 4 (the second block shifted by 2), then one 4x4 window;
# 40 px: a 10x10 map padded to 12x12, then 5x5 padded to 8x8 and shifted
SIZES = (32, 40)


def tiny_swin(version: int) -> nn.Module:
    torch.manual_seed(0)
    v2 = {"block": tv_swin.SwinTransformerBlockV2, "downsample_layer": tv_swin.PatchMergingV2} if version == 2 else {}
    model = tv_swin.SwinTransformer([4, 4], 16, [2, 2], [2, 4], [4, 4], stochastic_depth_prob=0.0, num_classes=10, **v2)
    with torch.no_grad():  # biases away from 0, so that padded positions hold something to get wrong
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.normal_(0.0, 0.5)
    return model


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    return division.summary(model, x).total_saved_bytes


def test_window_records_hold_the_block_inputs_positions() -> None:
    """map_to_windows is stock's partition (windows_to_map its inverse); a record keeps the block
    input's positions, rolled back and without padding, and gives the padding back as zeros or as
    a per-channel fill."""
    m = torch.randn(2, 10, 10, 3)
    grid = WindowGrid((3, 3), (4, 4), (10, 10), (2, 2))
    padded = torch.roll(F.pad(m, (0, 0, 0, 2, 0, 2)), shifts=(-2, -2), dims=(1, 2))
    stock = padded.view(2, 3, 4, 3, 4, 3).permute(0, 1, 3, 2, 4, 5).reshape(18, 16, 3)
    assert torch.equal(map_to_windows(padded, grid), stock)
    assert torch.equal(windows_to_map(stock, grid), padded)
    assert torch.equal(windows_as_input_map(stock, grid), m)
    assert torch.equal(input_map_as_windows(m, grid), stock)
    fill = torch.tensor([1.0, 2.0, 3.0])
    filled = input_map_as_windows(m, grid, fill)
    rebuilt = torch.roll(windows_to_map(filled, grid), shifts=(2, 2), dims=(1, 2))
    assert torch.equal(rebuilt[:, :10, :10], m)
    assert torch.equal(rebuilt[:, 10:], fill.expand(2, 2, 12, 3)) and torch.equal(rebuilt[:, :, 10:], fill.expand(2, 12, 2, 3))


@pytest.mark.parametrize("version", [1, 2])
def test_swin_layers_are_converted_and_reverted(version: int) -> None:
    model = division.convert_model(tiny_swin(version))
    block, merging = model.features[1][1], model.features[2]
    assert type(block).__name__ == f"DivisionSwinTransformerBlock{'V2' if version == 2 else ''}"
    assert type(block.attn).__name__ == f"DivisionShiftedWindowAttention{'V2' if version == 2 else ''}"
    stem_norm = model.features[0][2]  # after the patch embedding's Permute
    map_layers = [stem_norm, block.norm1, block.norm2, block.mlp[0], block.mlp[1], block.mlp[3], merging.norm,
                  merging.reduction]
    assert all(isinstance(m, division.layers.DivisionLayer) and m.map_layout == MAP for m in map_layers)
    assert type(block.attn.qkv) is nn.Linear  # the attention runs its projections itself
    if version == 2:  # the continuous position bias MLP runs on a table, not on a map
        assert type(block.attn.cpb_mlp[0]) is nn.Linear
    division.revert_model(model)
    assert type(model.features[1][1]) is (tv_swin.SwinTransformerBlockV2 if version == 2 else tv_swin.SwinTransformerBlock)
    assert type(model.features[1][1].mlp[0]) is nn.Linear and "map_layout" not in vars(model.features[1][1].mlp[0])


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("version", [1, 2])
def test_exact_mode_is_stock_swin_bit_for_bit(version: int, size: int, autocast: bool) -> None:
    """The converted attention runs stock's ops in stock's order: outputs and every gradient are
    stock's bit for bit, shifted and padded windows included, under bf16 autocast too."""
    assert_exact_mode_is_stock(tiny_swin(version), torch.randn(3, 3, size, size), autocast)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("version", [1, 2])
def test_attention_gradients_are_autograds_on_the_reconstructed_q_k_v(version: int, size: int, autocast: bool) -> None:
    """With a codec that gives its input back exactly (B = 1, float32 LFC), the recomputed window
    attention gives stock's gradients: q, k, v, the relative position bias (V2: its MLP) and the
    logit scale, padded positions included (they come back as the qkv bias), under bf16 autocast
    too (the recomputation runs under forward's autocast state)."""
    stock = tiny_swin(version)
    x = torch.randn(3, 3, size, size)
    y0, g0 = grads_of(stock, x, autocast=autocast)
    applies, y1, g1 = faithful_grads(stock, x, swin.WindowAttentionFn, autocast)
    assert applies == 4 and torch.equal(y0, y1)  # every block's attention was recomputed
    assert_same_gradients(g1, g0)


@pytest.mark.parametrize("version", [1, 2])
def test_division_swin_saves_a_tenth_and_its_gradients_average_to_stocks(version: int) -> None:
    """DIVISION's records in place of every map layer's input and of the attention's q, k, v and
    softmax: several times less saved than stock on this small model (16x16 .. 8x8 planes); each
    draw's gradient of the blocks' weights and of the relative position bias (which the
    recomputed attention gives) is noise around stock's, which averages away."""
    stock = tiny_swin(version)
    model = division.convert_model(copy.deepcopy(stock))
    x = torch.randn(4, 3, 64, 64)
    assert saved_bytes(model, x) * 6 < saved_bytes(stock, x)
    # V2's bias comes from an MLP through 16 * sigmoid, and its cosine attention normalizes the
    # rebuilt q and k (head size 8 here): noisier
    bias = {"relative_position_bias_table": (0.8, 0.97)} if version == 1 else {"cpb_mlp": (0.5, 0.85)}
    for part, (low, high) in {"features.": (0.99, 0.999), **bias}.items():
        one, mean = draw_cosines(stock, model, x, part)
        assert low < one < mean and mean > high, (part, one, mean)


@pytest.mark.parametrize("version", [1, 2])
def test_division_swin_under_bf16_autocast(version: int) -> None:
    """Under bf16 autocast the records are of the 16-bit projections' inputs and q, k, v, and the
    attention is recomputed under autocast as forward ran it: stock's output, finite gradients near
    stock's autocast ones."""
    stock = tiny_swin(version)
    x = torch.randn(4, 3, 40, 40)
    check_division_under_autocast(stock, x, "features.", min_cosine=0.95)


def test_attention_keeps_what_stock_saves_under_dropout_or_when_asked() -> None:
    """Attention dropout (its mask cannot be redrawn in backward) or compress_attention=False: the
    attention core is stock's, the projections' inputs still records; the same gradients as stock
    in exact mode."""
    stock = tiny_swin(1)
    for m in stock.modules():
        if isinstance(m, tv_swin.ShiftedWindowAttention):
            m.attention_dropout = 0.2
    x = torch.randn(2, 3, 32, 32)
    assert_exact_mode_is_stock(stock, x)
    for model in (division.convert_model(copy.deepcopy(stock)),
                  division.convert_model(tiny_swin(1), division.DivisionConfig(compress_attention=False))):
        assert count_applies(swin.WindowAttentionFn, lambda: grads_of(model, x)) == 0  # noqa: B023


def test_a_block_converts_alone() -> None:
    """A Swin block converted alone (a lone container, its norm layer given as a partial, as the
    model builds it) runs on an (N, H, W, C) input as stock's, its layers converted."""
    block = tv_swin.SwinTransformerBlock(16, 2, [4, 4], [2, 2], norm_layer=partial(nn.LayerNorm, eps=1e-5))
    x = torch.randn(2, 8, 8, 16)
    stock = copy.deepcopy(block)
    layer = division.convert_model(block, division.DivisionConfig(backward_mode="exact"))
    assert type(layer).__name__ == "DivisionSwinTransformerBlock" and layer.norm1.map_layout == layer.mlp[0].map_layout == MAP
    (y0, g0), (y1, g1) = grads_of_map(stock, x), grads_of_map(layer, x)
    assert torch.equal(y0, y1) and all(torch.equal(g0[k], g1[k]) for k in g0)


def grads_of_map(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    leaf = x.clone().requires_grad_(True)
    y = model(leaf)
    y.backward(torch.linspace(-1, 1, y.numel()).view(y.shape))
    return y.detach(), {"input": leaf.grad, **{n: p.grad for n, p in model.named_parameters()}}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("version", [1, 2])
def test_swin_on_cuda(version: int) -> None:
    """On a GPU (the compress kernels on channels_last maps, cuBLAS)."""
    check_on_cuda(tiny_swin(version).cuda(), torch.randn(3, 3, 40, 40, device="cuda"), "features.", min_cosine=0.95)


# ---- Video Swin: (N, T, H, W, C) maps, 3-d windows ------------------------------------------------

tv_swin3d = pytest.importorskip("torchvision.models.video.swin_transformer")
# (8, 32, 32) clips: a 4x8x8 map in 2x2x2 windows of (2, 4, 4), the second block shifted by
# (1, 2, 2); then 4x4x4, whose window shrinks to 4x4 in H and W. (6, 40, 40): 3x10x10, padded.
CLIPS = ((8, 32, 32), (6, 40, 40))


def tiny_swin3d() -> nn.Module:
    torch.manual_seed(0)
    model = tv_swin3d.SwinTransformer3d([2, 4, 4], 16, [2, 2], [2, 4], [2, 4, 4], stochastic_depth_prob=0.0,
                                        num_classes=10, norm_layer=partial(nn.LayerNorm, eps=1e-5))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.normal_(0.0, 0.5)
    return model


def test_3d_window_records_hold_the_block_inputs_positions() -> None:
    """map_to_windows is stock's 3-d partition, and a record keeps the block input's positions."""
    m = torch.randn(2, 3, 10, 10, 4)
    grid = WindowGrid((2, 3, 3), (2, 4, 4), (3, 10, 10), (1, 2, 2))
    padded = torch.roll(F.pad(m, (0, 0, 0, 2, 0, 2, 0, 1)), shifts=(-1, -2, -2), dims=(1, 2, 3))
    stock = padded.view(2, 2, 2, 3, 4, 3, 4, 4).permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(36, 32, 4)
    assert torch.equal(map_to_windows(padded, grid), stock)
    assert torch.equal(windows_to_map(stock, grid), padded)
    assert torch.equal(windows_as_input_map(stock, grid), m)
    assert torch.equal(input_map_as_windows(m, grid), stock)


def test_video_swin_layers_are_converted() -> None:
    model = division.convert_model(tiny_swin3d())
    block = model.features[0][1]
    assert type(block.attn).__name__ == "DivisionShiftedWindowAttention3d"
    assert type(model.patch_embed).__name__ == "DivisionPatchEmbed3d" and model.patch_embed.norm.map_layout == MAP
    assert block.norm1.map_layout == block.mlp[0].map_layout == model.features[1].reduction.map_layout == MAP
    division.revert_model(model)
    assert type(model.features[0][1].attn) is tv_swin3d.ShiftedWindowAttention3d


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("clip", CLIPS)
def test_exact_mode_is_stock_video_swin_bit_for_bit(clip: tuple[int, int, int], autocast: bool) -> None:
    assert_exact_mode_is_stock(tiny_swin3d(), torch.randn(2, 3, *clip), autocast)


@pytest.mark.parametrize("clip", CLIPS)
def test_video_swin_attention_gradients_are_autograds_on_the_reconstructed_q_k_v(clip: tuple[int, int, int]) -> None:
    """A codec that gives its input back exactly: the recomputed 3-d window attention (shift mask,
    shrunk windows, padding) gives stock's gradients."""
    stock = tiny_swin3d()
    x = torch.randn(2, 3, *clip)
    y0, g0 = grads_of(stock, x)
    applies, y1, g1 = faithful_grads(stock, x, swin.WindowAttentionFn)
    assert applies == 4 and torch.equal(y0, y1)
    assert_same_gradients(g1, g0)


def test_division_video_swin_saves_less_and_its_gradients_average_to_stocks() -> None:
    stock = tiny_swin3d()
    model = division.convert_model(copy.deepcopy(stock))
    x = torch.randn(2, 3, 16, 64, 64)
    assert saved_bytes(model, x) * 6 < saved_bytes(stock, x)
    one, mean = draw_cosines(stock, model, x, "features.")
    assert 0.9 < one < mean and mean > 0.98, (one, mean)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_video_swin_on_cuda() -> None:
    """On a GPU (the compress kernels on channels_last_3d maps)."""
    check_on_cuda(tiny_swin3d().cuda(), torch.randn(2, 3, 6, 40, 40, device="cuda"), "features.", min_cosine=None)
