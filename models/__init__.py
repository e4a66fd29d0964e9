"""Model definitions: CIFAR ResNet-18/164 and DenseNet-121, torchvision's ImageNet models, ViTs, by name."""

from . import cifar_densenet, cifar_resnet, imagenet, vit  # noqa: F401  (registers the models)
from .registry import build_model, check_image_size, list_models, register_model

__all__ = ["build_model", "check_image_size", "list_models", "register_model"]
