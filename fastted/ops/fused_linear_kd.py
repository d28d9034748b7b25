"""The LM heads of student and teacher fused with logit distillation (and cross-entropy) over the vocabulary.

``soft_weight * kd + hard_weight * ce`` on the logits ``x_s W_s^T + b_s`` and
``x_t W_t^T + b_t``, computed a block of rows at a time so that no (N, V)
tensor ever exists: for each block both heads run, the row kernel of
:mod:`fastted.ops.logit_kd` (Triton's ``fastted.kernels.logit_kd`` or its CPU
twin :func:`~fastted.ops.logit_kd.logit_kd_rows`) turns the student's block of
logits into its gradient in place, and the gradients of the student's hidden
states, weight and bias follow from it. This file holds the block loop, the
autograd Function, the functional :func:`fused_linear_kd` and the module
:class:`FusedLinearKDLoss`. The spec is
:func:`fastted.reference.fused_linear_kd_reference`.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastted.kernels import aligned_row_stride, device_arch
from fastted.ops.checks import check_float, check_floating, check_impl, check_like, check_weight
from fastted.ops.dispatch import autocast_dtype, detach_without_grad, resolve_impl, save_gradients
from fastted.ops.dispatch import scaled_gradients, to_autocast
from fastted.ops.logit_kd import Workspace, logit_kd_rows, logit_options, row_weights, shared_vocab

# --------------------------------------------------------------------------- the block loop

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


# What a block of rows must share each read of the heads among, and how much memory the blocks may take.
# The heads (and the fp32 weight gradient, read and written) are re-read by every block: with R rows a
# block does 2 R V (H_s + H_t [+ 2 H_s with gradients]) FLOP against that traffic, so the block must be
# large enough that the traffic costs at most 1 / AMORTIZE of the GEMMs' time at the device's balance of
# FLOP per byte. Past that, larger blocks only cost memory (and on a CPU, cache: at N = 2048, V = 32,000
# a full step takes 0.84 s with 128-row blocks, 0.86 s with 256, 1.13 s with 512; the sweep in
# benchmarks/results/2026-12-01-cpu-2core-fused-linear-kd-blocks-n2048.json).
AMORTIZE = 3
CPU_FLOPS_PER_BYTE = 16  # a 2-core AVX-512 Xeon: ~350 GFLOP/s fp32 GEMM over ~22 GB/s
MEMORY_BUDGET = {"cpu": 256 << 20, "cuda": 1 << 30}  # bytes of logits buffers (and CPU workspace) at most


def compute_bound_rows(vocab: int, h_s: int, h_t: int, e_s: int, e_t: int, needs_grad: bool, balance: float,
                       budget: int, row_bytes: int) -> int:
    """The smallest multiple of 64 rows whose GEMMs spend at most 1 / AMORTIZE of their time re-reading the
    heads at ``balance`` FLOP per byte (e_s, e_t: element sizes of the heads), or what ``budget`` bytes hold
    at ``row_bytes`` per row, whichever is fewer (before the batch's own row count)."""
    head_bytes = vocab * (e_s * h_s * (2 if needs_grad else 1) + e_t * h_t + (8 * h_s if needs_grad else 0))
    row_flops = 2 * vocab * (h_s + h_t + (2 * h_s if needs_grad else 0))
    rows = -(-AMORTIZE * balance * head_bytes // row_flops)
    rows = -(-rows // 64) * 64
    cap = budget // row_bytes
    if cap >= 32:
        cap -= cap % 16  # GEMM-friendly blocks
    return max(1, min(rows, cap))


def block_rows(n_rows: int, vocab: int, xs: Tensor, ws: Tensor, xt: Optional[Tensor], wt: Optional[Tensor],
               needs_grad: bool, chunk_size: Optional[int]) -> int:
    """Rows per block: ``chunk_size``, or the smallest block whose GEMMs stay compute-bound, within the budget.

    :func:`compute_bound_rows` at the device's FLOP per byte (the GPU
    architecture's, or CPU_FLOPS_PER_BYTE); the budget (MEMORY_BUDGET of the
    device kind, at most a sixteenth of a GPU's memory) caps the block's
    logits buffers and, on a CPU, the row function's fp32 workspace. ``xt``,
    ``wt`` None: no teacher head (a cached teacher,
    :func:`~fastted.ops.sparse_logit_kd.fused_linear_sparse_kd`).
    """
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int (rows per block), got {chunk_size!r}")
        return min(chunk_size, n_rows)
    e_s, e_t = ws.dtype.itemsize, 0 if wt is None else wt.dtype.itemsize
    h_t = 0 if xt is None else xt.shape[-1]
    device = xs.device
    if device.type == "cuda":
        balance = device_arch(device).flops_per_byte
        budget = min(MEMORY_BUDGET["cuda"], torch.cuda.get_device_properties(device).total_memory // 16)
        row_bytes = vocab * (e_s + e_t)
    else:
        balance, budget = CPU_FLOPS_PER_BYTE, MEMORY_BUDGET["cpu"]
        row_bytes = vocab * (e_s + e_t + 4 * 4)  # the row function's fp32 buffers: up to four (JSD + CE)
    rows = compute_bound_rows(vocab, xs.shape[-1], h_t, e_s, e_t, needs_grad, balance, budget, row_bytes)
    return min(rows, n_rows)


def _head(x: Tensor, w: Tensor, b: Optional[Tensor], out: Tensor) -> Tensor:
    """x w^T + b into ``out`` (a view of a logits buffer), returned."""
    return torch.addmm(b, x, w.t(), out=out) if b is not None else torch.mm(x, w.t(), out=out)


def fused_linear_kd_blocks(
    xs: Tensor,
    ws: Tensor,
    bs: Optional[Tensor],
    teacher_block,
    kd_coef: Tensor,
    labels: Optional[Tensor],
    ce_coef: Optional[Tensor],
    needs: tuple[bool, bool, bool],
    *,
    rows_fn,
    chunk_rows: int,
    stride: Optional[int] = None,
    **opts,
):
    """The student's LM head and the logit losses, ``chunk_rows`` rows at a time: every path of
    :func:`fused_linear_kd` and :func:`~fastted.ops.sparse_logit_kd.fused_linear_sparse_kd`.

    xs (N, H_s), ws (V, H_s), bs (V,): the student head. For each block of rows
    ``r`` the student logits are computed, ``teacher_block(r, rows)`` gives the
    teacher's side of the block (its logits, or a cache's top-k), ``rows_fn``
    (:func:`~fastted.ops.logit_kd.logit_kd_rows`, the Triton kernel's
    ``logit_kd_rows_triton``, or the sparse twins: same contract) turns the
    student block into its gradient in place, and the gradients of xs, ws, bs
    follow from it; no (N, V) tensor ever exists. needs: which of xs, ws, bs
    want a gradient. Weight and bias gradients are accumulated in fp32.
    ``stride``: the logits buffer's row stride, past V (a 16-byte multiple for
    the Triton kernels' 128-bit loads); its padding holds -inf.
    Returns (kd_rows, ce_rows, (gx, gw, gb)).
    """
    n_rows = xs.shape[0]
    want = any(needs)
    acc = torch.promote_types(ws.dtype, torch.float32)
    gx = torch.empty_like(xs) if needs[0] else None
    gw = torch.zeros(ws.shape, dtype=acc, device=ws.device) if needs[1] else None
    gb = torch.zeros(ws.shape[0], dtype=acc, device=ws.device) if needs[2] else None
    kd_rows, ce_rows = [], []
    vocab = ws.shape[0]
    stride = stride or vocab
    zs_buf = torch.empty((min(chunk_rows, n_rows), stride), dtype=ws.dtype, device=ws.device)
    for start in range(0, n_rows, chunk_rows):
        r = slice(start, start + chunk_rows)
        x = xs[r]
        zs = _head(x, ws, bs, zs_buf[: x.shape[0], :vocab])  # (R, V)
        if stride > vocab:  # the row kernel wrote the padding's gradient (0) into it for the block before
            zs_buf[:, vocab:] = float("-inf")
        kd, ce = rows_fn(
            zs, teacher_block(r, x.shape[0]), kd_coef[r], None if labels is None else labels[r],
            None if ce_coef is None else ce_coef[r], zs if want else None, **opts,
        )
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


def teacher_head_blocks(xt: Tensor, wt: Tensor, bt: Optional[Tensor], chunk_rows: int, stride: int):
    """``teacher_block`` of :func:`fused_linear_kd_blocks` for a live teacher: its head's logits of the rows,
    in one buffer every block shares (padding past V at -inf, which the row kernel loads)."""
    vocab = wt.shape[0]
    zt_buf = torch.empty((min(chunk_rows, xt.shape[0]), stride), dtype=wt.dtype, device=wt.device)
    if stride > vocab:
        zt_buf[:, vocab:] = float("-inf")
    return lambda r, rows: _head(xt[r], wt, bt, zt_buf[:rows, :vocab])


def head_loss(kd_rows: Tensor, ce_rows: Optional[Tensor], kd_coef: Tensor, ce_coef: Optional[Tensor],
              opts: dict) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, kd, ce) of the blocks' rows: kd = T^2 times the rows' weighted divergences, ce the weighted
    cross-entropies (0 without labels), loss = soft_weight * kd + hard_weight * ce."""
    kd = opts["temperature"] ** 2 * (kd_rows @ kd_coef.to(kd_rows.dtype))
    ce = ce_rows @ ce_coef.to(ce_rows.dtype) if ce_rows is not None else torch.zeros_like(kd)
    return opts["soft_weight"] * kd + opts["hard_weight"] * ce, kd, ce


def finish_head_gradients(grads, xs: Tensor, ws: Tensor, bs: Optional[Tensor], vocab: int) -> tuple:
    """(gx, gw, gb) of the first ``vocab`` entries, in the inputs' shapes and dtypes: the head's gradient is
    zero beyond the compared vocabulary."""
    gx, gw, gb = grads

    def full(g, x):
        if g is None or g.shape[0] == x.shape[0]:
            return None if g is None else g.to(x.dtype)
        out = torch.zeros_like(x)
        out[:vocab] = g
        return out

    return None if gx is None else gx.reshape(xs.shape), full(gw, ws), full(gb, bs)


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
            kd_rows, ce_rows, grads = fused_linear_kd_blocks(
                xs.reshape(-1, xs.shape[-1]), ws[:vocab], None if bs is None else bs[:vocab],
                teacher_head_blocks(x2, w2, b2, chunk_rows, stride), kd_coef, labels, ce_coef, needs,
                rows_fn=rows_fn, chunk_rows=chunk_rows, stride=stride, **opts,
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
    heads), within a memory budget (see :func:`block_rows`).

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
    args = (("student_hidden", student_hidden), ("student_weight", student_weight),
            ("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight))
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
    hard_labels = _shifted(hard_labels, ignore_index, lead) if shift_labels else hard_labels

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
        kd_coef.shape[0], vocab, student[0], student[1], teacher[0], teacher[1],
        torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in student), chunk_size,
    )
    student = detach_without_grad(student)
    loss, kd, ce = FusedLinearKDFunction.apply(
        impl, opts, vocab, chunk_rows, kd_coef, labels, ce_coef, *student, *teacher
    )
    return (loss, kd, ce) if return_terms else loss


def _shifted(labels, ignore_index: int, lead: tuple) -> Tensor:
    """(B, T) labels shifted left by one, ``ignore_index`` at the end: label t + 1 for hidden state t."""
    if not isinstance(labels, Tensor) or len(lead) != 2 or tuple(labels.shape) != lead:
        got = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"shift_labels=True shifts (B, T) hard_labels along T: it needs (B, T, H) hidden states and "
                         f"hard_labels of shape {lead if len(lead) == 2 else '(B, T)'}, got hard_labels {got} for "
                         f"hidden states of leading shape {lead}")
    return F.pad(labels[:, 1:], (0, 1), value=ignore_index)


class FusedLinearKDLoss(nn.Module):
    """nn.Module over :func:`fused_linear_kd`; ``kd`` and ``ce`` hold the last call's detached terms."""

    def __init__(self, temperature: float = 1.0, hard_weight: float = 0.0, soft_weight: float = 1.0,
                 divergence: str = "forward_kl", beta: float = 0.5, ignore_index: int = -100,
                 shift_labels: bool = False, kd_ignored_rows: bool = False,
                 vocab_size: Optional[int] = None, chunk_size: Optional[int] = None, impl: str = "auto"):
        super().__init__()
        logit_options(temperature, divergence, beta)
        check_impl(impl)
        self.options = dict(
            temperature=temperature, hard_weight=hard_weight, soft_weight=soft_weight, divergence=divergence,
            beta=beta, ignore_index=ignore_index, shift_labels=shift_labels, kd_ignored_rows=kd_ignored_rows,
            vocab_size=vocab_size, chunk_size=chunk_size, impl=impl,
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
