"""Bad input to contrastive_kd, pool_states and pooled_distance ends in a ValueError naming the argument;
dispatch and no gradient work where none is wanted."""

import pytest
import torch

import fastted
from tests.tables import check_bad_input

pytestmark = pytest.mark.bad_input


def _vecs(b=4, k=10, d=8):
    return {"student_vecs": torch.randn(b, d), "teacher_vecs": torch.randn(b, d), "negatives": torch.randn(k, d)}


def _layers(n=2, b=3, t=5, d=6):
    return [torch.randn(b, t, d) for _ in range(n)]


BAD_VECS = {
    "empty_bank": ({**_vecs(), "negatives": torch.randn(0, 8)}, ["negatives has shape (0, 8)", "empty memory bank"]),
    "width_differs": ({**_vecs(), "negatives": torch.randn(10, 9)}, ["negatives has shape (10, 9)", "(K, 8)"]),
    "per_anchor_batch": ({**_vecs(), "negatives": torch.randn(3, 10, 8)}, ["(3, 10, 8)", "(4, K, 8) per anchor"]),
    "teacher_shape": ({**_vecs(), "teacher_vecs": torch.randn(4, 7)}, ["teacher_vecs has shape (4, 7)", "(4, 8)"]),
    "student_3d": ({**_vecs(), "student_vecs": torch.randn(2, 4, 8)}, ["student_vecs has shape (2, 4, 8)", "(B, D)"]),
    "not_a_tensor": ({**_vecs(), "negatives": [[0.0] * 8]}, ["negatives must be a tensor", "list"]),
    "integer": (
        {**_vecs(), "student_vecs": torch.ones(4, 8, dtype=torch.long)},
        ["student_vecs has dtype torch.int64"],
    ),
    "negatives_need_grad": (
        {**_vecs(), "negatives": torch.randn(10, 8, requires_grad=True)},
        ["negatives requires grad", "negatives.detach()"],
    ),
    "temperature_zero": ({**_vecs(), "temperature": 0.0}, ["temperature must lie in (0.0", "got 0.0"]),
    "temperature_negative": ({**_vecs(), "temperature": -0.07}, ["temperature must lie in (0.0", "-0.07"]),
    "temperature_inf": ({**_vecs(), "temperature": float("inf")}, ["temperature must be a finite number", "inf"]),
    "labels_alone": (
        {**_vecs(), "labels": torch.zeros(4, dtype=torch.long)},
        ["labels and negative_labels go together"],
    ),
    "labels_float": (
        {**_vecs(), "labels": torch.zeros(4), "negative_labels": torch.zeros(10, dtype=torch.long)},
        ["labels must be an integer tensor of shape (4,)", "torch.float32"],
    ),
    "negative_labels_shape": (
        {**_vecs(), "labels": torch.zeros(4, dtype=torch.long), "negative_labels": torch.zeros(9, dtype=torch.long)},
        ["negative_labels has shape (9,)", "(10,)"],
    ),
    "mask_shape": ({**_vecs(), "mask": torch.ones(4, 2, dtype=torch.bool)}, ["mask has shape (4, 2)", "(4,)"]),
    "impl": ({**_vecs(), "impl": "cuda"}, ["impl must be one of", "'cuda'"]),
}

BAD_POOL = {
    "not_a_list": ({"states": torch.randn(3, 5, 6)}, ["states must be a list or tuple", "wrap a single layer"]),
    "empty": ({"states": []}, ["states is empty"]),
    "two_dims": ({"states": [torch.randn(3, 6)]}, ["states[0] has shape (3, 6)", "(B, T, d)"]),
    "layers_differ": (
        {"states": [torch.randn(3, 5, 6), torch.randn(3, 5, 7)]},
        ["states[1] is (3, 5, 7)", "states[0] is (3, 5, 6)", "must match"],
    ),
    "mask_shape": ({"states": _layers(), "mask": torch.ones(3, 4)}, ["mask has shape (3, 4)", "(3, 5)"]),
    "mask_negative": ({"states": _layers(), "mask": -torch.ones(3, 5)}, ["mask holds -1.0", "finite and >= 0"]),
    "pooling": ({"states": _layers(), "pooling": "max"}, ["pooling must be one of", "'max'"]),
}

BAD_RAIL = {
    "layer_counts": (
        {"student_states": _layers(2), "teacher_states": _layers(3)},
        ["teacher_states has 3 layers, but student_states has 2", "concat=True"],
    ),
    "examples": (
        {"student_states": _layers(b=3), "teacher_states": _layers(b=4)},
        ["teacher_states[0] has 4 examples, but student_states[0] has 3"],
    ),
    "teacher_tokens_without_mask": (
        {"student_states": _layers(), "teacher_states": _layers(t=7), "mask": torch.ones(3, 5)},
        ["teacher_states have 7 tokens", "teacher_mask"],
    ),
    "weight_width": (
        {"student_states": _layers(), "teacher_states": _layers(), "student_weights": [torch.randn(4, 5), None]},
        ["student_weights[0] has shape (4, 5)", "(d_f, 6)"],
    ),
    "projected_widths": (
        {
            "student_states": _layers(),
            "teacher_states": _layers(),
            "student_weights": [torch.randn(4, 6), torch.randn(4, 6)],
        },
        ["projected student vectors are 4 wide and the teacher's 6"],
    ),
    "bias_without_weight": (
        {"student_states": _layers(), "teacher_states": _layers(), "student_biases": [torch.randn(6), None]},
        ["student_biases[0] has shape (6,)", "None (no projection)"],
    ),
    "weights_count": (
        {"student_states": _layers(), "teacher_states": _layers(), "student_weights": [torch.randn(4, 6)]},
        ["student_weights has 1 layers"],
    ),
}


@pytest.mark.parametrize("name", list(BAD_VECS))
def test_contrastive_kd_bad_input(name):
    inputs, fragments = BAD_VECS[name]
    check_bad_input(fastted.contrastive_kd, inputs, fragments)


@pytest.mark.parametrize("name", list(BAD_POOL))
def test_pool_states_bad_input(name):
    inputs, fragments = BAD_POOL[name]
    check_bad_input(fastted.pool_states, inputs, fragments)


@pytest.mark.parametrize("name", list(BAD_RAIL))
def test_pooled_distance_bad_input(name):
    inputs, fragments = BAD_RAIL[name]
    check_bad_input(fastted.pooled_distance, inputs, fragments)


def test_module_bad_arguments():
    with pytest.raises(ValueError, match="temperature must lie in"):
        fastted.ContrastiveKDLoss(temperature=0)
    with pytest.raises(ValueError, match="proj_dim must be a positive int"):
        fastted.PooledDistanceLoss(8, 8, 2, proj_dim=0)
    with pytest.raises(ValueError, match="pooling must be one of"):
        fastted.PooledDistanceLoss(8, 8, 2, pooling="cls")


def test_negatives_without_grad_mode_are_fine():
    """Under no_grad a bank that requires grad is no hazard: nothing is differentiated."""
    with torch.no_grad():
        inputs = {**_vecs(), "negatives": torch.randn(10, 8, requires_grad=True)}
        assert torch.isfinite(fastted.contrastive_kd(**inputs))


@pytest.mark.parametrize("grad", [True, False])
def test_contrastive_kd_launches_and_gradient_work(monkeypatch, grad):
    """impl="triton" runs the kernels; under no_grad they are asked for no gradient."""
    import fastted.kernels.contrastive_kd as kernels

    calls = []
    real = kernels.contrastive_forward

    def spy(*args, **kwargs):
        calls.append((kwargs["grad_s"], kwargs["grad_t"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "contrastive_forward", spy)
    inputs = _vecs()
    inputs["student_vecs"].requires_grad_()
    with torch.set_grad_enabled(grad):
        fastted.contrastive_kd(**inputs, impl="triton")
    assert calls == [(grad, False)]


def test_vectors_wider_than_the_kernels_take(monkeypatch):
    """Past MAX_TRITON_WIDTH "auto" takes the PyTorch path (the kernels are never launched) and gives the
    reference's value; a forced impl="triton" is a ValueError naming the width."""
    import fastted.kernels.contrastive_kd as kernels
    from fastted.ops.contrastive_kd import MAX_TRITON_WIDTH

    def no_launch(*args, **kwargs):
        raise AssertionError("the kernels ran on vectors wider than they take")

    monkeypatch.setattr(kernels, "contrastive_forward", no_launch)
    g = torch.Generator().manual_seed(7)
    width = MAX_TRITON_WIDTH + 1
    inputs = dict(
        student_vecs=torch.randn(3, width, generator=g),
        teacher_vecs=torch.randn(3, width, generator=g),
        negatives=torch.randn(5, width, generator=g),
    )
    got = fastted.contrastive_kd(**inputs, impl="auto")
    torch.testing.assert_close(got, fastted.contrastive_kd(**inputs, impl="reference"), rtol=0, atol=0)
    with pytest.raises(ValueError, match=f"width {width}.*at most {MAX_TRITON_WIDTH}"):
        fastted.contrastive_kd(**inputs, impl="triton")
