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

import pytest
import torch

import fastted
from benchmarks.cases import MODES, Case, Draws, default_size, one_step, run_suite_case
from fastted.reference import filtered_mse_reference

SIZES = {
    "realistic": dict(n_tokens=16384, n_layers=12, d_s=768, d_t=1024, d_f=1024, dtype="bfloat16"),
    "small": dict(n_tokens=2048, n_layers=4, d_s=96, d_t=128, d_f=128, dtype="float32"),
}
IMPLS = ["fastted", "eager", "compile"]


def make_inputs(n_tokens, n_layers, d_s, d_t, d_f, dtype, device, seed=0):
    """TED's stage-II case: trainable student filters, frozen teacher filters, a padding mask."""
    draws = Draws(seed, device, dtype)
    rand = draws.normal
    mask = torch.rand(n_tokens, generator=draws.g) < 0.9
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


def make_case(impl: str, size: str, device: torch.device) -> Case:
    inputs = make_inputs(**SIZES[size], device=device)
    trainable = inputs["student_states"] + inputs["student_weights"] + inputs["student_biases"]
    return Case(inputs, loss_fn(impl, device), trainable)


def step(impl: str, size: str, mode: str, device: str = "cpu"):
    """Builds a case and returns one forward or full step of it: the memory probe's builder."""
    return one_step(make_case(impl, size, torch.device(device)), mode)


def _check(case: Case) -> None:
    with torch.no_grad():
        ref = filtered_mse_reference(**case.inputs)[0]
        loss = case.forward()
    torch.testing.assert_close(loss.float(), ref.float(), rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
def test_filtered_mse(benchmark, sync, impl, mode):
    run_suite_case(benchmark, sync, __name__, impl, mode, default_size(), _check)
