"""The ops' declarations (``KERNEL_OP``, :mod:`fastted.ops.registry`) are complete, and the tools list no op.

The compile tier, its tests and the GPU check read the registry only: an op
that forgets to declare itself would silently go uncompiled and unchecked,
and a tool that names an op again would be a second list to forget.
"""

import importlib
import importlib.util
from pathlib import Path

import pytest
import torch

import fastted.kernels
from fastted.kernels import runtime
from fastted.ops.registry import RegistryError, kernel_op, kernel_ops

ROOT = Path(__file__).resolve().parents[2]
# The files that read the registry instead of listing the ops.
TOOLS = ["kernels/resources.py", "benchmarks/gpu_check.py", "tests/kernels/test_compile_tier.py"]


def _kernel_modules() -> dict:
    """{name: module} of every module of fastted.kernels that launches a kernel (through runtime.launch)."""
    names = sorted({p.stem for folder in fastted.kernels.__path__ for p in Path(folder).glob("*.py")} - {"__init__"})
    modules = {name: importlib.import_module(f"fastted.kernels.{name}") for name in names if name != "runtime"}
    return {name: m for name, m in modules.items() if getattr(m, "launch", None) is runtime.launch}


def _defined_kernels(module) -> set[str]:
    """The @triton.jit kernels a kernel module defines (by the project's naming: ``*_kernel``)."""
    return {name for name in vars(module) if name.endswith("_kernel") and not name.startswith("_")}


def test_every_kernel_module_is_declared_by_its_op():
    """Each kernel module with a launcher has an op of its name that compiles its every kernel."""
    modules = _kernel_modules()
    assert modules, "no kernel module found"
    owners = {op.name: op for op in kernel_ops() if op.compile is not None}
    assert set(modules) == set(owners), (
        f"kernel modules {sorted(modules)}, ops declaring a compile tier {sorted(owners)}"
    )
    for name, module in modules.items():
        assert set(owners[name].compile.kernels) == _defined_kernels(module), name


@pytest.mark.parametrize("op", [op.name for op in kernel_ops()])
def test_every_op_declares_its_cases_and_floors(op):
    """Compile-tier cases (its own, or those of the op whose kernels it runs), GPU-check cases (its own, or
    those of the op that checks the same kernels), a floor (GEMMs or bytes), its tests by its name."""
    declared = kernel_op(op)
    tier = declared.compile if declared.runs is None else kernel_op(declared.runs).compile
    assert tier is not None, f"{op}: no compile-tier cases (runs {declared.runs})"
    case, run = next(iter(tier.cases(False)))
    assert isinstance(case, dict) and case["size"] and callable(run)
    assert importlib.util.find_spec(declared.tests) is not None, f"{op}: no {declared.tests}"
    gpu = declared.gpu
    checks = gpu.cases if gpu.covered_by is None else kernel_op(gpu.covered_by).gpu.cases
    assert checks is not None, f"{op}: no GPU-check cases"
    owner = op if gpu.covered_by is None else gpu.covered_by
    cases = checks(importlib.import_module(kernel_op(owner).tests), torch.bfloat16, "triton", False)
    assert cases and all(isinstance(label, dict) and callable(fn) for label, fn in cases)
    assert (gpu.gemms is None) != (gpu.min_bytes is None), f"{op}: one floor, GEMMs or bytes"


def test_the_registry_is_found_by_name():
    """Ops in module order, each under its file's name; an unknown name is a named error."""
    names = [op.name for op in kernel_ops()]
    assert names == sorted(names) and len(set(names)) == len(names)
    assert {
        "logit_kd",
        "fused_linear_kd",
        "sparse_logit_kd",
        "filtered_mse",
        "contrastive_kd",
        "pooling",
        "pooled_distance",
    } <= set(names)
    with pytest.raises(RegistryError, match="no kernel op 'nope'.*logit_kd"):
        kernel_op("nope")


@pytest.mark.parametrize("tool", TOOLS)
def test_the_tools_name_no_op(tool):
    """The compile tier, its tests and the GPU check read the registry: none of them names an op."""
    text = (ROOT / tool).read_text()
    names = {op.name for op in kernel_ops()} | {op.gpu.name for op in kernel_ops()}
    named = sorted(name for name in names if name in text)
    assert not named, f"{tool} names {named}: read them from fastted.ops.registry"
