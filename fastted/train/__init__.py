"""The engine: the `fastted` command and what it runs (configs, data, models from a config, DeepSpeed, the loop,
checkpoints, the teacher cache, reports).

The library (:mod:`fastted`: the fused losses, the recipes, the integrations) never imports this package; it
needs the ``train`` extra (``pip install "fastted[train]"``), which is checked here, by name, before any of
its modules is imported.
"""

from fastted.extras import TRAIN, missing

_missing = missing(TRAIN)
if _missing:
    raise ImportError(
        f"fastted.train (the engine and the `fastted` command) needs {', '.join(_missing)}, which "
        f'{"is" if len(_missing) == 1 else "are"} not installed: pip install "fastted[train]" '
        f"(the library alone, `import fastted`, needs none of them)"
    )
