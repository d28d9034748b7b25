"""How a fused loss picks its path and moves its tensors through autograd; shared by every op.

Paths (``impl=``):

- ``"auto"``: CUDA tensors run the Triton kernel; CPU tensors run the op's
  PyTorch path (chunked where that bounds memory); under
  ``TRITON_INTERPRET=1`` (the tests) the Triton kernel itself runs on the CPU.
- ``"triton"`` or ``"reference"`` forces one.

The autograd pattern of every op here: the loss is the last node of the
graph, so its forward computes the gradients of every input that needs one,
:func:`save_gradients` keeps them, and backward only scales them by the
incoming gradient (:func:`scaled_gradients`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Optional

import torch
from torch import Tensor

from fastted.kernels import interpreting
from fastted.ops.checks import check_impl

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Rows per block of the chunked PyTorch paths: a block holds about a million elements of its widest tensor.
CHUNK_ELEMENTS = 1 << 20


def resolve_impl(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    """ "triton" or "reference" for inputs on ``device`` of ``dtype``; a ValueError for an impossible force."""
    check_impl(impl)
    triton_ok = (device.type == "cuda" or interpreting()) and dtype in TRITON_DTYPES
    if impl == "auto":
        return "triton" if triton_ok else "reference"
    if impl == "triton" and not triton_ok:
        raise ValueError(
            f"impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1) of dtype float32, float16 or "
            f"bfloat16; got {device.type} tensors of {dtype}. Use impl='auto' or 'reference'."
        )
    return impl


def aligned(x: Tensor, contiguous: bool) -> Tensor:
    """x with unit column stride (fully contiguous if asked) at a 16-byte aligned address: what a kernel loads."""
    if x.stride(-1) != 1 or (contiguous and not x.is_contiguous()) or x.data_ptr() % 16:
        x = torch.empty_like(x, memory_format=torch.contiguous_format).copy_(x)
    return x


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast runs matmuls in on ``device_type``, or None outside autocast."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def to_autocast(x: Optional[Tensor], dtype: Optional[torch.dtype]) -> Optional[Tensor]:
    """A floating-point ``x`` in the autocast ``dtype`` (as nn.Linear would see it); anything else as it is."""
    if x is None or dtype is None or not x.is_floating_point():
        return x
    return x.to(dtype)


def detach_without_grad(tensors: Iterable[Optional[Tensor]]) -> list[Optional[Tensor]]:
    """The tensors, detached under ``torch.no_grad``: an autograd.Function would still report
    ``needs_input_grad`` there, and the op would compute gradients nobody asked for."""
    tensors = list(tensors)
    if torch.is_grad_enabled():
        return tensors
    return [None if x is None else x.detach() for x in tensors]


def save_gradients(ctx, grads: Sequence[Optional[Tensor]], in_place: bool = False) -> None:
    """Keep the gradients an op's forward computed (None where an input needs none) for its backward.

    ``in_place``: backward scales them in place, always, for a gradient as large as the step's largest tensor
    (the logit losses' (N, V)): no second copy of it, and a second backward through the same graph fails on
    the saved tensor's version instead of handing over a gradient already scaled.
    """
    ctx.grad_slots = [g is not None for g in grads]
    ctx.scale_in_place = in_place
    ctx.save_for_backward(*[g for g in grads if g is not None])


def scaled_gradients(ctx, grad_output: Tensor) -> list[Optional[Tensor]]:
    """The gradients :func:`save_gradients` kept, each times the loss's incoming gradient.

    Saved ``in_place``, they are scaled in place. Otherwise on a CPU an incoming gradient of exactly 1
    (``loss.backward()``) hands them over as they are, a pass over every gradient saved; on a GPU they are
    always multiplied (comparing would cost a device sync).
    """
    saved = iter(ctx.saved_tensors)
    if ctx.scale_in_place:
        return [next(saved).mul_(grad_output) if has else None for has in ctx.grad_slots]
    if grad_output.device.type == "cpu" and grad_output.numel() == 1 and bool(grad_output == 1):
        return [next(saved) if has else None for has in ctx.grad_slots]
    return [next(saved) * grad_output if has else None for has in ctx.grad_slots]
