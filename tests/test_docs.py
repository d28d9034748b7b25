"""The documentation: the site builds with ``mkdocs build --strict``, every ```python block of README.md and
docs/**/*.md runs, every result file the pages cite is committed, the configs page lists every method's settings
(``distil.<method>``, from the registry) with their defaults and every old key, and no page writes an old key
(``steps`` for ``jobs`` among them).

A block runs as it is, in a fresh interpreter whose working folder is a new temporary one, with the checkout
first on ``sys.path`` and the Triton interpreter off (a user's CPU run takes the PyTorch paths). A block that
cannot run is not tagged ``python`` (``text``, ``bash``), or, rarely, carries ``<!-- not run: <reason> -->`` on
the line before its fence, which skips it here with that reason. A block that imports transformers or datasets
takes seconds to start and is marked slow.
"""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
NOT_RUN = re.compile(r"<!--\s*not run:\s*(.+?)\s*-->")
SLOW = re.compile(r"^\s*(import|from)\s+(transformers|datasets|trl)\b", re.M)
TIMEOUT_S = 240
LAUNCH_VARIABLES = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK"}
LAUNCH_VARIABLES |= {"CROSS_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE", "TORCHELASTIC_RUN_ID"}


def python_blocks():
    """(page, line of the fence, code, reason it is not run or None) for every ```python block."""
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").splitlines()
        i = 0
        while i < len(lines):
            if lines[i].strip() == "```python":
                fence = i
                before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
                reason = NOT_RUN.fullmatch(before)
                body = []
                i += 1
                while i < len(lines) and lines[i].strip() != "```":
                    body.append(lines[i])
                    i += 1
                assert i < len(lines), f"{page.relative_to(ROOT)}:{fence + 1}: a ```python block never closed"
                yield page, fence + 1, "\n".join(body) + "\n", reason.group(1) if reason else None
            i += 1


def _params():
    params = []
    for page, line, code, reason in python_blocks():
        marks = [pytest.mark.skip(reason=f"not run: {reason}")] if reason else []
        if SLOW.search(code):
            marks.append(pytest.mark.slow)
        params.append(pytest.param(code, id=f"{page.relative_to(ROOT)}:{line}", marks=marks))
    return params


@pytest.mark.parametrize("code", _params())
def test_python_example_runs(code, tmp_path):
    # A new user's shell: no interpreter switch, and none of the launch variables that an earlier test's
    # DeepSpeed setup left in this process (with them, TrainingArguments sets up a process group).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and k not in LAUNCH_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TQDM_DISABLE="1")
    (tmp_path / "example.py").write_text(code)
    try:
        done = subprocess.run(
            [sys.executable, "example.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"the example ran past {TIMEOUT_S} s:\n{code}")
    assert done.returncode == 0, (
        f"the example failed (exit {done.returncode}):\n{code}\n--- stderr ---\n{done.stderr[-4000:]}"
    )


def test_examples_are_found():
    """The README's two examples and the docs' are collected (a renamed fence would silently run nothing)."""
    found = [(page.name, line) for page, line, _, _ in python_blocks()]
    assert sum(name == "README.md" for name, _ in found) >= 2, found
    assert len(found) >= 8, found


CITED = re.compile(r"benchmarks/results/[\w.\-]+\.json|(?<![\w./-])20\d\d-\d\d-\d\d-[\w.\-]+\.json")


def test_cited_result_files_exist():
    """Every result file README.md and the docs name (a path under benchmarks/results/, or a dated file name in
    a table of them) is committed, so each figure keeps its source."""
    missing = []
    for page in PAGES:
        for name in set(CITED.findall(page.read_text(encoding="utf-8"))):
            path = ROOT / (name if name.startswith("benchmarks/") else f"benchmarks/results/{name}")
            if "<" not in name and not path.is_file():
                missing.append(f"{page.relative_to(ROOT)}: {name}")
    assert not missing, "cited result files that are not in benchmarks/results/:\n" + "\n".join(missing)


@pytest.mark.slow
def test_site_builds_strict(tmp_path):
    needed = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")
    absent = [
        m
        for m in needed
        if importlib.util.find_spec(m.split(".")[0]) is None
        or (m == "mkdocstrings_handlers.python" and importlib.util.find_spec(m) is None)
    ]
    if absent:
        pytest.skip(f"the site needs {', '.join(absent)}: pip install mkdocs mkdocs-material mkdocstrings-python")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    assert (tmp_path / "site" / "index.html").is_file()


def _page(name):
    return (ROOT / "docs" / name).read_text(encoding="utf-8")


def test_compile_tier_figures_match_the_table():
    """The compile tier's variant count and time, as the page and the README state them, are the committed
    table's (benchmarks/results/compile-tier.json)."""
    import json

    table = json.loads((ROOT / "benchmarks" / "results" / "compile-tier.json").read_text())
    page = re.sub(r"\s+", " ", _page("compile-tier.md"))
    assert f"the committed table, {len(table['rows'])} variants, took {table['seconds']} s" in page
    readme = re.sub(r"\s+", " ", (ROOT / "README.md").read_text(encoding="utf-8"))
    assert f"({len(table['rows'])} kernel variants" in readme


def _reliability_counts():
    page = re.sub(r"\s+", " ", _page("reliability.md"))
    total = int(re.search(r"runs (\d+) cases", page).group(1))
    parts = [
        int(re.search(rf"(\d+) against {what}", page).group(1))
        for what in ("the Python API", "the command", "checkpoints")
    ]
    passed = int(re.search(r"All (\d+) pass", page).group(1))
    return total, parts, passed


def test_reliability_counts_add_up():
    """docs/reliability.md: the API, command and checkpoint cases sum to the total it states (330 = 188 + 117 + 25
    when written), and the README states the same total."""
    total, parts, passed = _reliability_counts()
    assert sum(parts) == total == passed, (total, parts, passed)
    readme = re.sub(r"\s+", " ", (ROOT / "README.md").read_text(encoding="utf-8"))
    assert f"the {total} `bad_input` cases" in readme


@pytest.mark.slow
def test_reliability_total_is_the_bad_input_marker():
    """The total docs/reliability.md states is the number of tests marked bad_input (collected, not run)."""
    total, _, _ = _reliability_counts()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "tests", "-m", "bad_input", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    found = re.search(r"(\d+)/\d+ tests collected", done.stdout) or re.search(r"(\d+) tests collected", done.stdout)
    assert found, done.stdout[-2000:] + done.stderr[-2000:]
    assert int(found.group(1)) == total, (
        f"{found.group(1)} tests are marked bad_input; docs/reliability.md says {total}"
    )


def test_lock_count_is_the_lock():
    """The number of pinned distributions docs/install.md gives is constraints.txt's."""
    lock = (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines()
    pins = [line for line in lock if "==" in line and not line.lstrip().startswith("#")]
    page = re.sub(r"\s+", " ", _page("install.md"))
    assert f"(all {len(pins)} in `constraints.txt`)" in page, f"constraints.txt pins {len(pins)}"


def _section(text, heading):
    """The text of a page from ``heading`` (a line of it) to the next heading of the same level."""
    start = text.index(heading + "\n")
    level = heading.split(" ")[0] + " "
    end = text.find("\n" + level, start + len(heading))
    return text[start : len(text) if end < 0 else end]


def _default(value):
    """A setting's default as the configs page's tables write it (YAML's spelling; numbers as Python's)."""
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if value is None:
        return "`null`"
    if isinstance(value, str):
        return f"`{value}`"
    return str(value)


def test_configs_page_lists_every_method_setting():
    """docs/configs.md's tables give every key of every method's section (distil.<method>, from the registry's
    settings dataclasses) with its default, and every old flat key with what replaced it."""
    import dataclasses

    from fastted.train.config import OLD_KEYS, RECIPES

    section = _section(_page("configs.md"), "## Each method's settings")
    missing = []
    for method, recipe in RECIPES.items():
        if f"`distil.{method}`" not in section:
            missing.append(f"the section distil.{method}")
        for f in dataclasses.fields(recipe.settings):
            row = f"| `{f.name}` | {_default(f.default)} |"
            if row not in section:
                missing.append(f"distil.{method}.{f.name}: no row starting {row!r}")
    old = _section(_page("configs.md"), "## Old keys")
    for key, new_keys in OLD_KEYS.items():
        rows = [line for line in old.splitlines() if line.startswith("|") and f"`distil.{key}`" in line]
        if not rows:
            missing.append(f"old key distil.{key}: no row")
        for new in new_keys:
            method, name = new.split(".")[1:]
            if name != key and not any(f"`{new}`" in line for line in rows):
                missing.append(f"old key distil.{key}: its row does not name {new}")
    assert not missing, "docs/configs.md:\n" + "\n".join(missing)


def test_pages_write_the_new_config_keys():
    """No page tells a user to write an old flat key (distil.mse_alpha), a method's own setting under
    distil.per_method, or the run's jobs under their old key ``steps`` (``steps=[distil]``, ``steps: [...]``, the
    key named `steps`), which load only with a deprecation line, except where it says so: the configs page's old
    keys, and a paragraph that says they still load. A step is the optimizer's (max_steps, ``steps=2`` of a
    Python example)."""
    from fastted.train.config import JOBS, OLD_KEYS, RECIPES, _renamed

    jobs = "|".join(sorted(JOBS, key=len, reverse=True))
    old = re.compile(
        r"distil\.(?:(" + "|".join(sorted(OLD_KEYS, key=len, reverse=True)) + r")\b(?![.\w])"
        r"|per_method\.(" + "|".join(RECIPES) + r")\.(\w+))"
        r"|(?<![\w.\-])steps(?:\s*[:=]\s*\[?\s*(?:" + jobs + r")\b|`)"
    )
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        if page.name == "configs.md":
            text = text.replace(_section(text, "## Old keys"), "")
        for paragraph in re.split(r"\n\s*\n", text):
            if "still load" in paragraph:
                continue
            for match in old.finditer(paragraph):
                method, key = match.group(2), match.group(3)
                if method and _renamed(f"distil.per_method.{method}.{key}") is None:  # a shared key of one method
                    continue
                found.append(f"{page.relative_to(ROOT)}: {match.group(0)}")
    assert not found, "old config keys (write distil.<method>.<key>, and jobs for steps):\n" + "\n".join(found)


def test_yaml_examples_load_without_old_keys(tmp_path):
    """Every ```yaml block of the pages is a config that loads, and sets no old key (``steps:`` among them)."""
    import warnings

    from fastted.train.config import ConfigKeyWarning, load_config

    blocks = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        blocks += [(page, block) for block in re.findall(r"^```yaml\n(.*?)^```", text, re.M | re.S)]
    assert blocks, "no ```yaml block found"
    for i, (page, block) in enumerate(blocks):
        path = tmp_path / f"example-{i}.yaml"
        path.write_text(block, encoding="utf-8")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", ConfigKeyWarning)
                load_config(str(path))
        except ConfigKeyWarning as warning:
            pytest.fail(f"{page.relative_to(ROOT)}: a yaml example sets an old key: {warning}")
