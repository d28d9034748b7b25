"""The repository's top-level folders never shadow an installed distribution of the same name.

Run from the repository root (``python -m fastted``, pytest, ``python -c``),
the current directory comes first on ``sys.path``: a regular package there
wins over site-packages. transformers 5.25 imports the PyPI distribution
``kernels``, and the project's ``kernels/`` folder, once a regular package,
broke both README commands. The folders a distribution could be named after
are therefore namespace portions (no ``__init__.py``), which Python takes only
when no regular package of the name exists anywhere on the path.

``tests/`` and ``benchmarks/`` stay regular packages: pytest imports their
modules by package (``tests.ops.test_logit_kd`` and ``benchmarks.test_logit_kd``
share a file name). They shadow nothing as long as no installed distribution
ships a top-level module of those names, which the last test checks.
"""

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE_FOLDERS = ["kernels", "scripts", "configs"]
PACKAGE_FOLDERS = ["tests", "benchmarks"]


def _resolve_from_root(name: str, extra_path: Path | None = None) -> str:
    """Where ``import name`` lands in a fresh interpreter started in the repository root (``python -c`` puts
    the current directory first on sys.path, as ``python -m`` and pytest do); ``extra_path`` comes after it."""
    env = dict(os.environ)
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in [str(extra_path), env.get("PYTHONPATH", "")] if p)
    code = f"import sys, {name}; sys.stdout.write(getattr({name}, '__file__', None) or repr(list({name}.__path__)))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"import {name} from {ROOT} failed:\n{done.stderr[-2000:]}"
    return done.stdout


def test_every_top_level_folder_is_classified():
    """A new top-level Python folder must be placed in one of the two lists (and so be checked below)."""
    folders = {
        p.name
        for p in ROOT.iterdir()
        if p.is_dir() and not p.name.startswith(".") and (any(p.glob("*.py")) or (p / "__init__.py").exists())
    }
    folders -= {"fastted", "build", "dist"}
    assert folders <= set(NAMESPACE_FOLDERS + PACKAGE_FOLDERS), sorted(folders)


@pytest.mark.parametrize("name", NAMESPACE_FOLDERS)
def test_folder_is_no_regular_package(name):
    assert not (ROOT / name / "__init__.py").exists(), (
        f"{name}/__init__.py makes {name}/ a regular package that shadows an installed distribution "
        f"'{name}' whenever the repository root is on sys.path"
    )


@pytest.mark.parametrize("name", NAMESPACE_FOLDERS)
def test_an_installed_distribution_wins_over_the_folder(name, tmp_path):
    """A stand-in distribution (a regular package on the path after the root) is what ``import`` finds."""
    site = tmp_path / "site-packages"
    (site / name).mkdir(parents=True)
    (site / name / "__init__.py").write_text("STAND_IN = True\n")
    landed = _resolve_from_root(name, extra_path=site)
    assert landed == str(site / name / "__init__.py"), f"import {name} from the repository root landed in {landed}"


def test_the_installed_kernels_distribution_wins():
    """The real case: with Hugging Face's ``kernels`` installed, it is what the root imports, and
    transformers' import of it (the one that broke the README's commands) succeeds."""
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the kernels distribution is not installed here (transformers before 5.25 does not need it)")
    landed = _resolve_from_root("kernels")
    assert Path(landed).resolve() == Path(dist.locate_file("kernels/__init__.py")).resolve(), landed
    assert not Path(landed).resolve().is_relative_to(ROOT / "kernels"), landed  # (a venv may live in the clone)
    env = dict(os.environ)
    done = subprocess.run(
        [sys.executable, "-c", "import transformers.activations, fastted.kernels"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_fastted_kernels_reaches_the_folder():
    """``fastted.kernels`` is the one name of the folder: its modules and the shared launch machinery."""
    import fastted.kernels
    from fastted.kernels import filtered_mse, runtime

    assert fastted.kernels.launch is runtime.launch
    assert Path(filtered_mse.__file__).name == "filtered_mse.py"
    if "kernels" in sys.modules:  # whatever imported it (transformers) got the distribution, not the folder
        assert (
            not Path(getattr(sys.modules["kernels"], "__file__", None) or "/")
            .resolve()
            .is_relative_to(ROOT / "kernels")
        )


@pytest.mark.parametrize("name", PACKAGE_FOLDERS)
def test_no_installed_distribution_ships_a_package_folder_name(name):
    """``tests`` and ``benchmarks`` are packages pytest needs; no installed distribution may own the name."""
    owners = []
    for dist in importlib.metadata.distributions():
        if Path(dist.locate_file("")).resolve() == ROOT:  # this project's own egg-info of an in-tree build
            continue
        for file in dist.files or []:
            parts = Path(file).parts
            if parts and (parts[0] == name or parts[0] == f"{name}.py") and not parts[0].endswith(".dist-info"):
                owners.append(dist.metadata["Name"])
                break
    assert not owners, f"installed distributions {owners} ship a top-level '{name}' that the repository's would shadow"
