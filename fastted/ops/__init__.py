"""The fused ops of fastted, one file per op, Liger-style.

Each file ``fastted/ops/<op>.py`` holds that op's input checks, its PyTorch
path, its autograd Function, its functional API and its ``nn.Module``; the
op's Triton kernels and launchers are ``fastted.kernels.<op>`` (source folder
``kernels/``), its spec ``fastted.reference.<op>_reference``, its tests
``tests/ops/test_<op>.py`` and its benchmark ``benchmarks/test_<op>.py``.

=================  ===========================================  ====================================
op                 functional / module                           kernel
=================  ===========================================  ====================================
filtered_mse       filtered_mse / FilteredMSELoss                kernels/filtered_mse.py
logit_kd           logit_kd / LogitKDLoss                        kernels/logit_kd.py
fused_linear_kd    fused_linear_kd / FusedLinearKDLoss           kernels/logit_kd.py (the row kernel)
sparse_logit_kd    sparse_logit_kd / SparseLogitKDLoss,          kernels/sparse_logit_kd.py
                   fused_linear_sparse_kd (the cached teacher)
pooling            pool_states                                   kernels/pooling.py
contrastive_kd     contrastive_kd / ContrastiveKDLoss            kernels/contrastive_kd.py
pooled_distance    pooled_distance / PooledDistanceLoss          kernels/pooling.py (then autograd)
=================  ===========================================  ====================================

Shared by all of them: :mod:`fastted.ops.checks` (input checks) and
:mod:`fastted.ops.dispatch` (the choice of path, alignment, autocast, the
saved-gradient pattern); by the logit losses, :mod:`fastted.ops.rows` (their
checks, the CPU paths' workspace, the block loop over an LM head). Each op
file ends with its ``KERNEL_OP``: its compile-tier and GPU-check cases and its
floors, which :mod:`fastted.ops.registry` collects for the compile tier and
the GPU check. The package re-exports nothing, so that
``fastted.ops.<op>`` is always the module (the public functions and modules
are ``fastted.<name>``). Importing it imports no Triton.
"""
