"""RAIL-KD's loss: the squared distance of pooled, projected, L2-normalized representations.

Every mapped layer is pooled over its valid tokens (:func:`~fastted.ops.pooling.pool_states`,
one launch of ``fastted.kernels.pooling`` per model on a GPU), projected,
normalized, and compared layer by layer or as one concatenated vector per
model; the projections and the distance run through autograd (they are small:
(B, d) vectors). This file holds the op's checks of the projections, the
functional :func:`pooled_distance` and the module :class:`PooledDistanceLoss`,
which owns the projections. The spec is
:func:`fastted.reference.pooled_distance_reference`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastted.ops.checks import as_list, check_floating, check_impl, check_positive_int, check_weight
from fastted.ops.contrastive_kd import EPS, unit, unit_backward
from fastted.ops.dispatch import detach_without_grad, save_gradients, scaled_gradients
from fastted.ops.pooling import check_pooling, check_states, pool_states, states_bytes, valid_examples
from fastted.ops.registry import GpuCheck, KernelOp
from fastted.reference import masked_mean, safe_count


def check_projections(name: str, weights, biases, widths: list[int], in_name: str) -> list:
    """Validated (weight, bias) per projected vector; None weight: identity."""
    n = len(widths)
    w_list = [None] * n if weights is None else as_list(name, weights, n, True)
    b_name = name.replace("weights", "biases")
    b_list = [None] * n if biases is None else as_list(b_name, biases, n, True)
    for i, (w, b, width) in enumerate(zip(w_list, b_list, widths)):
        if w is not None:
            check_weight(f"{name}[{i}]", w, None, width, in_name)
        if b is not None and (w is None or b.shape != (w.shape[0],)):
            need = f"({w.shape[0]},)" if w is not None else "None (no projection)"
            raise ValueError(f"{b_name}[{i}] has shape {tuple(b.shape)}, but needs {need}")
    return list(zip(w_list, b_list))


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
    teacher_pooled: bool = False,
    impl: str = "auto",
    return_layer_losses: bool = False,
):
    """RAIL-KD's loss: squared distance of pooled, projected, L2-normalized representations.

    Every layer is pooled over its valid tokens (:func:`~fastted.ops.pooling.pool_states`), then

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
        pooling: "mean" or "first" (see :func:`~fastted.ops.pooling.pool_states`).
        teacher_pooled: ``teacher_states`` are the teacher's layers pooled
            already, (B, d_t) each (a teacher cache's): they are not pooled
            again (the teacher's valid tokens are ``mask``'s).
        return_layer_losses: also return the detached per-pair losses.

    Returns the fp32 scalar loss (float64 for float64 states), gradients
    through autograd to the states and the projections.
    """
    s_states = check_states("student_states", student_states)
    t_states = (
        _pooled("teacher_states", teacher_states, s_states)
        if teacher_pooled
        else check_states("teacher_states", teacher_states)
    )
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
        if mask is not None and not teacher_pooled and t_states[0].shape[1] != s_states[0].shape[1]:
            raise ValueError(
                f"teacher_states have {t_states[0].shape[1]} tokens, but mask covers {s_states[0].shape[1]}: "
                f"pass teacher_mask (the teacher's own attention mask)"
            )
        teacher_mask = mask
    ps = pool_states(s_states, mask, pooling=pooling, concat=concat, impl=impl)
    if teacher_pooled:
        pt = (
            torch.cat([t.to(ps.dtype if concat else ps[0].dtype) for t in t_states], -1)
            if concat
            else [t.to(ps[0].dtype) for t in t_states]
        )
    else:
        pt = pool_states(t_states, teacher_mask, pooling=pooling, concat=concat, impl=impl)
    ps, pt = ([ps], [pt]) if concat else (ps, pt)
    proj_s = check_projections(
        "student_weights", student_weights, student_biases, [x.shape[1] for x in ps], "the pooled student layer(s)"
    )
    proj_t = check_projections(
        "teacher_weights", teacher_weights, teacher_biases, [x.shape[1] for x in pt], "the pooled teacher layer(s)"
    )

    valid = valid_examples(ps[0].shape[0], ps[0].device, mask, teacher_mask)
    batched = len(ps) > 1 and _stackable(proj_s) and _stackable(proj_t)
    if batched and _width(ps, proj_s) == _width(pt, proj_t):  # all layers in one Function: (L, B, P)
        heads = [
            None if x[0] is None else torch.stack(x)
            for side in (proj_s, proj_t)
            for x in ([w for w, _ in side], [b for _, b in side])
        ]
        acc = torch.promote_types(ps[0].dtype, torch.float32)
        coef = valid.to(acc) / safe_count(valid.sum().to(acc))
        loss, layer_losses = PooledDistanceFunction.apply(
            coef, *detach_without_grad([torch.stack(ps), torch.stack(pt), *heads])
        )
        return (loss, layer_losses) if return_layer_losses else loss
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
        a = F.normalize(a.to(acc), dim=-1, eps=EPS)
        b = F.normalize(b.to(acc), dim=-1, eps=EPS)
        losses.append(masked_mean(((a - b) ** 2).sum(-1), valid))
    layer_losses = torch.stack(losses)
    loss = layer_losses.sum()
    return (loss, layer_losses.detach()) if return_layer_losses else loss


def _pooled(name: str, states, s_states) -> list[Tensor]:
    """Pooled teacher layers: a list of (B, d) float tensors, B the student's examples."""
    if isinstance(states, Tensor) or not isinstance(states, (list, tuple)) or not states:
        raise ValueError(f"{name} must be a non-empty list of pooled (B, d) tensors, got {type(states).__name__}")
    for i, x in enumerate(states):
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[0] != s_states[0].shape[0]:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"{name}[{i}] has shape {got}, but teacher_pooled needs ({s_states[0].shape[0]}, d): "
                f"one pooled vector per example"
            )
        check_floating(f"{name}[{i}]", x)
    return list(states)


def _stackable(projections: list) -> bool:
    """The layers' projections can be stacked: all absent, or all present with one shape and all with or all
    without a bias."""
    weights, biases = [w for w, _ in projections], [b for _, b in projections]
    if all(w is None for w in weights):
        return all(b is None for b in biases)
    return (
        all(w is not None for w in weights)
        and len({tuple(w.shape) for w in weights}) == 1
        and len({b is None for b in biases}) == 1
    )


def _width(vectors: list[Tensor], projections: list) -> int:
    return vectors[0].shape[1] if projections[0][0] is None else projections[0][0].shape[0]


def _project(x: Tensor, w: Optional[Tensor], b: Optional[Tensor]) -> Tensor:
    """(L, B, d) through (L, P, d) weights and (L, P) biases: (L, B, P)."""
    if w is None:
        return x
    if b is None:
        return torch.bmm(x, w.transpose(1, 2))
    return torch.baddbmm(b[:, None, :], x, w.transpose(1, 2))


class PooledDistanceFunction(torch.autograd.Function):
    """The layer-wise distance of every layer at once, loss and gradients in the forward: projections as
    batched matmuls, the normalizations and their gradients written out (a dozen small ops fewer than
    autograd's graph of the same formulas, which on a CPU costs more than the arithmetic at RAIL-KD's
    sizes)."""

    @staticmethod
    def forward(ctx, coef, xs, xt, ws, bs, wt, bt):
        acc = coef.dtype
        a_hat, a_norm = unit(_project(xs, ws, bs).to(acc), EPS)  # (L, B, P)
        b_hat, b_norm = unit(_project(xt, wt, bt).to(acc), EPS)
        diff = a_hat - b_hat
        valid = (coef != 0)[None, :, None]
        layer_losses = torch.where(valid[..., 0], (diff * diff).sum(-1), 0) @ coef  # (L,)
        needs = ctx.needs_input_grad[1:]
        grads = [None] * 6
        if any(needs):
            g_hat = torch.where(valid, diff * (2 * coef)[None, :, None], 0)  # dLoss / d a_hat = -dLoss / d b_hat
            for side, (x, w, _b, g_proj) in enumerate(
                (
                    (xs, ws, bs, unit_backward(g_hat, a_hat, a_norm, EPS)),
                    (xt, wt, bt, unit_backward(-g_hat, b_hat, b_norm, EPS)),
                )
            ):
                n_x, n_w, n_b = needs[side], needs[2 + 2 * side], needs[3 + 2 * side]
                g_proj = g_proj.to(x.dtype)
                if n_x:
                    grads[side] = g_proj if w is None else torch.bmm(g_proj, w)
                if n_w:
                    grads[2 + 2 * side] = torch.bmm(g_proj.transpose(1, 2), x)
                if n_b:
                    grads[3 + 2 * side] = g_proj.sum(1)
        save_gradients(ctx, grads)
        ctx.mark_non_differentiable(layer_losses)
        return layer_losses.sum(), layer_losses

    @staticmethod
    def backward(ctx, grad_loss, grad_layer_losses):
        return (None, *scaled_gradients(ctx, grad_loss))


class PooledDistanceLoss(nn.Module):
    """RAIL-KD's pooled distance with its learned projections.

    Layer-wise (``concat=False``): one ``nn.Linear(d_s, proj_dim)`` per
    student layer and one ``nn.Linear(d_t, proj_dim)`` per teacher layer.
    Concatenated: one ``nn.Linear(L_s * d_s, proj_dim)`` and one
    ``nn.Linear(L_t * d_t, proj_dim)``. ``proj_dim=None``: no projections
    (the widths must match). ``layer_losses`` holds the last call's detached
    per-pair losses.

    The teacher's projections are fixed (``train_teacher_projection=False``,
    the default): a random orthogonal map (its rows orthonormal, drawn from a
    generator of its own, the same on every rank and in every run), with its
    bias at zero and frozen. Trained on both sides, the distance can be
    brought to zero by the projections alone: both map every vector to one
    constant, whatever the student's states. Against a fixed teacher side,
    whose projected vectors differ from example to example as the teacher's
    states do, only a student that carries them can match.
    ``train_teacher_projection=True`` trains both, as before (collapsible).
    """

    def __init__(
        self,
        student_width: int,
        teacher_width: int,
        n_layers: int,
        proj_dim: Optional[int] = 128,
        *,
        teacher_layers: Optional[int] = None,
        concat: bool = False,
        pooling: str = "mean",
        bias: bool = True,
        train_teacher_projection: bool = False,
        impl: str = "auto",
    ):
        super().__init__()
        check_pooling(pooling)
        check_impl(impl)
        if not isinstance(train_teacher_projection, bool):
            raise ValueError(f"train_teacher_projection must be a bool, got {train_teacher_projection!r}")
        for name, value in (
            ("student_width", student_width),
            ("teacher_width", teacher_width),
            ("n_layers", n_layers),
            ("proj_dim", proj_dim),
            ("teacher_layers", teacher_layers),
        ):
            if value is not None:
                check_positive_int(name, value)
        teacher_layers = n_layers if teacher_layers is None else teacher_layers
        if not concat and teacher_layers != n_layers:
            raise ValueError(
                f"teacher_layers={teacher_layers} differs from n_layers={n_layers}: only concat=True "
                f"compares models with different numbers of mapped layers"
            )
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
            self.teacher_proj = nn.ModuleList(
                nn.Linear(teacher_width, proj_dim, bias=bias) for _ in range(teacher_layers)
            )
        if not train_teacher_projection:
            _fix(self.teacher_proj)

    @property
    def trains_teacher_projection(self) -> bool:
        return self.teacher_proj is not None and self.teacher_proj[0].weight.requires_grad

    def forward(
        self,
        student_states: Sequence[Tensor],
        teacher_states: Sequence[Tensor],
        mask: Optional[Tensor] = None,
        teacher_mask: Optional[Tensor] = None,
        teacher_pooled: bool = False,
    ) -> Tensor:
        heads = {}
        for side, proj in (("student", self.student_proj), ("teacher", self.teacher_proj)):
            heads[f"{side}_weights"] = None if proj is None else [p.weight for p in proj]
            heads[f"{side}_biases"] = None if proj is None else [p.bias for p in proj]
        loss, self.layer_losses = pooled_distance(
            student_states,
            teacher_states,
            mask=mask,
            teacher_mask=teacher_mask,
            pooling=self.pooling,
            concat=self.concat,
            teacher_pooled=teacher_pooled,
            impl=self.impl,
            return_layer_losses=True,
            **heads,
        )
        return loss

    def extra_repr(self) -> str:
        return f"concat={self.concat}, pooling={self.pooling!r}, impl={self.impl!r}"


def _fix(projections: nn.ModuleList) -> None:
    """The fixed teacher side: each projection a random orthogonal map drawn from a generator seeded by its
    index (the same on every rank and run, whatever the global random state), its bias zero, all frozen."""
    with torch.no_grad():
        for i, linear in enumerate(projections):
            nn.init.orthogonal_(linear.weight, generator=torch.Generator().manual_seed(i))
            if linear.bias is not None:
                linear.bias.zero_()
    projections.requires_grad_(False)


# --------------------------------------------------------------------------- what the tools know of this op

KERNEL_OP = KernelOp(
    "pooled_distance",
    None,
    # its kernels are pooling's (checked there); read both models' states, write the student's gradient
    GpuCheck("pooled_distance", covered_by="pooling", min_bytes=lambda size, variant: 3 * states_bytes(size)),
    runs="pooling",
)
