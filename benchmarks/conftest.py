"""Benchmark setup: the report header and the device sync of timed functions."""
import pytest
import torch


def pytest_report_header(config):
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return f"fastted benchmarks on {dev}, torch {torch.__version__}"


@pytest.fixture
def sync():
    """Called inside every timed function: a GPU timing covers the kernels, not their launch."""
    if torch.cuda.is_available():
        return torch.cuda.synchronize
    return lambda: None
