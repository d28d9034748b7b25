"""Input checks shared by every op, recipe and data helper of fastted.

Each check raises a ``ValueError`` that names the argument, what it got and
what it needs (xformers' habit), and returns the checked value so that a call
site can check and bind in one line. Nothing here imports Triton or touches a
device: a check that would need a host sync on a GPU is left to the caller,
who knows whether it can afford one.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

IMPLS = ("auto", "triton", "reference")


def check_impl(impl: str) -> str:
    """One of :data:`IMPLS`: the path a fused loss takes (see :mod:`fastted.ops.dispatch`)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl


def is_number(value) -> bool:
    """A real number, Python's or numpy's (``np.float32(2.0)`` is one); never a bool or a tensor."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_positive_int(name: str, value) -> int:
    """An int >= 1, Python's or numpy's, returned as a Python int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def check_float(name: str, value, low: float, high: float = float("inf"), low_open: bool = False) -> float:
    """A finite number (Python's or numpy's) in [low, high] ((low, high] with ``low_open``), returned as a float."""
    if not is_number(value):
        raise ValueError(f"{name} must be a number (a Python or numpy scalar), got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        bounds = f"{'(' if low_open else '['}{low}, {high}{']' if high != float('inf') else ')'}"
        raise ValueError(f"{name} must lie in {bounds}, got {value}")
    return float(value)


def check_temperature(name: str, value) -> float:
    """A temperature: a number > 0."""
    return check_float(name, value, 0.0, low_open=True)


def check_alpha(name: str, value) -> float:
    """A loss weight: a finite number >= 0."""
    if not is_number(value) or not value >= 0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def as_list(name: str, value, n_layers: Optional[int], allow_none_entries: bool) -> list:
    """``value`` as a list of per-layer tensors (None entries where allowed), ``n_layers`` long when given."""
    if isinstance(value, Tensor) or not isinstance(value, (list, tuple)):
        raise ValueError(
            f"{name} must be a list or tuple of per-layer tensors, got {type(value).__name__}"
            + (f" of shape {tuple(value.shape)} (wrap a single layer as [x])" if isinstance(value, Tensor) else "")
        )
    if n_layers is not None and len(value) != n_layers:
        raise ValueError(f"{name} has {len(value)} layers, but student_states has {n_layers}: they must match")
    for i, x in enumerate(value):
        if x is None and allow_none_entries:
            continue
        if not isinstance(x, Tensor):
            raise ValueError(f"{name}[{i}] must be a tensor, got {type(x).__name__}")
    return list(value)


def check_floating(name: str, x: Tensor) -> None:
    """``x`` holds real floating-point values (every loss refuses integer, bool and complex tensors alike)."""
    if not x.is_floating_point():
        raise ValueError(f"{name} has dtype {x.dtype}, but needs a floating-point dtype")


def check_like(name: str, x: Tensor, ref: Tensor, ref_name: str) -> None:
    """``x`` shares ``ref``'s device and dtype."""
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device}, but {ref_name} is on {ref.device}: they must share a device")
    if x.dtype != ref.dtype:
        raise ValueError(
            f"{name} has dtype {x.dtype}, but {ref_name} has {ref.dtype}: they must match "
            f"(cast them, or run under torch.autocast)"
        )


def check_weight(name: str, w: Tensor, d_out: Optional[int], d_in: int, in_name: str) -> None:
    """A projection weight (d_out, d_in), nn.Linear's convention."""
    if w.dim() != 2 or w.shape[1] != d_in or (d_out is not None and w.shape[0] != d_out):
        need = f"({d_out if d_out is not None else 'd_f'}, {d_in})"
        raise ValueError(
            f"{name} has shape {tuple(w.shape)}, but needs {need} (nn.Linear convention: out_features x "
            f"in_features, in_features = the width of {in_name})"
        )


def check_bias(name: str, b: Tensor, d_f: int) -> None:
    if b.shape != (d_f,):
        raise ValueError(f"{name} has shape {tuple(b.shape)}, but needs ({d_f},) (the filter width d_f)")


def check_int_tensor(name: str, x, shape: tuple, device=None, ref_name: str = "", hint: str = "") -> Tensor:
    """x is an integer tensor of the given shape (on ``device``, that of ``ref_name``, when given)."""
    if not isinstance(x, Tensor) or x.dtype.is_floating_point or x.dtype == torch.bool:
        got = type(x).__name__ if not isinstance(x, Tensor) else f"a tensor of {x.dtype}"
        raise ValueError(f"{name} must be an integer tensor of shape {shape}, got {got}")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, but needs {shape}{hint}")
    if device is not None and x.device != device:
        raise ValueError(f"{name} is on {x.device}, but {ref_name} is on {device}")
    return x


def flat_mask(mask, lead: tuple, device: torch.device, ref_name: str) -> Tensor:
    """Validate a token mask of leading shape ``lead``; return it detached and flat, (N,)."""
    if not isinstance(mask, Tensor):
        raise ValueError(f"mask must be a tensor of shape {lead}, got {type(mask).__name__}")
    if tuple(mask.shape) != lead:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, but needs {lead} (the leading shape of {ref_name})")
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device}, but {ref_name} is on {device}")
    check_weights_tensor("mask", mask)
    return mask.detach().reshape(-1)


def check_weights_tensor(name: str, x: Tensor) -> None:
    """Weights (a mask, per-layer weights) are finite and >= 0: checked on a CPU tensor; on a GPU the check
    would cost a host sync, and a negative or non-finite weight there gives a wrong or non-finite loss."""
    if x.device.type != "cpu" or x.dtype == torch.bool or not (x.is_floating_point() or x.is_signed()):
        return
    bad = (x < 0) | ~torch.isfinite(x) if x.is_floating_point() else x < 0
    if bool(bad.any()):
        raise ValueError(f"{name} holds {x[bad].flatten()[0].item()}, but its weights must be finite and >= 0")
