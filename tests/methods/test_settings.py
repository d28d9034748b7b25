"""Each method owns its settings: the registered dataclass, the recipe's keyword arguments and the config's
``distil.<method>`` section agree on every name and default, and the old flat config keys map onto them."""

import dataclasses
import inspect

import pytest

from fastted.methods import KD, LWD, METHODS, TED
from fastted.methods.base import RUN_OPTIONS, Recipe
from fastted.methods.layerwise import LayerwiseRecipe
from fastted.train.config import OLD_KEYS, Config, load_config, to_dict

# Arguments a recipe takes as built objects, which its settings describe instead (RAIL-KD's per, CoDIR's
# bank_size and bank_mode), besides the models, TED's filters and the run's options.
BUILT = {"layer_map", "bank"}


def _keyword_defaults(recipe: type[Recipe]) -> dict:
    """The recipe's keyword arguments with a default that are its method's settings."""
    return {
        name: p.default
        for name, p in inspect.signature(recipe).parameters.items()
        if p.default is not inspect.Parameter.empty and name not in RUN_OPTIONS and name not in BUILT
    }


def _field_defaults(settings: type) -> dict:
    return {f.name: f.default for f in dataclasses.fields(settings)}


@pytest.mark.parametrize("method", list(METHODS))
def test_settings_are_the_recipes_keyword_arguments(method):
    recipe = METHODS[method]
    assert recipe.method == method and dataclasses.is_dataclass(recipe.settings)
    assert all(f.default is not dataclasses.MISSING for f in dataclasses.fields(recipe.settings))
    assert _field_defaults(recipe.settings) == _keyword_defaults(recipe)


@pytest.mark.parametrize("method", list(METHODS))
def test_the_config_section_is_the_settings(method):
    settings = METHODS[method].settings
    assert getattr(Config().distil, method) == settings()
    assert to_dict(load_config())["distil"][method] == dataclasses.asdict(settings())
    assert type(getattr(load_config().distil, method)) is settings


# The flat method keys of DistilConfig before each method owned its settings.
FLAT_KEYS = {
    "task_alpha",
    "kl_alpha",
    "mse_alpha",
    "temperature",
    "mask_padding",
    "normalize_mse",
    "crd_alpha",
    "bank_size",
    "bank_mode",
    "crd_negatives",
    "pooling",
    "projection_dim",
    "crd_temperature",
    "rail_alpha",
    "rail_per",
    "alpha_h",
    "alpha_s",
    "alpha_s_end",
    "alpha_s_schedule",
    "remap",
}


def test_every_old_key_maps_onto_a_setting():
    assert set(OLD_KEYS) == FLAT_KEYS
    for old, new in OLD_KEYS.items():
        for key in new:
            _, method, name = key.split(".")
            assert name in _field_defaults(METHODS[method].settings), (old, key)
    assert OLD_KEYS["crd_temperature"] == ["distil.codir.temperature"]
    assert OLD_KEYS["kl_alpha"] == [
        "distil.ted.kl_alpha",
        "distil.lwd.kl_alpha",
        "distil.kd.kl_alpha",
        "distil.codir.kd_alpha",
        "distil.railkd.kd_alpha",
    ]


def test_the_layerwise_recipes_share_a_base_and_run_its_init():
    for recipe in (TED, LWD, KD):
        assert issubclass(recipe, LayerwiseRecipe) and recipe.__mro__[1] is LayerwiseRecipe
        source = inspect.getsource(recipe.__init__)
        assert "super().__init__(" in source and "Recipe.__init__" not in source
    assert not issubclass(KD, TED) and not issubclass(LWD, TED)


def test_the_config_reads_the_cache_methods_from_the_recipes():
    from fastted.train.config import CACHED_METHODS

    assert list(CACHED_METHODS) == [m for m in METHODS if METHODS[m].reads_teacher_cache]
    assert "dwt" not in CACHED_METHODS and "ted" in CACHED_METHODS


NEW_METHOD = """
from dataclasses import dataclass
from fastted.methods.base import register, setting
from fastted.methods.layerwise import LayerwiseRecipe, LogitSettings

@dataclass
class ToySettings(LogitSettings):
    gamma: float = setting(0.5, ">= 0")

@register("toy", ToySettings)
class Toy(LayerwiseRecipe):
    label = "Toy"
    def __init__(self, student, teacher, *, task_alpha=1.0, kl_alpha=1.0, temperature=2.0, gamma=0.5,
                 tokenizers=None, task=None, impl="auto"):
        super().__init__(student, teacher, None, task_alpha=task_alpha, kl_alpha=kl_alpha, mse_alpha=0.0,
                         temperature=temperature, tokenizers=tokenizers, task=task, impl=impl)
        self.gamma = gamma

from fastted.methods import RecipeModels, build_recipe
from fastted.train.config import CACHED_METHODS, ConfigError, load_config
from tests.tiny_models import bert

config = load_config(overrides=("distil.methods=[toy]", "distil.toy.gamma=0.25", "distil.teacher_cache=true"))
assert "toy" in CACHED_METHODS and config.distil.toy == ToySettings(gamma=0.25)
try:
    load_config(overrides=("distil.toy.gamma=-1",))
    raise AssertionError("no ConfigError")
except ConfigError as error:
    assert str(error) == "distil.toy.gamma: got -1.0, needs a number >= 0", error
recipe = build_recipe("toy", config, RecipeModels(bert(2, 32), bert(4, 48, seed=1)))
assert type(recipe) is Toy and recipe.gamma == 0.25
"""


def test_a_new_method_is_its_module_alone():
    """A method registered before the config is built (as fastted.methods' imports do) has its config section, its
    checks, its place among the cache-reading methods and its recipe from a config, with nothing else changed."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", NEW_METHOD], cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
