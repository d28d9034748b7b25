"""The launch machinery every kernel module of fastted shares (re-exported as ``fastted.kernels``).

Each kernel module holds the ``@triton.jit`` kernels of one op and their
launchers, under the op's name: ``kernels/<op>.py`` beside ``fastted/ops/<op>.py``,
which holds the op's checks, PyTorch path, autograd Function and public API
(``fused_linear_kd`` runs the row kernel of ``logit_kd.py``, ``pooled_distance``
the kernels of ``pooling.py``). This module imports no Triton; an op imports
its kernel module the first time a Triton path is taken, so importing fastted
never touches CUDA and never compiles a kernel.

Every launcher launches through :func:`launch` and sizes its blocks with the
:class:`Arch` of :func:`device_arch`: inside :func:`recording`, the launches
are recorded instead of run and the architecture is the one recorded for, so
the compile tier (``fastted.kernels.resources``) compiles exactly what the
launchers pick, for a GPU this machine does not have.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import os

import torch


@dataclasses.dataclass(frozen=True)
class Arch:
    """What a launcher must respect on one GPU architecture (CUDA's limits per compute capability)."""

    name: str  # "sm_80"
    capability: int  # 80
    gpus: str  # the GPUs it stands for, for tables
    shared_per_block: int  # bytes of shared memory one block may opt in to
    shared_per_sm: int  # bytes of shared memory of one SM
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    max_threads_per_sm: int = 2048
    max_blocks_per_sm: int = 32
    # Dense bf16 tensor-core FLOP per byte of HBM bandwidth (A100: 312 TFLOP/s over 2.0 TB/s; H100 SXM:
    # 989 over 3.35): how many rows a GEMM must share a weight read among to stay compute-bound.
    flops_per_byte: int = 256


ARCHS = {
    "sm_80": Arch("sm_80", 80, "A100", shared_per_block=166_912, shared_per_sm=167_936, flops_per_byte=156),
    "sm_90": Arch("sm_90", 90, "H100/H200", shared_per_block=232_448, shared_per_sm=233_472, flops_per_byte=295),
}
# CUDA's grid limits: x up to 2^31 - 1 blocks, y and z up to 65,535.
MAX_GRID = (2**31 - 1, 65535, 65535)


@dataclasses.dataclass
class Launch:
    """One recorded launch: the kernel object (JITFunction, Heuristics or Autotuner), its grid and arguments."""

    kernel: object
    grid: object  # a tuple, or a function of the launch's meta-parameters (autotuned kernels)
    args: tuple
    kwargs: dict


_RECORDING: contextvars.ContextVar = contextvars.ContextVar("fastted_kernels_recording", default=None)


@contextlib.contextmanager
def recording(arch: Arch):
    """Record the launches made inside (a list, yielded) instead of running them, sizing blocks for ``arch``.

    The launchers run on meta tensors here: they allocate nothing and
    launch nothing, and every choice they make is the one they would make on
    a GPU of that architecture.
    """
    launches: list[Launch] = []
    token = _RECORDING.set((arch, launches))
    try:
        yield launches
    finally:
        _RECORDING.reset(token)


def launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, or its record inside :func:`recording`."""
    active = _RECORDING.get()
    if active is not None:
        active[1].append(Launch(kernel, grid, args, kwargs))
        return
    if interpreting():
        _interpreter_index_fix()
    kernel[grid](*args, **kwargs)


@functools.cache
def _interpreter_index_fix() -> None:
    """Triton's interpreter before 3.7 converts a scalar tensor to a Python int (what ``range`` asks of a
    loop bound: ``for k in range(0, tl.cdiv(K, BLOCK_K))``) with ``int()`` of its one-element array, which
    numpy 2.4 refuses (only 0-dimensional arrays convert): every loop bounded by a kernel argument or a
    loaded value fails under TRITON_INTERPRET=1. This gives the interpreter 3.7's conversion (of the
    squeezed array); it changes nothing that is compiled, and nothing on Triton 3.7 or later."""
    import triton
    from triton.runtime import interpreter

    if tuple(int(part) for part in triton.__version__.split(".")[:2]) >= (3, 7):
        return
    patch_tensor = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patched


def interpreting() -> bool:
    """True when Triton's interpreter runs the kernels (TRITON_INTERPRET=1): on the CPU, in tests.

    Never inside :func:`recording`, which stands for a GPU.
    """
    if _RECORDING.get() is not None:
        return False
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _cuda_arch(index: int) -> Arch:
    props = torch.cuda.get_device_properties(index)
    # Triton's driver reports the opt-in per-block limit, which torch does not expose.
    from triton.runtime import driver

    shared = driver.active.utils.get_device_properties(index)["max_shared_mem"]
    return Arch(
        f"sm_{props.major}{props.minor}",
        10 * props.major + props.minor,
        props.name,
        shared_per_block=shared,
        shared_per_sm=props.shared_memory_per_multiprocessor,
        max_threads_per_sm=props.max_threads_per_multi_processor,
        flops_per_byte=ARCHS["sm_80" if props.major < 9 else "sm_90"].flops_per_byte,
    )


def device_arch(device: torch.device) -> Arch:
    """The architecture the launchers size their blocks for: the recorded one, the CUDA device's, or (the
    interpreter, where shared memory does not bind) sm_90's."""
    active = _RECORDING.get()
    if active is not None:
        return active[0]
    if device.type == "cuda":
        return _cuda_arch(device.index if device.index is not None else torch.cuda.current_device())
    return ARCHS["sm_90"]


def aligned_row_stride(columns: int, dtype: torch.dtype) -> int:
    """The row stride (elements) of a buffer of ``columns`` columns whose rows start 16-byte aligned: what
    lets a row kernel load 128 bits at a time (a stride of 30,522 bf16 elements makes every load scalar)."""
    size = dtype.itemsize
    return -(-columns * size // 16) * 16 // size


def element_offsets(tensors, base, device):
    """int64 element offsets of each tensor's first element from ``base``'s: many layers, one base pointer.

    The tensors share base's dtype; the offsets reach the kernel without a host sync. Every address must
    be 16-byte aligned (the ops copy the tensors that are not, see ``fastted.ops.dispatch.aligned``): the
    kernels tell the compiler so (``tl.multiple_of``), and a wrong hint would load the wrong bytes, so it
    is asserted here.
    """
    if tensors is None:
        return None
    size = base.element_size()
    misaligned = [i for i, t in enumerate(tensors) if t.data_ptr() % 16]
    if misaligned:
        raise ValueError(
            f"tensors {misaligned} of a launch start at addresses that are not 16-byte aligned; "
            "the kernels need aligned layers (copy them with fastted.ops.dispatch.aligned)"
        )
    host = torch.tensor(
        [(t.data_ptr() - base.data_ptr()) // size for t in tensors], dtype=torch.int64, pin_memory=device.type == "cuda"
    )
    return host.to(device, non_blocking=True)
