"""fastted's Triton kernels: the modules of the repository's top-level ``kernels/`` folder.

``kernels/`` is deliberately not a Python package of its own (it has no
``__init__.py``): run from the repository root, where the current directory
is on ``sys.path`` (``python -m fastted``, pytest, a user's ``python -c``),
a regular package named ``kernels`` there would shadow the PyPI distribution
``kernels``, which transformers imports. A folder without ``__init__.py`` is
only a namespace portion, and Python prefers any regular package of that name.

So the folder is reachable under one name only, this package's: a wheel
copies its modules here (``setup.py``'s ``build_py``); in a source checkout
(an editable install, or the tree on ``sys.path``) this package's search path
reaches into it instead.
"""

from pathlib import Path

if not (Path(__file__).parent / "runtime.py").exists():  # a source checkout: the modules live in ../../kernels
    __path__.append(str(Path(__file__).resolve().parents[2] / "kernels"))

from fastted.kernels.runtime import (  # noqa: E402  (the search path first)
    ARCHS,
    MAX_GRID,
    Arch,
    Launch,
    aligned_row_stride,
    device_arch,
    element_offsets,
    interpreting,
    launch,
    recording,
)

__all__ = [
    "ARCHS",
    "MAX_GRID",
    "Arch",
    "Launch",
    "aligned_row_stride",
    "device_arch",
    "element_offsets",
    "interpreting",
    "launch",
    "recording",
]
