"""Bad input to filtered_mse ends in a ValueError naming the argument and the shapes; dispatch."""

import subprocess
import sys

import pytest
import torch

import fastted
from tests.tables import check_bad_input, device

pytestmark = pytest.mark.bad_input


def _good(n_layers=2, lead=(6,), d_s=8, d_t=12, d_f=10):
    return {
        "student_states": [torch.randn(*lead, d_s) for _ in range(n_layers)],
        "student_weights": [torch.randn(d_f, d_s) for _ in range(n_layers)],
        "teacher_states": [torch.randn(*lead, d_t) for _ in range(n_layers)],
        "teacher_weights": [torch.randn(d_f, d_t) for _ in range(n_layers)],
        "student_biases": [torch.randn(d_f) for _ in range(n_layers)],
        "teacher_biases": [torch.randn(d_f) for _ in range(n_layers)],
    }


def _with(key, index, value):
    inputs = _good()
    if index is None:
        inputs[key] = value
    else:
        inputs[key][index] = value
    return inputs


BAD = {
    "fewer_teacher_layers": (
        {**_good(), "teacher_states": _good()["teacher_states"][:1]},
        ["teacher_states has 1 layers", "student_states has 2"],
    ),
    "fewer_weights": (
        {**_good(), "student_weights": _good()["student_weights"][:1]},
        ["student_weights has 1 layers"],
    ),
    "tensor_not_list": (
        {**_good(), "student_states": torch.randn(2, 6, 8)},
        ["student_states must be a list or tuple", "(2, 6, 8)"],
    ),
    "tokens_mismatch": (_with("teacher_states", 1, torch.randn(7, 12)), ["teacher_states[1]", "(7, 12)", "(6, 8)"]),
    "student_width_mismatch": (
        _with("student_weights", 0, torch.randn(10, 9)),
        ["student_weights[0]", "(10, 9)", "(d_f, 8)"],
    ),
    "teacher_filter_width": (
        _with("teacher_weights", 1, torch.randn(11, 12)),
        ["teacher_weights[1]", "(11, 12)", "(10, 12)"],
    ),
    "bias_shape": (_with("student_biases", 0, torch.randn(9)), ["student_biases[0]", "(9,)", "(10,)"]),
    "dtype": (
        _with("teacher_states", 0, torch.randn(6, 12, dtype=torch.float64)),
        ["teacher_states[0]", "float64", "float32"],
    ),
    "weight_dtype": (_with("student_weights", 1, torch.randn(10, 8).half()), ["student_weights[1]", "float16"]),
    "device": (_with("teacher_states", 0, torch.randn(6, 12, device="meta")), ["teacher_states[0] is on meta", "cpu"]),
    "weight_device": (
        _with("teacher_weights", 1, torch.randn(10, 12, device="meta")),
        ["teacher_weights[1] is on meta"],
    ),
    "mask_device": ({**_good(), "mask": torch.ones(6, dtype=torch.bool, device="meta")}, ["mask is on meta"]),
    "mask_length": ({**_good(), "mask": torch.ones(5, dtype=torch.bool)}, ["mask has shape (5,)", "(6,)"]),
    "layer_weights_length": ({**_good(), "layer_weights": [1.0]}, ["layer_weights has shape (1,)", "(2,)"]),
    "layer_weights_negative": (
        {**_good(), "layer_weights": [1.0, -1.0]},
        ["layer_weights must be finite, non-negative"],
    ),
    "layer_weights_zero_sum": ({**_good(), "layer_weights": [0.0, 0.0]}, ["positive sum"]),
    "layer_weights_inf": ({**_good(), "layer_weights": [1.0, float("inf")]}, ["layer_weights must be finite", "inf"]),
    "mask_negative": (
        {**_good(), "mask": torch.tensor([1.0, 1.0, -2.0, 1.0, 1.0, 0.0])},
        ["mask holds -2.0", "finite and >= 0"],
    ),
    "no_layers": (
        {**_good(), "student_states": [], "student_weights": [], "teacher_states": []},
        ["student_states is empty"],
    ),
    "integer_states": (
        {key: [x.long() for x in v] for key, v in _good().items()},
        ["student_states[0] has dtype torch.int64, but needs a floating-point dtype"],
    ),
    "bool_states": (
        {
            **_good(),
            "student_states": [x.bool() for x in _good()["student_states"]],
            "teacher_states": [x.bool() for x in _good()["teacher_states"]],
            "student_weights": [None, None],
        },
        ["has dtype torch.bool, but needs a floating-point dtype"],
    ),
    "states_3d": (_with("student_states", 0, torch.randn(6, 8, 1, 1)), ["student_states[0]", "(6, 8, 1, 1)"]),
    "target_width_without_filter": (
        {**_good(), "teacher_weights": None, "teacher_biases": None},
        ["teacher_states[0] has width 12", "filter width 10"],
    ),
    "impl": ({**_good(), "impl": "cuda"}, ["impl must be one of", "'cuda'"]),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_names_argument_and_shapes(name):
    check_bad_input(fastted.filtered_mse, *BAD[name])


def test_triton_without_gpu_or_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if torch.cuda.is_available():
        pytest.skip("a GPU runs impl='triton' for real")
    with pytest.raises(ValueError, match="impl='triton' needs CUDA tensors"):
        fastted.filtered_mse(**_good(), impl="triton")
    # auto falls back to the reference path on the CPU
    assert torch.isfinite(fastted.filtered_mse(**_good(), impl="auto"))


def test_float64_is_not_a_triton_dtype():
    inputs = {k: [x.double() for x in v] for k, v in _good().items()}
    with pytest.raises(ValueError, match="float64"):
        fastted.filtered_mse(**inputs, impl="triton")


def test_triton_impl_launches_the_kernel(monkeypatch):
    """impl='triton' really runs the kernel, once per group of uniform layers."""
    import fastted.kernels.filtered_mse as kernel

    calls = []
    real = kernel.filtered_mse_forward
    monkeypatch.setattr(kernel, "filtered_mse_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    inputs = {key: [x.to(device()) for x in value] for key, value in _good(n_layers=4).items()}
    fastted.filtered_mse(**inputs, impl="triton").item()
    assert len(calls) == 1
    fastted.filtered_mse(**inputs, impl="reference").item()
    assert len(calls) == 1


def test_import_touches_no_cuda_and_no_kernel():
    code = (
        "import sys, torch, fastted\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialized'\n"
        # fastted.kernels.runtime, the launch machinery the dispatch reads, imports no Triton; no kernel module.
        "bad = [m for m in sys.modules if m == 'triton' or m.startswith(('triton.', 'fastted.kernels.'))\n"
        "       and m != 'fastted.kernels.runtime']\n"
        "assert not bad, bad\n"
        "assert not any(m.startswith(('transformers', 'deepspeed', 'datasets')) for m in sys.modules)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
