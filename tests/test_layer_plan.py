"""DivisionConfig.exclude and layer_bits: the layers convert_model leaves stock, and the HFC bits
the others' records take."""

from __future__ import annotations

import copy
import io
from collections import OrderedDict

import pytest
import torch
import torchvision
from torch import nn

import division
from division.convert import STATE_ATTR
from division.groupquant import GroupQuantCompressor
from division.layers import DivisionLayer


def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.randn(4, 3, 64, 64), torch.arange(4)


def grads_of(model: nn.Module) -> dict[str, torch.Tensor]:
    x, y = batch()
    nn.functional.cross_entropy(model(x), y).backward()
    return {name: p.grad for name, p in model.named_parameters()}


def converted_kinds(model: nn.Module, prefix: str) -> set[bool]:
    """Whether the layers (modules without children) under `prefix` are converted."""
    return {isinstance(m, DivisionLayer) for name, m in model.named_modules()
            if name.startswith(prefix) and next(m.children(), None) is None}


def test_an_excluded_stage_is_stock_and_gets_stocks_gradients() -> None:
    """layer4 (and everything in it) stays stock: its forward and backward are stock's, so its
    parameters' gradients are stock's bit for bit, while layer3's come from compressed records."""
    stock = resnet18()
    model = division.convert_model(copy.deepcopy(stock), division.DivisionConfig(exclude=["conv1", "layer4"]))
    assert type(model.conv1) is nn.Conv2d and converted_kinds(model, "layer4") == {False}
    assert converted_kinds(model, "layer3") == {True} and isinstance(model.bn1, DivisionLayer)
    assert model.state_dict().keys() == stock.state_dict().keys()
    ours, theirs = grads_of(model), grads_of(stock)
    layer4 = [name for name in ours if name.startswith("layer4")]
    assert layer4 and all(torch.equal(ours[name], theirs[name]) for name in layer4)
    assert not torch.equal(ours["layer3.0.conv1.weight"], theirs["layer3.0.conv1.weight"])


def test_excluding_every_module_gives_stock_gradients_and_memory() -> None:
    stock = resnet18()
    model = division.convert_model(copy.deepcopy(stock), division.DivisionConfig(exclude=["*"]))
    assert not any(isinstance(m, DivisionLayer) for m in model.modules())
    ours, theirs = grads_of(model), grads_of(stock)
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)
    report = division.summary(model, batch()[0])
    assert report.total_saved_bytes == report.total_vanilla_bytes
    assert {r.reason for r in report.rows if r.name.startswith("layer")} == {"excluded by DivisionConfig.exclude '*'"}


def record_bytes(shape: tuple[int, ...], bits: int) -> int:
    """What a DIVISION record of an input of `shape` holds at `bits` HFC bits."""
    return division.compress(torch.randn(shape), division.DivisionConfig(hfc_bits=bits)).nbytes


def test_layer_bits_nearest_match_then_first_pattern() -> None:
    """A convolution saves its input's record alone (its weight is a parameter), so its saved bytes
    say the Q of its record: the nearest enclosing match decides, the first of the patterns naming
    the same module, and modules no pattern names keep hfc_bits."""
    cfg = division.DivisionConfig(layer_bits={"layer3": 4, "layer3.1": 8, "layer3.1.conv*": 1, "layer3.1.conv1": 2})
    model = division.convert_model(resnet18(), cfg)
    report = division.summary(model, batch()[0])
    rows = {r.name: r for r in report.rows}
    expected = {"layer2.1.conv2": None, "layer3.0.conv1": 4, "layer3.0.conv2": 4, "layer3.1.conv1": 1, "layer3.1.conv2": 1}
    for name, bits in expected.items():
        assert rows[name].bits == bits, name
        assert rows[name].saved_bytes == record_bytes(rows[name].input_shape, bits or cfg.hfc_bits), name
    assert rows["layer3.1.bn1"].bits == 8 and rows["layer3.1.relu"].bits is None  # a mask takes no bits
    assert "converted (Q=8)" in str(report)
    assert model.layer3[1].bn1.compressor.cfg.hfc_bits == 8
    assert "Q=8" in repr(model.layer3[1].bn1) and "Q=2" in repr(model.layer2[1].bn1)


def test_activations_in_a_pattern_take_its_bits() -> None:
    """A SiLU after a convolution saves its input at activation_bits, or at the Q of a pattern."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 8, 3, padding=1), nn.SiLU())
    model = division.convert_model(net, division.DivisionConfig(layer_bits={"3": 1}))
    report = division.summary(model, torch.randn(2, 3, 32, 32))
    rows = {r.name: r for r in report.rows}
    assert rows["1"].saved_bytes == record_bytes((2, 8, 32, 32), 4)  # activation_bits
    assert rows["3"].saved_bytes == record_bytes((2, 8, 32, 32), 1)


def shared_hits(model: nn.Module) -> int:
    compressor = getattr(model, STATE_ATTR)
    before = compressor.shared_hits
    model(batch()[0])
    return compressor.shared_hits - before


def test_layers_reading_one_tensor_share_its_record_at_equal_bits_only() -> None:
    """layer4.0's conv1 and downsample read the block input: one record at one Q, two at two."""
    base = shared_hits(division.convert_model(resnet18()))
    assert shared_hits(division.convert_model(resnet18(), division.DivisionConfig(layer_bits={"layer4.0": 8}))) == base
    split = division.DivisionConfig(layer_bits={"layer4.0.downsample": 8})
    assert shared_hits(division.convert_model(resnet18(), split)) == base - 1


def test_copies_and_pickles_keep_one_compressor() -> None:
    """The layers given other bits call the model's compressor (its seed, its cache): a deep copy
    or a pickled model keeps them pointing at its own, and trains."""
    model = division.convert_model(resnet18(), division.DivisionConfig(layer_bits={"layer4": 4}))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for copied in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        root = getattr(copied, STATE_ATTR)
        assert root is not getattr(model, STATE_ATTR)
        assert copied.layer4[0].conv1.compressor.root is root and copied.layer4[0].conv1.compressor.cfg.hfc_bits == 4
        assert all(torch.isfinite(g).all() for g in grads_of(copied).values() if g is not None)


def test_revert_model_undoes_a_planned_conversion() -> None:
    model = division.convert_model(resnet18(), division.DivisionConfig(exclude=["layer1"], layer_bits={"layer4": 4}))
    division.revert_model(model)
    assert not any(isinstance(m, DivisionLayer) for m in model.modules()) and not hasattr(model, STATE_ATTR)


def test_a_pattern_that_names_no_module_is_refused() -> None:
    with pytest.raises(ValueError, match=r"exclude: the pattern 'Layer4' names no module of this ResNet.*conv1, bn1"):
        division.convert_model(resnet18(), division.DivisionConfig(exclude=["Layer4"]))
    with pytest.raises(ValueError, match=r"layer_bits: the pattern 'layer4\.9' names no module"):
        division.convert_model(resnet18(), division.DivisionConfig(layer_bits={"layer4.9": 4}))
    with pytest.raises(ValueError, match="'conv' names no module of this Conv2d.*no submodules"):
        division.convert_model(nn.Conv2d(3, 3, 3), division.DivisionConfig(exclude=["conv"]))


def attention_model() -> nn.Module:
    return nn.Sequential(OrderedDict(attn=nn.MultiheadAttention(8, 2, batch_first=True)))


@pytest.mark.parametrize("cfg", [{"exclude": ["attn.out_proj"]}, {"layer_bits": {"attn.out_proj": 8}}])
def test_what_an_attention_runs_itself_goes_with_it(cfg: dict) -> None:
    """MultiheadAttention runs its output projection's weights itself: the projection cannot be
    excluded or given bits apart from it (that would not take effect), the attention can."""
    model = attention_model()
    with pytest.raises(ValueError, match="'attn.out_proj' is part of MultiheadAttention 'attn', which DIVISION converts whole"):
        division.convert_model(model, division.DivisionConfig(**cfg))
    assert type(model.attn) is nn.MultiheadAttention and not hasattr(model, STATE_ATTR)  # refused before converting
    model = division.convert_model(attention_model(), division.DivisionConfig(exclude=["attn"]))
    assert type(model.attn) is nn.MultiheadAttention
    model = division.convert_model(attention_model(), division.DivisionConfig(layer_bits={"attn": 8}))
    assert model.attn.compressor.cfg.hfc_bits == 8


def test_a_swin_window_attention_goes_with_its_projections() -> None:
    """Swin's converted window attention runs its qkv projection itself: naming the projection is
    refused, naming the attention applies (its records at the attention's Q) and the block's MLP
    Linears, which it calls as layers, can be set apart."""
    from test_swin import tiny_swin

    with pytest.raises(ValueError, match="'features.1.0.attn.qkv' is part of ShiftedWindowAttention"):
        division.convert_model(tiny_swin(1), division.DivisionConfig(exclude=["features.1.0.attn.qkv"]))
    cfg = division.DivisionConfig(layer_bits={"features.1.0.attn": 8}, exclude=["features.1.0.mlp.0"])
    model = division.convert_model(tiny_swin(1), cfg)
    block = model.features[1][0]
    assert block.attn.compressor.cfg.hfc_bits == 8 and block.norm1.compressor.cfg.hfc_bits == 2
    assert type(block.mlp[0]) is nn.Linear and isinstance(block.mlp[3], DivisionLayer)
    x = torch.randn(2, 3, 32, 32)
    nn.functional.cross_entropy(model(x), torch.arange(2)).backward()


def test_layer_bits_with_another_codec_is_refused() -> None:
    with pytest.raises(ValueError, match="GroupQuantCompressor has bits of its own"):
        division.convert_model(resnet18(), division.DivisionConfig(layer_bits={"layer4": 4}),
                               compressor=GroupQuantCompressor(2))


def test_a_plan_is_described_one_way_everywhere() -> None:
    """Run lines, result tables and benchmark captions say a plan in this one form."""
    from division.plan import describe_plan

    assert describe_plan((("layer4", 4), ("conv1", 8)), ("fc", "layer1.0")) == "layer4=4; conv1=8; stock: fc, layer1.0"
    assert describe_plan([["layer4", 4]], []) == "layer4=4"  # as a run's saved settings hold it
    assert describe_plan((), ("fc",)) == "stock: fc" and describe_plan((), ()) == ""
