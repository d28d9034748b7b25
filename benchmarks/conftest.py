"""Benchmark setup: the report header, the device sync of timed functions, a cold compilation cache."""

import ctypes
import os
import shutil
import tempfile

import pytest
import torch


# torch.compile keeps what it compiled on disk, across processes: the first call a benchmark records
# (extra_info["first_call_s"]) would then hide the compilation that a user's first run pays. A fresh cache
# for the session (shared by the memory probes' processes) makes that first call cold.
def _pin_malloc() -> None:
    """Pin glibc's mmap and trim thresholds in the timing process (Linux): by default they move with the
    process's history (freeing a large block raises them), so whether a step's fresh gradient buffers are
    new pages, faulted in on every step, would depend on which benchmark ran before it, and fastted's
    impl runs first in every suite. Pinned, every impl reuses freed memory alike. The memory probes run in
    their own processes (benchmarks/memory.py) and are not affected."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks below 32 MiB come from the heap
        libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD: the heap keeps up to 256 MiB of freed memory
    except (OSError, AttributeError):  # not glibc: nothing to pin
        pass


_pin_malloc()
_COLD_CACHE = None
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _COLD_CACHE = os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastted-bench-inductor-")


def pytest_sessionfinish(session, exitstatus):
    if _COLD_CACHE is not None:
        shutil.rmtree(_COLD_CACHE, ignore_errors=True)


def pytest_report_header(config):
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return f"fastted benchmarks on {dev}, torch {torch.__version__}"


@pytest.fixture(autouse=True)
def devices_own_path(monkeypatch):
    """Every case runs the path a user times: Triton on a GPU, the PyTorch path on a CPU. Collected with tests/
    (the README's test command), tests/conftest.py has set TRITON_INTERPRET=1, which would run the recipes'
    kernels in Triton's interpreter: minutes of CI for a number nobody times. gpu_check's smoke test sets the
    interpreter for its own process."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture
def sync():
    """Called inside every timed function: a GPU timing covers the kernels, not their launch."""
    if torch.cuda.is_available():
        return torch.cuda.synchronize
    return lambda: None
