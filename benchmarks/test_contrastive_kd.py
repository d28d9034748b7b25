"""CoDIR's contrastive distillation from hidden states against eager PyTorch and torch.compile.

One step is CoDIR's loss (codir_loss below, one function for every impl):
pool the L mapped layers of both models over their valid tokens, project
each model's (B, L * d) vector to P, and score the student's against the
teacher's (the positive) and a memory bank of K negatives (InfoNCE at
tau = 0.07). The student's states and projection are trainable; the teacher's
side runs under no_grad. The impls differ only in the pooling and the loss:

- fastted: fastted.pool_states + fastted.contrastive_kd (Triton on a GPU,
  the chunked PyTorch path on a CPU), which never builds the B x K scores;
- eager: fastted.reference.pool_states_reference +
  contrastive_kd_reference, the spec the tests check against (normalize,
  the (B, 1 + K) logits, cross-entropy), as research code writes it;
- compile: torch.compile of the eager step.

Sizes: on a GPU B = 256, L = 12, d = 768, T = 128, bf16, with P in {128,
768} and K in {4096, 65536}; on a CPU a small one. FASTTED_BENCH_SIZE=
cpu-k65536 runs the CPU size with a 65536-entry bank.

Two levels: "states" times that whole step; "vectors" the loss alone on
(B, P) vectors, its own workspace, since at the hidden-state level the
(B, T, d) state gradients every impl must return dominate the peak.
test_cpu_peak_memory_is_a_quarter_of_eager checks the workspace bound.

    pytest benchmarks/test_contrastive_kd.py
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import fastted
from benchmarks.cases import MODES, Case, Draws, default_sizes, one_step, run_benchmark
from benchmarks.memory import cpu_peak_extra_mb
from fastted.reference import contrastive_kd_reference, pool_states_reference

_GPU = dict(batch=256, n_layers=12, width=768, seq=128, dtype="bfloat16", on="gpu")
SIZES = {
    "p128-k4096": dict(**_GPU, proj=128, bank=4096),
    "p128-k65536": dict(**_GPU, proj=128, bank=65536),
    "p768-k4096": dict(**_GPU, proj=768, bank=4096),
    "p768-k65536": dict(**_GPU, proj=768, bank=65536),
    "small": dict(batch=64, n_layers=4, width=128, seq=64, proj=128, bank=4096, dtype="float32", on="cpu"),
    "cpu-k65536": dict(batch=256, n_layers=4, width=128, seq=64, proj=128, bank=65536, dtype="float32", on="none"),
}
IMPLS = ["fastted", "eager", "compile"]
# "states": the step from hidden states (pooling's traffic and the states' gradients included);
# "vectors": the loss alone on (B, P) vectors, its own workspace (where the B x K scores would live).
LEVELS = ["states", "vectors"]
OPTIONS = dict(temperature=0.07)  # CoDIR's temperature


def codir_loss(
    student_states,
    teacher_states,
    mask,
    student_weight,
    student_bias,
    teacher_weight,
    teacher_bias,
    negatives,
    *,
    pool,
    contrast,
    temperature,
):
    """CoDIR's loss from hidden states: pool, project, InfoNCE against the teacher and the bank."""
    student_vecs = F.linear(pool(student_states, mask), student_weight, student_bias)
    with torch.no_grad():
        teacher_vecs = F.linear(pool(teacher_states, mask), teacher_weight, teacher_bias)
    return contrast(student_vecs, teacher_vecs, negatives, temperature=temperature)


def make_inputs(batch, n_layers, width, seq, proj, bank, dtype, device, seed=0, **_):
    """Both models' states, a right-padded attention mask, both projections and a memory bank."""
    draws = Draws(seed, device, dtype)
    rand = draws.normal
    mask = draws.padding_mask(batch, seq)
    return dict(
        student_states=[rand(batch, seq, width, grad=True) for _ in range(n_layers)],
        teacher_states=[rand(batch, seq, width) for _ in range(n_layers)],
        mask=mask,
        student_weight=rand(proj, n_layers * width, scale=(n_layers * width) ** -0.5, grad=True),
        student_bias=rand(proj, scale=0.1, grad=True),
        teacher_weight=rand(proj, n_layers * width, scale=(n_layers * width) ** -0.5),
        teacher_bias=rand(proj, scale=0.1),
        negatives=rand(bank, proj),
    )


_COMPILED = {}


def loss_fn(impl: str, device: torch.device):
    if impl == "fastted":
        path = "triton" if device.type == "cuda" else "reference"
        pool = functools.partial(fastted.pool_states, impl=path)
        contrast = functools.partial(fastted.contrastive_kd, impl=path)
        return lambda **kw: codir_loss(**kw, pool=pool, contrast=contrast, **OPTIONS)
    eager = dict(pool=pool_states_reference, contrast=contrastive_kd_reference)
    if impl == "eager":
        return lambda **kw: codir_loss(**kw, **eager, **OPTIONS)
    if "compile" not in _COMPILED:
        _COMPILED["compile"] = torch.compile(codir_loss)
    return lambda **kw: _COMPILED["compile"](**kw, **eager, **OPTIONS)


def make_vector_inputs(batch, proj, bank, dtype, device, seed=0, **_):
    """The loss alone: (B, P) student (trainable) and teacher vectors, a (K, P) bank."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    dtype = getattr(torch, dtype)
    return dict(
        student_vecs=torch.randn(batch, proj, generator=g).to(device, dtype).requires_grad_(),
        teacher_vecs=torch.randn(batch, proj, generator=g).to(device, dtype),
        negatives=torch.randn(bank, proj, generator=g).to(device, dtype),
    )


def vector_loss_fn(impl: str, device: torch.device):
    if impl == "fastted":
        path = "triton" if device.type == "cuda" else "reference"
        return lambda **kw: fastted.contrastive_kd(**kw, **OPTIONS, impl=path)
    if impl == "eager":
        return lambda **kw: contrastive_kd_reference(**kw, **OPTIONS)
    if "compile-vectors" not in _COMPILED:
        _COMPILED["compile-vectors"] = torch.compile(contrastive_kd_reference)
    return lambda **kw: _COMPILED["compile-vectors"](**kw, **OPTIONS)


def make_case(impl: str, size: str, device: torch.device, level: str = "states") -> Case:
    """level "states": CoDIR's step from hidden states; "vectors": the loss alone on pooled, projected vectors."""
    if level == "vectors":
        inputs = make_vector_inputs(**SIZES[size], device=device)
        return Case(inputs, vector_loss_fn(impl, device), [inputs["student_vecs"]])
    inputs = make_inputs(**SIZES[size], device=device)
    trainable = inputs["student_states"] + [inputs["student_weight"], inputs["student_bias"]]
    return Case(inputs, loss_fn(impl, device), trainable)


def step(impl: str, size: str, mode: str, device: str = "cpu", level: str = "states"):
    """The memory probe's builder: one forward or full step of a fresh case."""
    return one_step(make_case(impl, size, torch.device(device), level), mode)


def _double(x):
    if isinstance(x, list):
        return [_double(h) for h in x]
    return x.detach().double() if x.is_floating_point() else x


def _check(case: Case) -> None:
    """The case's loss against the eager computation in float64 on the same inputs."""
    inputs = {k: _double(v) for k, v in case.inputs.items()}
    with torch.no_grad():
        if "student_vecs" in inputs:
            ref = contrastive_kd_reference(**inputs, **OPTIONS)
        else:
            ref = codir_loss(**inputs, pool=pool_states_reference, contrast=contrastive_kd_reference, **OPTIONS)
        loss = case.forward()
    if case.inputs["negatives"].dtype == torch.float32:
        tol = dict(rtol=1e-4, atol=1e-5)
    else:
        tol = dict(rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(loss.double(), ref, **tol)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("size", default_sizes(SIZES))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
def test_contrastive_kd(benchmark, sync, impl, mode, size, level):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run_benchmark(
        benchmark,
        sync,
        make_case(impl, size, device, level),
        mode,
        _check,
        module=__name__,
        params=dict(impl=impl, size=size, level=level),
        extra=dict(size=size, level=level, **SIZES[size], **OPTIONS),
    )


def test_cpu_peak_memory_is_a_quarter_of_eager():
    """The loss's own workspace, measured: a full step of contrastive_kd on (B, P) = (256, 128) fp32 vectors
    against a K = 65536 bank peaks at most a quarter as far above its inputs as contrastive_kd_reference,
    which holds the (B, 1 + K) logits, their log-softmax and its gradient (peak resident memory of a fresh
    process). Measured here: about 18 MiB against 224 MiB."""
    fused = cpu_peak_extra_mb(__name__, "step", impl="fastted", size="cpu-k65536", mode="full", level="vectors")
    eager = cpu_peak_extra_mb(__name__, "step", impl="eager", size="cpu-k65536", mode="full", level="vectors")
    print(
        f"peak RSS beyond inputs, full step of the loss at B=256, P=128, K=65536: "
        f"fastted {fused:.0f} MiB, eager {eager:.0f} MiB"
    )
    assert eager > 128, f"eager's step should hold several B x (1 + K) fp32 tensors (64 MiB each), measured {eager} MiB"
    assert fused <= eager / 4, f"fastted {fused:.0f} MiB > a quarter of eager's {eager:.0f} MiB"
