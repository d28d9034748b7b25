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
    return {name: p.default for name, p in inspect.signature(recipe).parameters.items()
            if p.default is not inspect.Parameter.empty and name not in RUN_OPTIONS and name not in BUILT}


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
FLAT_KEYS = {"task_alpha", "kl_alpha", "mse_alpha", "temperature", "mask_padding", "normalize_mse", "crd_alpha",
             "bank_size", "bank_mode", "crd_negatives", "pooling", "projection_dim", "crd_temperature", "rail_alpha",
             "rail_per", "alpha_h", "alpha_s", "alpha_s_end", "alpha_s_schedule", "remap"}


def test_every_old_key_maps_onto_a_setting():
    assert set(OLD_KEYS) == FLAT_KEYS
    for old, new in OLD_KEYS.items():
        for key in new:
            _, method, name = key.split(".")
            assert name in _field_defaults(METHODS[method].settings), (old, key)
    assert OLD_KEYS["crd_temperature"] == ["distil.codir.temperature"]
    assert OLD_KEYS["kl_alpha"] == ["distil.ted.kl_alpha", "distil.lwd.kl_alpha", "distil.kd.kl_alpha",
                                    "distil.codir.kd_alpha", "distil.railkd.kd_alpha"]


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
