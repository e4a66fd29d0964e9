"""Finds the compiled CUDA kernels (`division._C`) and decides which backend a tensor goes to.

Follows torchao/bitsandbytes: the extension is loaded inside try/except and the pure-PyTorch
reference is the fallback, announced once, when a CUDA tensor has to take it.
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from types import ModuleType

import torch

from .config import DivisionConfig


@lru_cache(maxsize=1)
def load_extension() -> tuple[ModuleType | None, str]:
    """(module, "") when the CUDA extension imports, else (None, the reason)."""
    try:
        from . import _C  # type: ignore[attr-defined]
    except ImportError as err:
        return None, str(err)
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


def select_backend(x: torch.Tensor, cfg: DivisionConfig) -> str:
    """"cuda" or "torch" for this tensor; backend="cuda" without kernels is an error."""
    if cfg.backend == "torch":
        return "torch"
    module, reason = load_extension()
    if cfg.backend == "cuda":
        if module is None:
            raise RuntimeError(
                "DivisionConfig(backend='cuda') but the CUDA extension division._C is not built "
                f"({reason}). Reinstall with a CUDA toolkit present (CUDA_HOME set) or use "
                "backend='auto'."
            )
        if not x.is_cuda:
            raise ValueError(
                f"DivisionConfig(backend='cuda') got a tensor on {x.device}; the CUDA kernels "
                "need CUDA tensors (use backend='auto' to fall back to the reference)."
            )
        return "cuda"
    if x.is_cuda:
        if module is not None:
            return "cuda"
        _warn_fallback(reason)
    return "torch"
