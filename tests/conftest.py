"""Test setup: without a GPU, the Triton kernels run under Triton's interpreter.

TRITON_INTERPRET must be set before triton is first imported; fastted imports
its kernel modules lazily, so setting it here is early enough.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
