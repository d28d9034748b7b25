"""The distillation methods as recipes over Hugging Face models: one file per method, and their registry.

Each method's module registers its recipe with its settings dataclass
(:func:`~fastted.methods.base.register`): :data:`METHODS` maps each method's
name in a config (``distil.methods``, ``distil.<name>``) to its recipe class,
in the papers' order, then any other in the order of its import below; :func:`build_recipe` builds one from a
run's config (:meth:`~fastted.methods.base.Recipe.from_config`). A new method
is a module here and its import below.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from fastted.methods.base import REGISTRY, Recipe, RecipeModels, RecipeOutput
from fastted.methods.codir import CoDIR
from fastted.methods.dwt import DWT, Schedule, remap_parameters
from fastted.methods.finetune import FineTune
from fastted.methods.kd import KD
from fastted.methods.lwd import LWD
from fastted.methods.railkd import RAILKD
from fastted.methods.ted import TED, TEDStage1, load_stage1


class _Methods(Mapping):
    """The registry read in the papers' order (the config's and its messages'), then any other registered method
    in the order it registered; live, so a method registered after this import is in it too."""

    _PAPERS = (TED, LWD, KD, CoDIR, RAILKD, DWT)

    def __getitem__(self, name: str) -> type[Recipe]:
        return REGISTRY[name]

    def __iter__(self) -> Iterator[str]:
        first = [cls.method for cls in self._PAPERS]
        yield from first
        yield from (name for name in REGISTRY if name not in first)

    def __len__(self) -> int:
        return len(REGISTRY)

    def __repr__(self) -> str:
        return f"METHODS({', '.join(self)})"


# The distillation recipes by their names in a config.
METHODS: Mapping[str, type[Recipe]] = _Methods()


def recipe_class(method: str) -> type[Recipe]:
    """The recipe class of a method name of a config."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    return METHODS[method]


def build_recipe(method: str, config, models: RecipeModels) -> Recipe:
    """The stage-II recipe of ``method``, its settings from ``config`` (a :class:`fastted.train.config.Config`)."""
    return recipe_class(method).from_config(config, models)


__all__ = [
    "CoDIR",
    "DWT",
    "FineTune",
    "KD",
    "LWD",
    "METHODS",
    "RAILKD",
    "Recipe",
    "RecipeModels",
    "RecipeOutput",
    "Schedule",
    "TED",
    "TEDStage1",
    "build_recipe",
    "load_stage1",
    "recipe_class",
    "remap_parameters",
]
