"""Multi-layer filtered MSE: TED's and plain layer-wise distillation's loss over every mapped layer at once.

For mapped layer pairs l = 1..L::

    E_l    = S_l W_l^T + b_l - Y_l,     Y_l = H_l V_l^T + c_l (TED) or the teacher states H_l (LWD)
    loss_l = sum_i m_i ||E_l,i||^2 / (d_f * sum_i m_i)
    loss   = sum_l w_l loss_l / sum_l w_l

This file holds the op's input checks, its PyTorch path (a block of rows at a
time), the grouping of layers into launches of the Triton kernel
(``fastted.kernels.filtered_mse``), the autograd Function, the functional
:func:`filtered_mse` and the module :class:`FilteredMSELoss`. The spec is
:func:`fastted.reference.filtered_mse_reference`.

Each mapped layer pair is a :class:`FilteredMSELayer` of seven roles: the
student states ``s``, the student filter ``w`` and ``b``, the teacher states
(or targets) ``t``, the teacher filter ``v`` and ``c``, and ``q``, the row
scales of quantized targets (int8 or fp8 ``t``, as a teacher cache stores
them: target = t * q, dequantized inside the kernel).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from fastted.ops.checks import as_list, check_bias, check_floating, check_impl, check_like, check_weight, flat_mask
from fastted.ops.dispatch import (
    CHUNK_ELEMENTS,
    aligned,
    autocast_dtype,
    detach_without_grad,
    resolve_impl,
    save_gradients,
    scaled_gradients,
    to_autocast,
)
from fastted.ops.registry import CompileTier, GpuCheck, KernelOp
from fastted.reference import safe_count


class FilteredMSELayer(NamedTuple):
    """One mapped layer pair, as the fused paths take it (2-D, rows = tokens); the same shape holds its
    gradients, or which of its inputs need one."""

    s: Tensor  # (N, d_s) student states
    w: Optional[Tensor]  # (d_f, d_s) student filter weight; None: identity
    b: Optional[Tensor]  # (d_f,) student filter bias
    t: Tensor  # (N, d_t) teacher states, or (N, d_f) targets when v is None
    v: Optional[Tensor]  # (d_f, d_t) teacher filter weight; None: t are the targets
    c: Optional[Tensor]  # (d_f,) teacher filter bias
    q: Optional[Tensor] = None  # (N,) fp32 row scales of quantized targets t (int8 / fp8); None: t as it is


ROLES = FilteredMSELayer._fields
# The dtypes of quantized targets (what fastted.train.cache stores), read with their row scales.
QUANTIZED = (torch.int8, torch.float8_e4m3fn)
# The roles whose rows are the tokens: the kernel reads them with their row stride; the others contiguous.
STATE_ROLES = ("s", "t", "q")


# --------------------------------------------------------------------------- checks


def filtered_mse_inputs(
    student_states,
    student_weights,
    teacher_states,
    student_biases,
    teacher_weights,
    teacher_biases,
    mask,
    layer_weights,
    teacher_scales=None,
) -> tuple[list[FilteredMSELayer], Optional[Tensor], Tensor]:
    """Validate the public arguments; return the 2-D layers, the flat fp32 mask and the (L,) layer scale."""
    s_list = as_list("student_states", student_states, None, False)
    n_layers = len(s_list)
    if n_layers == 0:
        raise ValueError("student_states is empty: filtered_mse needs at least one layer pair")
    w_list = as_list("student_weights", student_weights, n_layers, True)
    t_list = as_list("teacher_states", teacher_states, n_layers, False)
    none = [None] * n_layers
    b_list = as_list("student_biases", student_biases, n_layers, True) if student_biases is not None else none
    v_list = as_list("teacher_weights", teacher_weights, n_layers, True) if teacher_weights is not None else none
    c_list = as_list("teacher_biases", teacher_biases, n_layers, True) if teacher_biases is not None else none
    q_list = as_list("teacher_scales", teacher_scales, n_layers, False) if teacher_scales is not None else none
    if teacher_scales is not None and teacher_weights is not None:
        raise ValueError("teacher_scales dequantize targets given as they are: they exclude teacher_weights")

    ref = s_list[0]
    if ref.dim() not in (2, 3):
        raise ValueError(f"student_states[0] has shape {tuple(ref.shape)}, but needs (N, d_s) or (B, T, d_s)")
    lead = tuple(ref.shape[:-1])
    if any(n == 0 for n in lead):
        raise ValueError(f"student_states[0] has shape {tuple(ref.shape)}: there are no tokens")

    # Under autocast the losses run in the autocast dtype, as nn.Linear would.
    cast = autocast_dtype(ref.device.type)
    ref_s = to_autocast(ref, cast)
    layers = []
    for l in range(n_layers):
        s, w, b, t, v, c = (
            to_autocast(x, cast) for x in (s_list[l], w_list[l], b_list[l], t_list[l], v_list[l], c_list[l])
        )
        t, q = (t_list[l], q_list[l]) if q_list[l] is not None else (t, None)  # quantized: not autocast
        for name, x in ((f"student_states[{l}]", s), (f"teacher_states[{l}]", t)):
            if tuple(x.shape[:-1]) != lead or x.dim() != ref.dim():
                raise ValueError(
                    f"{name} has shape {tuple(x.shape)}, but student_states[0] has {tuple(ref.shape)}: every "
                    f"layer's states need the same leading shape {lead}"
                )
            if x is not t or q is None:
                check_like(name, x, ref_s, "student_states[0]")
        if q is not None:
            q = _checked_scales(l, t, q, lead, ref)
        check_floating(f"student_states[{l}]", s)
        d_s, d_t = s.shape[-1], t.shape[-1]
        if w is not None:
            check_weight(f"student_weights[{l}]", w, None, d_s, f"student_states[{l}]")
            check_like(f"student_weights[{l}]", w, ref_s, "student_states[0]")
            d_f = w.shape[0]
        else:
            d_f = d_s
        if v is not None:
            check_weight(f"teacher_weights[{l}]", v, d_f, d_t, f"teacher_states[{l}]")
            check_like(f"teacher_weights[{l}]", v, ref_s, "student_states[0]")
        elif d_t != d_f:
            what = f"student_weights[{l}] projects to" if w is not None else f"student_states[{l}] (identity) has"
            raise ValueError(
                f"teacher_states[{l}] has width {d_t}, but {what} width {d_f}: without teacher_weights the "
                f"teacher states are the targets and need the filter width {d_f}"
            )
        for name, bias in ((f"student_biases[{l}]", b), (f"teacher_biases[{l}]", c)):
            if bias is not None:
                check_bias(name, bias, d_f)
                check_like(name, bias, ref_s, "student_states[0]")
        layers.append(FilteredMSELayer(s.reshape(-1, d_s), w, b, t.reshape(-1, d_t), v, c, q))

    if mask is not None:
        mask = flat_mask(mask, lead, ref.device, "student_states[0]").to(torch.float32)

    if layer_weights is None:
        scale = torch.full((n_layers,), 1.0 / n_layers, dtype=torch.float32, device=ref.device)
    else:
        lw = torch.as_tensor(layer_weights, dtype=torch.float32).detach()
        if lw.shape != (n_layers,):
            raise ValueError(f"layer_weights has shape {tuple(lw.shape)}, but needs ({n_layers},): one per layer")
        if lw.device.type == "cpu":  # checked without a device sync
            if bool((lw < 0).any()) or not bool(torch.isfinite(lw).all()) or not float(lw.sum()) > 0:
                raise ValueError(f"layer_weights must be finite, non-negative, with a positive sum, got {lw.tolist()}")
        lw = lw.to(ref.device)
        scale = lw / lw.sum()
    return layers, mask, scale


def _checked_scales(l: int, t: Tensor, q, lead: tuple, ref: Tensor) -> Tensor:
    """Layer l's quantized targets ``t`` (int8 / float8_e4m3fn) and row scales ``q`` (of the leading shape),
    checked; returns q flat, fp32."""
    if t.dtype not in QUANTIZED:
        raise ValueError(
            f"teacher_states[{l}] has dtype {t.dtype}, but teacher_scales are the row scales of "
            f"quantized targets: int8 or float8_e4m3fn (fastted.ops.quantize.quantize_rows)"
        )
    if not isinstance(q, Tensor) or tuple(q.shape) != lead:
        got = tuple(q.shape) if isinstance(q, Tensor) else type(q).__name__
        raise ValueError(f"teacher_scales[{l}] has shape {got}, but needs {lead} (one scale per token)")
    check_floating(f"teacher_scales[{l}]", q)
    for name, x in ((f"teacher_states[{l}]", t), (f"teacher_scales[{l}]", q)):
        if x.device != ref.device:
            raise ValueError(f"{name} is on {x.device}, but student_states[0] is on {ref.device}")
    return q.reshape(-1).to(torch.float32)


# --------------------------------------------------------------------------- gradients from dLoss/dE


def accumulate_grads(
    grad_err: Tensor,
    rows: slice,
    layer: FilteredMSELayer,
    needs: FilteredMSELayer,
    grads: dict[str, Tensor],
    colsum: Optional[Tensor] = None,
) -> None:
    """Turn dLoss/dE for a block of rows into gradients of the layer's inputs, by role.

    grad_err: (R, d_f) dLoss/dE for ``layer``'s rows ``rows`` (a slice);
    needs: a FilteredMSELayer of bools; grads: {role: gradient}, filled in
    place: row blocks of the state gradients are written into full (N, d)
    tensors, weight and bias gradients are summed over blocks (in grad_err's
    dtype). colsum: grad_err summed over rows, when the caller already has it
    (the kernel's epilogue computes it). The Triton path uses it too: these
    GEMMs are cuBLAS's on a GPU.
    """
    whole = rows == slice(None)

    def put(role: str, value: Tensor) -> None:  # a row block of a state gradient
        if whole:
            grads[role] = value
            return
        if role not in grads:
            grads[role] = value.new_empty((getattr(layer, role).shape[0], value.shape[1]))
        grads[role][rows] = value

    def add(role: str, value: Tensor) -> None:  # a weight or bias gradient: summed over row blocks
        grads[role] = value if role not in grads else grads[role].add_(value)

    g = grad_err
    if needs.b or needs.c:
        col = colsum if colsum is not None else g.sum(0)
    if needs.s:
        put("s", g @ layer.w.to(g.dtype) if layer.w is not None else g)
    if needs.w:
        add("w", g.t() @ layer.s[rows].to(g.dtype))
    if needs.b:
        add("b", col)
    if needs.t:
        put("t", -(g @ layer.v.to(g.dtype)) if layer.v is not None else -g)
    if needs.v:
        add("v", -(g.t() @ layer.t[rows].to(g.dtype)))
    if needs.c:
        add("c", -col)


def grads_like(grads: dict[str, Tensor], layer: FilteredMSELayer) -> FilteredMSELayer:
    """A layer's gradients by role (None where none was computed), each in the dtype of its input."""
    return FilteredMSELayer(*(None if role not in grads else grads[role].to(x.dtype) for role, x in zip(ROLES, layer)))


def target_rows(layer: FilteredMSELayer, rows: slice, dtype: torch.dtype) -> Tensor:
    """Rows of a layer's teacher states or targets in ``dtype``: quantized targets dequantized by their scales."""
    t = layer.t[rows].to(dtype)
    return t if layer.q is None else t * layer.q[rows].to(dtype)[:, None]


# --------------------------------------------------------------------------- the PyTorch path


def filtered_mse_chunked(layers, mask, count, layer_scale, needs) -> tuple[Tensor, list[FilteredMSELayer]]:
    """The CPU path of :func:`filtered_mse`: loss terms and gradients.

    layers: FilteredMSELayer per mapped layer; mask: (N,) fp32 or None; count:
    0-dim sum of the mask; layer_scale: (L,) w_l / sum(w); needs: one
    FilteredMSELayer of bools per layer. Works a block of rows at a time in
    fp32 (fp64 for fp64 inputs), so it never holds the projected tensors of
    all layers (or of a whole layer) at once. Returns (sq_err, grads): (L,)
    sums of m_i * E_l,ij^2 and, per layer, a FilteredMSELayer of gradients
    (None where not needed) in the dtype of their inputs.
    """
    sq_err = []
    all_grads = []
    safe = safe_count(count)
    for l, (layer, need) in enumerate(zip(layers, needs)):
        acc_dtype = torch.promote_types(layer.s.dtype, torch.float32)
        n_rows = layer.s.shape[0]
        d_f = layer.w.shape[0] if layer.w is not None else layer.s.shape[1]
        widest = max(layer.s.shape[1], layer.t.shape[1], d_f)
        block = max(1, CHUNK_ELEMENTS // widest)
        w = layer.w.to(acc_dtype) if layer.w is not None else None
        v = layer.v.to(acc_dtype) if layer.v is not None else None
        b = layer.b.to(acc_dtype) if layer.b is not None else None
        c = layer.c.to(acc_dtype) if layer.c is not None else None
        scale = 2.0 * layer_scale[l].to(acc_dtype) / (d_f * safe.to(acc_dtype))
        wide = FilteredMSELayer(layer.s, w, b, layer.t, v, c, layer.q)
        bias = b if c is None else (-c if b is None else b - c)  # both biases in one: one pass fewer per block
        total = torch.zeros((), dtype=acc_dtype, device=layer.s.device)
        grads: dict[str, Tensor] = {}
        for start in range(0, n_rows, block):
            rows = slice(start, min(start + block, n_rows)) if block < n_rows else slice(None)
            s = layer.s[rows].to(acc_dtype)
            t = target_rows(layer, rows, acc_dtype)
            # err = S W^T + b - (H V^T + c), built in one buffer
            if w is None:
                err = s.clone() if bias is None else s + bias
            else:
                err = s @ w.t() if bias is None else torch.addmm(bias, s, w.t())
            if v is not None:
                err.addmm_(t, v.t(), alpha=-1)
            else:
                err -= t
            row_sq = torch.linalg.vecdot(err, err)  # (R,) squared error per token
            if mask is not None:
                m = mask[rows].to(acc_dtype)
                total += row_sq @ m
            else:
                total += row_sq.sum()
            if any(need):
                weight = scale if mask is None else m[:, None] * scale
                accumulate_grads(err.mul_(weight), rows, wide, need, grads)
        sq_err.append(total)
        all_grads.append(grads_like(grads, layer))
    return torch.stack(sq_err), all_grads


# --------------------------------------------------------------------------- the Triton path


def launch_group_key(layer: FilteredMSELayer) -> tuple:
    """Layers with the same key (which roles are present, widths, row strides) share one kernel launch."""
    return (
        layer.w is None,
        layer.b is None,
        layer.v is None,
        layer.c is None,
        layer.q is None,
        layer.t.dtype,
        layer.s.shape[1],
        layer.t.shape[1],
        layer.s.stride(0),
        layer.t.stride(0),
    )


def filtered_mse_triton(layers, mask, count, layer_scale, needs) -> tuple[Tensor, list[FilteredMSELayer]]:
    """The Triton path, same contract as :func:`filtered_mse_chunked`: one kernel launch per group of layers
    with one :func:`launch_group_key`, then the backward GEMMs of one layer at a time."""
    from fastted.kernels import device_arch
    from fastted.kernels.filtered_mse import filtered_mse_forward

    # fp8 targets load as fp8 only from sm_89 on: before that they are dequantized here, in the states' dtype.
    if device_arch(layers[0].s.device).capability < 89:
        layers = [
            l._replace(t=target_rows(l, slice(None), l.s.dtype), q=None) if l.t.dtype == torch.float8_e4m3fn else l
            for l in layers
        ]
    # States keep their row stride; weights and biases must be contiguous.
    layers = [
        FilteredMSELayer(*(None if x is None else aligned(x, role not in STATE_ROLES) for role, x in zip(ROLES, l)))
        for l in layers
    ]
    groups: dict[tuple, list[int]] = {}
    for i, layer in enumerate(layers):
        groups.setdefault(launch_group_key(layer), []).append(i)

    sq_err = torch.empty(len(layers), dtype=torch.float32, device=layers[0].s.device)
    all_grads: list[FilteredMSELayer] = [FilteredMSELayer(*[None] * len(ROLES)) for _ in layers]
    for idx in groups.values():
        group = [layers[i] for i in idx]
        want_grad = any(any(needs[i]) for i in idx)
        want_colsum = any(needs[i].b or needs[i].c for i in idx)
        by_role = [None if r[0] is None else list(r) for r in zip(*group)]  # per role: the group's tensors
        index = torch.tensor(idx, device=sq_err.device) if len(idx) < len(layers) else None
        sq, grad_errs, colsum = filtered_mse_forward(
            *by_role,
            mask,
            count,
            layer_scale if index is None else layer_scale[index],
            write_grad=want_grad,
            write_colsum=want_colsum,
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
            grads: dict[str, Tensor] = {}
            accumulate_grads(g, slice(None), layers[i], needs[i], grads, colsum=None if colsum is None else colsum[j])
            all_grads[i] = grads_like(grads, layers[i])
    return sq_err, all_grads


# --------------------------------------------------------------------------- autograd


class FilteredMSEFunction(torch.autograd.Function):
    """Loss and gradients in the forward; backward scales them by grad_output.

    ``present`` says which of the six roles each layer has; ``flat`` holds
    the present tensors of every layer in that order.
    """

    @staticmethod
    def forward(ctx, impl, present, mask, layer_scale, *flat):
        # The inputs are already in the autocast dtype; the fp32 work inside stays fp32.
        with torch.autocast(flat[0].device.type, enabled=False):
            layers, needs, pos = [], [], 0
            needs_grad = ctx.needs_input_grad[4:]
            for has_roles in present:
                fields, flags = [], []
                for has in has_roles:
                    fields.append(flat[pos] if has else None)
                    flags.append(bool(needs_grad[pos]) if has else False)
                    pos += has
                layers.append(FilteredMSELayer(*fields))
                needs.append(FilteredMSELayer(*flags))

            n_rows = layers[0].s.shape[0]
            count = mask.sum() if mask is not None else torch.full((), float(n_rows), device=layers[0].s.device)
            if impl == "triton":
                sq_err, grads = filtered_mse_triton(layers, mask, count.reshape(1), layer_scale, needs)
            else:
                sq_err, grads = filtered_mse_chunked(layers, mask, count, layer_scale, needs)

            d_fs = [l.w.shape[0] if l.w is not None else l.s.shape[1] for l in layers]
            d_f = d_fs[0] if len(set(d_fs)) == 1 else torch.tensor(d_fs, dtype=sq_err.dtype).to(sq_err.device)
            layer_losses = sq_err / (d_f * safe_count(count).to(sq_err.dtype))
            loss = (layer_losses * layer_scale.to(sq_err.dtype)).sum()

        save_gradients(
            ctx, [g for layer_grads, has_roles in zip(grads, present) for g, has in zip(layer_grads, has_roles) if has]
        )
        ctx.mark_non_differentiable(layer_losses)
        return loss, layer_losses

    @staticmethod
    def backward(ctx, grad_loss, grad_layer_losses):
        return (None, None, None, None, *scaled_gradients(ctx, grad_loss))


# --------------------------------------------------------------------------- public API


def filtered_mse(
    student_states: Sequence[Tensor],
    student_weights: Sequence[Optional[Tensor]],
    teacher_states: Sequence[Tensor],
    *,
    student_biases: Optional[Sequence[Optional[Tensor]]] = None,
    teacher_weights: Optional[Sequence[Optional[Tensor]]] = None,
    teacher_biases: Optional[Sequence[Optional[Tensor]]] = None,
    teacher_scales: Optional[Sequence[Tensor]] = None,
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
        teacher_scales: L fp32 row scales of the leading shape, when the
            targets are quantized (``teacher_states`` int8 or float8_e4m3fn,
            no teacher_weights: Y_l = teacher_states * scale per row, what
            :mod:`fastted.train.cache` stores): dequantized inside the kernel (fp8
            from sm_89 on; before, and on the CPU path, in the states' dtype).
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
    layers, mask, layer_scale = filtered_mse_inputs(
        student_states,
        student_weights,
        teacher_states,
        student_biases,
        teacher_weights,
        teacher_biases,
        mask,
        layer_weights,
        teacher_scales,
    )
    ref = layers[0].s
    impl = resolve_impl(impl, ref.device, ref.dtype)
    present = tuple(tuple(x is not None for x in layer) for layer in layers)
    flat = detach_without_grad(x for layer in layers for x in layer if x is not None)
    loss, layer_losses = FilteredMSEFunction.apply(impl, present, mask, layer_scale, *flat)
    return (loss, layer_losses) if return_layer_losses else loss


class FilteredMSELoss(nn.Module):
    """nn.Module over :func:`filtered_mse`.

    After each call, ``layer_losses`` holds the detached (L,) per-layer losses
    (on the inputs' device: reading them is the caller's sync, not the loss's).
    """

    def __init__(self, layer_weights: Optional[Sequence[float] | Tensor] = None, impl: str = "auto"):
        super().__init__()
        check_impl(impl)
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
            student_states,
            student_weights,
            teacher_states,
            student_biases=student_biases,
            teacher_weights=teacher_weights,
            teacher_biases=teacher_biases,
            mask=mask,
            layer_weights=self.layer_weights,
            impl=self.impl,
            return_layer_losses=True,
        )
        return loss

    def extra_repr(self) -> str:
        return f"impl={self.impl!r}, layer_weights={self.layer_weights!r}"


# --------------------------------------------------------------------------- what the tools know of this op

# The sizes the compile tier records: the benchmarks' (so their variants are the ones the table shows), odd ones
# (no divisibility by 16 anywhere), and the largest the API accepts (for the grid limits; they add no variant).
COMPILE_SIZES = [
    ((4096, 384, 768, 384), "benchmark"),
    ((8192, 2048, 4096, 2048), "large"),
    ((1000, 100, 300, 50), "odd"),
    ((2**20, 4096, 8192, 4096), "largest"),
]


def _compile_cases(full: bool, sizes=COMPILE_SIZES):
    """The compile tier's cases: (case, run) pairs whose runs call the launchers on meta tensors."""
    from fastted.kernels import device_arch
    from fastted.kernels.filtered_mse import filtered_mse_forward
    from fastted.kernels.resources import DTYPES, META, empty, flag_sets, reduced

    for dtype in DTYPES:
        for (n, d_s, d_t, d_f), size in sizes:
            # the GEMM structure: student filter or identity, teacher filter or targets given
            for has_w, has_v in ((1, 1), (1, 0), (0, 1), (0, 0)):
                for flags, configs in flag_sets(
                    full, reduced(dtype, size), biases=(1, 0), mask=(True, False), grad=("colsum", "grad", "none")
                ):
                    biases, has_mask = flags["biases"], flags["mask"]
                    write_grad = flags["grad"] != "none"
                    write_colsum = flags["grad"] == "colsum" and bool(biases and has_w)
                    layers = 3
                    s = [empty((n, d_s if has_w else d_f), dtype) for _ in range(layers)]
                    w = [empty((d_f, d_s), dtype) for _ in range(layers)] if has_w else None
                    b = [empty((d_f,), dtype) for _ in range(layers)] if has_w and biases else None
                    t = [empty((n, d_t if has_v else d_f), dtype) for _ in range(layers)]
                    v = [empty((d_f, d_t), dtype) for _ in range(layers)] if has_v else None
                    c = [empty((d_f,), dtype) for _ in range(layers)] if has_v and biases else None
                    mask = empty((n,), torch.float32) if has_mask else None
                    case = dict(
                        op="filtered_mse", size=size, dtype=str(dtype), W=has_w, V=has_v, **flags, configs=configs
                    )
                    yield (
                        case,
                        lambda: filtered_mse_forward(
                            s,
                            w,
                            b,
                            t,
                            v,
                            c,
                            None,
                            mask,
                            empty((1,), torch.float32),
                            empty((layers,), torch.float32),
                            write_grad=write_grad,
                            write_colsum=write_colsum,
                        ),
                    )
            # a teacher cache's quantized targets (int8 everywhere; fp8 loads from sm_89 on), with and without
            # the student's filter
            quantized = [torch.int8] + ([torch.float8_e4m3fn] if device_arch(META).capability >= 89 else [])
            for t_dtype in quantized:
                for has_w in (1, 0):
                    for flags, configs in flag_sets(full, True, grad=("colsum", "none")):
                        write_grad = flags["grad"] != "none"
                        layers = 3
                        s = [empty((n, d_s if has_w else d_f), dtype) for _ in range(layers)]
                        w = [empty((d_f, d_s), dtype) for _ in range(layers)] if has_w else None
                        b = [empty((d_f,), dtype) for _ in range(layers)] if has_w else None
                        t = [empty((n, d_f), t_dtype) for _ in range(layers)]
                        q = [empty((n,), torch.float32) for _ in range(layers)]
                        case = dict(
                            op="filtered_mse",
                            size=size,
                            dtype=f"{dtype}/{t_dtype}",
                            W=has_w,
                            V=0,
                            quantized=str(t_dtype),
                            **flags,
                            configs=configs,
                        )
                        yield (
                            case,
                            lambda: filtered_mse_forward(
                                s,
                                w,
                                b,
                                t,
                                None,
                                None,
                                q,
                                empty((n,), torch.float32),
                                empty((1,), torch.float32),
                                empty((layers,), torch.float32),
                                write_grad=write_grad,
                                write_colsum=write_grad and bool(has_w),
                            ),
                        )


def _tier_expectations(rows: list[dict], arch: str) -> list[str]:
    """The autotuner may pick any config its pruning keeps: each one is compiled, for every dtype."""
    from fastted.kernels import ARCHS
    from fastted.kernels.filtered_mse import configs_for
    from fastted.kernels.resources import DTYPES, config_label

    out = []
    for dtype in DTYPES:
        configs = configs_for(dtype, ARCHS[arch])
        if not configs:
            out.append(f"no autotune config of {dtype} kept on {arch}")
        compiled = {r["config"] for r in rows if r["dtype"] == str(dtype)}
        out += [
            f"{dtype} config {label} not compiled for {arch}"
            for label in (config_label(config.all_kwargs()) for config in configs)
            if label not in compiled
        ]
    return out


def _gpu_cases(tests, dtype, impl: str, cuda: bool) -> list:
    """The tests' checks of every case and shape (on a GPU a realistic one too)."""
    shapes = tests.SHAPES + ([((4, 512), 768, 1024, 1024)] if cuda else [])
    return [
        (
            dict(case=case, shape=str(shape)),
            lambda case=case, shape=shape: tests.check_filtered_mse(case, shape, dtype, "random", 3, impl),
        )
        for case in tests.CASES
        for shape in shapes
    ]


def _autotune_cases(tests, smoke: bool, cuda: bool) -> list:
    """The autotuned kernel's first call of a new key against its second and the reference: with the
    column-sum buffer (biases), without it (an identity student; a forward without gradient), where Triton
    before 3.8 zeroed None."""
    cases = [
        (case, dtype, grad)
        for dtype in (torch.bfloat16, torch.float16, torch.float32)
        for case, grad in (("filters", True), ("projection", True), ("identity", True), ("projection", False))
    ]
    if smoke:  # one case with a column-sum buffer, one without
        cases = [cases[0], next(c for c in cases if not c[2])]
    if not cuda:  # the interpreter's autotuner keeps one config unless told to sweep, and has no GPU timer
        import time

        from fastted.kernels import filtered_mse as kernel

        def cpu_bench(kernel_call, quantiles):
            start = time.perf_counter()
            kernel_call()
            return [(time.perf_counter() - start) * 1e3] * len(quantiles)

        kernel.INTERPRETER_SWEEP = 3
        kernel.INTERPRETER_TIMER = cpu_bench
    return [
        (
            dict(kernel="filtered_mse_fwd_kernel", case=case, dtype=str(dtype), grad=grad),
            lambda case=case, dtype=dtype, grad=grad: tests.check_autotune_first_call(case, dtype, grad=grad),
        )
        for case, dtype, grad in cases
    ]


def _gemms(size: dict) -> list[tuple[int, int, int]]:
    """The GEMMs of a full step: forward S W^T and H V^T; backward dS = G W and dW = G^T S (the teacher is
    frozen)."""
    n, layers, d_s, d_t, d_f = (size[k] for k in ("n_tokens", "n_layers", "d_s", "d_t", "d_f"))
    return [(n, d_s, d_f), (n, d_t, d_f), (n, d_f, d_s), (d_f, n, d_s)] * layers


KERNEL_OP = KernelOp(
    "filtered_mse",
    CompileTier(("filtered_mse_fwd_kernel",), _compile_cases, _tier_expectations),
    GpuCheck("filtered_mse", cases=_gpu_cases, gemms=_gemms, autotune=_autotune_cases),
)
