"""Benchmark setup: the report header, the device sync of timed functions, a cold compilation cache."""
import os
import shutil
import tempfile

import pytest
import torch

# torch.compile keeps what it compiled on disk, across processes: the first call a benchmark records
# (extra_info["first_call_s"]) would then hide the compilation that a user's first run pays. A fresh cache
# for the session (shared by the memory probes' processes) makes that first call cold.
_COLD_CACHE = None
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _COLD_CACHE = os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastted-bench-inductor-")


def pytest_sessionfinish(session, exitstatus):
    if _COLD_CACHE is not None:
        shutil.rmtree(_COLD_CACHE, ignore_errors=True)


def pytest_report_header(config):
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return f"fastted benchmarks on {dev}, torch {torch.__version__}"


@pytest.fixture
def sync():
    """Called inside every timed function: a GPU timing covers the kernels, not their launch."""
    if torch.cuda.is_available():
        return torch.cuda.synchronize
    return lambda: None
