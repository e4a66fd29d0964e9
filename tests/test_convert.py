"""convert_model on whole networks: training, weights and state_dict, sharing, summary."""

from __future__ import annotations

import copy
import gc
import io
import weakref

import pytest
import torch
import torchvision
from torch import nn

import division
from benchmarks.op_count import OpCounter
from division.compressor import Compressor
from division.hashing import draw_seed
from division.saved import SavedBytes


def train_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float = 0.05) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(
    "name, size, steps, lr",
    [("resnet18", 32, 6, 0.05), pytest.param("resnet50", 64, 10, 0.01, marks=pytest.mark.slow)],
)
def test_converted_torchvision_resnet_learns_a_fixed_batch(name: str, size: int, steps: int, lr: float) -> None:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, num_classes=10)
    division.convert_model(model, division.DivisionConfig())
    x, y = torch.randn(8, 3, size, size), torch.arange(8) % 10
    losses = train_steps(model, x, y, steps, lr)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0]


def test_conversion_keeps_weights_and_state_dict_both_ways() -> None:
    torch.manual_seed(0)
    stock = torchvision.models.resnet18(num_classes=10)
    reference_state = copy.deepcopy(stock.state_dict())
    converted = division.convert_model(copy.deepcopy(stock), division.DivisionConfig())
    assert isinstance(converted.conv1, nn.Conv2d) and type(converted.conv1) is not nn.Conv2d
    state = converted.state_dict()
    assert list(state) == list(reference_state)
    for key in state:
        assert torch.equal(state[key], reference_state[key]), key
    # train the converted model a step, then load its weights into a stock one and back
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    train_steps(converted, x, y, 1)
    fresh_stock = torchvision.models.resnet18(num_classes=10)
    fresh_stock.load_state_dict(converted.state_dict())
    fresh_converted = division.convert_model(torchvision.models.resnet18(num_classes=10))
    fresh_converted.load_state_dict(fresh_stock.state_dict())
    converted.eval(), fresh_stock.eval(), fresh_converted.eval()
    with torch.no_grad():
        assert torch.equal(converted(x), fresh_stock(x))
        assert torch.equal(converted(x), fresh_converted(x))


def test_optimizer_built_before_conversion_still_updates_the_model() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    division.convert_model(model, division.DivisionConfig())
    before = model[0].weight.detach().clone()
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    assert not torch.equal(model[0].weight, before)


def test_a_block_input_read_by_two_convs_is_compressed_once() -> None:
    model = torchvision.models.resnet18(num_classes=10)
    division.convert_model(model, division.DivisionConfig())
    compressor = model._division_compressor
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert compressor.shared_hits == 3  # the three downsample convs share conv1's record
    unshared = division.convert_model(torchvision.models.resnet18(num_classes=10), division.DivisionConfig(share_inputs=False))
    unshared(torch.randn(2, 3, 32, 32)).sum().backward()
    assert unshared._division_compressor.shared_hits == 0


def test_a_forward_draws_one_seed_and_numbers_its_planes_in_sequence() -> None:
    model = division.convert_model(torchvision.models.resnet18(num_classes=10), division.DivisionConfig())
    x = torch.randn(2, 3, 32, 32)
    for _ in range(2):
        with OpCounter() as ops:
            model(x).sum().backward()
        assert ops.counts["aten.randint"] + ops.counts["aten.random_"] == 1  # one seed a step, not one per layer
    cfg = division.DivisionConfig()
    compressor = Compressor(cfg)
    a, b = torch.randn(2, 3, 8, 8), torch.randn(4, 5, 6, 6)
    compressor.new_forward()
    torch.manual_seed(1)
    got_a, got_b = compressor.compress(a), compressor.compress(b)
    torch.manual_seed(1)
    seed = draw_seed()
    assert torch.equal(got_a.codes, division.compress(a, cfg, seed=seed).codes)
    assert torch.equal(got_b.codes, division.compress(b, cfg, seed=seed, first_plane=2 * 3).codes)
    compressor.new_forward()
    assert not torch.equal(compressor.compress(a).codes, got_a.codes)  # the next forward draws anew


def test_converting_twice_and_bad_arguments_are_errors() -> None:
    model = division.convert_model(nn.Sequential(nn.Conv2d(3, 3, 1)))
    with pytest.raises(ValueError, match="already converted"):
        division.convert_model(model)
    with pytest.raises(TypeError, match="DivisionConfig"):
        division.convert_model(nn.Sequential(nn.Conv2d(3, 3, 1)), {"block_size": 8})  # type: ignore[arg-type]


def test_lazy_layers_are_converted_once_initialized_and_refused_before() -> None:
    """An uninitialized LazyConv2d turns into a stock Conv2d at its first forward, after
    convert_model: refused with the remedy. After one dummy forward it is a Conv2d and converts."""
    def model() -> nn.Sequential:
        return nn.Sequential(nn.LazyConv2d(4, 3), nn.LazyBatchNorm2d(), nn.ReLU())

    lazy = model()
    with pytest.raises(ValueError, match=r"'0' is an uninitialized LazyConv2d: it becomes a stock Conv2d .* dummy batch"):
        division.convert_model(lazy)
    assert type(lazy[2]) is nn.ReLU  # refused before anything was converted
    kept = division.convert_model(model(), division.DivisionConfig(exclude=("0", "1")))
    assert type(kept[2]).__name__ == "DivisionReLU"
    head = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))  # a Linear stays stock anyway
    assert type(division.convert_model(head)[0]).__name__ == "DivisionConv2d"
    with pytest.raises(ValueError, match="'2' is an uninitialized LazyLinear"):
        division.convert_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2)),
                               division.DivisionConfig(compress_linear=True))
    x = torch.randn(2, 3, 8, 8)
    torch.manual_seed(0)
    stock = model()
    stock(x)
    converted = division.convert_model(copy.deepcopy(stock), division.DivisionConfig(backward_mode="exact"))
    assert all(row.converted for row in division.summary(converted).rows)
    stock(x).square().sum().backward()
    converted(x).square().sum().backward()
    assert torch.equal(stock[0].weight.grad, converted[0].weight.grad)


def test_summary_says_why_a_convertible_layer_is_stock() -> None:
    model = division.convert_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    model.append(nn.Conv2d(4, 4, 3))
    assert division.summary(model).rows[2].reason == "added or changed after convert_model"
    assert division.summary(nn.Sequential(nn.Conv2d(3, 4, 3))).rows[0].reason == "model not converted"


def test_deepcopy_and_pickle_of_a_converted_model() -> None:
    model = division.convert_model(torchvision.models.resnet18(num_classes=10))
    twin = copy.deepcopy(model)
    assert twin._division_compressor is not model._division_compressor
    twin(torch.randn(2, 3, 32, 32)).sum().backward()


def test_summary_lists_layers_reasons_and_measured_bytes() -> None:
    model = torchvision.models.resnet18(num_classes=10)
    division.convert_model(model, division.DivisionConfig())
    result = division.summary(model, torch.randn(4, 3, 64, 64))
    names = {r.name: r for r in result.rows}
    assert names["conv1"].converted and names["layer1.0.bn1"].converted
    assert not names["fc"].converted and "compress_linear=False" in names["fc"].reason
    assert "is a mean, which saves nothing" in names["avgpool"].reason
    assert names["layer1.0.conv1"].input_shape == (4, 64, 16, 16)
    assert result.total_vanilla_bytes > 6 * result.total_saved_bytes  # small maps: ~8x
    assert result.ratio == pytest.approx(result.total_vanilla_bytes / result.total_saved_bytes)
    text = str(result)
    assert "layer1.0.conv1" in text and "smaller" in text
    # the model itself is untouched by measuring
    assert all(p.grad is None for p in model.parameters())
    assert type(model.conv1).__name__ == "DivisionConv2d"


def test_summary_of_an_unconverted_model_says_so() -> None:
    result = division.summary(nn.Sequential(nn.Conv2d(3, 3, 1), nn.SiLU(), nn.Sigmoid()))
    reasons = [r.reason for r in result.rows]
    assert reasons[:2] == ["model not converted"] * 2
    assert "no DIVISION version of Sigmoid" in reasons[2]


def test_revert_model_gives_stock_layers() -> None:
    model = division.convert_model(torchvision.models.resnet18(num_classes=10))
    division.revert_model(model)
    assert type(model.conv1) is nn.Conv2d and type(model.bn1) is nn.BatchNorm2d


@pytest.mark.parametrize("name, size", [
    ("mobilenet_v2", 64), ("efficientnet_b0", 64), ("squeezenet1_1", 64), ("convnext_tiny", 32),
    ("googlenet", 64), ("inception_v3", 75), ("resnet18", 32), ("swin_t", 64), ("maxvit_t", 224),
    pytest.param("vgg11", 32, marks=pytest.mark.slow),
])
def test_exact_mode_is_the_stock_model_bit_for_bit(name: str, size: int) -> None:
    """Dropout, stochastic depth and every converted layer: the same random draws, outputs and
    gradients as the unconverted model under the same seed (exact mode is the A/B reference)."""
    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    stock = torchvision.models.get_model(name, num_classes=10, **kwargs)
    converted = division.convert_model(copy.deepcopy(stock), division.DivisionConfig(backward_mode="exact"))
    x, y = torch.randn(2, 3, size, size), torch.tensor([1, 2])
    results = []
    for model in (stock, converted):
        torch.manual_seed(1)
        out = model(x)
        torch.nn.functional.cross_entropy(out, y).backward()
        results.append((out.detach(), [p.grad for p in model.parameters()], torch.rand(1)))
    (out0, grads0, after0), (out1, grads1, after1) = results
    assert torch.equal(out0, out1)
    assert all(torch.equal(a, b) for a, b in zip(grads0, grads1))
    assert torch.equal(after0, after1)  # and the same amount of randomness consumed


def test_a_lone_converted_layer_draws_anew_each_call_and_reverts() -> None:
    original = nn.Conv2d(3, 4, 3)
    layer = division.convert_model(original, division.DivisionConfig())
    x = torch.randn(2, 3, 8, 8)

    def weight_grad(seed: int | None) -> torch.Tensor:
        if seed is not None:
            torch.manual_seed(seed)
        layer.zero_grad()
        layer(x).square().sum().backward()
        return layer.weight.grad.clone()

    first, second = weight_grad(None), weight_grad(None)
    assert not torch.equal(first, second)  # two draws, not one record reused
    # each call draws its own seed, as a model's forward does: manual_seed reproduces it
    assert torch.equal(weight_grad(0), weight_grad(0))
    assert not torch.equal(weight_grad(0), weight_grad(1))
    assert not original._forward_pre_hooks  # the original layer's hooks are untouched
    twin = copy.deepcopy(layer)  # a copy's hook resets the copy's own compressor
    assert list(twin._forward_pre_hooks.values()) == [twin.compressor] and twin.compressor is not layer.compressor
    stock = division.revert_model(layer)
    assert type(stock) is nn.Conv2d and stock.weight is layer.weight
    assert not stock._forward_pre_hooks  # the compressor's hook went with the conversion
    with pytest.raises(ValueError, match="already converted"):
        division.convert_model(layer)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_b0", "resnet50", "densenet121", "swin_t"])
def test_exact_mode_is_the_stock_model_bit_for_bit_on_cuda(name: str) -> None:
    """On a GPU too (cuDNN batch norm, fused dropout); deterministic cuDNN, or stock itself would
    not repeat bit for bit."""
    torch.manual_seed(0)
    stock = torchvision.models.get_model(name, num_classes=10).cuda()
    converted = division.convert_model(copy.deepcopy(stock), division.DivisionConfig(backward_mode="exact"))
    x, y = torch.randn(4, 3, 64, 64, device="cuda"), torch.tensor([1, 2, 3, 4], device="cuda")
    results = []
    for model in (stock, converted):
        torch.manual_seed(1)
        with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
            out = model(x)
            torch.nn.functional.cross_entropy(out, y).backward()
        results.append((out.detach(), [p.grad for p in model.parameters()]))
    (out0, grads0), (out1, grads1) = results
    assert torch.equal(out0, out1)
    assert all(torch.equal(a, b) for a, b in zip(grads0, grads1))


def stem_and_block() -> nn.Module:
    """A ResNet stem and block on 224x224 images: the split-plane (cluster) compress of the input's
    224x224 planes, staged compress, word / channel decompress, fused ReLU masks and max-pool."""
    def conv_bn_relu(c_in: int, c_out: int, k: int, s: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, k, s, k // 2, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

    return nn.Sequential(*conv_bn_relu(3, 16, 7, 2), nn.MaxPool2d(3, 2, 1), *conv_bn_relu(16, 16, 3, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("amp", [False, True])
def test_a_converted_training_step_replays_as_a_cuda_graph(amp: bool) -> None:
    """Forward and backward captured whole in a CUDA graph (what torch.compile's reduce-overhead
    mode does with each graph): every kernel's host side is legal under capture (no sync, no
    allocation outside the graph's pool), exact mode replays eager's gradients, and each DIVISION
    replay draws a new seed (the generator's offset advances) for gradients as near the exact ones
    as an eager step's. fp32 NCHW, and bf16 autocast + channels_last."""
    torch.manual_seed(0)
    base = stem_and_block().cuda()
    fmt = torch.channels_last if amp else torch.contiguous_format
    x = torch.randn(2, 3, 224, 224, device="cuda").contiguous(memory_format=fmt)
    y = torch.tensor([1, 2], device="cuda")
    grads = {}
    for mode in ("exact", "division"):
        model = division.convert_model(copy.deepcopy(base).to(memory_format=fmt),
                                       division.DivisionConfig(backend="cuda", backward_mode=mode))
        grads[mode] = capture_and_replay(model, amp, x, y)
    (exact_replays, exact_eager), (div_replays, div_eager) = grads["exact"], grads["division"]
    for replay in exact_replays:
        torch.testing.assert_close(replay, exact_eager, rtol=1e-5, atol=1e-6)
    assert not torch.equal(div_replays[0], div_replays[1])  # a new seed each replay
    eager_cosine = nn.functional.cosine_similarity(div_eager, exact_eager, dim=0).item()
    for replay in div_replays:
        assert torch.isfinite(replay).all()
        cosine = nn.functional.cosine_similarity(replay, exact_eager, dim=0).item()
        assert cosine > min(0.9, eager_cosine - 0.05), (cosine, eager_cosine)


def capture_and_replay(model: nn.Module, amp: bool, x: torch.Tensor, y: torch.Tensor
                       ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(the gradients of two replays of a captured training step, those of an eager step after
    them), with deterministic cuDNN (or exact mode would not repeat bit for bit)."""
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
        def step() -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp, cache_enabled=False):
                loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()

        def flat_grad() -> torch.Tensor:
            return torch.cat([p.grad.flatten().float() for p in model.parameters()])

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture (cuDNN plans, kernel attributes)
            for _ in range(2):
                model.zero_grad(set_to_none=True)
                step()
        torch.cuda.current_stream().wait_stream(side)
        model.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        replays = []
        for _ in range(2):
            graph.replay()
            replays.append(flat_grad().clone())
        model.zero_grad(set_to_none=True)
        step()
        return replays, flat_grad()


def test_a_subclass_with_methods_of_its_own_is_kept_and_the_summary_says_whose() -> None:
    """A subclass may change what forward does: one that defines methods (or properties) is not
    converted, and the reason names them and its nearest base, from torch.nn or torchvision."""
    from torchvision.models.convnext import LayerNorm2d

    class MyConv(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2

    class MyNorm(LayerNorm2d):
        @property
        def eps_value(self) -> float:
            return self.eps

    model = division.convert_model(nn.Sequential(MyConv(3, 4, 1), MyNorm(4)))
    reasons = {r.kind: r.reason for r in division.summary(model).rows}
    assert reasons == {"MyConv": "MyConv subclasses nn.Conv2d with its own forward",
                       "MyNorm": "MyNorm subclasses torchvision.LayerNorm2d with its own eps_value"}


def test_a_subclass_that_only_builds_its_layer_is_converted_and_reverted() -> None:
    """A subclass defining only __init__ (static methods and data aside) runs its base's forward:
    it is converted (torchvision's video ResNets build their convolutions so), exact mode gives
    stock's outputs, gradients and draws, and revert_model gives the subclass back."""
    video = pytest.importorskip("torchvision.models.video")
    torch.manual_seed(0)
    stock = video.r3d_18(num_classes=10)
    converted = division.convert_model(copy.deepcopy(stock), division.DivisionConfig(backward_mode="exact"))
    conv = converted.layer1[0].conv1[0]
    assert type(conv).__name__ == "DivisionConv3DSimple" and isinstance(conv, video.resnet.Conv3DSimple)
    assert conv.get_downsample_stride(2) == (2, 2, 2)
    assert "Conv3DSimple" not in {r.kind for r in division.summary(converted).rows if not r.converted}
    x, y = torch.randn(2, 3, 4, 32, 32), torch.tensor([1, 2])
    results = []
    for model in (stock, converted):
        torch.manual_seed(1)
        out = model(x)
        torch.nn.functional.cross_entropy(out, y).backward()
        results.append((out.detach(), [p.grad for p in model.parameters()]))
    (out0, grads0), (out1, grads1) = results
    assert torch.equal(out0, out1) and all(torch.equal(a, b) for a, b in zip(grads0, grads1))
    buffer = io.BytesIO()  # torch.save of the whole model: the class made at conversion pickles too
    torch.save(converted, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded.layer1[0].conv1[0]) is type(conv) and loaded.layer1[0].conv1[0].compressor is loaded._division_compressor
    torch.manual_seed(1)
    assert torch.equal(loaded(x), out0)
    division.revert_model(converted)
    reverted = converted.layer1[0].conv1[0]
    assert type(reverted) is video.resnet.Conv3DSimple and reverted.weight is conv.weight
    assert not any(isinstance(m, division.layers.DivisionLayer) for m in converted.modules())
    unconverted = division.summary(video.r3d_18(num_classes=10)).rows
    assert {r.reason for r in unconverted if r.kind == "Conv3DSimple"} == {"model not converted"}


def test_converting_a_lone_block_leaves_the_original_as_it_was() -> None:
    """A block converted alone is a new module sharing the original's parameters and hooks; the
    original keeps its layers, its nested containers' (ConvNeXt's `block`, Swin's `mlp`) too."""
    from torchvision.models.convnext import CNBlock
    from torchvision.models.swin_transformer import SwinTransformerBlock

    for block in (CNBlock(16, 0.5, 0.0), SwinTransformerBlock(16, 2, [4, 4], [2, 2])):
        calls = []
        inner = block.block if isinstance(block, CNBlock) else block.mlp
        inner.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        before = [(name, type(m)) for name, m in block.named_modules()]
        layer = division.convert_model(block)
        assert [(name, type(m)) for name, m in block.named_modules()] == before
        assert all(a is b for a, b in zip(layer.parameters(), block.parameters()))
        assert any(isinstance(m, division.layers.DivisionLinear) for m in layer.modules())
        x = torch.randn(2, 16, 8, 8) if isinstance(block, CNBlock) else torch.randn(2, 8, 8, 16)
        layer(x.requires_grad_()).sum().backward()
        assert calls == [1]  # the nested container's hook, shared


def test_counting_saved_bytes_keeps_nothing_alive() -> None:
    """SavedBytes hands autograd a detached tensor: the graph of a forward without backward (what
    summary runs) dies with its last reference, and a backward still gets the saved values. A pack
    hook returning the live tensor leaks a saved output through a reference cycle in C++ that no gc
    breaks (pytorch/pytorch#115255): summary grew a ResNet-50 process by its stock activations at
    every call."""
    x = torch.randn(64, requires_grad=True)
    counter = SavedBytes()
    with counter.counting():
        y = x.exp()  # exp saves its output
    assert counter.total == 64 * 4
    alive = weakref.ref(y)
    del y
    gc.collect()
    assert alive() is None
    with counter.counting():
        x.exp().sum().backward()
    assert torch.equal(x.grad, x.detach().exp())
