#!/usr/bin/env bash
# The newest releases, checked on demand (make check-latest): a fresh environment of the newest versions
# setup.py admits (torch stays the locked CPU build on a machine without a GPU: a newer one from PyPI is a
# CUDA build of several GB), then the smoke subset in it. Prints the versions it ran and the times.
# When it passes, `make lock PYTHON=.ci/venv-latest/bin/python` moves the lock forward (then run make test).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${FASTTED_LATEST_VENV:-.ci/venv-latest}"
start=$SECONDS
python=$(bash scripts/new_env.sh "$venv")
FASTTED_LATEST=1 PYTHON="$python" bash scripts/install.sh
installed=$SECONDS
"$python" - <<'PY'
import importlib.metadata as md
names = ["torch", "triton", "transformers", "kernels", "tokenizers", "huggingface_hub", "datasets", "deepspeed",
         "accelerate", "trl", "liger_kernel", "numpy", "pytest", "pytest-benchmark"]
print("check-latest: versions " + ", ".join(f"{n} {md.version(n)}" for n in names))
PY
make smoke PYTHON="$python"
echo "check-latest: passed; install $((installed - start)) s, smoke subset $((SECONDS - installed)) s"
