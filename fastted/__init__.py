"""fastted: fused layer-wise knowledge distillation for transformer language models.

Importing fastted is cheap: it never touches CUDA, never imports Triton and
never compiles a kernel; a kernel module is imported on its first use.
"""

from fastted.filters import ClassificationHead, Filter, TaskFilters
from fastted.layerwise import LayerwiseMSELoss
from fastted.mapping import (
    LayerMap,
    RandomLayerMap,
    explicit_map,
    interval_layers,
    interval_map,
    last_k_map,
    uniform_map,
)
from fastted.memory_bank import MemoryBank
from fastted.methods import (
    DWT,
    KD,
    LWD,
    RAILKD,
    TED,
    CoDIR,
    Recipe,
    RecipeOutput,
    Schedule,
    TEDStage1,
    load_stage1,
    remap_parameters,
)
from fastted.models import ModelAdapter, check_same_vocab, task_loss
from fastted.ops.contrastive_kd import ContrastiveKDLoss, contrastive_kd
from fastted.ops.filtered_mse import FilteredMSELoss, filtered_mse
from fastted.ops.fused_linear_kd import FusedLinearKDLoss, fused_linear_kd
from fastted.ops.logit_kd import LogitKDLoss, logit_kd
from fastted.ops.packed_topk import PackedTopK, pack_topk, unpack_topk
from fastted.ops.pooled_distance import PooledDistanceLoss, pooled_distance
from fastted.ops.pooling import pool_states
from fastted.ops.sparse_logit_kd import SparseLogitKDLoss, fused_linear_sparse_kd, sparse_logit_kd

__version__ = "0.1.0"

__all__ = [
    "ClassificationHead",
    "CoDIR",
    "DWT",
    "Filter",
    "KD",
    "LWD",
    "LayerMap",
    "LayerwiseMSELoss",
    "ModelAdapter",
    "RAILKD",
    "RandomLayerMap",
    "Recipe",
    "RecipeOutput",
    "Schedule",
    "TED",
    "TEDStage1",
    "TaskFilters",
    "check_same_vocab",
    "explicit_map",
    "interval_layers",
    "interval_map",
    "last_k_map",
    "load_stage1",
    "remap_parameters",
    "task_loss",
    "uniform_map",
    "ContrastiveKDLoss",
    "FilteredMSELoss",
    "FusedLinearKDLoss",
    "LogitKDLoss",
    "MemoryBank",
    "PackedTopK",
    "PooledDistanceLoss",
    "SparseLogitKDLoss",
    "contrastive_kd",
    "filtered_mse",
    "fused_linear_kd",
    "fused_linear_sparse_kd",
    "logit_kd",
    "pack_topk",
    "pool_states",
    "pooled_distance",
    "sparse_logit_kd",
    "unpack_topk",
    "__version__",
]
