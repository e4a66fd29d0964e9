"""Named model constructors (timm's registry pattern): configs refer to models by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torchvision
from torch import nn

ModelFn = Callable[..., nn.Module]
_REGISTRY: dict[str, ModelFn] = {}
_IMAGE_SIZE: dict[str, int] = {}  # the input side a registered model's stem was designed for
TORCHVISION_PREFIX = "torchvision."


def register_model(fn: ModelFn | None = None, *, image_size: int | None = None) -> Any:
    """Register `fn(num_classes, in_channels)` under its function name (`@register_model` or
    `@register_model(image_size=32)`: the input side its stem was designed for, checked against
    the data by `check_image_size`).

    A second registration of the same name is an error rather than a silent overwrite, so two
    modules cannot fight over what a config's model name means.
    """
    def add(fn: ModelFn) -> ModelFn:
        name = fn.__name__
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"model {name!r} is already registered by {_REGISTRY[name].__module__}")
        _REGISTRY[name] = fn
        if image_size is not None:
            _IMAGE_SIZE[name] = image_size
        return fn

    return add if fn is None else add(fn)


def list_models() -> list[str]:
    """The registered names (torchvision's classification models are accepted on top of these)."""
    return sorted(_REGISTRY)


def _torchvision_names() -> list[str]:
    """torchvision's classifiers, of images and of videos (clips: (N, 3, T, H, W))."""
    return torchvision.models.list_models(module=torchvision.models) + torchvision.models.list_models(
        module=torchvision.models.video)


def build_model(name: str, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """A registered model, or any torchvision classification model, of images or videos, by its
    name (weights=None).

    Registered names win over torchvision's: "resnet18" and "densenet121" are the CIFAR variants
    of the paper (3x3 stem, no max-pool), not torchvision's ImageNet ones; "torchvision.resnet18"
    names torchvision's.
    """
    if num_classes < 1 or in_channels < 1:
        raise ValueError(
            f"build_model({name!r}): num_classes and in_channels must be positive, got "
            f"num_classes={num_classes}, in_channels={in_channels}"
        )
    if name in _REGISTRY:
        return _REGISTRY[name](num_classes=num_classes, in_channels=in_channels)
    tv_name = name.removeprefix(TORCHVISION_PREFIX)
    if tv_name in _torchvision_names():
        if in_channels != 3:
            raise ValueError(
                f"model {name!r} comes from torchvision, which fixes 3 input channels; in_channels="
                f"{in_channels} works with the registered models: {', '.join(list_models())}"
            )
        return torchvision.models.get_model(tv_name, weights=None, num_classes=num_classes)
    raise ValueError(
        f"unknown model {name!r}: registered models are {', '.join(list_models())}; any torchvision "
        "classification model name (e.g. resnet34, mobilenet_v2, torchvision.resnet18; r3d_18, mvit_v2_s for "
        "clips) is accepted too"
    )


def check_image_size(name: str, image_size: int, in_channels: int, num_classes: int) -> None:
    """Fail now, clearly, where training would fail or mislead later.

    A model whose stem was designed for small images (the CIFAR variants, 32x32) is refused on
    images more than twice that size, where it would run slowly on a near-full-resolution map;
    and the model is run once on meta tensors (shapes only, nothing computed), so that an input
    too small for its pooling stops here rather than deep inside the first step.
    """
    if name.removeprefix(TORCHVISION_PREFIX) in torchvision.models.list_models(module=torchvision.models.video):
        raise ValueError(
            f"model={name} classifies video clips (N, 3, frames, H, W) and the training data are images; "
            "measure its memory and speed with benchmarks/memory_speed.py --frames, or convert it in a "
            "loop of your own (division.convert_model)"
        )
    designed = _IMAGE_SIZE.get(name)
    if designed is not None and image_size > 2 * designed:
        raise ValueError(
            f"model={name} is the variant built for {designed}x{designed} images (its stem keeps "
            f"the full resolution); these images are {image_size}x{image_size}. Use "
            f"model.name={TORCHVISION_PREFIX}{name} for torchvision's ImageNet {name}"
            + (" or one of the ImageNet models (resnet50, wrn50_2, densenet161)" if name not in _torchvision_names() else "")
        )
    with torch.device("meta"):
        model = build_model(name, num_classes=num_classes, in_channels=in_channels)
        try:
            model.train()
            model(torch.empty(2, in_channels, image_size, image_size))
        except (RuntimeError, ValueError) as err:
            raise ValueError(
                f"model={name} cannot take {image_size}x{image_size} images: {err}".split("\n")[0]
                + " (use larger images: data.image_size for synthetic data)"
            ) from err
