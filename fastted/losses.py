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
    _CHUNK_ELEMENTS,
    DIVERGENCES,
    FilteredMSELayer,
    _safe_count,
    accumulate_filtered_mse_grads,
    cast_grads_like,
    filtered_mse_chunked,
    fused_linear_kd_chunked,
    logit_kd_chunked,
    logit_kd_rows,
)

IMPLS = ("auto", "triton", "reference")
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl


def _resolve_impl(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    _check_impl(impl)
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


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_int_tensor(name: str, x, shape: tuple, device=None, ref_name: str = "", hint: str = "") -> Tensor:
    """x is an integer tensor of the given shape (on ``device``, that of ``ref_name``, when given)."""
    if not isinstance(x, Tensor) or x.dtype.is_floating_point or x.dtype == torch.bool:
        got = type(x).__name__ if not isinstance(x, Tensor) else f"a tensor of {x.dtype}"
        raise ValueError(f"{name} must be an integer tensor of shape {shape}, got {got}")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, but needs {shape}{hint}")
    if device is not None and x.device != device:
        raise ValueError(f"{name} is on {x.device}, but {ref_name} is on {device}")
    return x


def _flat_mask(mask, lead: tuple, device: torch.device, ref_name: str) -> Tensor:
    """Validate a token mask of leading shape ``lead``; return it detached and flat, (N,)."""
    if not isinstance(mask, Tensor):
        raise ValueError(f"mask must be a tensor of shape {lead}, got {type(mask).__name__}")
    if tuple(mask.shape) != lead:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, but needs {lead} (the leading shape of {ref_name})")
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device}, but {ref_name} is on {device}")
    return mask.detach().reshape(-1)


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

    if mask is not None:
        mask = _flat_mask(mask, lead, ref.device, "student_states[0]").to(torch.float32)

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
    if not torch.is_grad_enabled():  # autograd.Function would still report needs_input_grad: compute no gradient
        flat = [x.detach() for x in flat]
    loss, layer_losses = _FilteredMSEFunction.apply(impl, structure, mask, layer_scale, *flat)
    return (loss, layer_losses) if return_layer_losses else loss


class FilteredMSELoss(nn.Module):
    """nn.Module over :func:`filtered_mse`.

    After each call, ``layer_losses`` holds the detached (L,) per-layer losses
    (on the inputs' device: reading them is the caller's sync, not the loss's).
    """

    def __init__(self, layer_weights: Optional[Sequence[float] | Tensor] = None, impl: str = "auto"):
        super().__init__()
        _check_impl(impl)
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


# =========================================================================== logit distillation


def _check_float(name: str, value, low: float, high: float = float("inf"), low_open: bool = False) -> float:
    if isinstance(value, Tensor) or not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{name} must be a Python number, got {type(value).__name__}")
    ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        bounds = f"{'(' if low_open else '['}{low}, {high}{']' if high != float('inf') else ')'}"
        raise ValueError(f"{name} must lie in {bounds}, got {value}")
    return float(value)


def _logit_options(temperature, divergence, beta) -> dict:
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    return dict(
        temperature=_check_float("temperature", temperature, 0.0, low_open=True),
        divergence=divergence,
        beta=_check_float("beta", beta, 0.0, 1.0),
    )


def _shared_vocab(vocab_size, v_s: int, v_t: int, what_s: str, what_t: str) -> int:
    """The number of leading vocabulary entries compared: both, or vocab_size when given."""
    if vocab_size is None:
        if v_s != v_t:
            raise ValueError(
                f"{what_s} covers a vocabulary of {v_s}, but {what_t} covers {v_t}: pass vocab_size=<n> to compare "
                f"the first n entries of both (n <= {min(v_s, v_t)}, e.g. the tokenizer's size when one "
                f"embedding matrix is padded)"
            )
        return v_s
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 1 <= vocab_size <= min(v_s, v_t):
        raise ValueError(
            f"vocab_size must be an int in [1, {min(v_s, v_t)}] (the smaller of the two vocabularies), "
            f"got {vocab_size!r}"
        )
    return vocab_size


def _row_weights(lead, device, dtype, mask, labels, ignore_index, labels_name, vocab, ref_name):
    """Validate mask and labels of leading shape ``lead``; return (N,) mean weights, fp32 (fp64 for fp64 inputs).

    Returns (kd_coef, labels, ce_coef): kd_coef = mask / count over the mask's
    rows; with labels, ce_coef the same over the rows the mask keeps and the
    labels do not ignore. No host sync on a GPU.
    """
    n_rows = 1
    for n in lead:
        n_rows *= n
    acc = torch.promote_types(dtype, torch.float32)
    valid = None
    if mask is not None:
        valid = _flat_mask(mask, lead, device, ref_name).to(acc)
    kd_valid = valid if valid is not None else torch.ones(n_rows, dtype=acc, device=device)
    kd_coef = kd_valid / _safe_count(kd_valid.sum())
    if labels is None:
        return kd_coef, None, None
    _check_int_tensor(labels_name, labels, lead, device, ref_name, " (one label per row/token)")
    labels = labels.detach().reshape(n_rows).to(torch.int64)
    ce_valid = (labels != ignore_index).to(acc)
    if valid is not None:
        ce_valid = ce_valid * (valid != 0)
    if vocab is not None and device.type == "cpu":  # no device sync here; on a GPU a bad label gives a NaN loss
        bad = (ce_valid != 0) & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            raise ValueError(
                f"{labels_name} holds {labels[bad][0].item()}, outside [0, {vocab}) (the compared vocabulary); "
                f"labels to skip must equal ignore_index={ignore_index}"
            )
    return kd_coef, labels, ce_valid / _safe_count(ce_valid.sum())


class _LogitKDFunction(torch.autograd.Function):
    """Loss and dLoss/d(student logits) in the forward; backward scales the gradient in place."""

    @staticmethod
    def forward(ctx, impl, opts, vocab, kd_coef, student_logits, teacher_logits):
        s = student_logits.reshape(-1, student_logits.shape[-1])
        t = teacher_logits.reshape(-1, teacher_logits.shape[-1])
        grad = None
        if ctx.needs_input_grad[4]:
            grad = torch.empty_like(s) if vocab == s.shape[1] else torch.zeros_like(s)
        s, t = s[:, :vocab], t[:, :vocab]
        g = None if grad is None else grad[:, :vocab]
        if impl == "triton":  # one launch over all rows: the kernel keeps nothing of size V but the gradient
            from fastted.kernels.logit_kd import logit_kd_rows_triton

            rows, _ = logit_kd_rows_triton(
                _aligned(s, False), _aligned(t, False), kd_coef, None, None, g, soft_weight=1.0, hard_weight=0.0,
                **opts,
            )
        else:
            rows = logit_kd_chunked(s, t, kd_coef, g, soft_weight=1.0, hard_weight=0.0, **opts)
        loss = opts["temperature"] ** 2 * (rows @ kd_coef.to(rows.dtype))
        if grad is not None:
            ctx.save_for_backward(grad)
            ctx.shape = student_logits.shape
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        # In place: the (N, V) gradient is the step's largest tensor. A second
        # backward through the same graph fails on the saved tensor's version.
        return None, None, None, None, grad.mul_(grad_loss).reshape(ctx.shape), None


def _check_logits(student_logits, teacher_logits):
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a tensor of shape (N, V) or (B, T, V), got {type(x).__name__}")
        if x.dim() not in (2, 3) or x.numel() == 0:
            raise ValueError(f"{name} has shape {tuple(x.shape)}, but needs (N, V) or (B, T, V) with N, V > 0")
        if not x.is_floating_point():
            raise ValueError(f"{name} has dtype {x.dtype}, but needs a floating-point dtype")
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"teacher_logits has shape {tuple(teacher_logits.shape)}, but student_logits has "
            f"{tuple(student_logits.shape)}: their leading (row/token) shapes must match"
        )
    if teacher_logits.device != student_logits.device:
        raise ValueError(
            f"teacher_logits is on {teacher_logits.device}, but student_logits is on {student_logits.device}"
        )


def logit_kd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 2.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    mask: Optional[Tensor] = None,
    labels: Optional[Tensor] = None,
    ignore_index: int = -100,
    vocab_size: Optional[int] = None,
    impl: str = "auto",
) -> Tensor:
    """Logit distillation with temperature, in one pass over the logits.

    ``D(softmax(t / T), softmax(s / T)) * T^2`` averaged over the valid rows
    (tokens), with D one of

    - ``"forward_kl"`` (default): KL(teacher || student), TED's and DistilBERT's KD;
    - ``"reverse_kl"``: KL(student || teacher);
    - ``"jsd"``: beta KL(teacher || M) + (1 - beta) KL(student || M),
      M = beta teacher + (1 - beta) student (at beta 0 and 1: the forward and
      reverse KL, as TRL's GKD and Liger-Kernel define them).

    Args:
        student_logits, teacher_logits: (N, V) or (B, T, V), any float dtype.
            The teacher is a constant: no gradient reaches it.
        mask: rows to average over, of the leading shape; None: all rows.
        labels, ignore_index: with labels of the leading shape, rows whose
            label is ``ignore_index`` are skipped too (HF's -100 convention).
        vocab_size: compare the first ``vocab_size`` logits of both; needed
            when the two vocabularies differ (a padded embedding matrix).
            The student's other logits get zero gradient.
        impl: "auto", "triton" or "reference".

    Returns the fp32 scalar loss (float64 for float64 logits). All rows
    skipped gives 0 and zero gradients; logits of -inf (banned tokens) are
    handled exactly.
    """
    _check_logits(student_logits, teacher_logits)
    opts = _logit_options(temperature, divergence, beta)
    vocab = _shared_vocab(
        vocab_size, student_logits.shape[-1], teacher_logits.shape[-1], "student_logits", "teacher_logits"
    )
    lead = tuple(student_logits.shape[:-1])
    dtype = torch.promote_types(student_logits.dtype, teacher_logits.dtype)
    kd_coef, labels, ce_coef = _row_weights(
        lead, student_logits.device, dtype, mask, labels, ignore_index, "labels", None, "student_logits"
    )
    if ce_coef is not None:
        kd_coef = ce_coef  # rows the mask keeps and the labels do not ignore
    impl = _resolve_impl(impl, student_logits.device, dtype)
    if not torch.is_grad_enabled():  # autograd.Function would still report needs_input_grad: compute no gradient
        student_logits = student_logits.detach()
    return _LogitKDFunction.apply(impl, opts, vocab, kd_coef, student_logits, teacher_logits)


class LogitKDLoss(nn.Module):
    """nn.Module over :func:`logit_kd`."""

    def __init__(self, temperature: float = 2.0, divergence: str = "forward_kl", beta: float = 0.5,
                 ignore_index: int = -100, vocab_size: Optional[int] = None, impl: str = "auto"):
        super().__init__()
        _logit_options(temperature, divergence, beta)
        _check_impl(impl)
        self.temperature, self.divergence, self.beta = temperature, divergence, beta
        self.ignore_index, self.vocab_size, self.impl = ignore_index, vocab_size, impl

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, mask: Optional[Tensor] = None,
                labels: Optional[Tensor] = None) -> Tensor:
        return logit_kd(
            student_logits, teacher_logits, temperature=self.temperature, divergence=self.divergence,
            beta=self.beta, mask=mask, labels=labels, ignore_index=self.ignore_index, vocab_size=self.vocab_size,
            impl=self.impl,
        )

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, divergence={self.divergence!r}, beta={self.beta}, "
                f"vocab_size={self.vocab_size}, impl={self.impl!r}")


def _chunk_rows(n_rows: int, vocab: int, width: int, chunk_size: Optional[int]) -> int:
    """Rows per block of the fused LM-head path: a block of logits about as large as the hidden states."""
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int (rows per block), got {chunk_size!r}")
        return min(chunk_size, n_rows)
    rows = max(n_rows * width, _CHUNK_ELEMENTS) // vocab
    if rows >= 32:
        rows -= rows % 16  # GEMM-friendly blocks
    return max(1, min(rows, n_rows))


class _FusedLinearKDFunction(torch.autograd.Function):
    """Both heads, loss and student gradients in the forward, a block of rows at a time."""

    @staticmethod
    def forward(ctx, impl, opts, vocab, chunk_rows, kd_coef, labels, ce_coef, xs, ws, bs, xt, wt, bt):
        with torch.autocast(xs.device.type, enabled=False):
            needs = tuple(bool(n) for n in ctx.needs_input_grad[7:10])
            if impl == "triton":
                from fastted.kernels.logit_kd import logit_kd_rows_triton as rows_fn
            else:
                rows_fn = logit_kd_rows
            kd_rows, ce_rows, (gx, gw, gb) = fused_linear_kd_chunked(
                xs.reshape(-1, xs.shape[-1]), ws[:vocab], None if bs is None else bs[:vocab],
                xt.reshape(-1, xt.shape[-1]), wt[:vocab], None if bt is None else bt[:vocab],
                kd_coef, labels, ce_coef, needs, rows_fn=rows_fn, chunk_rows=chunk_rows, **opts,
            )
            kd = opts["temperature"] ** 2 * (kd_rows @ kd_coef.to(kd_rows.dtype))
            ce = ce_rows @ ce_coef.to(ce_rows.dtype) if ce_rows is not None else torch.zeros_like(kd)
            loss = opts["soft_weight"] * kd + opts["hard_weight"] * ce

            def full(g, x):  # the gradient of the whole head: zero beyond the compared vocabulary
                if g is None or g.shape[0] == x.shape[0]:
                    return None if g is None else g.to(x.dtype)
                out = torch.zeros_like(x)
                out[:vocab] = g
                return out

            grads = (None if gx is None else gx.reshape(xs.shape), full(gw, ws), full(gb, bs))
        ctx.grad_slots = [g is not None for g in grads]
        ctx.save_for_backward(*[g for g in grads if g is not None])
        ctx.mark_non_differentiable(kd, ce)
        return loss, kd, ce

    @staticmethod
    def backward(ctx, grad_loss, grad_kd, grad_ce):
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) * grad_loss if has else None for has in ctx.grad_slots]
        return (None,) * 7 + (*grads, None, None, None)


def fused_linear_kd(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    *,
    temperature: float = 1.0,
    student_bias: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    hard_labels: Optional[Tensor] = None,
    hard_weight: float = 0.0,
    soft_weight: float = 1.0,
    ignore_index: int = -100,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    vocab_size: Optional[int] = None,
    chunk_size: Optional[int] = None,
    impl: str = "auto",
    return_terms: bool = False,
):
    """LM heads of student and teacher fused with logit KD (and cross-entropy) over the vocabulary.

    Computes ``soft_weight * kd + hard_weight * ce`` where kd is
    :func:`logit_kd` of the logits ``student_hidden @ student_weight^T + b``
    and ``teacher_hidden @ teacher_weight^T + c`` (temperature, divergence and
    beta as there, averaged over the rows ``mask`` keeps) and ce the
    cross-entropy of the student logits (temperature 1) on ``hard_labels``,
    averaged over the rows the mask keeps and the labels do not ignore: DWT's
    and continual pre-training's ``alpha_h * CE + alpha_s * KL`` in one pass.
    The logits are computed a block of rows at a time (``chunk_size`` rows;
    default: a block about as large as the hidden states) and never exist
    for the whole batch.

    Args:
        student_hidden: (N, H_s) or (B, T, H_s); student_weight: (V_s, H_s)
            and student_bias (V_s,): the student's LM head (nn.Linear convention).
        teacher_hidden: (..., H_t); teacher_weight (V_t, H_t), teacher_bias
            (V_t,): the teacher's head. The teacher is a constant: no
            gradient reaches it.
        mask: rows to count, of the hidden states' leading shape.
        hard_labels: integer labels of the leading shape; ``ignore_index``
            skips a row for the cross-entropy.
        vocab_size: when V_s != V_t (a padded embedding matrix), compare the
            first ``vocab_size`` entries of both (the cross-entropy too);
            without it, differing vocabularies are an error.
        return_terms: also return the detached fp32 kd and ce (0 without labels).

    Returns the fp32 scalar loss, or ``(loss, kd, ce)``. Gradients reach
    student_hidden, student_weight and student_bias, in their dtypes; under
    autocast the heads run in the autocast dtype.
    """
    args = (("student_hidden", student_hidden), ("student_weight", student_weight),
            ("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight))
    for name, x in args:
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
    opts = _logit_options(temperature, divergence, beta)
    opts["soft_weight"] = _check_float("soft_weight", soft_weight, 0.0)
    opts["hard_weight"] = _check_float("hard_weight", hard_weight, 0.0)
    if opts["hard_weight"] > 0 and hard_labels is None:
        raise ValueError(f"hard_weight={hard_weight} needs hard_labels: the cross-entropy is computed on them")

    xs, ws, xt, wt = student_hidden, student_weight, teacher_hidden, teacher_weight
    if xs.dim() not in (2, 3) or any(n == 0 for n in xs.shape):
        raise ValueError(f"student_hidden has shape {tuple(xs.shape)}, but needs (N, H_s) or (B, T, H_s), non-empty")
    lead = tuple(xs.shape[:-1])
    if tuple(xt.shape[:-1]) != lead or xt.dim() != xs.dim():
        raise ValueError(
            f"teacher_hidden has shape {tuple(xt.shape)}, but student_hidden has {tuple(xs.shape)}: their leading "
            f"(row/token) shapes must match"
        )
    _check_weight("student_weight", ws, None, xs.shape[-1], "student_hidden")
    _check_weight("teacher_weight", wt, None, xt.shape[-1], "teacher_hidden")
    for name, bias, w in (("student_bias", student_bias, ws), ("teacher_bias", teacher_bias, wt)):
        if bias is not None and (not isinstance(bias, Tensor) or bias.shape != (w.shape[0],)):
            got = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
            raise ValueError(f"{name} has shape {got}, but needs ({w.shape[0]},) (one per vocabulary entry)")
    vocab = _shared_vocab(vocab_size, ws.shape[0], wt.shape[0], "student_weight", "teacher_weight")

    cast = torch.get_autocast_dtype(xs.device.type) if torch.is_autocast_enabled(xs.device.type) else None
    student = [x if cast is None or x is None else x.to(cast) for x in (xs, ws, student_bias)]
    teacher = [x if cast is None or x is None else x.to(cast) for x in (xt, wt, teacher_bias)]
    for name, x in zip(("student_weight", "student_bias"), student[1:]):
        if x is not None:
            _check_like(name, x, student[0], "student_hidden")
    for name, x in zip(("teacher_hidden", "teacher_weight", "teacher_bias"), teacher):
        if x is not None:
            if x.device != xs.device:
                raise ValueError(f"{name} is on {x.device}, but student_hidden is on {xs.device}")
            _check_like(name, x, teacher[0], "teacher_hidden")

    kd_coef, labels, ce_coef = _row_weights(
        lead, xs.device, student[0].dtype, mask, hard_labels, ignore_index, "hard_labels", vocab, "student_hidden"
    )
    impl = _resolve_impl(impl, xs.device, student[0].dtype)
    chunk_rows = _chunk_rows(kd_coef.shape[0], vocab, max(xs.shape[-1], xt.shape[-1]), chunk_size)
    if not torch.is_grad_enabled():  # autograd.Function would still report needs_input_grad: compute no gradient
        student = [None if x is None else x.detach() for x in student]
    loss, kd, ce = _FusedLinearKDFunction.apply(
        impl, opts, vocab, chunk_rows, kd_coef, labels, ce_coef, *student, *teacher
    )
    return (loss, kd, ce) if return_terms else loss


class FusedLinearKDLoss(nn.Module):
    """nn.Module over :func:`fused_linear_kd`; ``kd`` and ``ce`` hold the last call's detached terms."""

    def __init__(self, temperature: float = 1.0, hard_weight: float = 0.0, soft_weight: float = 1.0,
                 divergence: str = "forward_kl", beta: float = 0.5, ignore_index: int = -100,
                 vocab_size: Optional[int] = None, chunk_size: Optional[int] = None, impl: str = "auto"):
        super().__init__()
        _logit_options(temperature, divergence, beta)
        _check_impl(impl)
        self.options = dict(
            temperature=temperature, hard_weight=hard_weight, soft_weight=soft_weight, divergence=divergence,
            beta=beta, ignore_index=ignore_index, vocab_size=vocab_size, chunk_size=chunk_size, impl=impl,
        )
        self.kd: Optional[Tensor] = None
        self.ce: Optional[Tensor] = None

    def forward(self, student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                teacher_weight: Tensor, *, student_bias: Optional[Tensor] = None,
                teacher_bias: Optional[Tensor] = None, mask: Optional[Tensor] = None,
                hard_labels: Optional[Tensor] = None) -> Tensor:
        loss, self.kd, self.ce = fused_linear_kd(
            student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias=student_bias,
            teacher_bias=teacher_bias, mask=mask, hard_labels=hard_labels, return_terms=True, **self.options,
        )
        return loss

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
