"""Losses on pooled representations: CoDIR's contrastive distillation and RAIL-KD's pooled distance.

- :func:`pool_states` pools the hidden states of every mapped layer over the
  valid tokens (mean, or the first valid token), all layers in one launch on
  a GPU, into one (B, L * d) tensor.
- :func:`contrastive_kd` is InfoNCE of student vectors against their teacher
  vectors (positives) and a memory bank of negatives; the fused kernel never
  builds the B x K score matrix.
- :func:`pooled_distance` is RAIL-KD's squared distance of pooled, projected,
  L2-normalized representations, layer-wise or concatenated.

Dispatch as for every fused loss (:mod:`fastted.losses`): CUDA tensors run
the Triton kernels, CPU tensors the PyTorch path of :mod:`fastted.reference`
(or the kernels themselves under ``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastted.losses import (
    _TRITON_DTYPES,
    _aligned,
    _as_list,
    _check_float,
    _check_impl,
    _check_int_tensor,
    _check_positive_int,
    _check_weight,
    _flat_mask,
    _resolve_impl,
)
from fastted.reference import POOLINGS, _masked_mean, _safe_count, contrastive_kd_chunked, pool_states_reference

_EPS = 1e-12  # F.normalize's floor: x / max(||x||, eps)


# =========================================================================== pooling


def _check_states(name: str, states) -> list[Tensor]:
    states = _as_list(name, states, None, False)
    if not states:
        raise ValueError(f"{name} is empty: it needs at least one layer's states (B, T, d)")
    ref = states[0]
    for i, h in enumerate(states):
        if h.dim() != 3 or h.numel() == 0:
            raise ValueError(f"{name}[{i}] has shape {tuple(h.shape)}, but needs (B, T, d), non-empty")
        if h.shape != ref.shape or h.dtype != ref.dtype or h.device != ref.device:
            raise ValueError(
                f"{name}[{i}] is {tuple(h.shape)} {h.dtype} on {h.device}, but {name}[0] is {tuple(ref.shape)} "
                f"{ref.dtype} on {ref.device}: the layers of one model must match"
            )
        if not h.is_floating_point():
            raise ValueError(f"{name}[{i}] has dtype {h.dtype}, but needs a floating-point dtype")
    return states


def _token_weights(mask: Optional[Tensor], shape: tuple, dtype: torch.dtype, device, ref_name: str) -> Tensor:
    """(B, T) mask / count in fp32 (fp64 for fp64 states): an example without valid tokens gets all zeros."""
    acc = torch.promote_types(dtype, torch.float32)
    if mask is None:
        return torch.full(shape, 1.0 / shape[1], dtype=acc, device=device)
    m = _flat_mask(mask, shape, device, ref_name).reshape(shape).to(acc)
    return (m / _safe_count(m.sum(1, keepdim=True))).contiguous()


class _MeanPoolFunction(torch.autograd.Function):
    """All layers pooled by one kernel; their gradients written by one kernel into one buffer."""

    @staticmethod
    def forward(ctx, weights, *states):
        from fastted.kernels.pooling import mean_pool_forward

        ctx.save_for_backward(weights)
        ctx.n_layers, ctx.dtype = len(states), states[0].dtype
        return mean_pool_forward(list(states), weights)

    @staticmethod
    def backward(ctx, grad):
        from fastted.kernels.pooling import mean_pool_backward

        (weights,) = ctx.saved_tensors
        grads = mean_pool_backward(_aligned(grad, False), weights, ctx.n_layers, ctx.dtype)
        return (None, *grads.unbind(0))


def pool_states(
    states: Sequence[Tensor],
    mask: Optional[Tensor] = None,
    *,
    pooling: str = "mean",
    concat: bool = True,
    impl: str = "auto",
):
    """Pool the hidden states of every mapped layer over their valid tokens.

    Args:
        states: L tensors (B, T, d) of one model (one shape and dtype).
        mask: (B, T) token mask (the attention mask); None: every token.
        pooling: "mean" over the valid tokens (CoDIR's paper), or "first":
            the first valid token (BERT's [CLS] with right padding; CoDIR's
            released code).
        concat: return one (B, L * d) tensor (layer l in columns l*d..);
            otherwise a list of L (B, d) views of it.
        impl: "auto", "triton" or "reference" (mean pooling; "first" is a
            gather on every path).

    An example without any valid token pools to zeros; the losses below
    leave such examples out of their means.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    states = _check_states("states", states)
    ref = states[0]
    shape = tuple(ref.shape[:2])
    width = ref.shape[2]
    if pooling == "first":  # a gather: the reference's is the implementation on every path
        m = None if mask is None else _flat_mask(mask, shape, ref.device, "states").reshape(shape)
        out = pool_states_reference(states, m, "first")
    else:
        weights = _token_weights(mask, shape, ref.dtype, ref.device, "states")
        if _resolve_impl(impl, ref.device, ref.dtype) == "triton":
            states = [_aligned(h, True) for h in states]
            if not torch.is_grad_enabled():
                states = [h.detach() for h in states]
            out = _MeanPoolFunction.apply(weights, *states)
        else:  # one batched matmul per layer: no (B, T, d) temporary in the forward
            w = weights.to(ref.dtype)[:, None, :]  # (B, 1, T)
            out = torch.cat([torch.bmm(w, h)[:, 0] for h in states], dim=1)
    return out if concat else list(out.split(width, dim=1))


# =========================================================================== contrastive distillation


def _check_vectors(student_vecs, teacher_vecs, negatives) -> int:
    """Validate the three tensors; return the number of anchors B."""
    for name, x in (("student_vecs", student_vecs), ("teacher_vecs", teacher_vecs), ("negatives", negatives)):
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"{name} has dtype {x.dtype}, but needs a floating-point dtype")
        if x.device != student_vecs.device:
            raise ValueError(f"{name} is on {x.device}, but student_vecs is on {student_vecs.device}")
    if student_vecs.dim() != 2 or student_vecs.numel() == 0:
        raise ValueError(f"student_vecs has shape {tuple(student_vecs.shape)}, but needs (B, D), non-empty")
    n_anchors, width = student_vecs.shape
    if teacher_vecs.shape != student_vecs.shape:
        raise ValueError(
            f"teacher_vecs has shape {tuple(teacher_vecs.shape)}, but needs {tuple(student_vecs.shape)} (the "
            f"positive of each anchor of student_vecs)"
        )
    if negatives.dim() not in (2, 3) or negatives.shape[-1] != width or (
        negatives.dim() == 3 and negatives.shape[0] != n_anchors
    ):
        raise ValueError(
            f"negatives has shape {tuple(negatives.shape)}, but needs (K, {width}) shared by the batch or "
            f"({n_anchors}, K, {width}) per anchor"
        )
    if negatives.shape[-2] == 0:
        raise ValueError(
            f"negatives has shape {tuple(negatives.shape)}: no negatives (an empty memory bank?); InfoNCE needs K >= 1"
        )
    if negatives.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "negatives requires grad, but contrastive_kd treats negatives as constants (a memory bank) and gives "
            "them no gradient: pass negatives.detach()"
        )
    return n_anchors


def _check_labels(labels, negative_labels, negatives: Tensor, n_anchors: int):
    if (labels is None) != (negative_labels is None):
        raise ValueError(
            "labels and negative_labels go together: the negatives whose label equals their anchor's are left out; "
            f"got labels={'a tensor' if labels is not None else None} and "
            f"negative_labels={'a tensor' if negative_labels is not None else None}"
        )
    if labels is None:
        return None, None
    need = tuple(negatives.shape[:-1])
    for name, x, shape in (("labels", labels, (n_anchors,)), ("negative_labels", negative_labels, need)):
        _check_int_tensor(name, x, shape, negatives.device, "negatives")
    return labels.detach().to(torch.int64).contiguous(), negative_labels.detach().to(torch.int64).contiguous()


class _ContrastiveKDFunction(torch.autograd.Function):
    """Loss and the gradients of both vectors in the forward; backward scales them."""

    @staticmethod
    def forward(ctx, impl, temperature, coef, labels, negative_labels, negatives, s, t):
        grad_s, grad_t = bool(ctx.needs_input_grad[6]), bool(ctx.needs_input_grad[7])
        opts = dict(temperature=temperature, eps=_EPS, grad_s=grad_s, grad_t=grad_t)
        if impl == "triton":
            from fastted.kernels.contrastive_kd import contrastive_forward

            rows, gs, gt = contrastive_forward(
                _aligned(s, False), _aligned(t, False), negatives.contiguous(), coef, labels=labels,
                negative_labels=negative_labels, **opts,
            )
        else:
            rows, gs, gt = contrastive_kd_chunked(s, t, negatives, coef, labels, negative_labels, **opts)
        ctx.grad_slots = (gs is not None, gt is not None)
        ctx.save_for_backward(*[g for g in (gs, gt) if g is not None])
        return rows @ coef.to(rows.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        saved = iter(ctx.saved_tensors)
        gs, gt = [next(saved) * grad_loss if has else None for has in ctx.grad_slots]
        return None, None, None, None, None, None, gs, gt


def contrastive_kd(
    student_vecs: Tensor,
    teacher_vecs: Tensor,
    negatives: Tensor,
    *,
    temperature: float = 0.07,
    mask: Optional[Tensor] = None,
    labels: Optional[Tensor] = None,
    negative_labels: Optional[Tensor] = None,
    impl: str = "auto",
) -> Tensor:
    """InfoNCE of student vectors against teacher vectors and negatives (CoDIR).

    For anchor b, with every vector L2-normalized inside the loss::

        loss_b = -log( exp(s_b.t_b / tau) / (exp(s_b.t_b / tau) + sum_k exp(s_b.n_k / tau)) )

    averaged over the anchors. The B x K scores are never materialized.

    Args:
        student_vecs: (B, D) student representations (pooled, projected).
        teacher_vecs: (B, D) teacher representations of the same inputs: the
            positives. Gradients reach both (a trainable teacher head works).
        negatives: (K, D) shared by the batch (a memory bank) or (B, K, D)
            per anchor; constants (detach them), any float dtype.
        temperature: tau > 0.
        mask: (B,) anchors to average over (e.g. examples that have a valid
            token); None: all. No anchor kept gives 0 and zero gradients.
        labels, negative_labels: (B,) and (K,) or (B, K) integers; negatives
            with their anchor's label are left out (different-label negatives
            in fine-tuning; pass example ids to leave out an anchor's own
            bank entry). An anchor left with no negative has loss 0.
        impl: "auto", "triton" or "reference".

    Returns the fp32 scalar loss (float64 for float64 vectors).
    """
    n_anchors = _check_vectors(student_vecs, teacher_vecs, negatives)
    temperature = _check_float("temperature", temperature, 0.0, low_open=True)
    labels, negative_labels = _check_labels(labels, negative_labels, negatives, n_anchors)
    acc = torch.promote_types(student_vecs.dtype, torch.float32)
    valid = torch.ones(n_anchors, dtype=acc, device=student_vecs.device)
    if mask is not None:
        valid = _flat_mask(mask, (n_anchors,), student_vecs.device, "student_vecs").to(acc)
    coef = valid / _safe_count(valid.sum())
    impl = _resolve_impl(impl, student_vecs.device, student_vecs.dtype)
    if impl == "triton" and not {teacher_vecs.dtype, negatives.dtype} <= set(_TRITON_DTYPES):
        impl = "reference"
    s, t = student_vecs, teacher_vecs
    if not torch.is_grad_enabled():  # autograd.Function would still report needs_input_grad: compute no gradient
        s, t = s.detach(), t.detach()
    return _ContrastiveKDFunction.apply(impl, temperature, coef, labels, negative_labels, negatives.detach(), s, t)


class ContrastiveKDLoss(nn.Module):
    """nn.Module over :func:`contrastive_kd`."""

    def __init__(self, temperature: float = 0.07, impl: str = "auto"):
        super().__init__()
        _check_float("temperature", temperature, 0.0, low_open=True)
        _check_impl(impl)
        self.temperature, self.impl = temperature, impl

    def forward(self, student_vecs: Tensor, teacher_vecs: Tensor, negatives: Tensor, *,
                mask: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                negative_labels: Optional[Tensor] = None) -> Tensor:
        return contrastive_kd(
            student_vecs, teacher_vecs, negatives, temperature=self.temperature, mask=mask, labels=labels,
            negative_labels=negative_labels, impl=self.impl,
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, impl={self.impl!r}"


# =========================================================================== RAIL-KD's pooled distance


def _projections(name: str, weights, biases, widths: list[int], in_name: str) -> list:
    """Validated (weight, bias) per projected vector; None weight: identity."""
    n = len(widths)
    w_list = [None] * n if weights is None else _as_list(name, weights, n, True)
    b_name = name.replace("weights", "biases")
    b_list = [None] * n if biases is None else _as_list(b_name, biases, n, True)
    for i, (w, b, width) in enumerate(zip(w_list, b_list, widths)):
        if w is not None:
            _check_weight(f"{name}[{i}]", w, None, width, in_name)
        if b is not None and (w is None or b.shape != (w.shape[0],)):
            need = f"({w.shape[0]},)" if w is not None else "None (no projection)"
            raise ValueError(f"{b_name}[{i}] has shape {tuple(b.shape)}, but needs {need}")
    return list(zip(w_list, b_list))


def valid_examples(n_examples: int, device, *masks: Optional[Tensor]) -> Tensor:
    """(B,) bool: the examples with a valid token under every given token mask ((B, T) or flat (B * T,))."""
    valid = torch.ones(n_examples, dtype=torch.bool, device=device)
    for m in masks:
        if m is not None:
            valid = valid & (m.reshape(n_examples, -1) != 0).any(1)
    return valid


def pooled_distance(
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
    impl: str = "auto",
    return_layer_losses: bool = False,
):
    """RAIL-KD's loss: squared distance of pooled, projected, L2-normalized representations.

    Every layer is pooled over its valid tokens (:func:`pool_states`), then

    - ``concat=False`` (layer-wise): for each pair l, s_l = normalize(W_l
      pool(S_l) + b_l) and t_l = normalize(V_l pool(H_l) + c_l), and the loss
      is sum_l mean_b ||s_l - t_l||^2;
    - ``concat=True``: one vector per model, s = normalize(W [pool(S_1), ...,
      pool(S_L)] + b), t likewise, and the loss is mean_b ||s - t||^2.

    Args:
        student_states, teacher_states: the mapped layers, (B, T, d_s) and
            (B, T_t, d_t) each; layer-wise needs as many of both.
        student_weights, teacher_weights: layer-wise, lists of one weight
            (D, d) per layer (None entries: identity); concatenated, one
            weight (D, L * d) per model in a one-element list. None: no
            projection (then the widths must match).
        student_biases, teacher_biases: the same layout, (D,) each, or None.
        mask: (B, T) student token mask; teacher_mask: the teacher's, default
            ``mask`` (the same tokenizer). The means run over the examples
            with a valid token in both; none gives 0 and zero gradients.
        pooling: "mean" or "first" (see :func:`pool_states`).
        return_layer_losses: also return the detached per-pair losses.

    Returns the fp32 scalar loss (float64 for float64 states), gradients
    through autograd to the states and the projections.
    """
    s_states = _check_states("student_states", student_states)
    t_states = _check_states("teacher_states", teacher_states)
    if not concat and len(s_states) != len(t_states):
        raise ValueError(
            f"teacher_states has {len(t_states)} layers, but student_states has {len(s_states)}: the layer-wise "
            f"distance needs one teacher layer per student layer (concat=True compares one vector per model)"
        )
    if t_states[0].shape[0] != s_states[0].shape[0]:
        raise ValueError(
            f"teacher_states[0] has {t_states[0].shape[0]} examples, but student_states[0] has "
            f"{s_states[0].shape[0]}: they must match"
        )
    if teacher_mask is None:
        if mask is not None and t_states[0].shape[1] != s_states[0].shape[1]:
            raise ValueError(
                f"teacher_states have {t_states[0].shape[1]} tokens, but mask covers {s_states[0].shape[1]}: "
                f"pass teacher_mask (the teacher's own attention mask)"
            )
        teacher_mask = mask
    ps = pool_states(s_states, mask, pooling=pooling, concat=concat, impl=impl)
    pt = pool_states(t_states, teacher_mask, pooling=pooling, concat=concat, impl=impl)
    ps, pt = ([ps], [pt]) if concat else (ps, pt)
    proj_s = _projections("student_weights", student_weights, student_biases, [x.shape[1] for x in ps],
                          "the pooled student layer(s)")
    proj_t = _projections("teacher_weights", teacher_weights, teacher_biases, [x.shape[1] for x in pt],
                          "the pooled teacher layer(s)")

    valid = valid_examples(ps[0].shape[0], ps[0].device, mask, teacher_mask)
    losses = []
    for a, b, (w, wb), (v, vb) in zip(ps, pt, proj_s, proj_t):
        a = a if w is None else F.linear(a, w, wb)
        b = b if v is None else F.linear(b, v, vb)
        if a.shape[1] != b.shape[1]:
            raise ValueError(
                f"the projected student vectors are {a.shape[1]} wide and the teacher's {b.shape[1]}: give "
                f"student_weights/teacher_weights that map both to one width"
            )
        acc = torch.promote_types(a.dtype, torch.float32)
        a = F.normalize(a.to(acc), dim=-1, eps=_EPS)
        b = F.normalize(b.to(acc), dim=-1, eps=_EPS)
        losses.append(_masked_mean(((a - b) ** 2).sum(-1), valid))
    layer_losses = torch.stack(losses)
    loss = layer_losses.sum()
    return (loss, layer_losses.detach()) if return_layer_losses else loss


class PooledDistanceLoss(nn.Module):
    """RAIL-KD's pooled distance with its learned projections.

    Layer-wise (``concat=False``): one ``nn.Linear(d_s, proj_dim)`` per
    student layer and one ``nn.Linear(d_t, proj_dim)`` per teacher layer.
    Concatenated: one ``nn.Linear(L_s * d_s, proj_dim)`` and one
    ``nn.Linear(L_t * d_t, proj_dim)``. ``proj_dim=None``: no projections
    (the widths must match). ``layer_losses`` holds the last call's detached
    per-pair losses.
    """

    def __init__(self, student_width: int, teacher_width: int, n_layers: int, proj_dim: Optional[int] = 128, *,
                 teacher_layers: Optional[int] = None, concat: bool = False, pooling: str = "mean",
                 bias: bool = True, impl: str = "auto"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        _check_impl(impl)
        for name, value in (("student_width", student_width), ("teacher_width", teacher_width),
                            ("n_layers", n_layers), ("proj_dim", proj_dim), ("teacher_layers", teacher_layers)):
            if value is not None:
                _check_positive_int(name, value)
        teacher_layers = n_layers if teacher_layers is None else teacher_layers
        if not concat and teacher_layers != n_layers:
            raise ValueError(f"teacher_layers={teacher_layers} differs from n_layers={n_layers}: only concat=True "
                             f"compares models with different numbers of mapped layers")
        self.concat, self.pooling, self.impl = concat, pooling, impl
        self.layer_losses: Optional[Tensor] = None
        if proj_dim is None:
            self.student_proj = self.teacher_proj = None
            return
        if concat:
            self.student_proj = nn.ModuleList([nn.Linear(n_layers * student_width, proj_dim, bias=bias)])
            self.teacher_proj = nn.ModuleList([nn.Linear(teacher_layers * teacher_width, proj_dim, bias=bias)])
        else:
            self.student_proj = nn.ModuleList(nn.Linear(student_width, proj_dim, bias=bias) for _ in range(n_layers))
            self.teacher_proj = nn.ModuleList(nn.Linear(teacher_width, proj_dim, bias=bias)
                                              for _ in range(teacher_layers))

    def forward(self, student_states: Sequence[Tensor], teacher_states: Sequence[Tensor],
                mask: Optional[Tensor] = None, teacher_mask: Optional[Tensor] = None) -> Tensor:
        heads = {}
        for side, proj in (("student", self.student_proj), ("teacher", self.teacher_proj)):
            heads[f"{side}_weights"] = None if proj is None else [p.weight for p in proj]
            heads[f"{side}_biases"] = None if proj is None else [p.bias for p in proj]
        loss, self.layer_losses = pooled_distance(
            student_states, teacher_states, mask=mask, teacher_mask=teacher_mask, pooling=self.pooling,
            concat=self.concat, impl=self.impl, return_layer_losses=True, **heads,
        )
        return loss

    def extra_repr(self) -> str:
        return f"concat={self.concat}, pooling={self.pooling!r}, impl={self.impl!r}"
