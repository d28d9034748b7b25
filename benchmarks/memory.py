"""Peak memory of one call: CUDA allocator statistics on a GPU, peak RSS of a
fresh process on the CPU (PyTorch keeps no allocator statistics there)."""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os

import torch


def cuda_peak_extra_mb(fn) -> float:
    """Peak memory allocated while fn() runs, beyond what was allocated before it (MiB)."""
    fn()  # a warm-up call: autotuning, compilation and lazy buffers are not the call's memory
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _child(module: str, builder: str, kwargs: dict, queue) -> None:
    run = getattr(importlib.import_module(module), builder)(**kwargs)  # builds the inputs, returns the call
    run()  # a warm-up call: lazy initialisations are not the step's memory
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets the peak RSS (VmHWM) to the current RSS
    before = _status_kib("VmRSS")
    run()
    queue.put((_status_kib("VmHWM") - before) / 1024)


def cpu_peak_extra_mb(module: str, builder: str, **kwargs) -> float:
    """Growth of the peak RSS (MiB) of a fresh process over one call.

    ``module.builder(**kwargs)`` builds the inputs and returns a function that
    runs the call. After a warm-up call the child resets its peak RSS (Linux:
    /proc/self/clear_refs), so the result is the memory the call needs beyond
    its inputs and weights. glibc's mmap threshold is pinned, so that freed
    large buffers go back to the system instead of hiding the next call's.
    """
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))  # read by the child's glibc at start
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(module, builder, kwargs, queue))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"memory measurement of {module}.{builder}({kwargs}) failed: exit code {proc.exitcode}")
    return queue.get()
