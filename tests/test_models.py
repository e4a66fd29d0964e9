"""Every registered model: shapes, finite gradients, published sizes, conversion and a step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import division
import models

CIFAR = ("resnet18", "resnet164", "densenet121")
IMAGENET = ("resnet50", "densenet161", "wrn50_2")
# published parameter counts (CIFAR models with 10 classes, ImageNet models with 1000)
PARAMS = {"resnet18": 11.17e6, "resnet164": 1.70e6, "densenet121": 6.96e6,
          "resnet50": 25.557032e6, "densenet161": 28.681e6, "wrn50_2": 68.88324e6}


def test_registry_lists_the_six_models() -> None:
    assert set(CIFAR + IMAGENET) <= set(models.list_models())


@pytest.mark.parametrize("name", CIFAR + IMAGENET)
def test_parameter_count_matches_the_paper(name: str) -> None:
    model = models.build_model(name, num_classes=10 if name in CIFAR else 1000)
    count = sum(p.numel() for p in model.parameters())
    assert count == pytest.approx(PARAMS[name], rel=0.01 if name in CIFAR else 1e-6)


@pytest.mark.parametrize("in_channels", [3, 1])
@pytest.mark.parametrize("name", CIFAR + IMAGENET)
def test_forward_backward_every_parameter_gets_a_finite_gradient(name: str, in_channels: int) -> None:
    torch.manual_seed(0)
    model = models.build_model(name, num_classes=7, in_channels=in_channels)
    size = 32 if name in CIFAR else 64
    out = model(torch.randn(2, in_channels, size, size))
    assert out.shape == (2, 7)
    out.sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", CIFAR)
def test_our_definitions_use_relu_modules(name: str) -> None:
    model = models.build_model(name)
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert relus and len({id(m) for m in relus}) == len(relus)
    division.convert_model(model, division.DivisionConfig())
    kept = [r for r in division.summary(model).rows if not r.converted and r.reason != "container"]
    assert all(r.kind in ("AdaptiveAvgPool2d", "AvgPool2d", "Linear", "Sequential", "Identity") for r in kept), kept


@pytest.mark.parametrize("name", CIFAR + IMAGENET)
def test_converted_model_trains_a_step(name: str) -> None:
    torch.manual_seed(0)
    model = division.convert_model(models.build_model(name, num_classes=10), division.DivisionConfig())
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.endswith("weight") for k in changed)


def test_torchvision_names_and_unknown_names() -> None:
    assert models.build_model("mobilenet_v2", num_classes=5)(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    with pytest.raises(ValueError, match="unknown model 'resnet19'.*resnet164"):
        models.build_model("resnet19")
    with pytest.raises(ValueError, match="fixes 3 input channels"):
        models.build_model("mobilenet_v2", in_channels=1)
