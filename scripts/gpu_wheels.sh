#!/usr/bin/env bash
# The wheels to carry to the GPU machine for benchmarks/gpu_check.py, built for its Python 3.12 into one
# folder (default build/gpu-wheels: git ignores it, so it travels to that machine only when named among
# the paths carried there).
#
# That machine reaches no package index. Its image's python3 has torch, triton, transformers (with its
# own requirements), numpy, pytest and pytest-benchmark; it has no deepspeed, datasets or setuptools.
# The check needs none of the three: it runs from the checkout without installing fastted (the repository
# root on sys.path, fastted.kernels read from kernels/), and imports nothing of the engine. So nothing
# here is required; each wheel adds one thing:
#   liger-kernel 0.8.5  Liger-Kernel's fused-linear losses as the fused LM head's baseline in
#                       bench:fused_linear_kd (pure Python; needs only torch and triton)
#   setuptools 84.2.1   `pip install --no-deps --no-build-isolation -e .`, for a run that wants fastted
#                       installed (the check does not)
#
#   scripts/gpu_wheels.sh [folder]                   # here, where an index is reachable
#   python3 -m pip install --no-index --no-deps build/gpu-wheels/*.whl   # there, before the check
#                       (--user or --break-system-packages if that python3 is externally managed)
#   python3 benchmarks/gpu_check.py
set -euo pipefail

out="${1:-build/gpu-wheels}"
mkdir -p "$out"
# Pure-Python wheels, taken as published for Python 3.12 (--no-deps: their requirements are on that machine).
python3 -m pip download --no-deps --only-binary :all: --python-version 3.12 --dest "$out" \
    liger-kernel==0.8.5 setuptools==84.2.1
ls -l "$out"
