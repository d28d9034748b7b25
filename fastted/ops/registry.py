"""What each kernel op says about itself, found by its file name: the one list of ops the tools read.

An op's module ``fastted/ops/<op>.py`` ends with ``KERNEL_OP = KernelOp(...)``:
the compile tier's cases of its kernels (the launches the launchers make on
meta tensors, which ``fastted.kernels.resources`` compiles for sm_80 and
sm_90, and what the op expects of the compiled rows), and the GPU check's
cases (its tests' checks in low precision, its benchmark and the floor its
timings are set against: the GEMMs it runs, or the bytes it must move).
:func:`kernel_ops` imports every module of ``fastted.ops`` and collects the
declarations, so that ``kernels/resources.py``, the compile tier's tests and
``benchmarks/gpu_check.py`` list no op by hand: a new kernel op is its
kernel, its op module (with its declaration), its spec, its export in
``fastted/__init__.py``, its tests and its benchmark.

The declarations hold functions, not data, where a case needs code; they
import Triton, the compile tier, the tests and the benchmarks only when
called, so that importing an op stays light and the library needs neither
tests nor benchmarks.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
from collections.abc import Callable, Iterable
from typing import Optional


@dataclasses.dataclass(frozen=True)
class CompileTier:
    """The compile tier's view of an op's kernels (``kernels/<op>.py``)."""

    # the @triton.jit kernels its launchers launch: the tier's rows are named by them
    kernels: tuple[str, ...]
    # full -> (case, run) pairs: run() calls a launcher on meta tensors inside fastted.kernels.recording; case is
    # the table's label of it (op, size, dtype, flags; ``configs="first"``: only the first autotune config). full:
    # every flag combination, else a covering set (fastted.kernels.resources.flag_sets).
    cases: Callable[[bool], Iterable[tuple[dict, Callable[[], object]]]]
    # rows -> problems: what the op expects of its compiled variants beyond the tier's own checks (an autotune
    # config of every dtype compiled, 128-bit loads where rows are aligned), rows: one arch's rows of its kernels
    expectations: Optional[Callable[[list[dict], str], list[str]]] = None


@dataclasses.dataclass(frozen=True)
class GpuCheck:
    """The GPU check's view of an op (``benchmarks/gpu_check.py``): correctness, benchmark, floor.

    Each function takes the op's tests or benchmark module (``tests.ops.test_<op>``, ``benchmarks.test_<op>``),
    imported by the check, so that the op never imports them.
    """

    # the sections' name: correctness:<name>, bench:<name> (the function the op exports where it differs)
    name: str
    # (tests module, dtype, impl, cuda) -> [(label, check)]: the tests' own checks (at a realistic shape too on
    # a GPU); None where another op's cases check the same kernels (``covered_by``)
    cases: Optional[Callable] = None
    covered_by: Optional[str] = None
    # benchmark module -> [extra keyword arguments of its make_case]: the variants benchmarked at each size
    variants: Callable = lambda bench: [{}]
    # the floor of a GEMM-bound op: size -> [(m, k, n)], the GEMMs of one full training step
    gemms: Optional[Callable[[dict], list[tuple[int, int, int]]]] = None
    # the floor of a memory-bound op: (size, variant) -> the bytes a full step must move at least
    min_bytes: Optional[Callable[[dict, dict], int]] = None
    # variant -> the Liger-Kernel implementations the benchmark also times where liger_kernel is installed
    liger: Optional[Callable[[dict], list[str]]] = None
    # (tests module, smoke, cuda) -> [(label, check)]: the first call of each autotuned kernel
    autotune: Optional[Callable] = None
    # the block sweep of a blocked op: (benchmark size on a GPU, on a CPU, variant of make_case)
    blocks: Optional[tuple[str, str, dict]] = None


@dataclasses.dataclass(frozen=True)
class KernelOp:
    """One op's declaration: ``KERNEL_OP`` of ``fastted/ops/<name>.py``."""

    name: str
    # its kernels' compile tier, or None for an op that runs another op's kernels (``runs``)
    compile: Optional[CompileTier]
    gpu: GpuCheck
    # the op whose kernel module (kernels/<runs>.py) and compile-tier cases cover this op's launches
    runs: Optional[str] = None

    @property
    def kernel_module(self) -> str:
        """The module of ``kernels/`` whose launchers it calls."""
        return self.runs or self.name

    @property
    def tests(self) -> str:
        return f"tests.ops.test_{self.name}"

    @property
    def benchmark(self) -> str:
        return f"benchmarks.test_{self.name}"


class RegistryError(ValueError):
    """A declaration that names what does not exist, or two ops of one name."""


@functools.cache
def kernel_ops() -> tuple[KernelOp, ...]:
    """Every op of ``fastted.ops`` that declares ``KERNEL_OP``, by module name (the tools' order)."""
    import fastted.ops

    ops = []
    for info in sorted(pkgutil.iter_modules(fastted.ops.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"fastted.ops.{info.name}")
        op = getattr(module, "KERNEL_OP", None)
        if op is None:
            continue
        if op.name != info.name:
            raise RegistryError(
                f"fastted/ops/{info.name}.py declares KERNEL_OP named {op.name!r}: an op's "
                f"declaration carries its file's name"
            )
        ops.append(op)
    names = {op.name for op in ops}
    for op in ops:
        if op.runs is not None and op.runs not in names:
            raise RegistryError(f"{op.name} runs the kernels of {op.runs!r}, which declares no KERNEL_OP")
        if op.gpu.covered_by is not None and op.gpu.covered_by not in names:
            raise RegistryError(
                f"{op.name}'s GPU check is covered by {op.gpu.covered_by!r}, which declares no KERNEL_OP"
            )
    return tuple(ops)


def kernel_op(name: str) -> KernelOp:
    """The declaration of op ``name``; a RegistryError naming the declared ones for another name."""
    for op in kernel_ops():
        if op.name == name:
            return op
    raise RegistryError(f"no kernel op {name!r}; declared: {[op.name for op in kernel_ops()]}")


def compiled_ops() -> list[KernelOp]:
    """The ops with kernels of their own: what the compile tier records, in order."""
    return [op for op in kernel_ops() if op.compile is not None]


def tier_kernels() -> list[str]:
    """Every @triton.jit kernel the compile tier must find rows of."""
    return [kernel for op in compiled_ops() for kernel in op.compile.kernels]
