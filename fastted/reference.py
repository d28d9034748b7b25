"""The specs of fastted's ops: eager PyTorch, float64-able, what tests and benchmarks compare against.

One ``<op>_reference`` per op of :mod:`fastted.ops` (``pool_states_reference``
for :mod:`~fastted.ops.pooling`), written the way research code writes it
(per-layer ``F.linear`` + ``F.mse_loss``, as TED's code does; log_softmax +
kl_div; the (B, 1 + K) logits of InfoNCE). Tests run them in float64 as the
oracle; benchmarks time them as the eager baseline. Beside them the
conventions every op shares: the masked mean (:func:`masked_mean`, never a
division by zero), the divergences and the poolings. Nothing here imports
Triton or another fastted module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def safe_count(count: Tensor) -> Tensor:
    """The denominator of a masked mean: all tokens masked divides 0 by 1."""
    return torch.where(count > 0, count, torch.ones_like(count))


def masked_mean(rows: Tensor, valid: Tensor) -> Tensor:
    """Mean of rows over the valid ones; 0 when none is valid."""
    valid = valid.to(rows.dtype)
    return torch.where(valid > 0, rows, torch.zeros_like(rows)).mul(valid).sum() / safe_count(valid.sum())


def filtered_mse_reference(
    student_states: Sequence[Tensor],
    student_weights: Sequence[Optional[Tensor]],
    teacher_states: Sequence[Tensor],
    *,
    student_biases: Optional[Sequence[Optional[Tensor]]] = None,
    teacher_weights: Optional[Sequence[Optional[Tensor]]] = None,
    teacher_biases: Optional[Sequence[Optional[Tensor]]] = None,
    teacher_scales: Optional[Sequence[Tensor]] = None,
    mask: Optional[Tensor] = None,
    layer_weights: Optional[Sequence[float]] = None,
) -> tuple[Tensor, Tensor]:
    """Eager multi-layer filtered MSE: the spec of :func:`fastted.filtered_mse`.

    Returns ``(loss, layer_losses)``. Computes in the inputs' dtype, as an
    eager training script does; with ``mask=None`` each layer's loss is exactly
    ``F.mse_loss`` of the two filter outputs (TED's unmasked mean). Quantized
    targets (``teacher_scales``) are dequantized first, in the student's dtype.
    """
    n_layers = len(student_states)
    layer_losses = []
    for layer in range(n_layers):
        s = student_states[layer]
        w = student_weights[layer]
        b = student_biases[layer] if student_biases is not None else None
        s_proj = F.linear(s, w, b) if w is not None else (s + b if b is not None else s)
        t = teacher_states[layer]
        if teacher_scales is not None:
            t = t.to(s.dtype) * teacher_scales[layer].to(s.dtype)[..., None]
        v = teacher_weights[layer] if teacher_weights is not None else None
        c = teacher_biases[layer] if teacher_biases is not None else None
        t_proj = F.linear(t, v, c) if v is not None else (t + c if c is not None else t)
        if mask is None:
            layer_losses.append(F.mse_loss(s_proj, t_proj))
        else:
            m = mask.reshape(-1).to(s_proj.dtype)
            sq = (s_proj - t_proj).pow(2).reshape(m.shape[0], -1).mean(-1)  # (N,)
            layer_losses.append((sq * m).sum() / safe_count(m.sum()))
    losses = torch.stack(layer_losses)
    if layer_weights is None:
        return losses.mean(), losses
    lw = torch.as_tensor(layer_weights, dtype=losses.dtype, device=losses.device)
    return (losses * lw).sum() / lw.sum(), losses


# --------------------------------------------------------------------------- logit distillation

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def _kl_elementwise(p_log: Tensor, q_log: Tensor) -> Tensor:
    """exp(p_log) * (p_log - q_log), and 0 where p is 0, where F.kl_div gives NaN.

    The zero branch is fed finite values, so that autograd through it gives 0, not NaN.
    """
    zero = p_log == float("-inf")
    kl = F.kl_div(q_log.masked_fill(zero, 0.0), p_log.masked_fill(zero, 0.0), reduction="none", log_target=True)
    return kl.masked_fill(zero, 0.0)


def effective_divergence(divergence: str, beta: float) -> str:
    """The divergence computed: JSD at beta 0 and 1 is the forward and the reverse KL."""
    if divergence == "jsd" and beta in (0.0, 1.0):
        return "forward_kl" if beta == 0.0 else "reverse_kl"
    return divergence


def divergence_reference(s_log: Tensor, t_log: Tensor, divergence: str, beta: float) -> Tensor:
    """Per-row divergence between student and teacher log-probabilities (..., V) -> (...).

    forward_kl: KL(teacher || student); reverse_kl: KL(student || teacher);
    jsd: beta KL(teacher || M) + (1 - beta) KL(student || M) with the mixture
    M = beta teacher + (1 - beta) student, and at beta = 0 and 1 the forward
    and reverse KL (the convention of TRL's GKD and Liger-Kernel).
    """
    divergence = effective_divergence(divergence, beta)
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
    return masked_mean(rows, valid) * temperature**2


def topk_targets_reference(teacher_logits: Tensor, k: int, temperature: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """What a teacher cache stores per token for the KL: ``(values, indices, tail_lse)``, the k largest logits
    (..., k), their vocabulary ids (..., k), and the log-sum-exp of all the other logits divided by the
    temperature (...,), -inf when k is the vocabulary. The spec of the cache's logit targets."""
    t = teacher_logits.detach()
    values, indices = t.topk(k, dim=-1)
    rest = t.scatter(-1, indices, float("-inf"))
    return values, indices, torch.logsumexp(rest / temperature, dim=-1)


def sparse_logit_kd_reference(
    student_logits: Tensor,
    topk_values: Tensor,
    topk_ids: Tensor,
    tail_lse: Tensor,
    *,
    temperature: float = 1.0,
    mask: Optional[Tensor] = None,
) -> Tensor:
    """KL(teacher || student) against a top-k teacher: the spec of the cached teacher's logit KD.

    Both distributions at temperature T are taken over k + 1 buckets: the teacher's top-k ids one by one and
    the rest of the vocabulary as one tail bucket. The teacher's are exact from what is stored (``values``,
    ``tail_lse`` of :func:`topk_targets_reference`); the student's come from its full log-softmax (its tail
    bucket the log-sum-exp of its other logits). KL over the buckets times T^2, averaged over the mask's rows.
    With k = V (an empty tail) it is :func:`logit_kd_reference`'s forward KL; with k < V it is at most that
    (merging outcomes never increases a KL divergence).
    """
    s_log = F.log_softmax(student_logits / temperature, dim=-1)
    indices = topk_ids.long()
    t_top = topk_values.to(s_log.dtype) / temperature
    t_norm = torch.logaddexp(torch.logsumexp(t_top, dim=-1), tail_lse.to(s_log.dtype))
    p_log = torch.cat([t_top - t_norm[..., None], (tail_lse.to(s_log.dtype) - t_norm)[..., None]], dim=-1)
    s_tail = torch.logsumexp(s_log.scatter(-1, indices, float("-inf")), dim=-1)
    q_log = torch.cat([s_log.gather(-1, indices), s_tail[..., None]], dim=-1)
    zero = p_log == float("-inf")  # an empty tail: p 0 there, whatever the student's (then -inf) bucket
    rows = _kl_elementwise(p_log, q_log.masked_fill(zero, 0.0)).sum(-1)
    valid = torch.ones_like(rows) if mask is None else mask.to(rows.dtype)
    return masked_mean(rows, valid) * temperature**2


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
    shift_labels: bool = False,
    kd_ignored_rows: bool = False,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    vocab_size: Optional[int] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Eager LM heads + logit KD + cross-entropy: the spec of :func:`fastted.fused_linear_kd`.

    Materializes both (N, V) logits, as a training script does. Returns
    ``(loss, kd, ce)``: loss = soft_weight * kd + hard_weight * ce, ce the
    cross-entropy of the student logits (temperature 1) over the rows the mask
    keeps and hard_labels do not ignore, kd the logit KD over those rows too
    (over all the mask's rows with ``kd_ignored_rows`` or without labels).
    ``shift_labels``: label t + 1 is row t's (a causal LM's (B, T) labels).
    """
    v = vocab_size if vocab_size is not None else student_weight.shape[0]
    s_logits = F.linear(student_hidden, student_weight[:v], None if student_bias is None else student_bias[:v])
    t_logits = F.linear(teacher_hidden, teacher_weight[:v], None if teacher_bias is None else teacher_bias[:v])
    return _head_losses_reference(
        s_logits,
        lambda kd_mask: logit_kd_reference(
            s_logits, t_logits, temperature=temperature, divergence=divergence, beta=beta, mask=kd_mask
        ),
        mask,
        hard_labels,
        hard_weight,
        soft_weight,
        ignore_index,
        shift_labels,
        kd_ignored_rows,
    )


def _head_losses_reference(
    s_logits, kd_over, mask, hard_labels, hard_weight, soft_weight, ignore_index, shift_labels, kd_ignored_rows
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, kd, ce) of an LM head's logits: ``kd_over(rows)`` the KD term over the KD rows (the mask's, and
    the labelled ones unless ``kd_ignored_rows``), ce the cross-entropy over the labelled rows of the mask."""
    v = s_logits.shape[-1]
    if hard_labels is not None and shift_labels:
        hard_labels = F.pad(hard_labels[:, 1:], (0, 1), value=ignore_index)
    kd_mask = mask
    if hard_labels is not None and not kd_ignored_rows:
        kd_mask = (hard_labels != ignore_index) & (
            torch.ones_like(hard_labels, dtype=torch.bool) if mask is None else mask.bool()
        )
    kd = kd_over(kd_mask)
    ce = kd.new_zeros(())
    if hard_labels is not None:
        valid = hard_labels != ignore_index
        if mask is not None:
            valid = valid & mask.bool()
        rows = F.cross_entropy(
            s_logits.reshape(-1, v), torch.where(valid, hard_labels, 0).reshape(-1), reduction="none"
        )
        ce = masked_mean(rows, valid.reshape(-1))
    return soft_weight * kd + hard_weight * ce, kd, ce


def fused_linear_sparse_kd_reference(
    student_hidden: Tensor,
    student_weight: Tensor,
    topk_values: Tensor,
    topk_ids: Tensor,
    tail_lse: Tensor,
    *,
    temperature: float = 1.0,
    student_bias: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    hard_labels: Optional[Tensor] = None,
    hard_weight: float = 0.0,
    soft_weight: float = 1.0,
    ignore_index: int = -100,
    shift_labels: bool = False,
    kd_ignored_rows: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """The student's eager LM head + :func:`sparse_logit_kd_reference` + cross-entropy: the spec of
    :func:`fastted.fused_linear_sparse_kd` (rows, labels and terms as :func:`fused_linear_kd_reference`)."""
    s_logits = F.linear(student_hidden, student_weight, student_bias)
    return _head_losses_reference(
        s_logits,
        lambda kd_mask: sparse_logit_kd_reference(
            s_logits, topk_values, topk_ids, tail_lse, temperature=temperature, mask=kd_mask
        ),
        mask,
        hard_labels,
        hard_weight,
        soft_weight,
        ignore_index,
        shift_labels,
        kd_ignored_rows,
    )


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
    return masked_mean(rows, valid)


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
        (
            ps[i],
            pt[i],
            pick(student_weights, i),
            pick(student_biases, i),
            pick(teacher_weights, i),
            pick(teacher_biases, i),
        )
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
        total = total + masked_mean(((a - b) ** 2).sum(-1), valid)
    return total
