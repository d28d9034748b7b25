"""Fused multi-layer filtered MSE against eager PyTorch and torch.compile.

The eager baseline is fastted.reference.filtered_mse_reference, the spec the
tests check against: per-layer F.linear + F.mse_loss, as TED's code does.
Modes: forward (a training forward: autograd on), backward (backward alone),
full (forward + backward). The forward and full cases record their peak
memory beyond inputs and weights in extra_info["peak_extra_mib"].

Sizes: on a GPU the issue's realistic size (N = 16384 tokens, 12 layers,
d_s = 768, d_t = 1024, d_f = 1024, bf16); on a CPU a small one. Set
FASTTED_BENCH_SIZE=small or realistic to choose.

    pytest benchmarks/test_filtered_mse.py
"""
from __future__ import annotations

import os

import pytest
import torch

import fastted
from fastted.reference import filtered_mse_reference

from benchmarks._memory import cpu_peak_extra_mb, cuda_peak_extra_mb

SIZES = {
    "realistic": dict(n_tokens=16384, n_layers=12, d_s=768, d_t=1024, d_f=1024, dtype="bfloat16"),
    "small": dict(n_tokens=2048, n_layers=4, d_s=96, d_t=128, d_f=128, dtype="float32"),
}
IMPLS = ["fastted", "eager", "compile"]
MODES = ["forward", "backward", "full"]


def default_size() -> str:
    return os.environ.get("FASTTED_BENCH_SIZE", "realistic" if torch.cuda.is_available() else "small")


def make_inputs(n_tokens, n_layers, d_s, d_t, d_f, dtype, device, seed=0):
    """TED's stage-II case: trainable student filters, frozen teacher filters, a padding mask."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    dtype = getattr(torch, dtype)

    def rand(*shape, scale=1.0, grad=False):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype).requires_grad_(grad)

    mask = torch.rand(n_tokens, generator=g) < 0.9
    return dict(
        student_states=[rand(n_tokens, d_s, grad=True) for _ in range(n_layers)],
        student_weights=[rand(d_f, d_s, scale=d_s**-0.5, grad=True) for _ in range(n_layers)],
        student_biases=[rand(d_f, scale=0.1, grad=True) for _ in range(n_layers)],
        teacher_states=[rand(n_tokens, d_t) for _ in range(n_layers)],
        teacher_weights=[rand(d_f, d_t, scale=d_t**-0.5) for _ in range(n_layers)],
        teacher_biases=[rand(d_f, scale=0.1) for _ in range(n_layers)],
        mask=mask.to(device),
    )


_COMPILED = {}


def loss_fn(impl: str, device: torch.device):
    """impl -> a function of the inputs returning the scalar loss."""
    if impl == "fastted":
        path = "triton" if device.type == "cuda" else "reference"
        return lambda **kw: fastted.filtered_mse(**kw, impl=path)
    if impl == "eager":
        return lambda **kw: filtered_mse_reference(**kw)[0]
    if impl not in _COMPILED:
        _COMPILED[impl] = torch.compile(filtered_mse_reference)
    return lambda **kw: _COMPILED[impl](**kw)[0]


class Case:
    """One benchmark case: its inputs, its loss function and its steps (none of them syncs)."""

    def __init__(self, impl: str, size: str, device: torch.device):
        self.inputs = make_inputs(**SIZES[size], device=device)
        self.fn = loss_fn(impl, device)
        self.trainable = self.inputs["student_states"] + self.inputs["student_weights"] + self.inputs["student_biases"]
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


def step(impl: str, size: str, mode: str, device: str = "cpu"):
    """Builds a case and returns one forward or full step of it: the memory probe's builder."""
    case = Case(impl, size, torch.device(device))

    def run():
        loss = case.forward()  # its graph, what a forward keeps for backward, is alive until run returns
        if mode == "full":
            loss.backward()
        case.clear()  # so that every call starts from inputs and weights alone

    return run


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
def test_filtered_mse(benchmark, sync, impl, mode):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = default_size()
    case = Case(impl, size, device)
    for _ in range(2):  # warm-up: autotuning, compilation, allocator
        case.full()

    if mode == "forward":
        benchmark(lambda: (case.forward(), sync()))
    elif mode == "full":
        benchmark(lambda: (case.full(), sync()))
    else:
        def setup():
            case.prepare_backward()
            sync()

        benchmark.pedantic(lambda: (case.backward(), sync()), setup=setup, rounds=20, warmup_rounds=1)

    # A benchmark that computes garbage is no benchmark: check it against the spec.
    with torch.no_grad():
        ref = filtered_mse_reference(**case.inputs)[0]
        loss = case.forward()
    torch.testing.assert_close(loss.float(), ref.float(), rtol=2e-2, atol=1e-4)

    benchmark.extra_info.update(size=size, **SIZES[size], device=str(device))
    if mode != "backward" and not benchmark.disabled:
        if device.type == "cuda":
            benchmark.extra_info["peak_extra_mib"] = cuda_peak_extra_mb(step(impl, size, mode, "cuda"))
        else:
            benchmark.extra_info["peak_extra_mib"] = cpu_peak_extra_mb(
                "benchmarks.test_filtered_mse", "step", impl=impl, size=size, mode=mode
            )
