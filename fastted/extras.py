"""What the optional parts of fastted need, by import name and distribution: one list, read by the engine's import
check (:mod:`fastted.train`), the import tests and the wheel check. Importing this module imports none of them.

setup.py's extras name the same distributions; tests/test_imports.py checks that they agree, and that
``.importlinter`` forbids the library every module of :data:`ENGINE_ONLY`.
"""

from __future__ import annotations

import importlib.util

# The hf extra: fastted.integrations and the recipes over Hugging Face models (import name -> distribution).
HF = {"transformers": "transformers"}
# What only the engine imports: the library never does, and importing fastted or running a loss loads none of them.
ENGINE_ONLY = {
    "datasets": "datasets",
    "deepspeed": "deepspeed",
    "yaml": "pyyaml",
    "matplotlib": "matplotlib",
    "gguf": "gguf",
    "accelerate": "accelerate",
}
# The train extra: all the engine needs (tqdm too, which torch may load whatever the library does).
TRAIN = {**HF, **ENGINE_ONLY, "tqdm": "tqdm"}


def missing(extra: dict[str, str]) -> list[str]:
    """The distributions of ``extra`` (one of the dicts above) whose modules cannot be found, in its order."""
    return [dist for module, dist in extra.items() if importlib.util.find_spec(module) is None]
