"""Pure-PyTorch references of fastted's losses.

Two kinds live here, and nothing in this module imports Triton:
- ``*_reference``: the numerical spec, written the way research code writes it
  (per-layer ``F.linear`` + ``F.mse_loss``, as TED's code does). Tests run it
  in float64 as the oracle; benchmarks time it as the eager baseline.
- ``*_chunked``: the CPU path of the fused losses. It computes the loss and
  its gradients together, a block of rows at a time, so it never holds the
  projected tensors of all layers (or of a whole layer) at once.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _safe_count(count: Tensor) -> Tensor:
    """The denominator of a masked mean: all tokens masked divides 0 by 1."""
    return torch.where(count > 0, count, torch.ones_like(count))


def filtered_mse_reference(
    student_states: Sequence[Tensor],
    student_weights: Sequence[Optional[Tensor]],
    teacher_states: Sequence[Tensor],
    *,
    student_biases: Optional[Sequence[Optional[Tensor]]] = None,
    teacher_weights: Optional[Sequence[Optional[Tensor]]] = None,
    teacher_biases: Optional[Sequence[Optional[Tensor]]] = None,
    mask: Optional[Tensor] = None,
    layer_weights: Optional[Sequence[float]] = None,
) -> tuple[Tensor, Tensor]:
    """Eager multi-layer filtered MSE: the spec of :func:`fastted.filtered_mse`.

    Returns ``(loss, layer_losses)``. Computes in the inputs' dtype, as an
    eager training script does; with ``mask=None`` each layer's loss is exactly
    ``F.mse_loss`` of the two filter outputs (TED's unmasked mean).
    """
    n_layers = len(student_states)
    layer_losses = []
    for layer in range(n_layers):
        s = student_states[layer]
        w = student_weights[layer]
        b = student_biases[layer] if student_biases is not None else None
        s_proj = F.linear(s, w, b) if w is not None else (s + b if b is not None else s)
        t = teacher_states[layer]
        v = teacher_weights[layer] if teacher_weights is not None else None
        c = teacher_biases[layer] if teacher_biases is not None else None
        t_proj = F.linear(t, v, c) if v is not None else (t + c if c is not None else t)
        if mask is None:
            layer_losses.append(F.mse_loss(s_proj, t_proj))
        else:
            m = mask.reshape(-1).to(s_proj.dtype)
            sq = (s_proj - t_proj).pow(2).reshape(m.shape[0], -1).mean(-1)  # (N,)
            layer_losses.append((sq * m).sum() / _safe_count(m.sum()))
    losses = torch.stack(layer_losses)
    if layer_weights is None:
        return losses.mean(), losses
    lw = torch.as_tensor(layer_weights, dtype=losses.dtype, device=losses.device)
    return (losses * lw).sum() / lw.sum(), losses


class FilteredMSELayer(NamedTuple):
    """One mapped layer pair, as the fused paths take it (2-D, rows = tokens)."""

    s: Tensor  # (N, d_s) student states
    w: Optional[Tensor]  # (d_f, d_s) student filter weight; None: identity
    b: Optional[Tensor]  # (d_f,) student filter bias
    t: Tensor  # (N, d_t) teacher states, or (N, d_f) targets when v is None
    v: Optional[Tensor]  # (d_f, d_t) teacher filter weight; None: t are the targets
    c: Optional[Tensor]  # (d_f,) teacher filter bias


def accumulate_filtered_mse_grads(grad_err, rows, layer, needs, grads, colsum=None):
    """Turn dLoss/dE for a block of rows into gradients of the layer's inputs.

    grad_err: (R, d_f) dLoss/dE for ``layer``'s rows ``rows`` (a slice);
    needs: a FilteredMSELayer of bools; grads: a list of six entries in
    FilteredMSELayer order, filled in place: row blocks of the state
    gradients are written into full (N, d) tensors, weight and bias gradients
    are summed over blocks (in grad_err's dtype). colsum: grad_err summed over
    rows, when the caller already has it (the kernel's epilogue computes it).
    """
    whole = rows == slice(None)

    def put(i, n_rows, value):
        if whole:
            grads[i] = value
        else:
            if grads[i] is None:
                grads[i] = value.new_empty((n_rows, value.shape[1]))
            grads[i][rows] = value

    def add(i, value):
        grads[i] = value if grads[i] is None else grads[i].add_(value)

    g = grad_err
    if needs.b or needs.c:
        col = colsum if colsum is not None else g.sum(0)
    if needs.s:
        put(0, layer.s.shape[0], g @ layer.w.to(g.dtype) if layer.w is not None else g)
    if needs.w:
        add(1, g.t() @ layer.s[rows].to(g.dtype))
    if needs.b:
        add(2, col)
    if needs.t:
        put(3, layer.t.shape[0], -(g @ layer.v.to(g.dtype)) if layer.v is not None else -g)
    if needs.v:
        add(4, -(g.t() @ layer.t[rows].to(g.dtype)))
    if needs.c:
        add(5, -col)


def cast_grads_like(grads, layer):
    """Each of a layer's six gradients in the dtype of its input."""
    return [None if g is None else g.to(x.dtype) for g, x in zip(grads, layer)]


# Rows per block of the chunked path: about a million elements of the widest side.
_CHUNK_ELEMENTS = 1 << 20


def filtered_mse_chunked(layers, mask, count, layer_scale, needs):
    """The CPU path of :func:`fastted.filtered_mse`: loss terms and gradients.

    layers: FilteredMSELayer per mapped layer; mask: (N,) fp32 or None; count:
    0-dim sum of the mask; layer_scale: (L,) w_l / sum(w); needs: one
    FilteredMSELayer of bools per layer. Works a block of rows at a time in
    fp32 (fp64 for fp64 inputs). Returns (sq_err, grads): (L,) sums of
    m_i * E_l,ij^2 and, per layer, six gradients (None where not needed) in
    the dtype of their inputs.
    """
    sq_err = []
    all_grads = []
    safe = _safe_count(count)
    for l, (layer, need) in enumerate(zip(layers, needs)):
        acc_dtype = torch.promote_types(layer.s.dtype, torch.float32)
        n_rows = layer.s.shape[0]
        d_f = layer.w.shape[0] if layer.w is not None else layer.s.shape[1]
        widest = max(layer.s.shape[1], layer.t.shape[1], d_f)
        step = max(1, _CHUNK_ELEMENTS // widest)
        w = layer.w.to(acc_dtype) if layer.w is not None else None
        v = layer.v.to(acc_dtype) if layer.v is not None else None
        b = layer.b.to(acc_dtype) if layer.b is not None else None
        c = layer.c.to(acc_dtype) if layer.c is not None else None
        scale = 2.0 * layer_scale[l].to(acc_dtype) / (d_f * safe.to(acc_dtype))
        wide = FilteredMSELayer(layer.s, w, b, layer.t, v, c)
        total = torch.zeros((), dtype=acc_dtype, device=layer.s.device)
        grads = [None] * 6
        for start in range(0, n_rows, step):
            rows = slice(start, min(start + step, n_rows)) if step < n_rows else slice(None)
            s = layer.s[rows].to(acc_dtype)
            t = layer.t[rows].to(acc_dtype)
            # err = S W^T + b - (H V^T + c), built in one buffer
            err = s @ w.t() if w is not None else s.clone()
            if v is not None:
                err.addmm_(t, v.t(), alpha=-1)
            else:
                err -= t
            if b is not None:
                err += b
            if c is not None:
                err -= c
            row_sq = torch.linalg.vecdot(err, err)  # (R,) squared error per token
            if mask is not None:
                m = mask[rows].to(acc_dtype)
                total += row_sq @ m
            else:
                total += row_sq.sum()
            if any(need):
                weight = scale if mask is None else m[:, None] * scale
                accumulate_filtered_mse_grads(err.mul_(weight), rows, wide, need, grads)
        sq_err.append(total)
        all_grads.append(cast_grads_like(grads, layer))
    return torch.stack(sq_err), all_grads
