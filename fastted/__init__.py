"""fastted: fused layer-wise knowledge distillation for transformer language models.

Importing fastted is cheap: it never touches CUDA, never imports Triton and
never compiles a kernel; a kernel module is imported on its first use.
"""
from fastted.contrastive import (
    ContrastiveKDLoss,
    PooledDistanceLoss,
    contrastive_kd,
    pool_states,
    pooled_distance,
)
from fastted.losses import (
    FilteredMSELoss,
    FusedLinearKDLoss,
    LogitKDLoss,
    filtered_mse,
    fused_linear_kd,
    logit_kd,
)
from fastted.memory_bank import MemoryBank

__version__ = "0.1.0"

__all__ = [
    "ContrastiveKDLoss",
    "FilteredMSELoss",
    "FusedLinearKDLoss",
    "LogitKDLoss",
    "MemoryBank",
    "PooledDistanceLoss",
    "contrastive_kd",
    "filtered_mse",
    "fused_linear_kd",
    "logit_kd",
    "pool_states",
    "pooled_distance",
    "__version__",
]
