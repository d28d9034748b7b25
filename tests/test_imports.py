"""The library and the engine are two rooms: the import contract of `.importlinter`, the kernels' own imports, and
what importing fastted and running its losses loads.

The wheel check (scripts/wheel_check.sh, in .ci/run) also runs the losses in an environment that holds only the
core dependencies, where importing the engine's would fail.
"""

import ast
import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fastted import extras

ROOT = Path(__file__).resolve().parents[1]
# What importing fastted and running its losses must never load.
ENGINE_DEPENDENCIES = (*extras.ENGINE_ONLY, "fastted.train")


@pytest.fixture(scope="module")
def lint() -> str:
    """The `lint-imports` command of this interpreter's environment (import-linter, the dev extra)."""
    beside = Path(sys.executable).parent / "lint-imports"  # this environment's, before any other on PATH
    found = str(beside) if beside.exists() else shutil.which("lint-imports") or str(beside)
    if not Path(found).exists():
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    return found


def test_the_import_contract_holds(lint):
    """`lint-imports` over `.importlinter`: the library never imports the engine or its dependencies, the ops no
    recipe, the recipes no integration."""
    done = subprocess.run([lint], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout, done.stdout[-2000:]


def test_the_contract_catches_a_library_module_that_imports_the_engine(lint, tmp_path):
    """The contract is not vacuous: a copy of the package where fastted.mapping imports the engine breaks it."""
    shutil.copytree(ROOT / "fastted", tmp_path / "fastted", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".importlinter", tmp_path / ".importlinter")
    with open(tmp_path / "fastted" / "mapping.py", "a") as f:
        f.write("\nimport fastted.train.cache\n")
    env = {"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(tmp_path)}
    done = subprocess.run([lint], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode != 0 and "BROKEN" in done.stdout, done.stdout[-3000:] + done.stderr[-2000:]


def test_one_list_of_dependencies_agrees_with_setup_and_the_contract():
    """fastted.extras is the one list: setup.py's hf and train extras name its distributions, and `.importlinter`
    forbids the library every module only the engine imports."""
    setup = (ROOT / "setup.py").read_text()

    def extra(name: str) -> set[str]:
        body = re.search(rf'"{name}": \[(.*?)\]', setup, re.S).group(1)
        return {re.match(r"[A-Za-z0-9_.-]+", req).group(0) for req in re.findall(r'"([^"]+)"', body)}

    assert extra("hf") == set(extras.HF.values())
    assert extra("train") == set(extras.TRAIN.values())
    contract = configparser.ConfigParser()
    contract.read(ROOT / ".importlinter")
    forbidden = contract["importlinter:contract:library-never-imports-the-engine"]["forbidden_modules"].split()
    assert set(extras.ENGINE_ONLY) | {"fastted.train"} == set(forbidden)


def _fastted_imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return [n for n in names if n == "fastted" or n.startswith("fastted.")]


# resources.py is the compile tier's tool, not a kernel: it reads the cases each op declares (fastted.ops.registry).
KERNEL_MODULES = sorted(p for p in (ROOT / "kernels").glob("*.py") if p.name != "resources.py")


@pytest.mark.parametrize("path", KERNEL_MODULES, ids=lambda p: p.name)
def test_a_kernel_module_imports_only_kernels(path):
    """kernels/ lies outside the package in a source checkout, where import-linter cannot follow it: its modules
    import nothing of fastted but fastted.kernels."""
    above = [n for n in _fastted_imports(path) if not n.startswith("fastted.kernels")]
    assert not above, f"{path.name} imports {above}: a kernel imports only fastted.kernels"


def test_importing_fastted_and_its_losses_loads_no_engine_dependency():
    """In a fresh interpreter: import fastted, run each loss family forward and backward, import the
    integrations; none of the engine's dependencies is loaded."""
    code = f"""
import sys, torch, fastted
g = torch.Generator().manual_seed(7)
s = torch.randn(6, 33, generator=g, requires_grad=True)
t = torch.randn(6, 33, generator=g)
fastted.logit_kd(s, t, temperature=2.0).backward()
w = torch.randn(8, 33, generator=g, requires_grad=True)
fastted.filtered_mse([s], [w], [t], teacher_weights=[torch.randn(8, 33, generator=g)]).backward()
fastted.contrastive_kd(s, t, torch.randn(10, 33, generator=g)).backward()
import fastted.integrations, fastted.methods, fastted.layerwise
print(sorted(m for m in {ENGINE_DEPENDENCIES!r} if m in sys.modules))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout


def test_the_engine_names_its_missing_dependencies(tmp_path):
    """Without the train extra, importing fastted.train says what to install (checked here by hiding yaml)."""
    (tmp_path / "sitecustomize.py").write_text(
        "import importlib.util\n_find = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *a, **k: None if name == 'yaml' else _find(name, *a, **k)\n"
    )
    env = {"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": str(Path(sys.executable).parent)}
    done = subprocess.run(
        [sys.executable, "-c", "import fastted.train"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode != 0
    assert "pyyaml" in done.stderr and 'pip install "fastted[train]"' in done.stderr, done.stderr[-2000:]
