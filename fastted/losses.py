"""Fused distillation losses: functional API, nn.Modules and device dispatch.

Each loss computes its value and its gradients in one pass (the loss is the
last node of the graph, so nothing else is needed from the forward), keeps the
gradients, and only scales them by the incoming gradient in backward.

Dispatch (``impl="auto"``): CUDA tensors run the Triton kernel; CPU tensors
run the chunked PyTorch path of :mod:`fastted.reference`, or the Triton kernel
itself under ``TRITON_INTERPRET=1``. ``impl="triton"`` or ``"reference"``
forces a path.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from fastted.kernels import interpreting
from fastted.reference import (
    FilteredMSELayer,
    _safe_count,
    accumulate_filtered_mse_grads,
    cast_grads_like,
    filtered_mse_chunked,
)

IMPLS = ("auto", "triton", "reference")
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _resolve_impl(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    triton_ok = (device.type == "cuda" or interpreting()) and dtype in _TRITON_DTYPES
    if impl == "auto":
        return "triton" if triton_ok else "reference"
    if impl == "triton" and not triton_ok:
        raise ValueError(
            f"impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1) of dtype float32, float16 or "
            f"bfloat16; got {device.type} tensors of {dtype}. Use impl='auto' or 'reference'."
        )
    return impl


# --------------------------------------------------------------------------- checks


def _as_list(name: str, value, n_layers: Optional[int], allow_none_entries: bool) -> list:
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


def _check_like(name: str, x: Tensor, ref: Tensor, ref_name: str) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device}, but {ref_name} is on {ref.device}: they must share a device")
    if x.dtype != ref.dtype:
        raise ValueError(
            f"{name} has dtype {x.dtype}, but {ref_name} has {ref.dtype}: they must match "
            f"(cast them, or run under torch.autocast)"
        )


def _check_weight(name: str, w: Tensor, d_out: Optional[int], d_in: int, in_name: str) -> None:
    if w.dim() != 2 or w.shape[1] != d_in or (d_out is not None and w.shape[0] != d_out):
        need = f"({d_out if d_out is not None else 'd_f'}, {d_in})"
        raise ValueError(
            f"{name} has shape {tuple(w.shape)}, but needs {need} (nn.Linear convention: out_features x "
            f"in_features, in_features = the width of {in_name})"
        )


def _check_bias(name: str, b: Tensor, d_f: int) -> None:
    if b.shape != (d_f,):
        raise ValueError(f"{name} has shape {tuple(b.shape)}, but needs ({d_f},) (the filter width d_f)")


def _filtered_mse_inputs(
    student_states, student_weights, teacher_states, student_biases, teacher_weights, teacher_biases, mask,
    layer_weights,
):
    """Validate the public arguments; return the 2-D layers, mask and layer scale."""
    s_list = _as_list("student_states", student_states, None, False)
    n_layers = len(s_list)
    if n_layers == 0:
        raise ValueError("student_states is empty: filtered_mse needs at least one layer pair")
    w_list = _as_list("student_weights", student_weights, n_layers, True)
    t_list = _as_list("teacher_states", teacher_states, n_layers, False)
    b_list = _as_list("student_biases", student_biases, n_layers, True) if student_biases is not None else None
    v_list = _as_list("teacher_weights", teacher_weights, n_layers, True) if teacher_weights is not None else None
    c_list = _as_list("teacher_biases", teacher_biases, n_layers, True) if teacher_biases is not None else None

    ref = s_list[0]
    if ref.dim() not in (2, 3):
        raise ValueError(
            f"student_states[0] has shape {tuple(ref.shape)}, but needs (N, d_s) or (B, T, d_s)"
        )
    lead = tuple(ref.shape[:-1])
    if any(n == 0 for n in lead):
        raise ValueError(f"student_states[0] has shape {tuple(ref.shape)}: there are no tokens")

    # Under autocast the losses run in the autocast dtype, as nn.Linear would.
    cast = None
    if torch.is_autocast_enabled(ref.device.type):
        cast = torch.get_autocast_dtype(ref.device.type)

    def prep(x):
        return x.to(cast) if cast is not None and x.is_floating_point() else x

    layers = []
    for l in range(n_layers):
        s, t = prep(s_list[l]), prep(t_list[l])
        w = prep(w_list[l]) if w_list[l] is not None else None
        b = prep(b_list[l]) if b_list is not None and b_list[l] is not None else None
        v = prep(v_list[l]) if v_list is not None and v_list[l] is not None else None
        c = prep(c_list[l]) if c_list is not None and c_list[l] is not None else None
        ref_s = prep(ref)
        for name, x in ((f"student_states[{l}]", s), (f"teacher_states[{l}]", t)):
            if tuple(x.shape[:-1]) != lead or x.dim() != ref.dim():
                raise ValueError(
                    f"{name} has shape {tuple(x.shape)}, but student_states[0] has {tuple(ref.shape)}: every "
                    f"layer's states need the same leading shape {lead}"
                )
            _check_like(name, x, ref_s, "student_states[0]")
        d_s, d_t = s.shape[-1], t.shape[-1]
        if w is not None:
            _check_weight(f"student_weights[{l}]", w, None, d_s, f"student_states[{l}]")
            _check_like(f"student_weights[{l}]", w, ref_s, "student_states[0]")
            d_f = w.shape[0]
        else:
            d_f = d_s
        if v is not None:
            _check_weight(f"teacher_weights[{l}]", v, d_f, d_t, f"teacher_states[{l}]")
            _check_like(f"teacher_weights[{l}]", v, ref_s, "student_states[0]")
        elif d_t != d_f:
            what = f"student_weights[{l}] projects to" if w is not None else f"student_states[{l}] (identity) has"
            raise ValueError(
                f"teacher_states[{l}] has width {d_t}, but {what} width {d_f}: without teacher_weights the "
                f"teacher states are the targets and need the filter width {d_f}"
            )
        for name, bias in ((f"student_biases[{l}]", b), (f"teacher_biases[{l}]", c)):
            if bias is not None:
                _check_bias(name, bias, d_f)
                _check_like(name, bias, ref_s, "student_states[0]")
        layers.append(FilteredMSELayer(s.reshape(-1, d_s), w, b, t.reshape(-1, d_t), v, c))

    n_rows = layers[0].s.shape[0]
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise ValueError(f"mask must be a tensor of shape {lead}, got {type(mask).__name__}")
        if tuple(mask.shape) != lead:
            raise ValueError(f"mask has shape {tuple(mask.shape)}, but the states need {lead} (their leading shape)")
        if mask.device != ref.device:
            raise ValueError(f"mask is on {mask.device}, but student_states[0] is on {ref.device}")
        mask = mask.detach().reshape(n_rows).to(torch.float32)

    if layer_weights is None:
        scale = torch.full((n_layers,), 1.0 / n_layers, dtype=torch.float32, device=ref.device)
    else:
        lw = torch.as_tensor(layer_weights, dtype=torch.float32).detach()
        if lw.shape != (n_layers,):
            raise ValueError(f"layer_weights has shape {tuple(lw.shape)}, but needs ({n_layers},): one per layer")
        if lw.device.type == "cpu":  # checked without a device sync
            if bool((lw < 0).any()) or not float(lw.sum()) > 0:
                raise ValueError(f"layer_weights must be non-negative with a positive sum, got {lw.tolist()}")
        lw = lw.to(ref.device)
        scale = lw / lw.sum()
    return layers, mask, scale


# --------------------------------------------------------------------------- autograd


_ROLES = len(FilteredMSELayer._fields)


def _aligned(x: Tensor, contiguous: bool) -> Tensor:
    """x with unit column stride (fully contiguous if asked) at a 16-byte aligned address."""
    if x.stride(-1) != 1 or (contiguous and not x.is_contiguous()) or x.data_ptr() % 16:
        x = torch.empty_like(x, memory_format=torch.contiguous_format).copy_(x)
    return x


def _structure(layer: FilteredMSELayer) -> tuple:
    """Layers with equal structure go into one kernel launch."""
    return (
        layer.w is None, layer.b is None, layer.v is None, layer.c is None,
        layer.s.shape[1], layer.t.shape[1], layer.s.stride(0), layer.t.stride(0),
    )


def _triton_forward(layers, mask, count, layer_scale, needs):
    from fastted.kernels.filtered_mse import filtered_mse_forward

    # States keep their row stride; weights and biases must be contiguous.
    layers = [
        FilteredMSELayer(*(None if x is None else _aligned(x, role not in ("s", "t")) for role, x in zip(l._fields, l)))
        for l in layers
    ]
    groups: dict[tuple, list[int]] = {}
    for i, layer in enumerate(layers):
        groups.setdefault(_structure(layer), []).append(i)

    sq_err = torch.empty(len(layers), dtype=torch.float32, device=layers[0].s.device)
    all_grads = [[None] * _ROLES for _ in layers]
    for idx in groups.values():
        group = [layers[i] for i in idx]
        want_grad = any(any(needs[i]) for i in idx)
        want_colsum = any(needs[i].b or needs[i].c for i in idx)
        roles = [None if r[0] is None else list(r) for r in zip(*group)]
        index = torch.tensor(idx, device=sq_err.device) if len(idx) < len(layers) else None
        sq, grad_errs, colsum = filtered_mse_forward(
            *roles, mask, count, layer_scale if index is None else layer_scale[index],
            write_grad=want_grad, write_colsum=want_colsum,
        )
        if index is None:
            sq_err = sq
        else:
            sq_err[index] = sq
        if not want_grad:
            continue
        for j, i in enumerate(idx):
            # dLoss/dE of one layer at a time becomes the gradients and is freed.
            g, grad_errs[j] = grad_errs[j], None
            accumulate_filtered_mse_grads(
                g, slice(None), layers[i], needs[i], all_grads[i], colsum=None if colsum is None else colsum[j]
            )
            all_grads[i] = cast_grads_like(all_grads[i], layers[i])
    return sq_err, all_grads


class _FilteredMSEFunction(torch.autograd.Function):
    """Loss and gradients in the forward; backward scales them by grad_output."""

    @staticmethod
    def forward(ctx, impl, structure, mask, layer_scale, *flat):
        # The inputs are already in the autocast dtype; the fp32 work inside stays fp32.
        with torch.autocast(flat[0].device.type, enabled=False):
            return _FilteredMSEFunction._forward(ctx, impl, structure, mask, layer_scale, flat)

    @staticmethod
    def _forward(ctx, impl, structure, mask, layer_scale, flat):
        layers, needs, pos = [], [], 0
        needs_grad = ctx.needs_input_grad[4:]
        for present in structure:  # present: which of the six roles a layer has
            fields, flags = [], []
            for has in present:
                fields.append(flat[pos] if has else None)
                flags.append(bool(needs_grad[pos]) if has else False)
                pos += has
            layers.append(FilteredMSELayer(*fields))
            needs.append(FilteredMSELayer(*flags))

        n_rows = layers[0].s.shape[0]
        count = mask.sum() if mask is not None else torch.full((), float(n_rows), device=layers[0].s.device)
        if impl == "triton":
            sq_err, grads = _triton_forward(layers, mask, count.reshape(1), layer_scale, needs)
        else:
            sq_err, grads = filtered_mse_chunked(layers, mask, count, layer_scale, needs)

        d_fs = [l.w.shape[0] if l.w is not None else l.s.shape[1] for l in layers]
        d_f = d_fs[0] if len(set(d_fs)) == 1 else torch.tensor(d_fs, dtype=sq_err.dtype).to(sq_err.device)
        layer_losses = sq_err / (d_f * _safe_count(count).to(sq_err.dtype))
        loss = (layer_losses * layer_scale.to(sq_err.dtype)).sum()

        flat_grads = [g for layer_grads, present in zip(grads, structure) for g, has in zip(layer_grads, present) if has]
        ctx.grad_slots = [g is not None for g in flat_grads]
        ctx.save_for_backward(*[g for g in flat_grads if g is not None])
        ctx.mark_non_differentiable(layer_losses)
        return loss, layer_losses

    @staticmethod
    def backward(ctx, grad_loss, grad_layer_losses):
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) * grad_loss if has else None for has in ctx.grad_slots]
        return (None, None, None, None, *grads)


# --------------------------------------------------------------------------- public API


def filtered_mse(
    student_states: Sequence[Tensor],
    student_weights: Sequence[Optional[Tensor]],
    teacher_states: Sequence[Tensor],
    *,
    student_biases: Optional[Sequence[Optional[Tensor]]] = None,
    teacher_weights: Optional[Sequence[Optional[Tensor]]] = None,
    teacher_biases: Optional[Sequence[Optional[Tensor]]] = None,
    mask: Optional[Tensor] = None,
    layer_weights: Optional[Sequence[float] | Tensor] = None,
    impl: str = "auto",
    return_layer_losses: bool = False,
):
    """Multi-layer filtered MSE between student and teacher hidden states.

    For mapped layer pairs l = 1..L::

        loss_l = sum_i m_i ||S_l,i W_l^T + b_l - Y_l,i||^2 / (d_f * sum_i m_i)
        loss   = sum_l w_l loss_l / sum_l w_l

    Args:
        student_states: L tensors (N, d_s) or (B, T, d_s).
        student_weights: L filter weights (d_f, d_s) (nn.Linear convention);
            a None entry means identity (d_s = d_f).
        teacher_states: L tensors: the targets Y_l (N, d_f), or the raw
            teacher states H_l (N, d_t) when ``teacher_weights`` are given,
            and then Y_l = H_l V_l^T + c_l.
        student_biases, teacher_biases: L biases (d_f,) or None entries.
        teacher_weights: L frozen teacher filter weights (d_f, d_t), or None.
        mask: token mask of the states' leading shape, (N,) or (B, T). None:
            every token counts, which is TED's unmasked mean exactly. All
            tokens masked gives a loss of 0 and zero gradients.
        layer_weights: L non-negative weights w_l (default: all 1, the
            layer-averaged MSE).
        impl: "auto", "triton" or "reference".
        return_layer_losses: also return the detached (L,) per-layer losses,
            for logging without a host sync.

    Returns the fp32 scalar loss (float64 for float64 inputs), or
    ``(loss, layer_losses)``. Gradients reach every input that requires one
    (teacher states and filters too), in its own dtype.
    """
    layers, mask, layer_scale = _filtered_mse_inputs(
        student_states, student_weights, teacher_states, student_biases, teacher_weights, teacher_biases,
        mask, layer_weights,
    )
    ref = layers[0].s
    impl = _resolve_impl(impl, ref.device, ref.dtype)
    structure = tuple(tuple(x is not None for x in layer) for layer in layers)
    flat = [x for layer in layers for x in layer if x is not None]
    loss, layer_losses = _FilteredMSEFunction.apply(impl, structure, mask, layer_scale, *flat)
    return (loss, layer_losses) if return_layer_losses else loss


class FilteredMSELoss(nn.Module):
    """nn.Module over :func:`filtered_mse`.

    After each call, ``layer_losses`` holds the detached (L,) per-layer losses
    (on the inputs' device: reading them is the caller's sync, not the loss's).
    """

    def __init__(self, layer_weights: Optional[Sequence[float] | Tensor] = None, impl: str = "auto"):
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        self.layer_weights = layer_weights
        self.impl = impl
        self.layer_losses: Optional[Tensor] = None

    def forward(
        self,
        student_states: Sequence[Tensor],
        student_weights: Sequence[Optional[Tensor]],
        teacher_states: Sequence[Tensor],
        *,
        student_biases: Optional[Sequence[Optional[Tensor]]] = None,
        teacher_weights: Optional[Sequence[Optional[Tensor]]] = None,
        teacher_biases: Optional[Sequence[Optional[Tensor]]] = None,
        mask: Optional[Tensor] = None,
    ) -> Tensor:
        loss, self.layer_losses = filtered_mse(
            student_states, student_weights, teacher_states,
            student_biases=student_biases, teacher_weights=teacher_weights, teacher_biases=teacher_biases,
            mask=mask, layer_weights=self.layer_weights, impl=self.impl, return_layer_losses=True,
        )
        return loss

    def extra_repr(self) -> str:
        return f"impl={self.impl!r}, layer_weights={self.layer_weights!r}"
