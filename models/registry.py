"""Named model constructors (timm's registry pattern): configs refer to models by name."""

from __future__ import annotations

from collections.abc import Callable

import torchvision
from torch import nn

ModelFn = Callable[..., nn.Module]
_REGISTRY: dict[str, ModelFn] = {}


def register_model(fn: ModelFn) -> ModelFn:
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def _torchvision_names() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


def build_model(name: str, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """A registered model, or any torchvision classification model by its name (weights=None)."""
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
