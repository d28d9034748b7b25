"""fastted: fused layer-wise knowledge distillation for transformer language models.

Importing fastted is cheap: it never touches CUDA, never imports Triton and
never compiles a kernel; a kernel module is imported on its first use.
"""
from fastted.losses import FilteredMSELoss, filtered_mse

__version__ = "0.1.0"

__all__ = ["FilteredMSELoss", "filtered_mse", "__version__"]
