"""Triton kernels of fastted, installed as ``fastted.kernels``.

Each module holds the ``@triton.jit`` kernels of one op and their launchers,
under the op's name: ``kernels/<op>.py`` beside ``fastted/ops/<op>.py``, which
holds the op's checks, PyTorch path, autograd Function and public API
(``fused_linear_kd`` runs the row kernel of ``logit_kd.py``, ``pooled_distance``
the kernels of ``pooling.py``). This package itself imports no Triton; an op
imports its kernel module the first time a Triton path is taken, so importing
fastted never touches CUDA and never compiles a kernel.
"""

import os

import torch


def interpreting() -> bool:
    """True when Triton's interpreter runs the kernels (TRITON_INTERPRET=1): on the CPU, in tests."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def element_offsets(tensors, base, device):
    """int64 element offsets of each tensor's first element from ``base``'s: many layers, one base pointer.

    The tensors share base's dtype; the offsets reach the kernel without a host sync.
    """
    if tensors is None:
        return None
    size = base.element_size()
    host = torch.tensor([(t.data_ptr() - base.data_ptr()) // size for t in tensors], dtype=torch.int64,
                        pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)
