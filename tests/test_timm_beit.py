"""timm's BEiT converted (division/timm_beit.py); skipped where timm is not installed."""

from __future__ import annotations

import copy

import pytest
import torch
from transformer_checks import (
    assert_exact_mode_is_stock,
    assert_same_gradients,
    count_applies,
    faithful_grads,
    grads_of,
)

import division
from division.functional import AttentionFn, ScaleFn

timm = pytest.importorskip("timm")
from timm.models.beit import Beit  # noqa: E402

VARIANTS = {  # BEiT's own relative position bias and layer scales (v1, v2), the model's shared bias, no qkv bias
    "relative": {"use_rel_pos_bias": True, "init_values": 0.1},
    "shared": {"use_shared_rel_pos_bias": True},
    "no_qkv_bias": {"use_rel_pos_bias": True, "qkv_bias": False, "init_values": 0.1},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_beit_attention_and_layer_scales_save_token_records(variant: str) -> None:
    """BEiT's qkv input (run as F.linear with its concatenated bias), its fused attention (q, k, v
    records, recomputed with the relative position bias, gathered again from its table) and its
    `gamma * y` (y a token record): exact mode is timm's bit for bit, a faithful codec gives its
    gradients, the bias table's included."""
    torch.manual_seed(0)
    stock = Beit(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10, **VARIANTS[variant])
    x = torch.randn(2, 3, 64, 64)
    assert_exact_mode_is_stock(stock, x)
    y0, g0 = grads_of(stock, x)
    applies, y2, g2 = faithful_grads(stock, x, AttentionFn)
    assert applies == 2 and torch.equal(y0, y2)
    assert_same_gradients(g2, g0, model_scale=True)
    model = division.convert_model(copy.deepcopy(stock))
    scales = 0 if stock.blocks[0].gamma_1 is None else 4

    assert count_applies(ScaleFn, lambda: grads_of(model, x)) == scales
    assert division.summary(model, x).ratio > 5  # an 8x8 patch grid (BEiT-B at 224 px: 2.0x -> 11.1x)
