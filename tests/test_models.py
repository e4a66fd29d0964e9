"""Every registered model: shapes, finite gradients, published sizes, init, conversion and a step."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import division
import models
from division.layers import DivisionLayer

CIFAR = ("resnet18", "resnet164", "densenet121")
IMAGENET = ("resnet50", "densenet161", "wrn50_2")
REGISTERED = tuple(models.list_models())
VIT_SIZES = {"vit_small": 32, "vit_b_16": 224}  # torchvision's ViT takes exactly its image size
# ViT-B/16 runs at 224x224: slow on a CPU
REGISTERED_PARAMS = [pytest.param(n, marks=pytest.mark.slow) if n == "vit_b_16" else n for n in REGISTERED]

# Published sizes: CIFAR models with 10 classes (ResNet-18 and DenseNet-121 as kuangliu's
# pytorch-cifar, ResNet-164 as He et al. 2016), ImageNet models with 1000 (torchvision's tables).
PUBLISHED = {
    "resnet18": 11.17e6, "resnet164": 1.70e6, "densenet121": 6.96e6,
    "resnet50": 25_557_032, "densenet161": 28_681_000, "wrn50_2": 68_883_240,
}
# What our CIFAR definitions count exactly; ResNet-164 is the standard 1,703,258 plus the 8,064
# biases of each block's last 1x1 conv, which the reference's definition has.
EXACT_CIFAR = {"resnet18": 11_173_962, "resnet164": 1_703_258 + 8_064, "densenet121": 6_956_298}


def _input_size(name: str) -> int:
    return VIT_SIZES.get(name, 32 if name in CIFAR else 64)


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_the_six_models() -> None:
    assert set(CIFAR + IMAGENET) <= set(REGISTERED)
    assert REGISTERED == tuple(sorted(REGISTERED))


@pytest.mark.parametrize("name", CIFAR + IMAGENET)
def test_parameter_count_matches_the_published_one(name: str) -> None:
    model = models.build_model(name, num_classes=10 if name in CIFAR else 1000)
    count = _num_params(model)
    if name in CIFAR:
        assert count == pytest.approx(PUBLISHED[name], rel=0.02)
        assert count == EXACT_CIFAR[name]
    else:
        assert count == PUBLISHED[name]


@pytest.mark.parametrize("in_channels", [3, 1])
@pytest.mark.parametrize("name", REGISTERED_PARAMS)
def test_forward_backward_every_parameter_gets_a_finite_gradient(name: str, in_channels: int) -> None:
    torch.manual_seed(0)
    model = models.build_model(name, num_classes=7, in_channels=in_channels)
    size = _input_size(name)
    out = model(torch.randn(2, in_channels, size, size))
    assert out.shape == (2, 7)
    out.sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", IMAGENET)
def test_grey_stem_keeps_the_geometry(name: str) -> None:
    torch.manual_seed(0)
    rgb = models.build_model(name, num_classes=10)
    grey = models.build_model(name, num_classes=10, in_channels=1)
    stems = [m for m in grey.modules() if isinstance(m, nn.Conv2d) and m.in_channels == 1]
    assert len(stems) == 1
    ref = next(m for m in rgb.modules() if isinstance(m, nn.Conv2d))
    for attr in ("out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
        assert getattr(stems[0], attr) == getattr(ref, attr), attr
    assert (stems[0].bias is None) == (ref.bias is None)
    assert _num_params(rgb) - _num_params(grey) == ref.weight[:, 1:].numel()


class _CountReLUCalls(TorchFunctionMode):
    """Counts every relu reaching torch, through a module or not."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func in (F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_):
            self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", CIFAR)
def test_our_definitions_use_one_relu_module_per_use(name: str) -> None:
    torch.manual_seed(0)
    model = models.build_model(name)
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    module_calls = {id(m): 0 for m in relus}

    def count(module: nn.Module, args: object, output: object) -> None:
        module_calls[id(module)] += 1

    for m in relus:
        m.register_forward_hook(count)
    with _CountReLUCalls() as mode:
        model(torch.randn(2, 3, 32, 32))
    assert all(n == 1 for n in module_calls.values())  # no module reused within a forward
    assert mode.calls == len(relus)  # and no functional relu besides them


@pytest.mark.parametrize("name", CIFAR)
def test_our_definitions_convert_fully(name: str) -> None:
    model = division.convert_model(models.build_model(name), division.DivisionConfig())
    kept = [r for r in division.summary(model).rows if not r.converted and r.reason != "container"]
    assert all(r.kind in ("AdaptiveAvgPool2d", "Linear", "Identity") for r in kept), kept


@pytest.mark.parametrize("name", CIFAR)
def test_init_follows_the_papers(name: str) -> None:
    torch.manual_seed(0)
    model = models.build_model(name)
    for mname, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight)), mname
            assert torch.equal(m.bias, torch.zeros_like(m.bias)), mname
        elif isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
            assert torch.equal(m.bias, torch.zeros_like(m.bias)), mname
    # He normal, fan_out: std sqrt(2 / (k*k*out_channels)), checked on the largest 3x3 conv
    conv = max((m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)),
               key=lambda m: m.weight.numel())
    expected = math.sqrt(2.0 / (9 * conv.out_channels))
    assert conv.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert conv.weight.mean().item() == pytest.approx(0.0, abs=0.05 * expected)


@pytest.mark.parametrize("in_channels", [3, 1])
@pytest.mark.parametrize("name", REGISTERED_PARAMS)
def test_converted_model_trains_a_step(name: str, in_channels: int) -> None:
    # grey inputs at Fashion-MNIST's 28x28 where the model allows it: torchvision's DenseNet-161
    # shrinks 28x28 to 1x1 before its last 2x2 average pool
    size = VIT_SIZES.get(name, 28 if in_channels == 1 and name != "densenet161" else 32)
    torch.manual_seed(0)
    model = models.build_model(name, num_classes=10, in_channels=in_channels)
    model = division.convert_model(model, division.DivisionConfig())
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(isinstance(m, DivisionLayer) for m in convs)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    x, y = torch.randn(4, in_channels, size, size), torch.tensor([0, 1, 2, 3])
    # two steps: torchvision zero-initialises a ViT's head, so only the head moves in the first
    for _ in range(2 if name in VIT_SIZES else 1):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    unchanged = [k for k, p in model.named_parameters() if torch.equal(p, before[k])]
    assert not unchanged
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_torchvision_names_build() -> None:
    torch.manual_seed(0)
    model = models.build_model("mobilenet_v2", num_classes=5)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_registered_names_shadow_torchvision_ones() -> None:
    stem = models.build_model("resnet18").conv1
    assert stem.kernel_size == (3, 3) and stem.stride == (1, 1)  # the CIFAR variant, not 7x7/2
    tv_stem = models.build_model("torchvision.resnet18").conv1
    assert tv_stem.kernel_size == (7, 7) and tv_stem.stride == (2, 2)


def test_image_size_check_refuses_what_would_fail_or_mislead() -> None:
    with pytest.raises(ValueError, match=r"resnet18 is the variant built for 32x32 images.*torchvision.resnet18"):
        models.check_image_size("resnet18", 224, 3, 10)
    with pytest.raises(ValueError, match=r"model=densenet161 cannot take 8x8 images: .*too small"):
        models.check_image_size("densenet161", 8, 3, 10)
    models.check_image_size("resnet18", 64, 3, 10)  # up to twice the designed size is fine
    models.check_image_size("torchvision.resnet18", 224, 3, 10)
    models.check_image_size("densenet161", 29, 3, 1000)  # the smallest its pooling takes
    with pytest.raises(ValueError, match=r"cannot take 28x28"):
        models.check_image_size("densenet161", 28, 3, 10)
    # torchvision's video classifiers build, but take clips: the harness's images are refused by name
    assert type(models.build_model("r3d_18")).__name__ == "VideoResNet"
    with pytest.raises(ValueError, match=r"model=r3d_18 classifies video clips .*memory_speed.py --frames"):
        models.check_image_size("r3d_18", 112, 3, 10)


def test_bad_names_and_arguments_say_what_is_accepted() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'resnet19'.*resnet164.*torchvision"):
        models.build_model("resnet19")
    with pytest.raises(ValueError, match="fixes 3 input channels"):
        models.build_model("mobilenet_v2", in_channels=1)
    with pytest.raises(ValueError, match="must be positive"):
        models.build_model("resnet18", num_classes=0)


def test_a_name_cannot_be_registered_twice() -> None:
    def resnet18(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
        return nn.Identity()

    with pytest.raises(ValueError, match="already registered"):
        models.register_model(resnet18)
    assert models.build_model("resnet18").conv1.kernel_size == (3, 3)
