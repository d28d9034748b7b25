"""Fused logit KD against eager PyTorch (log_softmax + kl_div) and torch.compile.

The eager baseline is fastted.reference.logit_kd_reference, the spec the
tests check against. Modes: forward (with autograd on), backward, full; the
forward and full cases record their peak memory beyond the inputs.

Sizes: on a GPU N = 8192 rows and V = 32000 and 128256, bf16; on a CPU a
small one. FASTTED_BENCH_SIZE=<name> picks one size of SIZES.

    pytest benchmarks/test_logit_kd.py
"""

from __future__ import annotations

import pytest
import torch

import fastted
from benchmarks.cases import MODES, Case, default_sizes, one_step, run_suite_case
from fastted.reference import logit_kd_reference

SIZES = {
    "v32k": dict(n_rows=8192, vocab=32000, dtype="bfloat16", on="gpu"),
    "v128k": dict(n_rows=8192, vocab=128256, dtype="bfloat16", on="gpu"),
    "small": dict(n_rows=512, vocab=32000, dtype="float32", on="cpu"),
}
IMPLS = ["fastted", "eager", "compile"]
OPTIONS = dict(temperature=2.0)  # TED's and DistilBERT's KD: forward KL at T = 2


def make_inputs(n_rows, vocab, dtype, device, seed=0, **_):
    g = torch.Generator(device="cpu").manual_seed(seed)
    dtype = getattr(torch, dtype)
    return dict(
        student_logits=(torch.randn(n_rows, vocab, generator=g) * 3).to(device, dtype).requires_grad_(),
        teacher_logits=(torch.randn(n_rows, vocab, generator=g) * 3).to(device, dtype),
        mask=(torch.rand(n_rows, generator=g) < 0.9).to(device),
    )


_COMPILED = {}


def loss_fn(impl: str, device: torch.device):
    if impl == "fastted":
        path = "triton" if device.type == "cuda" else "reference"
        return lambda **kw: fastted.logit_kd(**kw, **OPTIONS, impl=path)
    if impl == "eager":
        return lambda **kw: logit_kd_reference(**kw, **OPTIONS)
    if "compile" not in _COMPILED:
        _COMPILED["compile"] = torch.compile(logit_kd_reference)
    return lambda **kw: _COMPILED["compile"](**kw, **OPTIONS)


def make_case(impl: str, size: str, device: torch.device) -> Case:
    inputs = make_inputs(**SIZES[size], device=device)
    return Case(inputs, loss_fn(impl, device), [inputs["student_logits"]])


def step(impl: str, size: str, mode: str, device: str = "cpu"):
    """The memory probe's builder: one forward or full step of a fresh case."""
    return one_step(make_case(impl, size, torch.device(device)), mode)


def _check(case: Case) -> None:
    with torch.no_grad():
        ref = logit_kd_reference(**case.inputs, **OPTIONS)
        loss = case.forward()
    torch.testing.assert_close(loss.float(), ref.float(), rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("size", default_sizes(SIZES))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
def test_logit_kd(benchmark, sync, impl, mode, size):
    run_suite_case(benchmark, sync, __name__, impl, mode, size, _check, **OPTIONS)
