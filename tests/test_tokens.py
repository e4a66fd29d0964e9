"""Transformer layers: token records over the patch grid, converted Linear / LayerNorm / GELU /
MultiheadAttention against stock and autograd, torchvision's ViT end to end."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.vision_transformer import Encoder, VisionTransformer

import division
import division.functional as functional
from division.compressor import Compressor
from division.format import lfc_shape
from division.layers import DivisionLayerNorm, DivisionLinear, DivisionMultiheadAttention
from division.tokens import TokenGrid, as_map, compress_tokens, decompress_tokens, infer_token_grid


def small_vit(dropout: float = 0.1, grid: int = 8) -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer(image_size=4 * grid, patch_size=4, num_layers=2, num_heads=3, hidden_dim=48,
                              mlp_dim=96, num_classes=10, dropout=dropout, attention_dropout=dropout)
    nn.init.normal_(model.heads.head.weight, std=0.1)  # torchvision's zero head passes no gradient
    return model


class PatchViT(nn.Module):
    """A ViT without prefix tokens: H x W patches of 4 x 4 px through torchvision's encoder, then
    mean-pooled (the grid must be given to convert_model: there is no class token to count)."""

    def __init__(self, height: int, width: int, dropout: float = 0.1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv_proj = nn.Conv2d(3, 48, kernel_size=4, stride=4)
        self.encoder = Encoder(height * width, num_layers=2, num_heads=3, hidden_dim=48, mlp_dim=96,
                               dropout=dropout, attention_dropout=dropout)
        self.head = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.conv_proj(x).flatten(2).transpose(1, 2)  # (N, H x W, D), row-major patches
        return self.head(self.encoder(tokens).mean(dim=1))


# (grid, B): the square grid with a class token, an odd one whose LFC blocks end partial (7 = 4 + 3),
# and a 5 x 7 grid without prefix tokens, partial blocks both ways
VIT_GRIDS = [
    pytest.param(TokenGrid(8, 8, prefix=1), 8, id="8x8+cls"),
    pytest.param(TokenGrid(7, 7, prefix=1), 4, id="7x7+cls"),
    pytest.param(TokenGrid(5, 7, prefix=0), 4, id="5x7"),
]
# token grids of the layer tests: one with a class token, one odd without prefix (B=4: 2 x 2 LFC
# blocks, the last row and column of blocks partial)
LAYER_GRIDS = [
    pytest.param(TokenGrid(4, 4, prefix=1), 8, id="4x4+cls"),
    pytest.param(TokenGrid(5, 7, prefix=0), 4, id="5x7"),
]


def vit_on(grid: TokenGrid, dropout: float = 0.1) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A small ViT over `grid`, and a batch of 4 images of its size with labels: torchvision's
    (square, class token) where it can be, else PatchViT."""
    if grid.prefix == 1 and grid.height == grid.width:
        model: nn.Module = small_vit(dropout, grid=grid.height)
    else:
        assert grid.prefix == 0, grid
        model = PatchViT(grid.height, grid.width, dropout)
    torch.manual_seed(2)
    return model, torch.randn(4, 3, 4 * grid.height, 4 * grid.width), torch.tensor([1, 2, 3, 4])


def convert_vit(model: nn.Module, grid: TokenGrid, cfg: division.DivisionConfig) -> nn.Module:
    """torchvision's ViT says its grid itself; PatchViT is given it."""
    return division.convert_model(model, cfg, token_grid=None if isinstance(model, VisionTransformer) else grid)


@pytest.fixture
def token_records(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every token record a converted layer's forward makes."""
    seen: list = []
    real = functional.compress_tokens

    def spy(compressor, x):  # type: ignore[no-untyped-def]
        record = real(compressor, x)
        seen.append(record)
        return record

    monkeypatch.setattr(functional, "compress_tokens", spy)
    return seen


def loss_and_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int = 1) -> tuple[torch.Tensor, dict]:
    torch.manual_seed(seed)
    model.train()
    model.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_patch_tokens_are_a_channels_last_map_of_their_grid() -> None:
    x = torch.randn(2, 3 + 5 * 7, 16)
    grid = TokenGrid(5, 7, prefix=3)
    m = as_map(x, grid)
    assert m.shape == (2, 16, 5, 7) and m.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(m, x[:, 3:].reshape(2, 5, 7, 16).permute(0, 3, 1, 2))
    plain = torch.randn(2, 5 * 7, 16)
    assert as_map(plain, TokenGrid(5, 7)).data_ptr() == plain.data_ptr()  # no copy without a prefix


def test_video_tokens_are_a_channels_last_3d_map_and_grids_are_told_apart_by_length() -> None:
    """A video's T x H x W patch tokens are a channels_last_3d (N, D, T, H, W) map; of several
    grids, an input takes the one of its length, and none when two different grids share it."""
    x = torch.randn(2, 1 + 3 * 4 * 5, 6)
    grid = TokenGrid(4, 5, prefix=1, time=3)
    m = as_map(x, grid)
    assert m.shape == (2, 6, 3, 4, 5) and m.is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.equal(m, x[:, 1:].reshape(2, 3, 4, 5, 6).permute(0, 4, 1, 2, 3))
    compressor = Compressor(division.DivisionConfig(block_size=1, lfc_dtype="float32"))
    compressor.token_grid = (TokenGrid(2, 2, 1, 3), grid)
    record = compress_tokens(compressor, x)
    assert record.grid == grid and torch.equal(decompress_tokens(record), x)
    compressor.token_grid = (grid, TokenGrid(10, 6, prefix=1), grid)  # the same length, 61
    assert compress_tokens(compressor, x).grid is None
    model = division.convert_model(small_vit(), token_grid=[TokenGrid(8, 8, 1), TokenGrid(4, 4, 1)])
    assert model._division_compressor.token_grid == (TokenGrid(8, 8, 1), TokenGrid(4, 4, 1))
    with pytest.raises(TypeError, match="a non-empty sequence of them"):
        division.convert_model(small_vit(), token_grid=[])


@pytest.mark.parametrize("prefix", [2, 0])
def test_token_record_is_the_division_record_of_the_map_plus_exact_prefix(prefix: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, prefix + 5 * 7, 16)
    grid = TokenGrid(5, 7, prefix=prefix)
    cfg = division.DivisionConfig(block_size=4)
    compressor = Compressor(cfg)
    compressor.token_grid = grid
    torch.manual_seed(5)
    record = compress_tokens(compressor, x)
    torch.manual_seed(5)  # the same seed drawn for the map compressed on its own
    alone = division.decompress(division.compress(as_map(x, grid), cfg))
    out = decompress_tokens(record)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out[:, :prefix], x[:, :prefix])
    assert (record.prefix is None) == (prefix == 0)
    assert torch.equal(out[:, prefix:], alone.permute(0, 2, 3, 1).reshape(3, 35, 16))
    assert tuple(record.inner.shape) == (3, 16, 5, 7) and record.nbytes < x.numel() * 4 / 3
    assert record.inner.lfc.numel() == 3 * 16 * 2 * 2  # 5 x 7 in 4 x 4 blocks: 2 x 2, partial at the ends
    assert 0 < (out - x).abs().max() < 0.5 * x.abs().max()


def test_a_sequence_off_the_grid_is_one_column_of_token_blocks() -> None:
    x = torch.randn(2, 20, 8)  # 20 tokens: not 1 + 8 x 8
    compressor = Compressor(division.DivisionConfig())
    compressor.token_grid = TokenGrid(8, 8, prefix=1)
    record = compress_tokens(compressor, x)
    assert record.grid is None and record.prefix is None and record.inner.shape == (2, 8, 20, 1)
    out = decompress_tokens(record)
    assert out.shape == x.shape
    step = record.inner.quantization_step.view(2, 8, 1).transpose(1, 2)  # per (sample, feature)
    assert bool(((out - x).abs() <= step * 1.01 + 1e-2 * x.abs().amax()).all())


def test_grid_is_read_from_torchvisions_vit() -> None:
    assert infer_token_grid(small_vit()) == TokenGrid(8, 8, prefix=1)
    assert infer_token_grid(nn.Linear(3, 4)) is None
    with pytest.raises(TypeError, match="token_grid must be a division.TokenGrid"):
        division.convert_model(small_vit(), token_grid=(8, 8))
    with pytest.raises(ValueError, match="TokenGrid.height=0"):
        TokenGrid(0, 4)


def test_vit_layers_are_converted_and_cnn_linears_are_not() -> None:
    model = division.convert_model(small_vit())
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"DivisionLinear", "DivisionLayerNorm", "DivisionGELU", "DivisionMultiheadAttention"} <= kinds
    cnn = division.convert_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2)))
    assert not isinstance(cnn[2], DivisionLinear)  # no grid: heads stay exact as in the paper


@pytest.mark.parametrize("dropout", [0.0, 0.1])  # without attention dropout AttentionFn runs
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize(("grid", "block"), VIT_GRIDS)
def test_exact_mode_is_stock_vit_bit_for_bit(autocast: bool, dropout: float, grid: TokenGrid, block: int) -> None:
    stock, x, y = vit_on(grid, dropout)
    exact = convert_vit(vit_on(grid, dropout)[0], grid, division.DivisionConfig(block_size=block, backward_mode="exact"))
    assert any(isinstance(m, DivisionMultiheadAttention) for m in exact.modules())
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss_s, grads_s = loss_and_grads(stock, x, y)
        loss_e, grads_e = loss_and_grads(exact, x, y)
    assert torch.equal(loss_s, loss_e)
    assert [n for n in grads_s if not torch.equal(grads_s[n], grads_e[n])] == []


def test_revert_gives_back_stock_layers() -> None:
    model = division.revert_model(division.convert_model(small_vit()))
    assert not any(isinstance(m, division.layers.DivisionLayer) for m in model.modules())
    assert type(model.encoder.layers[0].self_attention) is nn.MultiheadAttention


@pytest.fixture
def captured_reconstructions(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """Every reconstruction a converted layer's backward uses."""
    seen: list[torch.Tensor] = []
    real = functional.decompress_tokens

    def spy(record):  # type: ignore[no-untyped-def]
        out = real(record)
        seen.append(out.detach().clone())
        return out

    monkeypatch.setattr(functional, "decompress_tokens", spy)
    return seen


@pytest.mark.parametrize(("grid", "block"), LAYER_GRIDS)
def test_layer_gradients_are_autograds_on_the_reconstruction(
    captured_reconstructions: list, token_records: list, grid: TokenGrid, block: int
) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, grid.length, 12, requires_grad=True)
    gy = torch.randn(3, grid.length, 12)
    for stock in (nn.GELU(), nn.Linear(12, 12)):
        with torch.no_grad():
            for p in stock.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        layer = division.convert_model(copy.deepcopy(stock), division.DivisionConfig(block_size=block), token_grid=grid)
        captured_reconstructions.clear()
        token_records.clear()
        layer(x).backward(gy)
        (x_hat,) = captured_reconstructions
        (record,) = token_records  # over the grid: the patch map and its LFC blocks
        assert record.grid == grid and tuple(record.inner.shape) == (3, 12, grid.height, grid.width)
        assert record.inner.lfc.numel() == 3 * 12 * math.prod(lfc_shape((grid.height, grid.width), block))
        assert not torch.equal(x_hat, x) and (x_hat - x).abs().max() < 0.5 * x.abs().max()
        leaf = x_hat.clone().requires_grad_(True)
        stock.zero_grad()
        stock(leaf).backward(gy)
        for p_stock, p in zip(stock.parameters(), layer.parameters()):
            torch.testing.assert_close(p.grad, p_stock.grad, rtol=1e-5, atol=1e-5)
        if not isinstance(stock, nn.Linear):  # Linear's input gradient needs only W and gy
            torch.testing.assert_close(x.grad, leaf.grad, rtol=1e-5, atol=1e-5)
        x.grad = None


@pytest.mark.parametrize(("grid", "block"), LAYER_GRIDS)
def test_layer_norm_backward_is_atens_on_the_reconstruction_with_the_exact_statistics(
    captured_reconstructions: list, token_records: list, grid: TokenGrid, block: int
) -> None:
    """As batch norm: the per-token mean and 1/std come exact from forward; backward is stock's
    native_layer_norm_backward on the reconstruction with them (exact mode: stock bit for bit)."""
    torch.manual_seed(0)
    x = torch.randn(3, grid.length, 12, requires_grad=True)
    gy = torch.randn(3, grid.length, 12)
    stock = nn.LayerNorm(12)
    with torch.no_grad():
        stock.weight.add_(torch.randn(12) * 0.1)
    layer = division.convert_model(copy.deepcopy(stock), division.DivisionConfig(block_size=block), token_grid=grid)
    layer(x).backward(gy)
    (x_hat,) = captured_reconstructions
    assert [r.grid for r in token_records] == [grid]
    _, mean, rstd = torch.ops.aten.native_layer_norm(x.detach(), [12], stock.weight, stock.bias, stock.eps)
    gx, gw, gb = torch.ops.aten.native_layer_norm_backward(
        gy, x_hat, [12], mean, rstd, stock.weight, stock.bias, [True, True, True]
    )
    assert torch.equal(x.grad, gx) and torch.equal(layer.weight.grad, gw) and torch.equal(layer.bias.grad, gb)
    (gx_stock,) = torch.autograd.grad(stock(x), x, gy)  # the exact input's gradient, for scale
    # 2-bit noise on i.i.d. tokens: 0.23-0.38 of it over 4 x 4 planes, 0.31-0.51 over 5 x 7 (a wider
    # range per plane, so a coarser step), over seeds 0-19
    assert 0 < (x.grad - gx_stock).norm() < 0.6 * gx_stock.norm()


def test_mean_of_many_division_gradients_converges_to_the_exact_one() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 1 + 8 * 8, 16).cumsum(dim=1) / 4  # neighbouring tokens correlated
    gy = torch.randn(4, 65, 8)
    layer = division.convert_model(nn.Linear(16, 8), token_grid=TokenGrid(8, 8, prefix=1))
    exact = gy.reshape(-1, 8).t() @ x.reshape(-1, 16)
    draws = []
    for _ in range(400):
        layer.zero_grad()
        layer(x).backward(gy)
        draws.append(layer.weight.grad.clone())
    one = (draws[0] - exact).norm() / exact.norm()
    mean = (torch.stack(draws).mean(0) - exact).norm() / exact.norm()
    assert one > 1e-3 and mean < one / 10  # noise shrinks as 1/sqrt(400) = 1/20


def test_attention_falls_back_to_stock_where_it_does_not_apply() -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 2, batch_first=True)
    conv = division.convert_model(copy.deepcopy(mha))
    assert isinstance(conv, DivisionMultiheadAttention)
    q, kv = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    for args, kwargs in [((q, q, q), {"need_weights": True}), ((q, kv, kv), {"need_weights": False}),
                         ((q, q, q), {"need_weights": False, "attn_mask": torch.zeros(5, 5, dtype=torch.bool)})]:
        out_s, w_s = mha(*args, **kwargs)
        out_c, w_c = conv(*args, **kwargs)
        assert torch.equal(out_s, out_c)
        assert (w_s is None and w_c is None) or torch.equal(w_s, w_c)


def test_layer_norm_of_other_shapes_runs_stock() -> None:
    ln = division.convert_model(nn.LayerNorm([4, 4]))
    assert isinstance(ln, DivisionLayerNorm)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    ref = nn.LayerNorm([4, 4])
    assert torch.equal(ln(x), ref(x))


def test_summary_reports_every_transformer_layer_and_the_saving() -> None:
    model = division.convert_model(small_vit(dropout=0.0))
    s = division.summary(model, torch.randn(2, 3, 32, 32))
    kinds = {r.kind for r in s.converted}
    assert {"DivisionLinear", "DivisionLayerNorm", "DivisionGELU", "DivisionMultiheadAttention"} <= kinds
    mlp = next(r for r in s.rows if r.name.endswith("layer_0.mlp.1"))  # GELU on 65 x 96 tokens
    assert mlp.input_shape == (2, 65, 96) and mlp.vanilla_bytes > 6 * mlp.saved_bytes
    assert s.ratio > 2


@pytest.mark.parametrize(("grid", "block"), LAYER_GRIDS)
def test_attention_gradients_are_autograds_on_the_reconstructed_q_k_v(
    captured_reconstructions: list, token_records: list, grid: TokenGrid, block: int
) -> None:
    torch.manual_seed(0)
    n, heads, length = 2, 3, grid.length
    q, k, v = (torch.randn(n, heads, length, 8).cumsum(2).div(4).requires_grad_(True) for _ in range(3))
    gy = torch.randn(n, heads, length, 8)
    compressor = Compressor(division.DivisionConfig(block_size=block))
    compressor.token_grid = grid
    functional.AttentionFn.apply(q, k, v, compressor).backward(gy)
    assert len(captured_reconstructions) == 3
    assert [r.grid for r in token_records] == [grid] * 3
    hats = [t.view(n, length, heads, 8).transpose(1, 2).clone().requires_grad_(True) for t in captured_reconstructions]
    for hat, exact in zip(hats, (q, k, v)):
        assert 0 < (hat - exact).abs().max() < 0.5 * exact.abs().max()
    F.scaled_dot_product_attention(*hats).backward(gy)
    for hat, exact in zip(hats, (q, k, v)):
        torch.testing.assert_close(exact.grad, hat.grad, rtol=1e-5, atol=1e-6)


def test_a_heads_view_is_saved_as_a_copy_of_itself() -> None:
    head = division.convert_model(nn.Linear(16, 4), token_grid=TokenGrid(2, 2, prefix=1))
    tokens = torch.randn(3, 5, 16)
    counter = division.saved.SavedBytes(exclude=list(head.parameters()))
    x = tokens[:, 0]
    with counter.counting():
        out = head(x)
    assert counter.total == x.numel() * 4  # the view's 3 x 16 values, not the 3 x 5 x 16 tensor
    assert torch.equal(out, F.linear(x, head.weight, head.bias))


@pytest.mark.parametrize(("grid", "block"), VIT_GRIDS)
def test_division_vit_trains_under_bf16_autocast(token_records: list, grid: TokenGrid, block: int) -> None:
    stock, x, y = vit_on(grid, dropout=0.0)
    model = convert_vit(vit_on(grid, dropout=0.0)[0], grid, division.DivisionConfig(block_size=block))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = loss_and_grads(model, x, y)
    _, exact = loss_and_grads(stock, x, y)
    # every saved token input went over the grid: per block ln_1, the in-projection, q, k, v, the
    # out-projection, ln_2, the MLP's two Linears and its GELU; then the encoder's final LayerNorm
    assert len(token_records) == 2 * 10 + 1 and {r.grid for r in token_records} == {grid}
    assert {r.inner.dtype for r in token_records} == {torch.bfloat16, torch.float32}
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())
    flat = torch.cat([g.flatten() for g in grads.values()])
    ref = torch.cat([g.flatten() for g in exact.values()])
    assert F.cosine_similarity(flat, ref, dim=0) > 0.5  # bf16 and 2-bit noise, the same direction


def test_attention_keeps_what_sdpa_saves_when_asked() -> None:
    saved = {}
    for compress in (True, False):
        model = division.convert_model(small_vit(dropout=0.0), division.DivisionConfig(compress_attention=compress))
        attention = model.encoder.layers[0].self_attention
        counter = division.saved.SavedBytes(exclude=list(model.parameters()))
        tokens = torch.randn(2, 65, 48)
        with counter.counting():
            attention(tokens, tokens, tokens, need_weights=False)
        saved[compress] = counter.total
    # SDPA keeps q, k, v and its output (4 x 2 x 65 x 48 floats): far above their three records
    assert saved[False] - saved[True] > 3 * tokens.numel() * 4


def test_train_runs_vit_small_two_steps(tmp_path: Path) -> None:
    """train.py's harness trains `model=vit_small` (converted over its 8 x 8 grid) on tiny synthetic data."""
    from test_train import TINY, make_cfg  # tests/ is on sys.path under pytest

    from harness.run import train

    result = train(make_cfg(*TINY, "model=vit_small", "trainer.max_steps=2"), tmp_path / "division")
    assert result["step"] == 2 and result["model"] == "vit_small"
    (metrics,) = [json.loads(s) for s in (tmp_path / "division" / "metrics.jsonl").read_text().splitlines()]
    assert metrics["step"] == 2 and metrics["method"] == "division" and metrics["model"] == "vit_small"
    assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["val_loss"])
    assert 0 < metrics["train_loss"] < 10 * math.log(10)  # 10 classes: log 10 at chance
    assert (tmp_path / "division" / "last.pt").is_file()
    # the harness converted the ViT: its activations are a fraction of the stock model's
    vanilla = train(make_cfg(*TINY, "model=vit_small", "method=vanilla", "trainer.max_steps=1", "trainer.save_last=false"),
                    tmp_path / "vanilla")
    assert vanilla["act_mem_gib"] > 6 * metrics["act_mem_gib"] > 0
