"""Contrastive distillation (CoDIR): InfoNCE of student vectors against their teacher vectors and a memory bank.

For anchor b, with every vector L2-normalized inside the loss::

    loss_b = -log( exp(s_b.t_b / tau) / (exp(s_b.t_b / tau) + sum_k exp(s_b.n_k / tau)) )

averaged over the anchors the mask keeps. Neither path builds the B x K
scores: the Triton kernels (``fastted.kernels.contrastive_kd``) and the
PyTorch path (:func:`contrastive_kd_chunked`, a block of negatives at a time)
both keep an online log-sum-exp. This file holds the op's input checks, that
PyTorch path, the autograd Function, the functional :func:`contrastive_kd`
and the module :class:`ContrastiveKDLoss`. The spec is
:func:`fastted.reference.contrastive_kd_reference`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from fastted.ops.checks import check_floating, check_impl, check_int_tensor, check_temperature, flat_mask
from fastted.ops.dispatch import (
    CHUNK_ELEMENTS,
    TRITON_DTYPES,
    aligned,
    detach_without_grad,
    resolve_impl,
    save_gradients,
    scaled_gradients,
)
from fastted.ops.registry import CompileTier, GpuCheck, KernelOp
from fastted.reference import safe_count

EPS = 1e-12  # F.normalize's floor: x / max(||x||, eps)
# The widest vectors the Triton kernels take: each program holds whole rows (anchors, negatives) in
# registers, and the compile tier checks every block rule up to this width. Wider ones (rare: the
# contrastive heads project to 128-768) take the PyTorch path under impl="auto".
MAX_TRITON_WIDTH = 1024

# --------------------------------------------------------------------------- checks


def check_vectors(student_vecs, teacher_vecs, negatives) -> int:
    """Validate the three tensors; return the number of anchors B."""
    for name, x in (("student_vecs", student_vecs), ("teacher_vecs", teacher_vecs), ("negatives", negatives)):
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
        check_floating(name, x)
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
    if (
        negatives.dim() not in (2, 3)
        or negatives.shape[-1] != width
        or (negatives.dim() == 3 and negatives.shape[0] != n_anchors)
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


def check_labels(labels, negative_labels, negatives: Tensor, n_anchors: int):
    """(labels (B,), negative_labels (K,) or (B, K)) as contiguous int64, or (None, None)."""
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
        check_int_tensor(name, x, shape, negatives.device, "negatives")
    return labels.detach().to(torch.int64).contiguous(), negative_labels.detach().to(torch.int64).contiguous()


# --------------------------------------------------------------------------- the PyTorch path


def unit(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """x / max(||x||, eps) over the last dimension, and that clamped norm."""
    norm = x.norm(dim=-1, keepdim=True).clamp_min(eps)
    return x / norm, norm


def unit_backward(g: Tensor, x_hat: Tensor, norm: Tensor, eps: float) -> Tensor:
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
    """The CPU path of :func:`contrastive_kd`, the twin of the Triton kernels.

    s, t: (B, D) raw vectors; negatives (K, D) or (B, K, D); coef (B,) weight
    of each anchor in the mean. Scores a block of negatives at a time with an
    online log-sum-exp and a running softmax-weighted sum of the normalized
    negatives, so no (B, K) tensor exists beyond one block. Returns
    (loss_rows (B,), grad_s or None, grad_t or None), fp32 (fp64 for fp64).
    """
    acc = torch.promote_types(s.dtype, torch.float32)
    s_hat, s_norm = unit(s.to(acc), eps)
    t_hat, t_norm = unit(t.to(acc), eps)
    pos = (s_hat * t_hat).sum(1) / temperature
    q = s_hat / temperature
    # The running max starts at the positive: it stays finite, however many negatives are left out.
    m = pos.clone()
    neg = torch.zeros_like(pos)  # the negatives' share of the softmax denominator, relative to exp(m)
    o = torch.zeros_like(t_hat)  # and of its weighted sum of normalized negatives
    per_anchor = negatives.dim() == 3
    n_anchors, k_total, width = s.shape[0], negatives.shape[-2], s.shape[1]
    # A block's scores (B, k) and normalized negatives ((k, D), or (B, k, D) per anchor) hold ~a million elements.
    block = max(1, CHUNK_ELEMENTS // (n_anchors * width if per_anchor else n_anchors + width))
    for start in range(0, k_total, block):
        n_hat, _ = unit(negatives[..., start : start + block, :].to(acc), eps)
        sc = q @ n_hat.t() if not per_anchor else torch.einsum("bkd,bd->bk", n_hat, q)  # (B, k)
        if labels is not None:  # leave out the negatives that share their anchor's label
            block_labels = negative_labels[..., start : start + block]
            sc = sc.masked_fill(
                labels[:, None] == (block_labels if per_anchor else block_labels[None, :]), float("-inf")
            )
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
        gs = unit_backward((o - neg[:, None] * t_hat) * scale, s_hat, s_norm, eps).to(s.dtype)
    if grad_t:
        gt = unit_backward(-neg[:, None] * s_hat * scale, t_hat, t_norm, eps).to(t.dtype)
    return rows, gs, gt


# --------------------------------------------------------------------------- autograd


class ContrastiveKDFunction(torch.autograd.Function):
    """Loss and the gradients of both vectors in the forward; backward scales them."""

    @staticmethod
    def forward(ctx, impl, temperature, coef, labels, negative_labels, negatives, s, t):
        grad_s, grad_t = bool(ctx.needs_input_grad[6]), bool(ctx.needs_input_grad[7])
        opts = dict(temperature=temperature, eps=EPS, grad_s=grad_s, grad_t=grad_t)
        if impl == "triton":
            from fastted.kernels.contrastive_kd import contrastive_forward

            rows, gs, gt = contrastive_forward(
                aligned(s, False),
                aligned(t, False),
                negatives.contiguous(),
                coef,
                labels=labels,
                negative_labels=negative_labels,
                **opts,
            )
        else:
            rows, gs, gt = contrastive_kd_chunked(s, t, negatives, coef, labels, negative_labels, **opts)
        save_gradients(ctx, (gs, gt))
        return rows @ coef.to(rows.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        return (None,) * 6 + tuple(scaled_gradients(ctx, grad_loss))


# --------------------------------------------------------------------------- public API


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
        impl: "auto", "triton" or "reference". The Triton kernels take
            vectors up to MAX_TRITON_WIDTH (1024) wide; "auto" runs wider ones
            on the PyTorch path.

    Returns the fp32 scalar loss (float64 for float64 vectors).
    """
    n_anchors = check_vectors(student_vecs, teacher_vecs, negatives)
    temperature = check_temperature("temperature", temperature)
    labels, negative_labels = check_labels(labels, negative_labels, negatives, n_anchors)
    acc = torch.promote_types(student_vecs.dtype, torch.float32)
    valid = torch.ones(n_anchors, dtype=acc, device=student_vecs.device)
    if mask is not None:
        valid = flat_mask(mask, (n_anchors,), student_vecs.device, "student_vecs").to(acc)
    coef = valid / safe_count(valid.sum())
    requested = impl
    impl = resolve_impl(impl, student_vecs.device, student_vecs.dtype)
    if impl == "triton" and student_vecs.shape[1] > MAX_TRITON_WIDTH:
        if requested == "triton":
            raise ValueError(
                f"student_vecs has width {student_vecs.shape[1]}, but impl='triton' takes at most "
                f"{MAX_TRITON_WIDTH} (the kernels hold a vector per row); use impl='auto'"
            )
        impl = "reference"
    if impl == "triton" and not {teacher_vecs.dtype, negatives.dtype} <= set(TRITON_DTYPES):
        impl = "reference"
    s, t = detach_without_grad([student_vecs, teacher_vecs])
    return ContrastiveKDFunction.apply(impl, temperature, coef, labels, negative_labels, negatives.detach(), s, t)


class ContrastiveKDLoss(nn.Module):
    """nn.Module over :func:`contrastive_kd`."""

    def __init__(self, temperature: float = 0.07, impl: str = "auto"):
        super().__init__()
        check_temperature("temperature", temperature)
        check_impl(impl)
        self.temperature, self.impl = temperature, impl

    def forward(
        self,
        student_vecs: Tensor,
        teacher_vecs: Tensor,
        negatives: Tensor,
        *,
        mask: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        negative_labels: Optional[Tensor] = None,
    ) -> Tensor:
        return contrastive_kd(
            student_vecs,
            teacher_vecs,
            negatives,
            temperature=self.temperature,
            mask=mask,
            labels=labels,
            negative_labels=negative_labels,
            impl=self.impl,
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, impl={self.impl!r}"


# --------------------------------------------------------------------------- what the tools know of this op

# The sizes the compile tier records: the benchmarks' (so their variants are the ones the table shows), odd ones
# (no divisibility by 16 anywhere), and the largest the API accepts (for the grid limits; they add no variant).
# One size per BLOCK_D class (64 to 1024: D 513-1024 with an fp32 bank once overflowed shared memory, 129-256
# did on A100), the benchmark's, an odd one
COMPILE_SIZES = [
    ((256, 65536, 128), "benchmark"),
    ((256, 4096, 768), "d768"),
    ((64, 4096, 384), "d384"),
    ((64, 4096, 200), "d200"),
    ((64, 4096, 48), "d48"),
    ((33, 1000, 100), "odd"),
    ((2**16, 2**20, 1024), "largest"),
]


def _compile_cases(full: bool, sizes=COMPILE_SIZES):
    """The compile tier's cases: (case, run) pairs whose runs call the launchers on meta tensors."""
    from fastted.kernels.contrastive_kd import contrastive_forward
    from fastted.kernels.resources import DTYPES, empty, flag_sets, reduced

    # (student, teacher, bank): one dtype, the student's low-precision vectors against the MemoryBank's fp32
    # bank, and an fp32 teacher head beside a bf16 student
    triples = [(d, d, d) for d in DTYPES] + [
        (torch.bfloat16, torch.bfloat16, torch.float32),
        (torch.float16, torch.float16, torch.float32),
        (torch.bfloat16, torch.float32, torch.float32),
    ]
    for s_dtype, t_dtype, n_dtype in triples:
        for (b, k, d), size in sizes:
            for per_anchor in (False, True):
                if per_anchor and b * k * d > 2**34:
                    continue
                few = reduced(s_dtype, size) or reduced(n_dtype, size) or t_dtype != s_dtype
                for flags, _ in flag_sets(full, few, labels=(True, False), grads=("s,t", "s", "none")):
                    has_labels = flags["labels"]
                    grad_s, grad_t = flags["grads"] != "none", flags["grads"] == "s,t"
                    s = empty((b, d), s_dtype)
                    t = empty((b, d), t_dtype)
                    neg = empty((b, k, d) if per_anchor else (k, d), n_dtype)
                    labels = empty((b,), torch.int64) if has_labels else None
                    neg_labels = empty((b, k) if per_anchor else (k,), torch.int64) if has_labels else None
                    teacher = "" if t_dtype == s_dtype else f" (teacher {t_dtype})"
                    case = dict(
                        op="contrastive_kd",
                        size=size,
                        dtype=f"{s_dtype}/{n_dtype}{teacher}",
                        per_anchor=per_anchor,
                        **flags,
                    )
                    yield (
                        case,
                        lambda: contrastive_forward(
                            s,
                            t,
                            neg,
                            empty((b,), torch.float32),
                            labels=labels,
                            negative_labels=neg_labels,
                            temperature=0.07,
                            eps=1e-12,
                            grad_s=grad_s,
                            grad_t=grad_t,
                        ),
                    )


def _gpu_cases(tests, dtype, impl: str, cuda: bool) -> list:
    """The tests' check, shared and per-anchor banks, with and without labels (on a GPU at CoDIR's sizes)."""
    shapes = tests.SHAPES + ([(256, 65536, 128), (256, 4096, 768), (64, 4096, 1024)] if cuda else [])
    return [
        (
            dict(shape=str(shape), per_anchor=per_anchor, labels=labels),
            lambda shape=shape, per_anchor=per_anchor, labels=labels: tests.check_contrastive_kd(
                impl, *shape, dtype, per_anchor=per_anchor, use_labels=labels
            ),
        )
        for shape in shapes
        for per_anchor in (False, True)
        for labels in (False, True)
        if not (per_anchor and shape[0] * shape[1] * shape[2] > 2**27)
    ]  # no 8 GiB per-anchor banks


def _min_bytes(size: dict, variant: dict) -> int:
    """Read the bank; from hidden states (level "states"), read both models' states and write the student's
    gradient."""
    states = size["n_layers"] * size["batch"] * size["seq"] * size["width"]
    read_states = variant.get("level", "states") == "states"
    return (size["bank"] * size["proj"] + (3 * states if read_states else 0)) * getattr(torch, size["dtype"]).itemsize


KERNEL_OP = KernelOp(
    "contrastive_kd",
    CompileTier(("contrastive_partials_kernel", "contrastive_finalize_kernel"), _compile_cases),
    GpuCheck(
        "contrastive_kd",
        cases=_gpu_cases,
        variants=lambda bench: [dict(level=level) for level in bench.LEVELS],
        min_bytes=_min_bytes,
    ),
)
