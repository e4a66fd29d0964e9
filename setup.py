"""Installs the `division` package and, when a CUDA toolkit is present, its kernels as division._C.

The extension is built whenever nvcc is found (CUDA_HOME, or /usr/local/cuda), also on a machine
without a GPU, for TORCH_CUDA_ARCH_LIST (default "8.0;8.6;9.0": A100, RTX 30xx/A10, H100/H200).
Without a toolkit the install still succeeds and division uses its pure-PyTorch reference codec.
DIVISION_DEBUG=1 builds with -O0 -g -lineinfo. Build: `pip install --no-build-isolation -e .`
"""

from __future__ import annotations

import os
import re
from glob import glob
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
DEFAULT_ARCHS = "8.0;8.6;9.0"


def version() -> str:
    text = (HERE / "division" / "__init__.py").read_text()
    return re.search(r'__version__ = "([^"]+)"', text).group(1)


def find_cuda_home() -> str | None:
    """A toolkit directory holding bin/nvcc, decided without needing a GPU."""
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and (Path(candidate) / "bin" / "nvcc").exists():
            return candidate
    return None


def extensions() -> tuple[list, dict]:
    cuda_home = find_cuda_home()
    if cuda_home is None or os.environ.get("DIVISION_NO_CUDA") == "1":
        print("division: no CUDA toolkit found (set CUDA_HOME); installing without division._C")
        return [], {}
    os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    debug = os.environ.get("DIVISION_DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sources = sorted(glob("cuda_ext/*.cpp")) + sorted(glob("cuda_ext/*.cu"))
    print(f"division: building division._C with {cuda_home} for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    ext = CUDAExtension(
        name="division._C",
        sources=sources,
        include_dirs=[str(HERE / "cuda_ext")],
        define_macros=[("WITH_CUDA", None)],
        extra_compile_args={
            # no FMA contraction on the host: the CPU twin must round every op like PyTorch does
            "cxx": opt + ["-std=c++20", "-ffp-contract=off"],
            # the kernels use __f*_rn intrinsics where rounding matters, so fmad stays on elsewhere
            "nvcc": opt + ["-std=c++20"] + (["-lineinfo"] if debug else []),
        },
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extensions()

setup(
    name="division",
    version=version(),
    description="DIVISION (Dual Activation Precision, ICML 2023): memory-efficient training for PyTorch",
    packages=find_packages(include=["division", "division.*"]),
    python_requires=">=3.10",
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
