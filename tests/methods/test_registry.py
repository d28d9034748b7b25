"""The recipe registry (fastted.methods) and the interface the engine relies on (fastted.Recipe)."""

import pytest
import torch
from transformers import BertForMaskedLM

from fastted import DWT, KD, LWD, RAILKD, TED, CoDIR, Recipe, RecipeOutput, Schedule, TaskFilters, TEDStage1
from fastted.methods import METHODS, FineTune, RecipeModels, build_recipe, recipe_class
from fastted.train.config import METHODS as CONFIG_METHODS
from fastted.train.config import load_config
from tests.tiny_models import batch, bert


def _config(task="classification", **overrides):
    values = {"task": task, "seed": 7, "engine.impl": "reference"}
    for method in ("ted", "lwd", "kd"):
        values.update({f"distil.{method}.kl_alpha": 3.0, f"distil.{method}.temperature": 4.0})
    values.update(
        {
            "distil.ted.mse_alpha": 5.0,
            "distil.lwd.mse_alpha": 5.0,
            "distil.codir.kd_temperature": 4.0,
            "distil.codir.crd_alpha": 0.25,
            "distil.codir.proj_dim": 16,
            "distil.codir.bank_size": 32,
            "distil.railkd.rail_alpha": 0.5,
            "distil.railkd.per": "step",
            "distil.railkd.proj_dim": 8,
            "distil.railkd.concat": True,
            "distil.dwt.alpha_h": 0.75,
            "distil.dwt.alpha_s": 2.0,
            "distil.dwt.alpha_s_end": 0.5,
            "distil.dwt.alpha_s_schedule": "linear",
            "distil.dwt.temperature": 4.0,
            **overrides,
        }
    )
    if task != "classification":
        values["jobs"] = ["distil", "evaluate"]
    return load_config(preset="bbc-minilm-tiny", overrides=tuple(values.items()))


def _models(task="classification", filters=False):
    student, teacher = bert(2, 32, task), bert(4, 48, task, seed=1)
    stage1 = (TaskFilters([0, 1], 32, 24), TaskFilters([1, 3], 48, 24)) if filters else None
    return RecipeModels(student, teacher, total_steps=40, filters=stage1)


def test_the_registry_covers_every_method_of_the_config():
    assert list(METHODS) == list(CONFIG_METHODS)
    assert [recipe_class(m).label for m in METHODS] == ["TED", "LWD", "KD", "CoDIR", "RAIL-KD", "DWT"]
    assert [m for m in METHODS if recipe_class(m).uses_stage1_filters] == ["ted"]
    with pytest.raises(ValueError, match="method must be one of ted, lwd, kd, codir, railkd, dwt, got 'distil'"):
        recipe_class("distil")


@pytest.mark.parametrize("method", list(METHODS))
def test_build_recipe_reads_its_own_settings(method):
    config = _config()
    recipe = build_recipe(method, config, _models(filters=method == "ted"))
    assert type(recipe) is METHODS[method] and recipe.impl == "reference"
    if method in ("ted", "lwd", "kd"):
        assert recipe.alphas == {"task": 1.0, "kd": 3.0, "mse": 0.0 if method == "kd" else 5.0}
        assert recipe.temperature == 4.0
    if method == "codir":
        assert recipe.alphas["crd"] == 0.25 and recipe.bank.size == 32 and recipe.student_head.out_features == 16
        assert recipe.kd_temperature == 4.0 and recipe.temperature == config.distil.codir.temperature == 0.07
    if method == "railkd":
        assert recipe.alphas["rail"] == 0.5 and (recipe.layer_map.per, recipe.layer_map.seed) == ("step", 7)
        assert recipe.distance.concat and recipe.distance.student_proj[0].out_features == 8  # unset before: no key
        assert recipe.layer_map.student_layers == (0, 1) and recipe.layer_map.teacher_layers == (0, 1, 2, 3)
    if method == "dwt":
        assert recipe.alpha_h == 0.75 and recipe.temperature == 4.0
        assert (recipe.alpha_s.kind, recipe.alpha_s.start, recipe.alpha_s.end, recipe.alpha_s.steps) == (
            "linear",
            2.0,
            0.5,
            40,
        )
    out = recipe(batch("classification", seed=3), step=0)
    assert isinstance(out, RecipeOutput) and torch.isfinite(out.loss)


def test_codir_reads_the_bank_pooling_and_negatives_settings():
    """The codir-paper entry's settings reach the recipe: a momentum bank of one entry per training example (the
    run's train_size, whatever bank_size says), K negatives drawn per anchor, first-token pooling."""
    config = _config(
        **{"distil.codir.bank_mode": "momentum", "distil.codir.negatives": 5, "distil.codir.pooling": "first"}
    )
    models = _models()
    models.train_size = 37
    recipe = build_recipe("codir", config, models)
    assert (recipe.bank.mode, recipe.bank.size, recipe.negatives, recipe.pooling) == ("momentum", 37, 5, "first")
    assert recipe.needs_example_ids and not build_recipe("codir", _config(), _models()).needs_example_ids
    assert not any(
        build_recipe(m, _config(), _models(filters=m == "ted")).needs_example_ids for m in METHODS if m != "codir"
    )
    models.train_size = None
    with pytest.raises(ValueError, match="distil.codir.bank_mode: momentum keeps one entry per training example"):
        build_recipe("codir", config, models)


@pytest.mark.bad_input
def test_ted_without_stage1_filters_is_a_clear_error():
    with pytest.raises(
        ValueError,
        match=r"TED needs models.filters = \(student's, teacher's\) stage-I TaskFilters, "
        r"got NoneType",
    ):
        build_recipe("ted", _config(), _models())


def test_lm_recipes_take_the_fused_head_setting():
    models = RecipeModels(bert(2, 32, "mlm"), bert(4, 48, "mlm", seed=1))
    for fused in (True, False):
        recipe = build_recipe("kd", _config("mlm", **{"distil.fused_lm_head": fused}), models)
        assert recipe.fused_lm_head is fused
    dwt = build_recipe("dwt", _config("mlm", **{"distil.dwt.alpha_s_end": None}), models)
    assert dwt.fused_lm_head and repr(dwt.alpha_s) == repr(Schedule("constant", 2.0))


def test_frozen_modules_are_the_teacher_and_its_filters():
    m = _models(filters=True)
    recipe = TED(m.student, m.teacher, *m.filters)
    frozen = recipe.frozen_modules()
    assert frozen[0] is m.teacher and frozen[1] is m.filters[1] and len(frozen) == 2
    assert all(not p.requires_grad for module in frozen for p in module.parameters())
    trained = {id(p) for p in recipe.parameters()}
    assert not trained & {id(p) for module in frozen for p in module.parameters()}
    stage1 = TEDStage1(bert(2, 32), interval=1)
    assert stage1.frozen_modules() == [stage1.student] and stage1.teacher is None


def test_external_parameters_are_what_the_fused_losses_read_outside_forward():
    m = _models(filters=True)
    ted = TED(m.student, m.teacher, *m.filters)
    assert {id(p) for p in ted.external_parameters()} == {id(p) for p in m.filters[0].parameters()}
    kd = KD(bert(2, 32), bert(4, 48, seed=1))
    assert kd.external_parameters() == []  # logits from the models' own heads: nothing read outside a forward
    lwd = LWD(bert(2, 32, "mlm"), bert(4, 48, "mlm", seed=1), fused_lm_head=True)
    external = {id(p) for p in lwd.external_parameters()}
    assert {id(p) for p in lwd.projections.parameters()} <= external
    weight, bias = lwd.student_model.lm_head_parts()
    assert {id(weight), id(bias)} <= external
    assert len(external) == len(lwd.external_parameters())  # each once, though tied to the input embeddings


def test_save_pretrained_saves_a_loadable_student(tmp_path):
    student = bert(2, 32, "mlm")
    recipe = DWT(student, bert(2, 32, "mlm", seed=1), total_steps=10)
    recipe.save_pretrained(tmp_path / "dwt")
    loaded = BertForMaskedLM.from_pretrained(tmp_path / "dwt")
    for (name, p), q in zip(student.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)
    finetune = FineTune(bert(2, 32))
    finetune.save_pretrained(tmp_path / "finetune")
    assert (tmp_path / "finetune" / "model.safetensors").exists()


def test_forward_count_in_the_state_dict_and_older_checkpoints():
    recipe = RAILKD(bert(2, 32), bert(4, 48, seed=1), proj_dim=8)
    recipe.train()
    recipe(batch("classification", seed=1))
    recipe.eval()
    recipe(batch("classification", seed=1))  # evaluation forwards are not counted
    assert recipe.forward_count == 1
    state = recipe.state_dict()
    assert state["_extra_state"] == {"forward_count": 1}
    state["_extra_state"] = {"step": 5}  # written before the counter had its name
    recipe.load_state_dict(state)
    assert recipe.forward_count == 5


def test_a_recipe_without_from_config_says_so():
    with pytest.raises(NotImplementedError, match="FineTune is not built from a run's config"):
        FineTune.from_config(_config(), _models())
    assert issubclass(CoDIR, Recipe) and Recipe.from_config.__qualname__ == "Recipe.from_config"
