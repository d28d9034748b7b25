"""Pooling the mapped layers' hidden states (fastted.pool_states) against eager PyTorch and torch.compile.

One step pools the L mapped layers of one model over the attention mask's
tokens into one (B, L * d) tensor and reduces it against a fixed random
(B, L * d) tensor, so that the step ends in a scalar and its backward writes
the (B, T, d) gradient of every layer (what CoDIR's and RAIL-KD's student
side needs). The impls differ only in the pooling:

- fastted: fastted.pool_states (all layers in one Triton launch on a GPU, a
  batched matmul per layer on a CPU);
- eager: fastted.reference.pool_states_reference, the spec the tests check
  against (a masked sum and a division per layer);
- compile: torch.compile of the eager step.

Sizes: on a GPU CoDIR's (B = 256, L = 12, d = 768, T = 128, bf16); on a
CPU a small one. Set FASTTED_BENCH_SIZE to choose.

    pytest benchmarks/test_pooling.py
"""

from __future__ import annotations

import pytest
import torch

import fastted
from benchmarks.cases import MODES, Case, Draws, default_size, impl_fn, one_step, run_suite_case
from fastted.reference import pool_states_reference

SIZES = {
    "realistic": dict(batch=256, n_layers=12, width=768, seq=128, dtype="bfloat16"),
    "small": dict(batch=64, n_layers=4, width=128, seq=64, dtype="float32"),
}
IMPLS = ["fastted", "eager", "compile"]


def make_inputs(batch, n_layers, width, seq, dtype, device, seed=0):
    """One model's trainable states, a right-padded attention mask and the fixed tensor the pooled one meets."""
    draws = Draws(seed, device, dtype)
    mask = draws.padding_mask(batch, seq)
    states = [draws.normal(batch, seq, width, grad=True) for _ in range(n_layers)]
    return dict(states=states, mask=mask, against=draws.normal(batch, n_layers * width))


def _fused(states, mask, against, impl):
    return (fastted.pool_states(states, mask, impl=impl) * against).float().sum()


def _eager(states, mask, against):
    return (pool_states_reference(states, mask) * against).float().sum()


def make_case(impl: str, size: str, device: torch.device) -> Case:
    inputs = make_inputs(**SIZES[size], device=device)
    return Case(inputs, impl_fn(impl, device, _fused, _eager), inputs["states"])


def step(impl: str, size: str, mode: str, device: str = "cpu"):
    """Builds a case and returns one forward or full step of it: the memory probe's builder."""
    return one_step(make_case(impl, size, torch.device(device)), mode)


def _check(case: Case) -> None:
    with torch.no_grad():
        ref = _eager(**{k: ([x.double() for x in v] if k == "states" else v) for k, v in case.inputs.items()})
        got = case.forward()
    torch.testing.assert_close(got.double(), ref.double(), rtol=2e-2, atol=1e-2)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
def test_pooling(benchmark, sync, impl, mode):
    run_suite_case(benchmark, sync, __name__, impl, mode, default_size(), _check)
