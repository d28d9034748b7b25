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

import math
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


# --------------------------------------------------------------------------- logit distillation

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def _kl_elementwise(p_log: Tensor, q_log: Tensor) -> Tensor:
    """exp(p_log) * (p_log - q_log), and 0 where p is 0, where F.kl_div gives NaN.

    The zero branch is fed finite values, so that autograd through it gives 0, not NaN.
    """
    zero = p_log == float("-inf")
    kl = F.kl_div(q_log.masked_fill(zero, 0.0), p_log.masked_fill(zero, 0.0), reduction="none", log_target=True)
    return kl.masked_fill(zero, 0.0)


def divergence_reference(s_log: Tensor, t_log: Tensor, divergence: str, beta: float) -> Tensor:
    """Per-row divergence between student and teacher log-probabilities (..., V) -> (...).

    forward_kl: KL(teacher || student); reverse_kl: KL(student || teacher);
    jsd: beta KL(teacher || M) + (1 - beta) KL(student || M) with the mixture
    M = beta teacher + (1 - beta) student, and at beta = 0 and 1 the forward
    and reverse KL (the convention of TRL's GKD and Liger-Kernel).
    """
    if divergence == "jsd" and beta == 0.0:
        divergence = "forward_kl"
    if divergence == "jsd" and beta == 1.0:
        divergence = "reverse_kl"
    if divergence == "forward_kl":
        return _kl_elementwise(t_log, s_log).sum(-1)
    if divergence == "reverse_kl":
        return _kl_elementwise(s_log, t_log).sum(-1)
    both = (s_log == float("-inf")) & (t_log == float("-inf"))  # M = 0 there: keep its log finite
    pair = torch.stack(
        [s_log.masked_fill(both, 0.0) + math.log(1 - beta), t_log.masked_fill(both, 0.0) + math.log(beta)]
    )
    m_log = torch.logsumexp(pair, dim=0)
    return (beta * _kl_elementwise(t_log, m_log) + (1 - beta) * _kl_elementwise(s_log, m_log)).sum(-1)


def _masked_mean(rows: Tensor, valid: Tensor) -> Tensor:
    """Mean of rows over the valid ones; 0 when none is valid."""
    valid = valid.to(rows.dtype)
    return torch.where(valid > 0, rows, torch.zeros_like(rows)).mul(valid).sum() / _safe_count(valid.sum())


def logit_kd_reference(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 2.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    mask: Optional[Tensor] = None,
) -> Tensor:
    """Eager logit KD, the spec of :func:`fastted.logit_kd`: log_softmax + kl_div.

    divergence(softmax(t / T), softmax(s / T)) * T^2, averaged over the rows
    (tokens) the mask keeps; logits of shape (..., V) in any float dtype.
    """
    s_log = F.log_softmax(student_logits / temperature, dim=-1)
    t_log = F.log_softmax(teacher_logits / temperature, dim=-1)
    rows = divergence_reference(s_log, t_log, divergence, beta)
    valid = torch.ones_like(rows) if mask is None else mask.to(rows.dtype)
    return _masked_mean(rows, valid) * temperature**2


def fused_linear_kd_reference(
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
) -> tuple[Tensor, Tensor, Tensor]:
    """Eager LM heads + logit KD + cross-entropy: the spec of :func:`fastted.fused_linear_kd`.

    Materializes both (N, V) logits, as a training script does. Returns
    ``(loss, kd, ce)``: loss = soft_weight * kd + hard_weight * ce, kd the
    logit KD over the mask's rows, ce the cross-entropy of the student logits
    (temperature 1) over the rows the mask keeps and hard_labels do not ignore.
    """
    v = vocab_size if vocab_size is not None else student_weight.shape[0]
    s_logits = F.linear(student_hidden, student_weight[:v], None if student_bias is None else student_bias[:v])
    t_logits = F.linear(teacher_hidden, teacher_weight[:v], None if teacher_bias is None else teacher_bias[:v])
    kd = logit_kd_reference(s_logits, t_logits, temperature=temperature, divergence=divergence, beta=beta, mask=mask)
    ce = kd.new_zeros(())
    if hard_labels is not None:
        valid = hard_labels != ignore_index
        if mask is not None:
            valid = valid & mask.bool()
        rows = F.cross_entropy(
            s_logits.reshape(-1, v), torch.where(valid, hard_labels, 0).reshape(-1), reduction="none"
        )
        ce = _masked_mean(rows, valid.reshape(-1))
    return soft_weight * kd + hard_weight * ce, kd, ce


def logit_kd_rows(
    zs: Tensor,
    zt: Tensor,
    kd_coef: Tensor,
    labels: Optional[Tensor],
    ce_coef: Optional[Tensor],
    grad: Optional[Tensor],
    *,
    temperature: float,
    divergence: str,
    beta: float,
    soft_weight: float,
    hard_weight: float,
) -> tuple[Tensor, Optional[Tensor]]:
    """A block of rows of the fused logit losses: the CPU twin of the Triton row kernel.

    zs, zt: (R, V) student and teacher logits; kd_coef: (R,) weight of each
    row's divergence in the mean (mask / count); labels, ce_coef: (R,) hard
    labels and the weight of each row's cross-entropy, or None. Writes
    dLoss/dzs into grad (R, V) when given, where
    loss = soft_weight T^2 sum_r kd_coef_r D_r + hard_weight sum_r ce_coef_r CE_r.
    Returns the per-row divergence D (without T^2) and cross-entropy, fp32
    (fp64 for fp64 logits), 0 on rows whose weight is 0.
    """
    acc = torch.promote_types(zs.dtype, torch.float32)
    kd_coef = kd_coef.to(acc)
    keep = kd_coef != 0
    s = zs.to(acc)
    ls = F.log_softmax(s / temperature, dim=-1)
    lt = F.log_softmax(zt.to(acc) / temperature, dim=-1)
    rows = torch.where(keep, divergence_reference(ls, lt, divergence, beta), 0)
    ce_rows = None
    if grad is not None:
        if divergence == "jsd" and 0.0 < beta < 1.0:
            q, p = ls.exp(), lt.exp()
            lm = torch.log((1 - beta) * q + beta * p)
            q_term = torch.where(q > 0, q * (ls - lm), 0)  # summed over V: KL(student || M)
            g = (1 - beta) * (q_term - q * q_term.sum(-1, keepdim=True))
        elif divergence == "reverse_kl" or (divergence == "jsd" and beta == 1.0):
            q = ls.exp()
            g = torch.where(q > 0, q * (ls - lt - rows[:, None]), 0)
        else:
            g = ls.exp() - lt.exp()
        g = g * (soft_weight * temperature * kd_coef)[:, None]
    if labels is not None:
        ce_coef = ce_coef.to(acc)
        lu = ls if temperature == 1.0 else F.log_softmax(s, dim=-1)
        in_range = (labels >= 0) & (labels < zs.shape[1])
        picked = lu.gather(1, torch.where(in_range, labels, 0)[:, None])[:, 0]
        ce_rows = torch.where(ce_coef != 0, torch.where(in_range, -picked, float("nan")), 0)
        if grad is not None:
            dce = lu.exp()
            dce.scatter_add_(1, torch.where(in_range, labels, 0)[:, None], -in_range.to(acc)[:, None])
            g = g + dce * (hard_weight * ce_coef)[:, None]
            keep = keep | (ce_coef != 0)
    if grad is not None:
        grad.copy_(torch.where(keep[:, None], g, 0))
    return rows, ce_rows


def logit_kd_chunked(s: Tensor, t: Tensor, kd_coef: Tensor, grad: Optional[Tensor], **opts) -> Tensor:
    """The CPU path of :func:`fastted.logit_kd`: :func:`logit_kd_rows` over blocks of rows.

    s, t: (N, V) logits; grad: (N, V) output for dLoss/ds, or None. Each block
    holds about a million logits, so the temporaries of the softmaxes stay
    bounded beyond the gradient itself. Returns the (N,) row divergences.
    """
    n_rows, vocab = s.shape
    step = max(1, _CHUNK_ELEMENTS // vocab)
    rows = []
    for start in range(0, n_rows, step):
        r = slice(start, start + step)
        kd, _ = logit_kd_rows(s[r], t[r], kd_coef[r], None, None, None if grad is None else grad[r], **opts)
        rows.append(kd)
    return torch.cat(rows)


_MIXED_ADDMM = {"ok": True}  # torch.addmm(..., out_dtype=) exists on CUDA in recent torch only


def _accumulate_mm(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b, with acc in fp32 and a, b in any float dtype."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if a.is_cuda and _MIXED_ADDMM["ok"]:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)  # fp32 accumulation, no (V, H) temporary
            return
        except (TypeError, RuntimeError, NotImplementedError):
            _MIXED_ADDMM["ok"] = False
    acc.add_(a @ b)


def fused_linear_kd_chunked(
    xs: Tensor,
    ws: Tensor,
    bs: Optional[Tensor],
    xt: Tensor,
    wt: Tensor,
    bt: Optional[Tensor],
    kd_coef: Tensor,
    labels: Optional[Tensor],
    ce_coef: Optional[Tensor],
    needs: tuple[bool, bool, bool],
    *,
    rows_fn,
    chunk_rows: int,
    **opts,
):
    """Both LM heads and the logit losses, ``chunk_rows`` rows at a time.

    xs (N, H_s), ws (V, H_s), bs (V,): the student head; xt, wt, bt the
    teacher's. For each block of rows the student and teacher logits are
    computed, ``rows_fn`` (:func:`logit_kd_rows` or the Triton kernel, same
    contract) turns the student block into its gradient in place, and the
    gradients of xs, ws, bs follow from it; no (N, V) tensor ever exists.
    needs: which of xs, ws, bs want a gradient. Weight and bias gradients
    are accumulated in fp32. Returns (kd_rows, ce_rows, (gx, gw, gb)).
    """
    n_rows = xs.shape[0]
    want = any(needs)
    acc = torch.promote_types(ws.dtype, torch.float32)
    gx = torch.empty_like(xs) if needs[0] else None
    gw = torch.zeros(ws.shape, dtype=acc, device=ws.device) if needs[1] else None
    gb = torch.zeros(ws.shape[0], dtype=acc, device=ws.device) if needs[2] else None
    kd_rows, ce_rows = [], []
    for start in range(0, n_rows, chunk_rows):
        r = slice(start, start + chunk_rows)
        x = xs[r]
        zs = torch.addmm(bs, x, ws.t()) if bs is not None else x @ ws.t()  # (R, V)
        zt = torch.addmm(bt, xt[r], wt.t()) if bt is not None else xt[r] @ wt.t()  # (R, V)
        kd, ce = rows_fn(
            zs, zt, kd_coef[r], None if labels is None else labels[r], None if ce_coef is None else ce_coef[r],
            zs if want else None, **opts,
        )
        del zt
        kd_rows.append(kd)
        ce_rows.append(ce)
        if want:  # zs now holds dLoss/dzs
            if gx is not None:
                torch.mm(zs, ws, out=gx[r])
            if gw is not None:
                _accumulate_mm(gw, zs.t(), x)
            if gb is not None:
                gb += zs.sum(0, dtype=acc)
    ce_rows = torch.cat(ce_rows) if labels is not None else None
    return torch.cat(kd_rows), ce_rows, (gx, gw, gb)


# --------------------------------------------------------------------------- pooling and contrastive distillation

POOLINGS = ("mean", "first")


def pool_states_reference(states: Sequence[Tensor], mask: Optional[Tensor] = None, pooling: str = "mean") -> Tensor:
    """Pooled hidden states of every layer, concatenated: L tensors (B, T, d) -> (B, L * d).

    "mean": the mean over the tokens the mask keeps; "first": the first token
    the mask keeps (position 0 without a mask: BERT's [CLS]). An example
    without any kept token pools to zeros.
    """
    ref = states[0]
    m = torch.ones(ref.shape[:2], dtype=ref.dtype, device=ref.device) if mask is None else mask.to(ref.dtype)
    if pooling == "mean":
        return torch.cat([(h * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1) for h in states], dim=1)
    rows = torch.arange(ref.shape[0], device=ref.device)
    first = (m != 0).to(torch.int64).argmax(1)  # the first kept token (0 when none is)
    keep = (m != 0).any(1, keepdim=True).to(ref.dtype)
    return torch.cat([h[rows, first] * keep for h in states], dim=1)


def _excluded(labels: Optional[Tensor], negative_labels: Optional[Tensor]) -> Optional[Tensor]:
    """(B, K) True where a negative shares its anchor's label, or None."""
    if labels is None:
        return None
    nl = negative_labels if negative_labels.dim() == 2 else negative_labels[None, :]
    return labels[:, None] == nl


def contrastive_kd_reference(
    student_vecs: Tensor,
    teacher_vecs: Tensor,
    negatives: Tensor,
    *,
    temperature: float = 0.07,
    mask: Optional[Tensor] = None,
    labels: Optional[Tensor] = None,
    negative_labels: Optional[Tensor] = None,
    eps: float = 1e-12,
) -> Tensor:
    """Eager InfoNCE, the spec of :func:`fastted.contrastive_kd`: normalize, score, cross-entropy.

    student_vecs, teacher_vecs (B, D); negatives (K, D) shared or (B, K, D)
    per anchor. Materializes the (B, 1 + K) logits, as research code does.
    Negatives whose label equals the anchor's are left out; the mean is over
    the anchors the mask keeps.
    """
    s = F.normalize(student_vecs, dim=-1, eps=eps)
    t = F.normalize(teacher_vecs, dim=-1, eps=eps)
    n = F.normalize(negatives, dim=-1, eps=eps)
    pos = (s * t).sum(-1, keepdim=True)  # (B, 1)
    neg = s @ n.t() if n.dim() == 2 else torch.bmm(n, s[:, :, None])[:, :, 0]  # (B, K)
    excluded = _excluded(labels, negative_labels)
    if excluded is not None:
        neg = neg.masked_fill(excluded, float("-inf"))
    logits = torch.cat([pos, neg], dim=1) / temperature
    target = torch.zeros(s.shape[0], dtype=torch.int64, device=s.device)
    rows = F.cross_entropy(logits, target, reduction="none")
    valid = torch.ones_like(rows) if mask is None else mask.to(rows.dtype)
    return _masked_mean(rows, valid)


def _unit(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """x / max(||x||, eps) over the last dimension, and that clamped norm."""
    norm = x.norm(dim=-1, keepdim=True).clamp_min(eps)
    return x / norm, norm


def _unit_backward(g: Tensor, x_hat: Tensor, norm: Tensor, eps: float) -> Tensor:
    """The gradient of x from that of x_hat = x / max(||x||, eps)."""
    return torch.where(norm > eps, (g - (g * x_hat).sum(-1, keepdim=True) * x_hat) / norm, g / eps)


def contrastive_kd_chunked(
    s: Tensor,
    t: Tensor,
    negatives: Tensor,
    coef: Tensor,
    labels: Optional[Tensor],
    negative_labels: Optional[Tensor],
    *,
    temperature: float,
    eps: float,
    grad_s: bool,
    grad_t: bool,
):
    """The CPU path of :func:`fastted.contrastive_kd`, the twin of the Triton kernels.

    s, t: (B, D) raw vectors; negatives (K, D) or (B, K, D); coef (B,) weight
    of each anchor in the mean. Scores a block of negatives at a time with an
    online log-sum-exp and a running softmax-weighted sum of the normalized
    negatives, so no (B, K) tensor exists beyond one block. Returns
    (loss_rows (B,), grad_s or None, grad_t or None), fp32 (fp64 for fp64).
    """
    acc = torch.promote_types(s.dtype, torch.float32)
    s_hat, s_norm = _unit(s.to(acc), eps)
    t_hat, t_norm = _unit(t.to(acc), eps)
    pos = (s_hat * t_hat).sum(1) / temperature
    q = s_hat / temperature
    # The running max starts at the positive: it stays finite, however many negatives are left out.
    m = pos.clone()
    neg = torch.zeros_like(pos)  # the negatives' share of the softmax denominator, relative to exp(m)
    o = torch.zeros_like(t_hat)  # and of its weighted sum of normalized negatives
    per_anchor = negatives.dim() == 3
    n_anchors, k_total, width = s.shape[0], negatives.shape[-2], s.shape[1]
    # A block's scores (B, k) and normalized negatives ((k, D), or (B, k, D) per anchor) hold ~a million elements.
    step = max(1, _CHUNK_ELEMENTS // (n_anchors * width if per_anchor else n_anchors + width))
    for start in range(0, k_total, step):
        n_hat, _ = _unit(negatives[..., start:start + step, :].to(acc), eps)
        sc = q @ n_hat.t() if not per_anchor else torch.einsum("bkd,bd->bk", n_hat, q)  # (B, k)
        excluded = _excluded(labels, None if labels is None else negative_labels[..., start:start + step])
        if excluded is not None:
            sc = sc.masked_fill(excluded, float("-inf"))
        m_new = torch.maximum(m, sc.max(1).values)
        alpha = torch.exp(m - m_new)
        p = torch.exp(sc - m_new[:, None])
        neg = neg * alpha + p.sum(1)
        if grad_s:
            o = o * alpha[:, None] + (p @ n_hat if not per_anchor else torch.einsum("bk,bkd->bd", p, n_hat))
        m = m_new
    w_pos = torch.exp(pos - m)
    total = w_pos + neg
    rows = (m - pos) + torch.log1p((w_pos - 1) + neg)  # lse - pos, exact while the positive dominates
    coef = coef.to(acc)
    rows = torch.where(coef != 0, rows, 0)
    scale = (coef / temperature / total)[:, None]  # 1 - p_pos = neg / total: no cancellation near p_pos = 1
    gs = gt = None
    if grad_s:
        gs = _unit_backward((o - neg[:, None] * t_hat) * scale, s_hat, s_norm, eps).to(s.dtype)
    if grad_t:
        gt = _unit_backward(-neg[:, None] * s_hat * scale, t_hat, t_norm, eps).to(t.dtype)
    return rows, gs, gt


def pooled_distance_reference(
    student_states: Sequence[Tensor],
    teacher_states: Sequence[Tensor],
    *,
    student_weights=None,
    student_biases=None,
    teacher_weights=None,
    teacher_biases=None,
    mask: Optional[Tensor] = None,
    teacher_mask: Optional[Tensor] = None,
    pooling: str = "mean",
    concat: bool = False,
    eps: float = 1e-12,
) -> Tensor:
    """Eager RAIL-KD loss, the spec of :func:`fastted.pooled_distance`.

    Pool, project (nn.Linear convention; None: identity), L2-normalize, then
    the squared Euclidean distance of student and teacher vectors, averaged
    over the examples that keep a token in both masks and summed over the
    layer pairs (``concat=False``: per-layer weight lists), or of the
    concatenated pooled layers of each model (``concat=True``: one-element
    weight lists).
    """
    teacher_mask = mask if teacher_mask is None else teacher_mask
    ps = pool_states_reference(student_states, mask, pooling)
    pt = pool_states_reference(teacher_states, teacher_mask, pooling)
    n = 1 if concat else len(student_states)  # projected vectors per model
    ps, pt = ps.chunk(n, dim=1), pt.chunk(n, dim=1)
    pick = lambda xs, i: None if xs is None else xs[i]  # noqa: E731
    pairs = [
        (ps[i], pt[i], pick(student_weights, i), pick(student_biases, i), pick(teacher_weights, i),
         pick(teacher_biases, i))
        for i in range(n)
    ]
    valid = torch.ones(ps[0].shape[0], dtype=torch.bool, device=ps[0].device)
    for m in (mask, teacher_mask):
        if m is not None:
            valid = valid & (m != 0).any(1)
    total = 0
    for a, b, w, wb, v, vb in pairs:
        a = F.normalize(a if w is None else F.linear(a, w, wb), dim=-1, eps=eps)
        b = F.normalize(b if v is None else F.linear(b, v, vb), dim=-1, eps=eps)
        total = total + _masked_mean(((a - b) ** 2).sum(-1), valid)
    return total
