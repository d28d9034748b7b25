"""fastted: fused layer-wise knowledge distillation for transformer language models.

Importing fastted is cheap: it never touches CUDA, never imports Triton and
never compiles a kernel; a kernel module is imported on its first use.
"""
from fastted.losses import (
    FilteredMSELoss,
    FusedLinearKDLoss,
    LogitKDLoss,
    filtered_mse,
    fused_linear_kd,
    logit_kd,
)

__version__ = "0.1.0"

__all__ = [
    "FilteredMSELoss",
    "FusedLinearKDLoss",
    "LogitKDLoss",
    "filtered_mse",
    "fused_linear_kd",
    "logit_kd",
    "__version__",
]
