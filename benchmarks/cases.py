"""What every benchmark of a fused loss shares: a case (inputs, loss, trainable
inputs) and one way to time it and to measure its peak memory."""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable

import torch

from benchmarks.memory import cpu_peak_extra_mb, cuda_peak_extra_mb

MODES = ["forward", "backward", "full"]


class Draws:
    """The seeded random inputs of a case, on its device and in its dtype (never zeros): one CPU generator, so
    the same seed gives the same inputs on every device."""

    def __init__(self, seed: int, device, dtype: str):
        self.g = torch.Generator(device="cpu").manual_seed(seed)
        self.device, self.dtype = device, getattr(torch, dtype)

    def normal(self, *shape, scale: float = 1.0, grad: bool = False) -> torch.Tensor:
        """N(0, scale^2) in the case's dtype; a leaf that requires grad when ``grad``."""
        x = torch.randn(*shape, generator=self.g) * scale
        return x.to(self.device, self.dtype).requires_grad_(grad)

    def padding_mask(self, batch: int, seq: int) -> torch.Tensor:
        """A right-padded (B, T) attention mask, each example between T / 2 and T tokens long."""
        lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=self.g)
        return (torch.arange(seq)[None, :] < lengths[:, None]).to(self.device)


def default_size() -> str:
    """FASTTED_BENCH_SIZE, else the issue's realistic size on a GPU and a small one on a CPU."""
    return os.environ.get("FASTTED_BENCH_SIZE", "realistic" if torch.cuda.is_available() else "small")


def default_sizes(sizes: dict) -> list[str]:
    """FASTTED_BENCH_SIZE, else every size whose entry says it is for this kind of device ("gpu" or "cpu")."""
    if "FASTTED_BENCH_SIZE" in os.environ:
        return [os.environ["FASTTED_BENCH_SIZE"]]
    kind = "gpu" if torch.cuda.is_available() else "cpu"
    return [name for name, size in sizes.items() if size["on"] == kind]


class Case:
    """One benchmark case: its inputs, its loss function and its steps (none of them syncs)."""

    def __init__(self, inputs: dict, fn: Callable[..., torch.Tensor], trainable: list):
        self.inputs = inputs
        self.fn = fn
        self.trainable = [x for x in trainable if x is not None]
        self.loss = None

    def clear(self):
        for x in self.trainable:
            x.grad = None

    def forward(self):
        return self.fn(**self.inputs)

    def full(self):
        self.clear()
        self.fn(**self.inputs).backward()

    def prepare_backward(self):
        self.clear()
        self.loss = self.forward()

    def backward(self):
        self.loss.backward()


def one_step(case: Case, mode: str):
    """A forward or full step of case, as the memory probes call it."""

    def run():
        loss = case.forward()  # its graph, what a forward keeps for backward, is alive until run returns
        if mode == "full":
            loss.backward()
        case.clear()  # so that every call starts from inputs and weights alone

    return run


_COMPILED: dict = {}


def impl_fn(impl: str, device: torch.device, fused: Callable, eager: Callable) -> Callable:
    """The step of one impl: ``fused`` (fastted) on the device's path (Triton on a GPU, the PyTorch path on a
    CPU), the ``eager`` spec, or torch.compile of that same function (compiled once)."""
    if impl == "fastted":
        return functools.partial(fused, impl="triton" if device.type == "cuda" else "reference")
    if impl == "eager":
        return eager
    if eager not in _COMPILED:
        _COMPILED[eager] = torch.compile(eager)
    return _COMPILED[eager]


def run_suite_case(
    benchmark, sync, module_name: str, impl: str, mode: str, size: str, check: Callable[[Case], None], **extra
) -> None:
    """:func:`run_benchmark` of a suite whose module has ``SIZES`` and ``make_case(impl, size, device)``."""
    module = sys.modules[module_name]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run_benchmark(
        benchmark,
        sync,
        module.make_case(impl, size, device),
        mode,
        check,
        module=module_name,
        params=dict(impl=impl, size=size),
        extra=dict(size=size, **module.SIZES[size], **extra),
    )


def run_benchmark(
    benchmark, sync, case: Case, mode: str, check: Callable[[Case], None], *, module: str, params: dict, extra: dict
) -> None:
    """Times one mode of case with pytest-benchmark, checks its result, records its peak memory.

    module.step(**params, mode=..., device=...) must rebuild the case: on a CPU
    the peak memory is measured in a fresh process (benchmarks/memory.py).
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for i in range(2):  # warm-up: autotuning, compilation, allocator; the first call's time is recorded
        start = time.perf_counter()
        case.full()
        sync()
        if i == 0:
            benchmark.extra_info["first_call_s"] = time.perf_counter() - start
    if mode == "forward":
        benchmark(lambda: (case.forward(), sync()))
    elif mode == "full":
        benchmark(lambda: (case.full(), sync()))
    else:

        def setup():
            case.prepare_backward()
            sync()

        benchmark.pedantic(lambda: (case.backward(), sync()), setup=setup, rounds=20, warmup_rounds=1)
    check(case)  # a benchmark that computes garbage is no benchmark

    benchmark.extra_info.update(**extra, device=str(device))
    if mode != "backward" and not benchmark.disabled:
        step = __import__(module, fromlist=["step"]).step
        if device.type == "cuda":
            benchmark.extra_info["peak_extra_mib"] = cuda_peak_extra_mb(step(**params, mode=mode, device="cuda"))
        else:
            benchmark.extra_info["peak_extra_mib"] = cpu_peak_extra_mb(module, "step", **params, mode=mode)
