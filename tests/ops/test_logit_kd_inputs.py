"""Bad input to logit_kd and fused_linear_kd ends in a ValueError naming the argument; dispatch."""

import numpy as np
import pytest
import torch

import fastted
from fastted import reference
from tests.tables import check_bad_input, device

pytestmark = pytest.mark.bad_input


def _logits(lead=(6,), v_s=50, v_t=50):
    return {"student_logits": torch.randn(*lead, v_s), "teacher_logits": torch.randn(*lead, v_t)}


def _heads(lead=(6,), h_s=8, h_t=12, v_s=50, v_t=50):
    return {
        "student_hidden": torch.randn(*lead, h_s),
        "student_weight": torch.randn(v_s, h_s),
        "teacher_hidden": torch.randn(*lead, h_t),
        "teacher_weight": torch.randn(v_t, h_t),
    }


BAD_LOGITS = {
    "not_a_tensor": ({**_logits(), "student_logits": [1.0]}, ["student_logits must be a tensor", "list"]),
    "one_dim": ({**_logits(), "teacher_logits": torch.randn(50)}, ["teacher_logits has shape (50,)", "(N, V)"]),
    "rows_differ": ({**_logits(), "teacher_logits": torch.randn(5, 50)}, ["(5, 50)", "(6, 50)", "leading"]),
    "integer_logits": ({**_logits(), "student_logits": torch.ones(6, 50, dtype=torch.long)}, ["torch.int64"]),
    "vocab_differs": (
        _logits(v_t=60),
        ["student_logits covers a vocabulary of 50", "teacher_logits covers 60", "vocab_size"],
    ),
    "vocab_size_too_big": ({**_logits(v_t=60), "vocab_size": 55}, ["vocab_size must be an int in [1, 50]", "55"]),
    "temperature_zero": ({**_logits(), "temperature": 0.0}, ["temperature must lie in (0.0", "got 0.0"]),
    "temperature_tensor": ({**_logits(), "temperature": torch.tensor(2.0)}, ["temperature must be a number"]),
    "temperature_inf": ({**_logits(), "temperature": float("inf")}, ["temperature must be a finite number", "inf"]),
    "beta_nan": ({**_logits(), "divergence": "jsd", "beta": float("nan")}, ["beta must be a finite number", "nan"]),
    "mask_negative": (
        {**_logits(), "mask": torch.tensor([1.0, -1.0, 1.0, 1.0, 0.0, 1.0])},
        ["mask holds -1.0", "finite and >= 0"],
    ),
    "mask_nan": (
        {**_logits(), "mask": torch.tensor([1.0, float("nan"), 1.0, 1.0, 0.0, 1.0])},
        ["mask holds nan", "finite and >= 0"],
    ),
    "beta_out_of_range": ({**_logits(), "divergence": "jsd", "beta": 1.5}, ["beta must lie in [0.0, 1.0]", "1.5"]),
    "divergence": ({**_logits(), "divergence": "kl"}, ["divergence must be one of", "'kl'"]),
    "mask_shape": ({**_logits(), "mask": torch.ones(5, dtype=torch.bool)}, ["mask has shape (5,)", "(6,)"]),
    "labels_float": ({**_logits(), "labels": torch.zeros(6)}, ["labels must be an integer tensor", "torch.float32"]),
    "labels_shape": ({**_logits(), "labels": torch.zeros(3, 2, dtype=torch.long)}, ["labels has shape (3, 2)"]),
    "impl": ({**_logits(), "impl": "cuda"}, ["impl must be one of", "'cuda'"]),
}

BAD_HEADS = {
    "hidden_rows_differ": (
        {**_heads(), "teacher_hidden": torch.randn(5, 12)},
        ["teacher_hidden has shape (5, 12)", "(6, 8)"],
    ),
    "weight_width": (
        {**_heads(), "student_weight": torch.randn(50, 9)},
        ["student_weight has shape (50, 9)", "(d_f, 8)"],
    ),
    "teacher_weight_width": ({**_heads(), "teacher_weight": torch.randn(50, 8)}, ["teacher_weight has shape (50, 8)"]),
    "bias_shape": ({**_heads(), "student_bias": torch.randn(49)}, ["student_bias has shape (49,)", "(50,)"]),
    "vocab_differs": (_heads(v_s=64), ["student_weight covers a vocabulary of 64", "teacher_weight covers 50"]),
    "dtype_mismatch": (
        {**_heads(), "student_weight": torch.randn(50, 8, dtype=torch.float64)},
        ["student_weight has dtype torch.float64", "torch.float32"],
    ),
    "hard_weight_without_labels": ({**_heads(), "hard_weight": 0.5}, ["hard_weight=0.5 needs hard_labels"]),
    "negative_weight": ({**_heads(), "soft_weight": -1.0}, ["soft_weight must lie in [0.0", "-1.0"]),
    "hard_weight_inf": (
        {**_heads(), "hard_weight": float("inf"), "hard_labels": torch.zeros(6, dtype=torch.long)},
        ["hard_weight must be a finite number", "inf"],
    ),
    "mask_negative": ({**_heads(), "mask": torch.tensor([1, -1, 1, 1, 0, 1])}, ["mask holds -1", "finite and >= 0"]),
    "label_out_of_range": (
        {**_heads(), "hard_labels": torch.tensor([0, 1, 2, 50, 4, 5])},
        ["hard_labels holds 50, outside [0, 50)", "ignore_index=-100"],
    ),
    "chunk_size": ({**_heads(), "chunk_size": 0}, ["chunk_size must be a positive int", "0"]),
    "hidden_empty": ({**_heads(), "student_hidden": torch.randn(0, 8)}, ["student_hidden has shape (0, 8)"]),
    "shift_flat_rows": (
        {**_heads(), "hard_labels": torch.zeros(6, dtype=torch.long), "shift_labels": True},
        ["shift_labels=True shifts (B, T) hard_labels along T", "(6,)"],
    ),
    "shift_without_labels": ({**_heads(), "shift_labels": True}, ["shift_labels=True", "NoneType"]),
    "shift_not_bool": ({**_heads(), "shift_labels": "yes"}, ["shift_labels must be a bool", "'yes'"]),
    "kd_ignored_rows_not_bool": ({**_heads(), "kd_ignored_rows": 1}, ["kd_ignored_rows must be a bool", "1"]),
    "integer_states": (
        {key: v.long() if torch.is_tensor(v) else v for key, v in _heads().items()},
        ["student_hidden has dtype torch.int64, but needs a floating-point dtype"],
    ),
    "integer_teacher": (
        {**_heads(), "teacher_hidden": torch.ones(6, 12, dtype=torch.int32)},
        ["teacher_hidden has dtype torch.int32, but needs a floating-point dtype"],
    ),
}


@pytest.mark.parametrize("name", list(BAD_LOGITS))
def test_logit_kd_bad_input(name):
    check_bad_input(fastted.logit_kd, *BAD_LOGITS[name])


@pytest.mark.parametrize("name", list(BAD_HEADS))
def test_fused_linear_kd_bad_input(name):
    check_bad_input(fastted.fused_linear_kd, *BAD_HEADS[name])


def test_modules_check_their_options():
    with pytest.raises(ValueError, match="divergence must be one of"):
        fastted.LogitKDLoss(divergence="js")
    with pytest.raises(ValueError, match="temperature must lie in"):
        fastted.FusedLinearKDLoss(temperature=-1.0)


def test_triton_impl_launches_the_row_kernel(monkeypatch):
    """impl='triton' runs the row kernel: once for logit_kd, once per block of rows for fused_linear_kd."""
    import fastted.kernels.logit_kd as kernel

    calls = []
    real = kernel.logit_kd_forward
    monkeypatch.setattr(kernel, "logit_kd_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    logits = {k: v.to(device()) for k, v in _logits().items()}
    fastted.logit_kd(**logits, impl="triton").item()
    assert len(calls) == 1
    heads = {k: v.to(device()) for k, v in _heads().items()}
    fastted.fused_linear_kd(**heads, impl="triton", chunk_size=4).item()
    assert len(calls) == 3
    fastted.fused_linear_kd(**heads, impl="reference").item()
    fastted.logit_kd(**logits, impl="reference").item()
    assert len(calls) == 3


def test_second_backward_is_a_clear_error():
    """logit_kd scales its stored gradient in place, so a second backward must fail loudly, not silently."""
    logits = _logits()
    s = logits["student_logits"].requires_grad_()
    loss = fastted.logit_kd(s, logits["teacher_logits"], impl="reference")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_triton_without_gpu_or_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if torch.cuda.is_available():
        pytest.skip("a GPU runs impl='triton' for real")
    with pytest.raises(ValueError, match="impl='triton' needs CUDA tensors"):
        fastted.logit_kd(**_logits(), impl="triton")
    with pytest.raises(ValueError, match="impl='triton' needs CUDA tensors"):
        fastted.fused_linear_kd(**_heads(), impl="triton")


def test_no_grad_computes_no_gradient(monkeypatch):
    """Under torch.no_grad (an evaluation loop) the losses skip the gradient: the row work gets no output buffer."""
    import fastted.ops.fused_linear_kd as fused_op
    import fastted.ops.logit_kd as logit_op

    grads = []
    real_rows, real_chunked = fused_op.logit_kd_rows, logit_op.logit_kd_chunked
    monkeypatch.setattr(fused_op, "logit_kd_rows", lambda *a, **k: grads.append(a[5]) or real_rows(*a, **k))
    monkeypatch.setattr(logit_op, "logit_kd_chunked", lambda *a, **k: grads.append(a[3]) or real_chunked(*a, **k))
    logits = _logits()
    logits["student_logits"].requires_grad_()
    heads = _heads()
    heads["student_hidden"].requires_grad_()
    with torch.no_grad():
        values = [fastted.logit_kd(**logits, impl="reference"), fastted.fused_linear_kd(**heads, impl="reference")]
    assert len(grads) == 2 and all(g is None for g in grads)
    assert not any(v.requires_grad for v in values)
    with_grad = [fastted.logit_kd(**logits, impl="reference"), fastted.fused_linear_kd(**heads, impl="reference")]
    assert len(grads) == 4 and all(g is not None for g in grads[2:])
    for a, b in zip(values, with_grad):
        torch.testing.assert_close(a, b.detach())


@pytest.mark.parametrize("temperature", [np.float32(2.0), np.float64(2.0), np.int64(2)], ids=lambda t: type(t).__name__)
def test_numpy_scalar_temperature_is_a_number(temperature):
    """A numpy scalar is a number: the loss equals the one at the Python float, against the float64 spec."""
    inputs = _logits()
    got = fastted.logit_kd(inputs["student_logits"], inputs["teacher_logits"], temperature=temperature)
    want = reference.logit_kd_reference(
        inputs["student_logits"].double(), inputs["teacher_logits"].double(), temperature=2.0
    )
    assert abs(got.item() - want.item()) <= 1e-5 * (1 + abs(want.item()))
