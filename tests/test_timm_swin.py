"""timm's Swin Transformer converted (division/timm_swin.py); skipped where timm is not installed."""

from __future__ import annotations

import copy

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
from division.tokens import WindowGrid, input_map_as_windows, windows_as_input_map

timm = pytest.importorskip("timm")
from timm.models import swin_transformer as timm_swin  # noqa: E402

# 32 px: an 8x8 map in 2x2 windows of 4 (the second block shifted by 2), then one 4x4 window;
# 40 px: a 10x10 map padded to 12x12 (shifted windows over it), then 5x5 padded to 8x8 and shifted
SIZES = (32, 40)


def tiny_swin(size: int = 32, **kwargs: object) -> nn.Module:
    torch.manual_seed(0)
    model = timm_swin.SwinTransformer(img_size=size, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4),
                                      window_size=4, num_classes=10, drop_path_rate=0.0, **kwargs)
    with torch.no_grad():  # biases away from 0, so that padded positions hold something to get wrong
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.normal_(0.0, 0.5)
    return model


def test_timms_windows_are_rolled_then_padded() -> None:
    """timm's block rolls its map, then pads it (torchvision pads, then rolls): a roll_first grid
    cuts timm's windows, and its records keep the block input's positions, the padding given back
    as zeros or as a per-channel fill."""
    m = torch.randn(2, 10, 10, 3)
    grid = WindowGrid((3, 3), (4, 4), (10, 10), (2, 2), roll_first=True)
    shifted = F.pad(torch.roll(m, shifts=(-2, -2), dims=(1, 2)), (0, 0, 0, 2, 0, 2))
    stock = timm_swin.window_partition(shifted, (4, 4)).view(-1, 16, 3)
    assert torch.equal(input_map_as_windows(m, grid), stock)
    assert torch.equal(windows_as_input_map(stock, grid), m)
    fill = torch.tensor([1.0, 2.0, 3.0])
    filled = timm_swin.window_reverse(input_map_as_windows(m, grid, fill).view(-1, 4, 4, 3), (4, 4), 12, 12)
    assert torch.equal(torch.roll(filled[:, :10, :10], shifts=(2, 2), dims=(1, 2)), m)
    assert torch.equal(filled[:, 10:], fill.expand(2, 2, 12, 3)) and torch.equal(filled[:, :, 10:], fill.expand(2, 12, 2, 3))


def test_timm_swin_layers_are_converted_and_reverted() -> None:
    model = division.convert_model(tiny_swin())
    block, merging = model.layers[0].blocks[1], model.layers[1].downsample
    assert type(block).__name__ == "DivisionTimmSwinBlock" and type(block.attn).__name__ == "DivisionTimmWindowAttention"
    map_layers = [model.patch_embed.norm, block.norm1, block.norm2, block.mlp.fc1, block.mlp.act, block.mlp.fc2,
                  merging.norm, merging.reduction, model.norm]
    assert all(isinstance(m, division.layers.DivisionLayer) and m.map_layout == MAP for m in map_layers)
    assert type(block.attn.qkv) is nn.Linear  # the attention runs its projections itself
    reverted = division.revert_model(model)
    assert [type(m) for m in reverted.modules()] == [type(m) for m in tiny_swin().modules()]


def test_a_patch_embedding_that_gives_tokens_is_not_converted() -> None:
    """ViT's patch embedding flattens to tokens: nothing of its own converts (its convolution does)."""
    vit = division.convert_model(timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8))
    assert type(vit.patch_embed) is timm.layers.PatchEmbed and isinstance(vit.patch_embed.proj, division.layers.DivisionLayer)
    _, reason = division.convert.conversion_for(timm.layers.PatchEmbed(32, 8, 3, 16), division.DivisionConfig())
    assert reason == "its output is not an (N, H, W, C) map: its convolution converts alone"


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("size", SIZES)
def test_exact_mode_is_timms_swin_bit_for_bit(size: int, autocast: bool) -> None:
    """The converted block and attention run timm's ops in timm's order: outputs and every gradient
    are timm's bit for bit, shifted and padded windows included, under bf16 autocast too."""
    assert_exact_mode_is_stock(tiny_swin(size), torch.randn(3, 3, size, size), autocast)


VARIANTS = {"dynamic_mask": {"strict_img_size": False}, "always_partition": {"always_partition": True},
            "dropout": {"attn_drop_rate": 0.2}, "fused_attn": {}}


@pytest.mark.parametrize("variant", VARIANTS)
def test_exact_mode_is_timms_swin_in_its_variants(variant: str) -> None:
    """Any input size (the shift mask computed per forward: here 48 px into a model built for 40),
    windows larger than the map (padded, still shifted), attention dropout and timm's fused
    attention (scaled_dot_product_attention, bias and mask as one): timm's outputs and gradients
    bit for bit."""
    stock = tiny_swin(40, **VARIANTS[variant])
    for m in stock.modules():
        if isinstance(m, timm_swin.WindowAttention):
            m.fused_attn = variant == "fused_attn"
    size = 48 if variant == "dynamic_mask" else 40
    assert_exact_mode_is_stock(stock, torch.randn(3, 3, size, size))


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("size", SIZES)
def test_timm_attention_gradients_are_autograds_on_the_reconstructed_q_k_v(size: int, autocast: bool) -> None:
    """With a codec that gives its input back exactly (B = 1, float32 LFC), the recomputed window
    attention gives timm's gradients: q, k, v and the relative position bias, padded positions
    included, under bf16 autocast too."""
    stock = tiny_swin(size)
    x = torch.randn(3, 3, size, size)
    y0, g0 = grads_of(stock, x, autocast=autocast)
    applies, y1, g1 = faithful_grads(stock, x, swin.WindowAttentionFn, autocast)
    assert applies == 4 and torch.equal(y0, y1)  # every block's attention was recomputed
    assert_same_gradients(g1, g0)


def test_division_timm_swin_saves_a_tenth_and_its_gradients_average_to_timms() -> None:
    """DIVISION's records in place of every map layer's input and of the attention's q, k, v and
    softmax: a tenth of what timm's model saves (at 64 px: 16x16 .. 8x8 planes); each draw's
    gradient is noise around timm's, which averages away."""
    stock = tiny_swin(64)
    model = division.convert_model(copy.deepcopy(stock))
    x = torch.randn(4, 3, 64, 64)
    assert division.summary(model, x).ratio > 9
    for part, (low, high) in {"layers.": (0.99, 0.999), "relative_position_bias_table": (0.8, 0.95)}.items():
        one, mean = draw_cosines(stock, model, x, part)
        assert low < one < mean and mean > high, (part, one, mean)


def test_division_timm_swin_under_bf16_autocast() -> None:
    check_division_under_autocast(tiny_swin(40), torch.randn(4, 3, 40, 40), "layers.", min_cosine=0.95)


def test_a_block_whose_attention_is_excluded_runs_timms_attention() -> None:
    """exclude names the attention of a block: the block still saves map records, its attention
    is timm's (stock projections), and exact mode is still timm's bit for bit."""
    stock = tiny_swin(40)
    cfg = division.DivisionConfig(exclude=("layers.0.blocks.1.attn",))
    model = division.convert_model(copy.deepcopy(stock), cfg)
    assert type(model.layers[0].blocks[1].attn) is timm_swin.WindowAttention
    assert type(model.layers[0].blocks[1]).__name__ == "DivisionTimmSwinBlock"
    x = torch.randn(3, 3, 40, 40)
    assert count_applies(swin.WindowAttentionFn, lambda: grads_of(model, x)) == 3
    exact = division.convert_model(copy.deepcopy(stock), cfg.replace(backward_mode="exact"))
    (y0, g0), (y1, g1) = grads_of(stock, x), grads_of(exact, x)
    assert torch.equal(y0, y1) and all(torch.equal(g0[k], g1[k]) for k in g0)


def test_a_timm_swin_whose_forward_changed_keeps_its_blocks() -> None:
    """The converted block follows timm's forward and _attn: a timm whose _attn reads otherwise
    keeps the block stock."""
    from division.timm_blocks import followed_conversions, forward_reads
    from division.timm_swin import BLOCK_ATTN, BLOCK_FORWARD, FOLLOWED

    assert forward_reads(timm_swin.SwinTransformerBlock, BLOCK_ATTN, "_attn")
    assert timm_swin.SwinTransformerBlock in followed_conversions(FOLLOWED)
    changed = lambda cls, expected, method="forward": expected != BLOCK_FORWARD and forward_reads(cls, expected, method)  # noqa: E731
    assert timm_swin.SwinTransformerBlock not in followed_conversions(FOLLOWED, changed)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_timm_swin_on_cuda() -> None:
    check_on_cuda(tiny_swin(40).cuda(), torch.randn(4, 3, 40, 40, device="cuda"), "layers.", min_cosine=0.95)
