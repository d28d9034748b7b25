"""A teacher cut after its last mapped layer when no term needs its logits: the same losses and gradients as the
whole teacher, on encoders and decoders (fused LM head included); nothing cut when a KL term reads the logits."""

import copy

import pytest
import torch

from fastted import KD, LWD, RAILKD, CoDIR, RandomLayerMap, explicit_map
from tests.tiny_models import batch, bert, gpt2


def _twins(build, student, teacher):
    """The recipe on the whole teacher and on a copy of it that the recipe truncates."""
    torch.manual_seed(4)  # the recipes' own projections: drawn alike
    whole = build(copy.deepcopy(student), copy.deepcopy(teacher))
    torch.manual_seed(4)
    cut = build(copy.deepcopy(student), copy.deepcopy(teacher))
    return whole, cut, cut.truncate_teacher()


def _step(recipe, b):
    out = recipe(b, step=0)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in recipe.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "task, build, kept",
    [
        ("classification", lambda s, t: LWD(s, t, explicit_map([(0, 0), (1, 1)], 2, 4), kl_alpha=0.0), 2),
        (
            "classification",
            lambda s, t: CoDIR(s, t, explicit_map([(0, 1), (1, 2)], 2, 4), kd_alpha=0.0, proj_dim=8, bank_size=16),
            3,
        ),
        (
            "classification",
            lambda s, t: RAILKD(s, t, RandomLayerMap(2, 4, teacher_layers=[0, 1, 2], seed=1), kd_alpha=0.0, proj_dim=8),
            3,
        ),
        ("clm", lambda s, t: LWD(s, t, explicit_map([(0, 0), (1, 1)], 2, 4), kl_alpha=0.0, fused_lm_head=True), 2),
        ("clm", lambda s, t: LWD(s, t, explicit_map([(0, 1), (1, 2)], 2, 4), kl_alpha=0.0), 3),
    ],
)
def test_the_cut_teacher_gives_the_same_step(task, build, kept):
    student, teacher = (
        (bert(2, 32, seed=1), bert(4, 32, seed=2))
        if task == "classification"
        else (gpt2(2, 32, seed=1), gpt2(4, 32, seed=2))
    )
    whole, cut, n = _twins(build, student, teacher)
    assert n == kept and cut.teacher_model.num_layers == kept and whole.teacher_model.num_layers == 4
    assert len(cut.teacher_model.layers) == kept and cut.teacher.config.num_hidden_layers == kept
    b = batch(task, seed=70)
    torch.manual_seed(0)
    out_whole, grads_whole = _step(whole, b)
    torch.manual_seed(0)
    out_cut, grads_cut = _step(cut, b)
    torch.testing.assert_close(out_cut.loss, out_whole.loss, rtol=1e-6, atol=1e-7)
    assert grads_cut.keys() == grads_whole.keys()
    for name in grads_whole:
        torch.testing.assert_close(grads_cut[name], grads_whole[name], rtol=1e-5, atol=1e-7, msg=name)


def test_nothing_is_cut_when_a_term_reads_the_logits():
    student, teacher = bert(2, 32, seed=1), bert(4, 32, seed=2)
    assert KD(student, teacher).truncate_teacher() is None
    assert LWD(student, teacher, explicit_map([(0, 0), (1, 1)], 2, 4)).truncate_teacher() is None  # kl_alpha 1
    assert LWD(student, teacher, explicit_map([(0, 0), (1, 3)], 2, 4), kl_alpha=0.0).truncate_teacher() is None
    assert teacher.config.num_hidden_layers == 4
