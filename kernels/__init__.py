"""Triton kernels of fastted, installed as ``fastted.kernels``.

Each module holds the ``@triton.jit`` kernels of one loss and their launchers.
This package itself imports no Triton; the losses import a kernel module the
first time a Triton path is taken, so importing fastted never touches CUDA and
never compiles a kernel.
"""

import os


def interpreting() -> bool:
    """True when Triton's interpreter runs the kernels (TRITON_INTERPRET=1): on the CPU, in tests."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
