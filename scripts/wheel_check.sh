#!/usr/bin/env bash
# A wheel that works outside the repository (make wheel-check; .ci/run): the sdist built from the clone,
# the wheel built from the sdist (so the sdist must carry everything), LICENSE checked in both, the wheel
# installed with its core dependencies alone (torch, triton, numpy, safetensors) at the tested versions into a new
# virtual environment, and used from a directory outside the clone: imports, one loss of each family on the CPU
# path and under Triton's interpreter, none of the engine's dependencies installed or imported, and the engine's
# named refusal; then the `train` extra added, `fastted --help` and `fastted config`.
#   PYTHON   an interpreter with the `build` package (the dev extra has it), default python3
set -euo pipefail
PYTHON="${PYTHON:-python3}"
cd "$(dirname "$0")/.."
root=$PWD
work=$(mktemp -d /tmp/fastted-wheel-check.XXXXXX)
trap 'rm -rf "$work"' EXIT

"$PYTHON" -m build --outdir "$work/dist" . > "$work/build.log" 2>&1 || { tail -40 "$work/build.log"; exit 1; }
wheel=$(ls "$work"/dist/fastted-*.whl)
sdist=$(ls "$work"/dist/fastted-*.tar.gz)
"$PYTHON" - "$wheel" "$sdist" <<'PY'
import sys, tarfile, zipfile
wheel, sdist = sys.argv[1:]
names = zipfile.ZipFile(wheel).namelist()
assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names), names
kernels = sorted(n for n in names if n.startswith("fastted/kernels/"))
for module in ("__init__.py", "runtime.py", "filtered_mse.py", "logit_kd.py", "contrastive_kd.py", "resources.py"):
    assert f"fastted/kernels/{module}" in kernels, (module, kernels)
assert not any(n.startswith(("kernels/", "tests/", "benchmarks/")) for n in names), "top-level folders in the wheel"
members = tarfile.open(sdist).getnames()
assert any(m.endswith("/LICENSE") and m.count("/") == 1 for m in members), "no LICENSE in the sdist"
print(f"wheel: {len(names)} files, LICENSE in the wheel and the sdist, fastted/kernels/: {len(kernels)} files")
PY

python=$(bash scripts/new_env.sh "$work/venv")
grep -viE '^(torch|fastted)==' constraints.txt > "$work/constraints.txt"
"$python" -m pip install "$(grep -E '^torch==' constraints.txt)" > "$work/install.log" 2>&1 &&
    "$python" -m pip install -c "$work/constraints.txt" "$wheel" >> "$work/install.log" 2>&1 ||
    { tail -40 "$work/install.log"; exit 1; }

mkdir -p "$work/outside"
cp scripts/wheel_check.py "$work/outside/"
cd "$work/outside"
case "$PWD" in "$root"*) echo "wheel-check: $PWD is inside the clone"; exit 1;; esac
"$python" wheel_check.py
"$python" -W "ignore::RuntimeWarning" wheel_check.py --interpret  # the interpreter's masked-away -inf arithmetic
# The core install: the engine refuses by name (and what to install) rather than with a ModuleNotFoundError.
if "$work/venv/bin/fastted" --help > refusal.txt 2>&1; then echo "wheel-check: fastted ran without the train extra"; exit 1; fi
grep -q 'pip install "fastted\[train\]"' refusal.txt || { cat refusal.txt; exit 1; }
echo "wheel-check: the core install ran the losses; the engine asked for fastted[train]"
"$python" -m pip install -c "$work/constraints.txt" "$wheel[train]" >> "$work/install.log" 2>&1 ||
    { tail -40 "$work/install.log"; exit 1; }
"$work/venv/bin/fastted" --help | grep -q "cache-teacher"
"$work/venv/bin/fastted" config > config.yaml
grep -q "^distil:" config.yaml
echo "wheel-check: passed (fastted --help, fastted config, the losses, outside the clone in $work/outside)"
