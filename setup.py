"""Builds the `division` kernels as division._C when a CUDA toolkit is present (the package metadata
and dependencies are in pyproject.toml).

    pip install <pyproject's build-system requires>; pip install --no-build-isolation -e ".[dev]"

The extension is built whenever a CUDA toolkit (bin/nvcc and include/cuda_runtime.h) is found, also
on a machine without a GPU: from CUDA_HOME, CUDA_PATH, torch's own guess, then /usr/local/cuda. An
explicitly set CUDA_HOME that holds no toolkit, or DIVISION_NO_CUDA=1, installs without it. The
architectures are TORCH_CUDA_ARCH_LIST (default "8.0;8.6;9.0": A100, RTX 30xx / A10, H100 / H200).
DIVISION_DEBUG=1 builds with -O0 -g -lineinfo; DIVISION_SANITIZE=address builds the host code (the
kernels' CPU twin) with AddressSanitizer (scripts/twin_asan.sh). Without the extension `division` uses its
pure-PyTorch reference codec (one warning when a CUDA tensor has to take it).
"""

from __future__ import annotations

import os
from glob import glob
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
DEFAULT_ARCHS = "8.0;8.6;9.0"


def is_toolkit(path: str | None) -> bool:
    return bool(path) and (Path(path) / "bin" / "nvcc").is_file() and (
        Path(path) / "include" / "cuda_runtime.h"
    ).is_file()


def find_cuda_home() -> tuple[str | None, str]:
    """(toolkit directory, "") or (None, why not), decided without needing a GPU."""
    if os.environ.get("DIVISION_NO_CUDA") == "1":
        return None, "DIVISION_NO_CUDA=1"
    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if explicit:
        return (explicit, "") if is_toolkit(explicit) else (None, f"no nvcc/headers under {explicit}")
    try:
        from torch.utils.cpp_extension import CUDA_HOME as torch_guess
    except ImportError as err:
        return None, f"torch is not importable ({err})"
    for candidate in (torch_guess, "/usr/local/cuda"):
        if is_toolkit(candidate):
            return candidate, ""
    return None, "no CUDA toolkit found (set CUDA_HOME)"


def extensions() -> tuple[list, dict]:
    cuda_home, why = find_cuda_home()
    if cuda_home is None:
        print(f"division: installing without the CUDA extension division._C: {why}")
        return [], {}
    # torch.utils.cpp_extension reads both at import and at build time
    os.environ["CUDA_HOME"] = cuda_home
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension, is_ninja_available

    debug = os.environ.get("DIVISION_DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sanitize = ["-fsanitize=address", "-fno-omit-frame-pointer"] if os.environ.get("DIVISION_SANITIZE") == "address" else []
    sources = sorted(glob("cuda_ext/*.cpp")) + sorted(glob("cuda_ext/*.cu"))
    print(
        f"division: building division._C from {len(sources)} sources with {cuda_home} for "
        f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}"
        + (" (debug)" if debug else "")
    )
    ext = CUDAExtension(
        name="division._C",
        sources=sources,
        include_dirs=[str(HERE / "cuda_ext")],
        extra_compile_args={
            # the CPU twin must round every float op on its own, like PyTorch: no FMA contraction
            # (the C++ standard is left to torch: C++17 or C++20 depending on its version)
            "cxx": opt + ["-ffp-contract=off"] + sanitize,
            # nvcc keeps --fmad=true: every float op of the format goes through a __f*_rn
            # intrinsic, which is never contracted, and no other float arithmetic is left to fuse
            "nvcc": opt + (["-lineinfo"] if debug else []),
        },
        extra_link_args=sanitize,
    )
    build = BuildExtension.with_options(use_ninja=is_ninja_available())
    return [ext], {"build_ext": build}


ext_modules, cmdclass = extensions()

setup(
    # the library and the experiment harness around it: `import division, harness, data, models`
    # works from anywhere after `pip install -e .`
    packages=find_packages(include=["division", "harness", "data", "models", "benchmarks"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
