"""RAIL-KD's pooled distance (fastted.pooled_distance) against eager PyTorch and torch.compile.

One step is RAIL-KD's layer-wise loss: pool each of the L mapped layers of
both models over their valid tokens, project each to P with its own linear
map, L2-normalize, and sum over the layer pairs the mean squared distance of
student and teacher vectors. The student's states and every projection are
trainable (the teacher's states are constants). The impls:

- fastted: fastted.pooled_distance (the pooling of each model in one Triton
  launch on a GPU; the small (B, P) tail through autograd);
- eager: fastted.reference.pooled_distance_reference, the spec the tests
  check against;
- compile: torch.compile of the eager step.

Sizes: on a GPU B = 256, L = 6 pairs of width 768, T = 128, P = 128, bf16;
on a CPU a small one. Set FASTTED_BENCH_SIZE to choose.

    pytest benchmarks/test_pooled_distance.py
"""

from __future__ import annotations

import pytest
import torch

import fastted
from benchmarks.cases import MODES, Case, Draws, default_size, impl_fn, one_step, run_suite_case
from fastted.reference import pooled_distance_reference

SIZES = {
    "realistic": dict(batch=256, n_layers=6, width=768, seq=128, proj=128, dtype="bfloat16"),
    "small": dict(batch=64, n_layers=4, width=128, seq=64, proj=64, dtype="float32"),
}
IMPLS = ["fastted", "eager", "compile"]


def make_inputs(batch, n_layers, width, seq, proj, dtype, device, seed=0):
    """Both models' states, a right-padded attention mask and one projection per layer and model."""
    draws = Draws(seed, device, dtype)
    mask = draws.padding_mask(batch, seq)
    states = {
        side: [draws.normal(batch, seq, width, grad=side == "student") for _ in range(n_layers)]
        for side in ("student", "teacher")
    }
    heads = {
        f"{side}_{part}": [draws.normal(*shape, scale=scale, grad=True) for _ in range(n_layers)]
        for side in ("student", "teacher")
        for part, shape, scale in (("weights", (proj, width), width**-0.5), ("biases", (proj,), 0.1))
    }
    return dict(student_states=states["student"], teacher_states=states["teacher"], mask=mask, **heads)


def make_case(impl: str, size: str, device: torch.device) -> Case:
    inputs = make_inputs(**SIZES[size], device=device)
    trainable = [
        x for key, value in inputs.items() if key != "teacher_states" and isinstance(value, list) for x in value
    ]
    return Case(inputs, impl_fn(impl, device, fastted.pooled_distance, pooled_distance_reference), trainable)


def step(impl: str, size: str, mode: str, device: str = "cpu"):
    """Builds a case and returns one forward or full step of it: the memory probe's builder."""
    return one_step(make_case(impl, size, torch.device(device)), mode)


def _check(case: Case) -> None:
    with torch.no_grad():
        ref = pooled_distance_reference(
            **{k: [x.double() for x in v] if isinstance(v, list) else v for k, v in case.inputs.items()}
        )
        got = case.forward()
    torch.testing.assert_close(got.double(), ref, rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
def test_pooled_distance(benchmark, sync, impl, mode):
    run_suite_case(benchmark, sync, __name__, impl, mode, default_size(), _check)
