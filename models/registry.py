"""Named model constructors (timm's registry pattern): configs refer to models by name."""

from __future__ import annotations

from collections.abc import Callable

import torchvision
from torch import nn

ModelFn = Callable[..., nn.Module]
_REGISTRY: dict[str, ModelFn] = {}


def register_model(fn: ModelFn) -> ModelFn:
    """Register `fn(num_classes, in_channels)` under its function name.

    A second registration of the same name is an error rather than a silent overwrite, so two
    modules cannot fight over what a config's model name means.
    """
    name = fn.__name__
    if name in _REGISTRY and _REGISTRY[name] is not fn:
        raise ValueError(f"model {name!r} is already registered by {_REGISTRY[name].__module__}")
    _REGISTRY[name] = fn
    return fn


def list_models() -> list[str]:
    """The registered names (torchvision's classification models are accepted on top of these)."""
    return sorted(_REGISTRY)


def _torchvision_names() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


def build_model(name: str, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """A registered model, or any torchvision classification model by its name (weights=None).

    Registered names win over torchvision's: "resnet18" and "densenet121" are the CIFAR variants
    of the paper (3x3 stem, no max-pool), not torchvision's ImageNet ones.
    """
    if num_classes < 1 or in_channels < 1:
        raise ValueError(
            f"build_model({name!r}): num_classes and in_channels must be positive, got "
            f"num_classes={num_classes}, in_channels={in_channels}"
        )
    if name in _REGISTRY:
        return _REGISTRY[name](num_classes=num_classes, in_channels=in_channels)
    if name in _torchvision_names():
        if in_channels != 3:
            raise ValueError(
                f"model {name!r} comes from torchvision, which fixes 3 input channels; in_channels="
                f"{in_channels} works with the registered models: {', '.join(list_models())}"
            )
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    raise ValueError(
        f"unknown model {name!r}: registered models are {', '.join(list_models())}; any torchvision "
        "classification model name (e.g. resnet34, mobilenet_v2) is accepted too"
    )
