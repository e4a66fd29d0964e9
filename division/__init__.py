"""division: DIVISION (Dual Activation Precision, ICML 2023) for PyTorch.

    cfg = division.DivisionConfig(block_size=8, hfc_bits=2)
    model = division.convert_model(model, cfg)
    packed = division.compress(x, cfg); x_hat = division.decompress(packed)
"""

from .backend import cuda_extension_available, load_extension
from .codec import compress, decompress
from .config import DivisionConfig
from .format import CompressedActivation
from .tokens import TokenGrid

__all__ = [
    "CompressedActivation",
    "DivisionConfig",
    "TokenGrid",
    "compress",
    "cuda_extension_available",
    "decompress",
]
__version__ = "0.1.0"

load_extension()  # registers torch.ops.division.* when the kernels are built

from .convert import convert_model  # noqa: E402

__all__ += ["convert_model"]

from .summary import ModelSummary, revert_model, summary  # noqa: E402

__all__ += ["ModelSummary", "revert_model", "summary"]
