"""The LM heads of student and teacher fused with logit distillation (and cross-entropy) over the vocabulary.

``soft_weight * kd + hard_weight * ce`` on the logits ``x_s W_s^T + b_s`` and
``x_t W_t^T + b_t``, computed a block of rows at a time so that no (N, V)
tensor ever exists: for each block both heads run, the row kernel of
:mod:`fastted.ops.logit_kd` (Triton's ``fastted.kernels.logit_kd`` or its CPU
twin :func:`~fastted.ops.logit_kd.logit_kd_rows`) turns the student's block of
logits into its gradient in place, and the gradients of the student's hidden
states, weight and bias follow from it. The block loop is shared with the
cached teacher's head (:mod:`fastted.ops.rows`); this file holds the
teacher's head, the autograd Function, the functional :func:`fused_linear_kd`
and the module :class:`FusedLinearKDLoss`. The spec is
:func:`fastted.reference.fused_linear_kd_reference`.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor, nn

from fastted.kernels import aligned_row_stride
from fastted.ops.checks import check_float, check_floating, check_impl, check_like, check_weight
from fastted.ops.dispatch import (
    autocast_dtype,
    detach_without_grad,
    resolve_impl,
    save_gradients,
    scaled_gradients,
    to_autocast,
)
from fastted.ops.logit_kd import logit_kd_rows
from fastted.ops.registry import GpuCheck, KernelOp
from fastted.ops.rows import (
    Workspace,
    block_rows,
    finish_head_gradients,
    head_blocks,
    head_logits,
    head_loss,
    logit_options,
    row_weights,
    shared_vocab,
    shifted_labels,
)

# --------------------------------------------------------------------------- the teacher's head


def teacher_head_blocks(xt: Tensor, wt: Tensor, bt: Optional[Tensor], chunk_rows: int, stride: int):
    """``teacher_block`` of :func:`~fastted.ops.rows.head_blocks` for a live teacher: its head's logits of the rows,
    in one buffer every block shares (padding past V at -inf, which the row kernel loads)."""
    vocab = wt.shape[0]
    zt_buf = torch.empty((min(chunk_rows, xt.shape[0]), stride), dtype=wt.dtype, device=wt.device)
    if stride > vocab:
        zt_buf[:, vocab:] = float("-inf")
    return lambda r, rows: head_logits(xt[r], wt, bt, zt_buf[:rows, :vocab])


# --------------------------------------------------------------------------- autograd


class FusedLinearKDFunction(torch.autograd.Function):
    """Both heads, loss and student gradients in the forward, a block of rows at a time."""

    @staticmethod
    def forward(ctx, impl, opts, vocab, chunk_rows, kd_coef, labels, ce_coef, xs, ws, bs, xt, wt, bt):
        with torch.autocast(xs.device.type, enabled=False):
            needs = tuple(bool(n) for n in ctx.needs_input_grad[7:10])
            if impl == "triton":
                from fastted.kernels.logit_kd import logit_kd_rows_triton as rows_fn
            else:  # the CPU twin overwrites the loop's own logits buffers, and shares its workspace across blocks
                rows_fn = functools.partial(logit_kd_rows, workspace=Workspace(), scratch=True)
            stride = aligned_row_stride(vocab, ws.dtype) if impl == "triton" else vocab
            opts = dict(opts, padded_cols=stride) if impl == "triton" else opts
            x2, w2, b2 = xt.reshape(-1, xt.shape[-1]), wt[:vocab], None if bt is None else bt[:vocab]
            kd_rows, ce_rows, grads = head_blocks(
                xs.reshape(-1, xs.shape[-1]),
                ws[:vocab],
                None if bs is None else bs[:vocab],
                teacher_head_blocks(x2, w2, b2, chunk_rows, stride),
                kd_coef,
                labels,
                ce_coef,
                needs,
                rows_fn=rows_fn,
                chunk_rows=chunk_rows,
                stride=stride,
                **opts,
            )
            loss, kd, ce = head_loss(kd_rows, ce_rows, kd_coef, ce_coef, opts)
            grads = finish_head_gradients(grads, xs, ws, bs, vocab)
        save_gradients(ctx, grads)
        ctx.mark_non_differentiable(kd, ce)
        return loss, kd, ce

    @staticmethod
    def backward(ctx, grad_loss, grad_kd, grad_ce):
        return (None,) * 7 + (*scaled_gradients(ctx, grad_loss), None, None, None)


# --------------------------------------------------------------------------- public API


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
    shift_labels: bool = False,
    kd_ignored_rows: bool = False,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    vocab_size: Optional[int] = None,
    chunk_size: Optional[int] = None,
    impl: str = "auto",
    return_terms: bool = False,
):
    """LM heads of student and teacher fused with logit KD (and cross-entropy) over the vocabulary.

    Computes ``soft_weight * kd + hard_weight * ce`` where kd is
    :func:`~fastted.ops.logit_kd.logit_kd` of the logits
    ``student_hidden @ student_weight^T + b`` and
    ``teacher_hidden @ teacher_weight^T + c`` (temperature, divergence and
    beta as there, averaged over the rows ``mask`` keeps) and ce the
    cross-entropy of the student logits (temperature 1) on ``hard_labels``,
    averaged over the rows the mask keeps and the labels do not ignore: DWT's
    and continual pre-training's ``alpha_h * CE + alpha_s * KL`` in one pass.
    The logits are computed a block of rows at a time and never exist for
    the whole batch: ``chunk_size`` rows, or by default the smallest block
    whose GEMMs stay compute-bound on the device (each block re-reads both
    heads), within a memory budget (see :func:`~fastted.ops.rows.block_rows`).

    Args:
        student_hidden: (N, H_s) or (B, T, H_s); student_weight: (V_s, H_s)
            and student_bias (V_s,): the student's LM head (nn.Linear convention).
        teacher_hidden: (..., H_t); teacher_weight (V_t, H_t), teacher_bias
            (V_t,): the teacher's head. The teacher is a constant: no
            gradient reaches it.
        mask: rows to count, of the hidden states' leading shape.
        hard_labels: integer labels of the leading shape; ``ignore_index``
            skips a row for the cross-entropy and, unless ``kd_ignored_rows``,
            for the KD term too (Liger's and TRL's convention: the KD rows
            are the labelled ones).
        shift_labels: a causal LM's call: hidden state t predicts label t + 1,
            so the labels of (B, T) are shifted left by one (the last position
            gets ``ignore_index``), as Hugging Face's causal LMs shift them;
            needs (B, T, H) hidden states. False (default): row t's label is
            ``hard_labels[t]`` (labels shifted already, or a masked LM).
        kd_ignored_rows: count the rows whose label is ``ignore_index`` in the
            KD term (distillation over every token the mask keeps, e.g. the
            unmasked tokens of an MLM batch); default False.
        vocab_size: when V_s != V_t (a padded embedding matrix), compare the
            first ``vocab_size`` entries of both (the cross-entropy too);
            without it, differing vocabularies are an error.
        return_terms: also return the detached fp32 kd and ce (0 without labels).

    Returns the fp32 scalar loss, or ``(loss, kd, ce)``. Gradients reach
    student_hidden, student_weight and student_bias, in their dtypes; under
    autocast the heads run in the autocast dtype.
    """
    args = (
        ("student_hidden", student_hidden),
        ("student_weight", student_weight),
        ("teacher_hidden", teacher_hidden),
        ("teacher_weight", teacher_weight),
    )
    for name, x in args:
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
    opts = logit_options(temperature, divergence, beta)
    opts["soft_weight"] = check_float("soft_weight", soft_weight, 0.0)
    opts["hard_weight"] = check_float("hard_weight", hard_weight, 0.0)
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
    check_weight("student_weight", ws, None, xs.shape[-1], "student_hidden")
    check_weight("teacher_weight", wt, None, xt.shape[-1], "teacher_hidden")
    for name, bias, w in (("student_bias", student_bias, ws), ("teacher_bias", teacher_bias, wt)):
        if bias is not None and (not isinstance(bias, Tensor) or bias.shape != (w.shape[0],)):
            got = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
            raise ValueError(f"{name} has shape {got}, but needs ({w.shape[0]},) (one per vocabulary entry)")
    vocab = shared_vocab(vocab_size, ws.shape[0], wt.shape[0], "student_weight", "teacher_weight")
    for name, flag in (("shift_labels", shift_labels), ("kd_ignored_rows", kd_ignored_rows)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be a bool, got {flag!r}")
    hard_labels = shifted_labels(hard_labels, ignore_index, lead) if shift_labels else hard_labels

    cast = autocast_dtype(xs.device.type)
    student = [to_autocast(x, cast) for x in (xs, ws, student_bias)]
    teacher = [to_autocast(x, cast) for x in (xt, wt, teacher_bias)]
    check_floating("student_hidden", student[0])
    check_floating("teacher_hidden", teacher[0])
    for name, x in zip(("student_weight", "student_bias"), student[1:]):
        if x is not None:
            check_like(name, x, student[0], "student_hidden")
    for name, x in zip(("teacher_hidden", "teacher_weight", "teacher_bias"), teacher):
        if x is not None:
            if x.device != xs.device:
                raise ValueError(f"{name} is on {x.device}, but student_hidden is on {xs.device}")
            check_like(name, x, teacher[0], "teacher_hidden")

    kd_coef, labels, ce_coef = row_weights(
        lead, xs.device, student[0].dtype, mask, hard_labels, ignore_index, "hard_labels", vocab, "student_hidden"
    )
    if ce_coef is not None and not kd_ignored_rows:
        kd_coef = ce_coef  # the rows the mask keeps and the labels do not ignore
    impl = resolve_impl(impl, xs.device, student[0].dtype)
    chunk_rows = block_rows(
        kd_coef.shape[0],
        vocab,
        student[0],
        student[1],
        teacher[0],
        teacher[1],
        torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in student),
        chunk_size,
    )
    student = detach_without_grad(student)
    loss, kd, ce = FusedLinearKDFunction.apply(
        impl, opts, vocab, chunk_rows, kd_coef, labels, ce_coef, *student, *teacher
    )
    return (loss, kd, ce) if return_terms else loss


class FusedLinearKDLoss(nn.Module):
    """nn.Module over :func:`fused_linear_kd`; ``kd`` and ``ce`` hold the last call's detached terms."""

    def __init__(
        self,
        temperature: float = 1.0,
        hard_weight: float = 0.0,
        soft_weight: float = 1.0,
        divergence: str = "forward_kl",
        beta: float = 0.5,
        ignore_index: int = -100,
        shift_labels: bool = False,
        kd_ignored_rows: bool = False,
        vocab_size: Optional[int] = None,
        chunk_size: Optional[int] = None,
        impl: str = "auto",
    ):
        super().__init__()
        logit_options(temperature, divergence, beta)
        check_impl(impl)
        self.options = dict(
            temperature=temperature,
            hard_weight=hard_weight,
            soft_weight=soft_weight,
            divergence=divergence,
            beta=beta,
            ignore_index=ignore_index,
            shift_labels=shift_labels,
            kd_ignored_rows=kd_ignored_rows,
            vocab_size=vocab_size,
            chunk_size=chunk_size,
            impl=impl,
        )
        self.kd: Optional[Tensor] = None
        self.ce: Optional[Tensor] = None

    def forward(
        self,
        student_hidden: Tensor,
        student_weight: Tensor,
        teacher_hidden: Tensor,
        teacher_weight: Tensor,
        *,
        student_bias: Optional[Tensor] = None,
        teacher_bias: Optional[Tensor] = None,
        mask: Optional[Tensor] = None,
        hard_labels: Optional[Tensor] = None,
    ) -> Tensor:
        loss, self.kd, self.ce = fused_linear_kd(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            student_bias=student_bias,
            teacher_bias=teacher_bias,
            mask=mask,
            hard_labels=hard_labels,
            return_terms=True,
            **self.options,
        )
        return loss

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


# --------------------------------------------------------------------------- what the tools know of this op


def _gpu_cases(tests, dtype, impl: str, cuda: bool) -> list:
    """The tests' check of every divergence (on a GPU at a Llama 3 8B-sized head too)."""
    shapes = tests.SHAPES + ([((2, 64), 2048, 4096, 128256)] if cuda else [])
    return [
        (
            dict(divergence=div, beta=beta, shape=str(shape)),
            lambda div=div, beta=beta, shape=shape: tests.check_fused_linear_kd(impl, shape, dtype, div, beta),
        )
        for div, beta in tests.DIVERGENCES
        for shape in shapes
    ]


def _gemms(size: dict) -> list[tuple[int, int, int]]:
    """Both heads forward; the student's dX = G W and dW = G^T X."""
    n, h_s, h_t, v = (size[k] for k in ("n_rows", "h_s", "h_t", "vocab"))
    return [(n, h_s, v), (n, h_t, v), (n, v, h_s), (v, n, h_s)]


KERNEL_OP = KernelOp(
    "fused_linear_kd",
    None,  # logit_kd's row kernel, on the padded buffers its compile tier records ("padded" cases)
    GpuCheck(
        "fused_linear_kd",
        cases=_gpu_cases,
        gemms=_gemms,
        variants=lambda bench: [dict(objective=objective) for objective in bench.OBJECTIVES],
        # Liger's chunked (compiled) loss has both objectives, its Triton LigerFusedLinearJSD the JSD only
        liger=lambda variant: ["liger"] + (["liger-triton"] if variant.get("objective") == "jsd" else []),
        # V = 128,256 on a GPU: does the block rule pick a block whose GEMMs are compute-bound there?
        blocks=("v128k", "small", dict(objective="jsd")),
    ),
    runs="logit_kd",
)
