"""torchvision's MViT (v1 and v2) converted: token records over each stage's grid, pooled heads,
the multiscale attention recomputed."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformer_checks import (
    assert_exact_mode_is_stock,
    assert_same_gradients,
    check_on_cuda,
    count_applies,
    draw_cosines,
    faithful_grads,
    grads_of,
)

import division
from division import mvit
from division.functional import HEADS
from division.tokens import TokenGrid

tv_mvit = pytest.importorskip("torchvision.models.video.mvit")
CLIP = (8, 32, 32)  # a 4x8x8 token grid; the second block pools q to 4x4x4; k, v pooled to 4x2x2 and 4x4x4


def tiny_mvit(version: int) -> nn.Module:
    torch.manual_seed(0)
    blocks = [
        tv_mvit.MSBlockConfig(1, 16, 16, [3, 3, 3], [3, 3, 3], [1, 1, 1], [1, 4, 4]),
        tv_mvit.MSBlockConfig(2, 16, 32, [3, 3, 3], [3, 3, 3], [1, 2, 2], [1, 2, 2]),
        tv_mvit.MSBlockConfig(2, 32, 32, [3, 3, 3], [3, 3, 3], [1, 1, 1], [1, 2, 2]),
    ]
    v2 = version == 2
    model = tv_mvit.MViT((32, 32), 8, blocks, residual_pool=v2, residual_with_cls_embed=False, rel_pos_embed=v2,
                         proj_after_attn=v2, dropout=0.0, num_classes=10)
    with torch.no_grad():  # away from the initialization's zeros, so that every term is exercised
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("version", [1, 2])
def test_mvit_layers_and_token_grids(version: int) -> None:
    """The grids of every stage come from the model; its Linears convert (token inputs), the
    pooling norms take per-head tokens; revert_model undoes it all."""
    model = division.convert_model(tiny_mvit(version))
    assert set(model._division_compressor.token_grid) == {TokenGrid(8, 8, 1, 4), TokenGrid(4, 4, 1, 4), TokenGrid(2, 2, 1, 4)}
    block = model.blocks[1]
    assert type(block.attn).__name__ == "DivisionMultiscaleAttention" and type(block.attn.pool_q).__name__ == "DivisionPool"
    assert block.attn.pool_q.norm_act[0].map_layout == HEADS and type(block.mlp[0]).__name__ == "DivisionLinear"
    division.revert_model(model)
    assert type(model.blocks[1].attn) is tv_mvit.MultiscaleAttention
    assert not any(isinstance(m, division.layers.DivisionLayer) for m in model.modules())


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("version", [1, 2])
def test_exact_mode_is_stock_mvit_bit_for_bit(version: int, autocast: bool) -> None:
    assert_exact_mode_is_stock(tiny_mvit(version), torch.randn(2, 3, *CLIP), autocast)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("version", [1, 2])
def test_attention_gradients_are_autograds_on_the_reconstructed_q_k_v(version: int, autocast: bool) -> None:
    """A codec that gives its input back exactly (B = 1, float32 LFC): the recomputed attention
    (v2: relative positions and the residual q) gives stock's gradients, under bf16 autocast too."""
    stock = tiny_mvit(version)
    x = torch.randn(2, 3, *CLIP)
    y0, g0 = grads_of(stock, x, autocast=autocast)
    applies, y1, g1 = faithful_grads(stock, x, mvit.MultiscaleAttentionFn, autocast)
    assert applies == 3 and torch.equal(y0, y1)
    # the key norm's bias has a gradient of exactly 0 (softmax does not see a shift of all keys),
    # which both compute as float noise: to the model's gradient scale
    assert_same_gradients(g1, g0, model_scale=True)


@pytest.mark.parametrize("version", [1, 2])
def test_division_mvit_saves_a_tenth_and_its_gradients_average_to_stocks(version: int) -> None:
    """Token records over each stage's grid, per-head records of the pooled q, k, v and the
    attention recomputed: a tenth of what stock saves on this small model (4x8x8 and 4x4x4 grids);
    each draw's gradient is noise around stock's, which averages away."""
    stock = tiny_mvit(version)
    model = division.convert_model(copy.deepcopy(stock))
    x = torch.randn(2, 3, *CLIP)
    assert division.summary(model, x).total_saved_bytes * 9 < division.summary(stock, x).total_saved_bytes
    one, mean = draw_cosines(stock, model, x, "blocks.")
    assert 0.75 < one < mean and mean > 0.95, (one, mean)


def test_attention_keeps_what_stock_saves_when_asked() -> None:
    x = torch.randn(2, 3, *CLIP)
    for cfg in (division.DivisionConfig(compress_attention=False), division.DivisionConfig(backward_mode="exact")):
        model = division.convert_model(tiny_mvit(2), cfg)
        assert count_applies(mvit.MultiscaleAttentionFn, lambda: grads_of(model, x)) == 0  # noqa: B023


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("version", [1, 2])
def test_mvit_on_cuda(version: int) -> None:
    """On a GPU (the compress kernels on channels_last_3d token maps, cuBLAS)."""
    check_on_cuda(tiny_mvit(version).cuda(), torch.randn(2, 3, *CLIP, device="cuda"), "blocks.", min_cosine=0.9)
