"""Test setup: without a GPU, the Triton kernels run under Triton's interpreter.

TRITON_INTERPRET must be set before triton is first imported; fastted imports
its kernel modules lazily, so setting it here is early enough.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def cpu_users_path(monkeypatch):
    """The fused losses on a CPU user's PyTorch path for one test: TRITON_INTERPRET=1 (above) would run every
    kernel of a whole pipeline in Triton's interpreter, over 90 % of an end-to-end test's time. The command's
    tests (tests/train/test_cli.py, test_smollm2.py) take it; the kernels against float64 and whole recipes on
    them stay with tests/ops and tests/methods."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
