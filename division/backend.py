"""Finds the compiled kernels (`division._C`) and decides which implementation a tensor goes to.

Follows torchao/bitsandbytes: the extension is loaded inside try/except and the pure-PyTorch
reference is the fallback, announced once, when a CUDA tensor has to take it. Loading it registers
the torch.library ops torch.ops.division.* (with their fake implementations, ops.py). A build of
another bit format than format.py's is refused, not silently mixed.
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from types import ModuleType

import torch

from .config import DivisionConfig
from .format import FORMAT_VERSION


@lru_cache(maxsize=1)
def load_extension() -> tuple[ModuleType | None, str]:
    """(module, "") when the extension imports and speaks this bit format, else (None, the reason)."""
    try:
        from . import _C  # type: ignore[attr-defined]
    except ImportError as err:
        return None, str(err)
    built = getattr(_C, "FORMAT_VERSION", None)
    if built != FORMAT_VERSION:
        return None, (
            f"it was built for bit format {built}, this division needs {FORMAT_VERSION}: rebuild "
            "it (pip install --no-build-isolation -e .)"
        )
    from .ops import register_fakes

    register_fakes()
    return _C, ""


def cuda_extension_available() -> bool:
    return load_extension()[0] is not None


@lru_cache(maxsize=1)
def _warn_fallback(reason: str) -> None:
    warnings.warn(
        "division: the compiled CUDA extension division._C is not available "
        f"({reason}); CUDA tensors use the pure-PyTorch reference codec, which is correct but "
        "several times slower. Build it with `CUDA_HOME=/usr/local/cuda pip install "
        "--no-build-isolation -e .` (see README), or set backend='torch' to silence this.",
        RuntimeWarning,
        stacklevel=3,
    )


def kernels_allowed(cfg: DivisionConfig) -> bool:
    """Whether layers built with `cfg` may run the compiled ops (decided once, at conversion)."""
    if cfg.backend == "torch":
        return False
    module, reason = load_extension()
    if cfg.backend == "cuda" and module is None:
        raise RuntimeError(
            "DivisionConfig(backend='cuda') but the CUDA extension division._C is not built "
            f"({reason}). Reinstall with a CUDA toolkit present (CUDA_HOME set) or use "
            "backend='auto'."
        )
    return module is not None


def check_tensor(x: torch.Tensor, cfg: DivisionConfig, kernels: bool) -> None:
    """The error of a non-CUDA tensor under backend="cuda", the warning of a CUDA tensor without the
    kernels; with `kernels` decided beforehand, it loads nothing (so torch.compile traces it)."""
    if cfg.backend == "cuda" and not x.is_cuda:
        raise ValueError(
            f"DivisionConfig(backend='cuda') got a tensor on {x.device}; the CUDA kernels "
            "need CUDA tensors (use backend='auto' to fall back to the reference)."
        )
    if not kernels and x.is_cuda and cfg.backend == "auto":
        _warn_fallback(load_extension()[1])


def select_backend(x: torch.Tensor, cfg: DivisionConfig) -> str:
    """"kernels" (the compiled ops: CUDA kernels, or their CPU twin) or "torch" (the reference)."""
    kernels = kernels_allowed(cfg)
    check_tensor(x, cfg, kernels)
    return "kernels" if kernels else "torch"
