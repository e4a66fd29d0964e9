"""torchvision's MaxViT converted: GELU on conv maps, partition layers and relative attention."""

from __future__ import annotations

import copy

import pytest
import torch
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
from division import maxvit
from division.functional import CONV
from division.tokens import PartitionGrid, map_as_partitions, partitions_as_map

tv_maxvit = pytest.importorskip("torchvision.models.maxvit")

SIZE = 64  # a 32x32 stem map; blocks on 16x16 (4x4 windows of 4, a 4x4 grid of 4x4) and 8x8 maps


def tiny_maxvit(size: int = SIZE) -> nn.Module:
    torch.manual_seed(0)
    return tv_maxvit.MaxVit((size, size), 8, 4, [16, 32], [1, 1], 8, 0.0, num_classes=10)


@pytest.mark.parametrize("swapped", [False, True])
def test_partition_records_hold_the_map(swapped: bool) -> None:
    """partitions_as_map is stock's departition (of the swapped grid partitions too) and
    map_as_partitions stock's partition: records keep the (N, H, W, C) map the partitions tile."""
    x = torch.randn(2, 5, 12, 8)  # (N, C, H, W): 3 x 2 windows of 4
    partitioned = tv_maxvit.WindowPartition()(x, 4)
    if swapped:
        partitioned = partitioned.swapaxes(-2, -3)
    grid = PartitionGrid(4, 3, 2, swapped)
    assert grid.fits(partitioned) and not grid.fits(partitioned.transpose(1, 2))
    m = partitions_as_map(partitioned, grid)
    assert torch.equal(m, x.permute(0, 2, 3, 1))
    assert torch.equal(map_as_partitions(m, grid), partitioned)


def test_maxvit_layers_are_converted_and_reverted() -> None:
    model = division.convert_model(tiny_maxvit())
    layer = model.blocks[0].layers[0]
    mbconv, window, grid = layer.layers[0], layer.layers[1], layer.layers[2]
    assert mbconv.layers.conv_a[2].map_layout == CONV and mbconv.layers.conv_b[2].map_layout == CONV
    assert model.stem[0][2].map_layout == CONV
    for attention_layer, swapped in ((window, False), (grid, True)):
        expected = PartitionGrid(4, 4, 4, swapped)
        attention = attention_layer.attn_layer[1]
        assert type(attention).__name__ == "DivisionRelativePositionalMultiHeadAttention"
        assert attention.map_layout == attention.to_qkv.map_layout == attention.merge.map_layout == expected
        assert attention_layer.attn_layer[0].map_layout == expected
        assert all(attention_layer.mlp_layer[i].map_layout == expected for i in (0, 1, 2, 3))
    assert type(model.classifier[3]) is nn.Linear  # (N, C) rows: kept exact as in the paper
    division.revert_model(model)
    assert type(model.blocks[0].layers[0].layers[1]) is tv_maxvit.PartitionAttentionLayer
    assert type(model.blocks[0].layers[0].layers[1].attn_layer[1].to_qkv) is nn.Linear
    assert not any(isinstance(m, division.layers.DivisionLayer) for m in model.modules())


@pytest.mark.parametrize("autocast", [False, True])
def test_exact_mode_is_stock_maxvit_bit_for_bit(autocast: bool) -> None:
    """Stock's ops in stock's order: outputs and every gradient are stock's bit for bit."""
    assert_exact_mode_is_stock(tiny_maxvit(), torch.randn(3, 3, SIZE, SIZE), autocast)


@pytest.mark.parametrize("autocast", [False, True])
def test_attention_gradients_are_autograds_on_the_reconstructed_q_k_v(autocast: bool) -> None:
    """With a codec that gives its input back exactly (B = 1, float32 LFC), the recomputed
    attention of every partition layer gives stock's gradients (q, k, v, the relative position
    bias table), under bf16 autocast too."""
    stock = tiny_maxvit()
    x = torch.randn(3, 3, SIZE, SIZE)
    y0, g0 = grads_of(stock, x, autocast=autocast)
    applies, y1, g1 = faithful_grads(stock, x, maxvit.PartitionAttentionFn, autocast)
    assert applies == 4 and torch.equal(y0, y1)
    assert_same_gradients(g1, g0)


def test_division_maxvit_saves_a_tenth_and_its_gradients_average_to_stocks() -> None:
    """DIVISION's records in place of the conv maps, the GELUs' inputs, the partition layers'
    inputs and the attention's q, k, v and softmax: several times less saved on this small model;
    each draw's gradient is noise around stock's, which averages away."""
    stock = tiny_maxvit()
    model = division.convert_model(copy.deepcopy(stock))
    x = torch.randn(4, 3, SIZE, SIZE)
    assert division.summary(model, x).total_saved_bytes * 6 < division.summary(stock, x).total_saved_bytes
    for part, (low, high) in {"blocks.": (0.95, 0.99), "relative_position_bias_table": (0.7, 0.95)}.items():
        one, mean = draw_cosines(stock, model, x, part)
        assert low < one < mean and mean > high, (part, one, mean)


def test_the_attention_rebuilds_its_position_bias_in_backward() -> None:
    """The relative position bias (1, heads, P, P) is not among what forward saves: backward
    rebuilds it from the table (the faithful-gradient test above checks its gradient)."""
    model = division.convert_model(tiny_maxvit())
    attentions = [m for m in model.modules() if isinstance(m, maxvit._RelativeAttention)]
    bias_shapes = {tuple(m.get_relative_positional_bias().shape) for m in attentions}
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        n = count_applies(maxvit.PartitionAttentionFn, lambda: model(torch.randn(2, 3, SIZE, SIZE)))
    assert n == len(attentions) == 4 and bias_shapes == {(1, 2, 16, 16), (1, 4, 16, 16)}
    assert not bias_shapes & set(shapes)


def test_division_maxvit_under_bf16_autocast() -> None:
    """Under bf16 autocast the attention is recomputed as forward ran it: stock's output, finite
    gradients near stock's autocast ones."""
    stock = tiny_maxvit()
    x = torch.randn(4, 3, SIZE, SIZE)
    check_division_under_autocast(stock, x, "blocks.", min_cosine=0.9)


def test_attention_keeps_what_stock_saves_when_asked() -> None:
    """compress_attention=False or exact mode: the attention core is stock's (no recomputation)."""
    x = torch.randn(2, 3, SIZE, SIZE)
    for cfg in (division.DivisionConfig(compress_attention=False), division.DivisionConfig(backward_mode="exact")):
        model = division.convert_model(tiny_maxvit(), cfg)
        assert count_applies(maxvit.PartitionAttentionFn, lambda: grads_of(model, x)) == 0  # noqa: B023


def test_another_input_size_runs_stocks_layers() -> None:
    """A partition layer's grid is fixed at construction (stock departitions by it): on inputs it
    does not fit, the converted layers run stock's forward, which fails as stock's does."""
    attention = division.convert_model(tiny_maxvit()).blocks[0].layers[0].layers[1]
    x = torch.randn(2, 16, 8, 8, requires_grad=True)  # the layer was built for 16x16 maps
    with pytest.raises(RuntimeError):
        tv_maxvit.PartitionAttentionLayer.forward(attention, x)
    with pytest.raises(RuntimeError):
        attention(x)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_maxvit_on_cuda() -> None:
    """On a GPU (the compress kernels on channels_last maps, cuBLAS)."""
    check_on_cuda(tiny_maxvit().cuda(), torch.randn(3, 3, SIZE, SIZE, device="cuda"), "blocks.", min_cosine=0.9)
