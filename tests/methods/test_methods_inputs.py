"""Bad arguments to the recipes end in a ValueError that names the argument and what it needs."""

import pytest

from fastted import DWT, KD, LWD, RAILKD, CoDIR, MemoryBank, RandomLayerMap, TEDStage1, explicit_map, uniform_map
from tests.tiny_models import batch, bert, gpt2

pytestmark = pytest.mark.bad_input


@pytest.fixture
def models():
    return bert(2, 32), bert(4, 48, seed=1)


@pytest.mark.parametrize(
    "build,fragment",
    [
        (lambda s, t: KD(s, s), "teacher and student are the same module"),
        (lambda s, t: KD(s, t, kl_alpha=-0.5), "kl_alpha must be a finite number >= 0, got -0.5"),
        (lambda s, t: KD(s, t, temperature=0.0), "temperature must lie in (0.0, inf), got 0.0"),
        (lambda s, t: KD(s, t, impl="cuda"), "impl must be one of"),
        (lambda s, t: KD(s, bert(4, 48, num_labels=5)), "num_labels"),
        (lambda s, t: KD(s, gpt2(2, 32)), "the student's task is 'classification' and the teacher's 'clm'"),
        (lambda s, t: LWD(s, t, explicit_map([(0, 3)], 2, 4).pairs), "layer_map must be a LayerMap"),
        (lambda s, t: LWD(s, t, uniform_map(4, 4)), "layer_map.student holds 2, but the BertForSequenceClassification"),
        (lambda s, t: CoDIR(s, t, proj_dim=0), "proj_dim must be a positive int"),
        (lambda s, t: CoDIR(s, t, proj_dim=16, bank=MemoryBank(8, 32)), "bank holds vectors of width 32"),
        (lambda s, t: CoDIR(s, t, kd_temperature=-1.0), "kd_temperature must lie in"),
        (lambda s, t: CoDIR(s, t, negatives=-1), "negatives must be 0 (every bank entry) or a positive int"),
        (lambda s, t: CoDIR(s, t, negatives=2.5), "drawn per anchor), got 2.5"),
        (lambda s, t: CoDIR(s, t, pooling="max"), "pooling must be one of"),
        (lambda s, t: RAILKD(s, t, uniform_map(2, 4)), "layer_map must be a RandomLayerMap"),
        (lambda s, t: RAILKD(s, t, RandomLayerMap(3, 4)), "layer_map.student_layers holds 2"),
        (lambda s, t: DWT(t, s, alpha_s="4"), "alpha_s must be a finite number >= 0"),
        (lambda s, t: TEDStage1(s, interval=3), "layers must be a non-empty list"),
        (lambda s, t: TEDStage1(s, filters="filters"), "filters must be a TaskFilters"),
    ],
)
def test_bad_recipe_arguments(models, build, fragment):
    student, teacher = models
    with pytest.raises(ValueError) as info:
        build(student, teacher)
    assert fragment in str(info.value), str(info.value)


def test_bad_batches(models):
    student, teacher = models
    recipe = KD(student, teacher)
    b = batch("classification", seed=50)
    with pytest.raises(ValueError, match="needs batch\\['labels'\\]"):
        recipe({k: v for k, v in b.items() if k != "labels"})
    with pytest.raises(ValueError, match="needs 'input_ids'"):
        recipe({"attention_mask": b["attention_mask"], "labels": b["labels"]})
    with pytest.raises(ValueError, match="step must be a non-negative int"):
        recipe(b, step=-2)
    with pytest.raises(ValueError, match="every term of this recipe has weight 0"):
        KD(student, teacher, task_alpha=0.0, kl_alpha=0.0)(b)
    bank = MemoryBank(16, 8, mode="momentum")
    codir = CoDIR(student, teacher, proj_dim=8, bank=bank).train()
    with pytest.raises(ValueError, match="index"):
        codir({k: v for k, v in b.items() if k != "index"})


@pytest.mark.parametrize(
    "key, value, fragment",
    [
        ("input_ids", 30_000, "batch['input_ids']: got ids from 0 to 30000, needs ids in [0, 97)"),
        ("input_ids", -1, "batch['input_ids']: got ids from -1 to"),
        ("labels", 3, "batch['labels']: got 3, needs labels in [0, 3)"),
        ("labels", -2, "batch['labels']: got -2, needs labels in [0, 3)"),
    ],
)
def test_out_of_range_ids_and_labels_are_named(models, key, value, fragment):
    student, teacher = models
    b = batch("classification", seed=51)
    b[key] = b[key].clone()
    b[key].view(-1)[0] = value
    if key == "input_ids":
        b[key].view(-1)[1] = 0
    for recipe in (KD(student, teacher), LWD(student, teacher)):
        with pytest.raises(ValueError) as info:
            recipe(b)
        assert fragment in str(info.value), str(info.value)


def test_out_of_range_lm_labels_are_named():
    student, teacher = gpt2(2, 32), gpt2(3, 48, seed=1)
    b = batch("clm", seed=52)
    b["labels"] = b["labels"].clone()
    b["labels"][0, 1] = 97
    with pytest.raises(
        ValueError,
        match=r"batch\['labels'\]: got 97, needs labels in \[0, 97\) \(the "
        r"GPT2LMHeadModel's vocabulary\) or -100",
    ):
        KD(student, teacher)(b)
