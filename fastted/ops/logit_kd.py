"""Logit distillation: a divergence of the tempered softmaxes of student and teacher logits, in one pass.

``D(softmax(t / T), softmax(s / T)) * T^2`` averaged over the rows the mask
keeps, D the forward KL, the reverse KL or the JSD. This file holds the op's
input checks (the logit options, the compared vocabulary and the row weights
are shared with the other logit losses: :mod:`fastted.ops.rows`), its PyTorch path
(:func:`logit_kd_rows`, the CPU twin of the Triton row kernel
``fastted.kernels.logit_kd``, and :func:`logit_kd_chunked` over blocks of
rows), the autograd Function, the functional :func:`logit_kd` and the module
:class:`LogitKDLoss`. The spec is :func:`fastted.reference.logit_kd_reference`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastted.ops.checks import check_floating, check_impl
from fastted.ops.dispatch import aligned, detach_without_grad, resolve_impl, save_gradients, scaled_gradients
from fastted.ops.registry import CompileTier, GpuCheck, KernelOp
from fastted.ops.rows import ROW_BLOCK_ELEMENTS, Workspace, kd_loss, logit_options, row_weights, shared_vocab
from fastted.reference import divergence_reference, effective_divergence

# --------------------------------------------------------------------------- checks


def check_logits(student_logits, teacher_logits) -> None:
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a tensor of shape (N, V) or (B, T, V), got {type(x).__name__}")
        if x.dim() not in (2, 3) or x.numel() == 0:
            raise ValueError(f"{name} has shape {tuple(x.shape)}, but needs (N, V) or (B, T, V) with N, V > 0")
        check_floating(name, x)
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"teacher_logits has shape {tuple(teacher_logits.shape)}, but student_logits has "
            f"{tuple(student_logits.shape)}: their leading (row/token) shapes must match"
        )
    if teacher_logits.device != student_logits.device:
        raise ValueError(
            f"teacher_logits is on {teacher_logits.device}, but student_logits is on {student_logits.device}"
        )


# --------------------------------------------------------------------------- the PyTorch path


def _log_softmax_into(out: Tensor, z: Tensor, inv_t: float) -> Tensor:
    """out = log_softmax(z * inv_t) over the last axis, written in place of out (which may be z itself).

    In place through the out= overload of ATen's CPU kernel, which reads each row before it writes it; that
    kernel writes as if out were contiguous, so a strided out goes through a temporary."""
    if inv_t != 1.0:
        z = torch.mul(z, inv_t, out=out) if z.dtype == out.dtype else out.copy_(z).mul_(inv_t)
    if not out.is_contiguous():
        return out.copy_(torch.log_softmax(z, -1, dtype=out.dtype))
    return torch.ops.aten._log_softmax.out(z.to(out.dtype), -1, False, out=out)


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """sum_v a * b per row."""
    return torch.linalg.vecdot(a, b)


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
    workspace: Optional[Workspace] = None,
    scratch: bool = False,
) -> tuple[Tensor, Optional[Tensor]]:
    """A block of rows of the fused logit losses: the CPU twin of the Triton row kernel.

    zs, zt: (R, V) student and teacher logits; kd_coef: (R,) weight of each
    row's divergence in the mean (mask / count); labels, ce_coef: (R,) hard
    labels and the weight of each row's cross-entropy, or None. Writes
    dLoss/dzs into grad (R, V) when given (grad may be zs itself: the fused
    LM head turns its block of logits into their gradient), where
    loss = soft_weight T^2 sum_r kd_coef_r D_r + hard_weight sum_r ce_coef_r CE_r.
    Returns the per-row divergence D (without T^2) and cross-entropy, fp32
    (fp64 for fp64 logits), 0 on rows whose weight is 0.

    On a CPU the divergences are written as a few fused passes over the block
    (log-softmaxes in place, the divergence from row dot products of
    log-probabilities, the gradient built in the student's buffer), about a
    third of the passes of the formulas in :func:`logit_kd_rows_exact`; rows
    where those dot products are not finite (logits of -inf: 0 * -inf) are
    then recomputed by :func:`logit_kd_rows_exact` from their saved
    log-probabilities, so banned tokens stay exact. ``workspace`` lends the
    blocks of one call their (R, V) buffers; ``scratch`` says that zs and zt
    are the caller's own buffers and may be overwritten. On other devices (the reference path of a CUDA
    tensor: float64, or forced) this is :func:`logit_kd_rows_exact`.
    """
    opts = dict(
        temperature=temperature, divergence=divergence, beta=beta, soft_weight=soft_weight, hard_weight=hard_weight
    )
    if zs.device.type != "cpu":  # the fast path syncs on its fallback rows: CPU only
        return logit_kd_rows_exact(zs, zt, kd_coef, labels, ce_coef, grad, **opts)
    divergence = effective_divergence(divergence, beta)
    ws = workspace if workspace is not None else Workspace()
    acc = torch.promote_types(zs.dtype, torch.float32)
    n_rows, vocab = zs.shape
    inv_t = 1.0 / temperature
    kd_coef = kd_coef.to(acc)
    want = grad is not None
    keep = kd_coef != 0

    # The cross-entropy's parts that need the raw student logits, before its buffer is overwritten.
    ce_rows = hc = onehot_rows = softmax1 = None
    if labels is not None:
        ce_coef = ce_coef.to(acc)
        keep = keep | (ce_coef != 0)
        in_range = (labels >= 0) & (labels < vocab)
        safe = torch.where(in_range, labels, 0)[:, None]
        hc = hard_weight * ce_coef
        onehot_rows = (safe, torch.where(in_range, hc, 0)[:, None])
        if temperature != 1.0:
            picked = zs.gather(1, safe)[:, 0].to(acc)
            softmax1 = ws.get("softmax1", zs, acc)  # exp(s - max), then softmax(s) once the sum is known
            top = zs.amax(-1).to(acc)
            torch.sub(zs, top[:, None], out=softmax1).exp_()
            total = softmax1.sum(-1)
            ce_rows = torch.log(total) + top - picked
            if want:
                softmax1.mul_((hc / total)[:, None])  # hard_weight ce_coef softmax(s): the CE's dense gradient

    # Log-probabilities at temperature T, in place where the caller allows it: the student's in zs or in
    # the gradient's buffer (where the gradient is built), the teacher's in zt.
    if scratch and zs.dtype == acc:
        ls = zs
    elif want and grad.dtype == acc:
        ls = grad
    else:
        ls = ws.get("ls", zs, acc)
    _log_softmax_into(ls, zs, inv_t)
    lt = zt if scratch and zt.dtype == acc else ws.get("lt", zt, acc)
    _log_softmax_into(lt, zt, inv_t)
    if labels is not None and temperature == 1.0:
        ce_rows = -ls.gather(1, safe)[:, 0]

    # The divergence per row, from dot products of what the log-softmaxes gave.
    if divergence == "forward_kl":  # D = sum p (lt - ls)
        p = torch.exp(lt, out=ws.get("p", zs, acc))
        rows = _rowdot(p, lt) - _rowdot(p, ls)
    elif divergence == "reverse_kl":  # D = sum q (ls - lt)
        q = torch.exp(ls, out=ws.get("p", zs, acc))
        rows = _rowdot(q, ls) - _rowdot(q, lt)
    else:  # D = beta sum p lt + (1 - beta) sum q ls - sum m log m, m = (1 - beta) (q + beta / (1 - beta) p)
        q = torch.exp(ls, out=ws.get("q", zs, acc))
        p = torch.exp(lt, out=ws.get("p", zs, acc))
        m1 = torch.add(q, p, alpha=beta / (1 - beta), out=ws.get("m", zs, acc))  # m / (1 - beta)
        rows_p, rows_q = _rowdot(p, lt), _rowdot(q, ls)
        lm1 = torch.log(m1, out=p)  # log(m / (1 - beta)); p is not needed any more
        rows = beta * rows_p + (1 - beta) * (rows_q - _rowdot(m1, lm1)) - math.log(1 - beta)

    # Rows the few passes cannot give exactly: keep their log-probabilities for the exact formulas.
    bad = keep & ~torch.isfinite(rows if ce_rows is None else rows + ce_rows)
    fix = None
    if bool(bad.any()):
        idx = bad.nonzero()[:, 0]
        fix = (idx, ls[idx] * temperature, lt[idx] * temperature)  # logits whose log_softmax(. / T) is ls, lt

    if want:
        kc = soft_weight * temperature * kd_coef  # dLoss/dzs = kc * dD/d(zs / T)
        g = ls
        if divergence == "forward_kl":  # kc (q - p) [+ hc q when T = 1]
            g.exp_()
            g.mul_((kc if hc is None or softmax1 is not None else kc + hc)[:, None])
            g.addcmul_(p, kc[:, None], value=-1.0)
        elif divergence == "reverse_kl":  # kc q (ls - lt - D) [+ hc q]
            g.sub_(lt).sub_(rows[:, None]).mul_(kc[:, None])
            if hc is not None and softmax1 is None:
                g.add_(hc[:, None])
            g.mul_(q)
        else:  # kc (1 - beta) q (ls - lm - sum q (ls - lm)) [+ hc q]; lm = lm1 + log(1 - beta) cancels
            shift = rows_q - _rowdot(q, lm1)
            g.sub_(lm1).sub_(shift[:, None]).mul_((kc * (1 - beta))[:, None])
            if hc is not None and softmax1 is None:
                g.add_(hc[:, None])
            g.mul_(q)
        if softmax1 is not None:
            g.add_(softmax1)
        if onehot_rows is not None:
            g.scatter_add_(1, onehot_rows[0], -onehot_rows[1])
        if not bool(keep.all()):
            g.index_fill_(0, (~keep).nonzero()[:, 0], 0)
        if g is not grad:
            grad.copy_(g)

    rows = torch.where(kd_coef != 0, rows, 0)
    if ce_rows is not None:
        ce_rows = torch.where(ce_coef != 0, torch.where(in_range, ce_rows, float("nan")), 0)
    if fix is not None:
        idx, s_fix, t_fix = fix
        g_fix = torch.empty_like(s_fix) if want else None
        kd_fix, ce_fix = logit_kd_rows_exact(
            s_fix,
            t_fix,
            kd_coef[idx],
            None if labels is None else labels[idx],
            None if ce_coef is None else ce_coef[idx],
            g_fix,
            **opts,
        )
        rows[idx] = kd_fix
        if ce_rows is not None:
            ce_rows[idx] = ce_fix
        if want:
            grad[idx] = g_fix.to(grad.dtype)
    return rows, ce_rows


def logit_kd_rows_exact(
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
    """A block of rows of the fused logit losses, straight from the formulas: the spec of :func:`logit_kd_rows`.

    zs, zt: (R, V) student and teacher logits; kd_coef: (R,) weight of each
    row's divergence in the mean (mask / count); labels, ce_coef: (R,) hard
    labels and the weight of each row's cross-entropy, or None. Writes
    dLoss/dzs into grad (R, V) when given, where
    loss = soft_weight T^2 sum_r kd_coef_r D_r + hard_weight sum_r ce_coef_r CE_r.
    Returns the per-row divergence D (without T^2) and cross-entropy, fp32
    (fp64 for fp64 logits), 0 on rows whose weight is 0. About 15 passes over
    the block; :func:`logit_kd_rows` runs it for the rows its own few passes
    cannot give exactly (logits of -inf, non-finite values) and on CUDA.
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
    """The CPU path of :func:`logit_kd`: :func:`logit_kd_rows` over blocks of rows.

    s, t: (N, V) logits; grad: (N, V) output for dLoss/ds, or None. Each block
    holds about a quarter of a million logits (a MiB in fp32: the row
    function's few buffers stay in cache, and beyond the gradient itself the
    call needs a few MiB). Returns the (N,) row divergences.
    """
    n_rows, vocab = s.shape
    block = max(1, ROW_BLOCK_ELEMENTS // vocab)
    rows = []
    workspace = Workspace()
    for start in range(0, n_rows, block):
        r = slice(start, start + block)
        kd, _ = logit_kd_rows(
            s[r], t[r], kd_coef[r], None, None, None if grad is None else grad[r], workspace=workspace, **opts
        )
        rows.append(kd)
    return torch.cat(rows)


# --------------------------------------------------------------------------- autograd


class LogitKDFunction(torch.autograd.Function):
    """Loss and dLoss/d(student logits) in the forward; backward scales the gradient in place (the step's
    largest tensor: :func:`~fastted.ops.dispatch.save_gradients`)."""

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
                aligned(s, False),
                aligned(t, False),
                kd_coef,
                None,
                None,
                g,
                soft_weight=1.0,
                hard_weight=0.0,
                **opts,
            )
        else:
            rows = logit_kd_chunked(s, t, kd_coef, g, soft_weight=1.0, hard_weight=0.0, **opts)
        save_gradients(ctx, [None if grad is None else grad.reshape(student_logits.shape)], in_place=True)
        return kd_loss(rows, kd_coef, opts["temperature"])

    @staticmethod
    def backward(ctx, grad_loss):
        return (None,) * 4 + (*scaled_gradients(ctx, grad_loss), None)


# --------------------------------------------------------------------------- public API


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
    check_logits(student_logits, teacher_logits)
    opts = logit_options(temperature, divergence, beta)
    vocab = shared_vocab(
        vocab_size, student_logits.shape[-1], teacher_logits.shape[-1], "student_logits", "teacher_logits"
    )
    lead = tuple(student_logits.shape[:-1])
    dtype = torch.promote_types(student_logits.dtype, teacher_logits.dtype)
    kd_coef, labels, ce_coef = row_weights(
        lead, student_logits.device, dtype, mask, labels, ignore_index, "labels", None, "student_logits"
    )
    if ce_coef is not None:
        kd_coef = ce_coef  # rows the mask keeps and the labels do not ignore
    impl = resolve_impl(impl, student_logits.device, dtype)
    (student_logits,) = detach_without_grad([student_logits])
    return LogitKDFunction.apply(impl, opts, vocab, kd_coef, student_logits, teacher_logits)


class LogitKDLoss(nn.Module):
    """nn.Module over :func:`logit_kd`."""

    def __init__(
        self,
        temperature: float = 2.0,
        divergence: str = "forward_kl",
        beta: float = 0.5,
        ignore_index: int = -100,
        vocab_size: Optional[int] = None,
        impl: str = "auto",
    ):
        super().__init__()
        logit_options(temperature, divergence, beta)
        check_impl(impl)
        self.temperature, self.divergence, self.beta = temperature, divergence, beta
        self.ignore_index, self.vocab_size, self.impl = ignore_index, vocab_size, impl

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        mask: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
    ) -> Tensor:
        return logit_kd(
            student_logits,
            teacher_logits,
            temperature=self.temperature,
            divergence=self.divergence,
            beta=self.beta,
            mask=mask,
            labels=labels,
            ignore_index=self.ignore_index,
            vocab_size=self.vocab_size,
            impl=self.impl,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, divergence={self.divergence!r}, beta={self.beta}, "
            f"vocab_size={self.vocab_size}, impl={self.impl!r}"
        )


# --------------------------------------------------------------------------- what the tools know of this op

# The sizes the compile tier records: the benchmarks' (so their variants are the ones the table shows), odd ones
# (no divisibility by 16 anywhere), and the largest the API accepts (for the grid limits; they add no variant).
COMPILE_SIZES = [
    ((4096, 30522), "bert"),
    ((8192, 128256), "llama3"),
    ((999, 1001), "odd"),
    ((2**20, 262144), "largest"),
]


def _compile_cases(full: bool, sizes=COMPILE_SIZES):
    """The compile tier's cases: (case, run) pairs whose runs call the launchers on meta tensors."""
    from fastted.kernels import aligned_row_stride
    from fastted.kernels.logit_kd import FORWARD_KL, JSD, REVERSE_KL, logit_kd_forward
    from fastted.kernels.resources import DTYPES, empty, flag_sets, reduced

    for dtype in DTYPES:
        for (n, v), size in sizes:
            for divergence in (FORWARD_KL, REVERSE_KL, JSD):
                # the cross-entropy: its own log-sum-exp at T != 1, shared at T = 1, or none
                for flags, _ in flag_sets(full, reduced(dtype, size), ce=("T=2", "T=1", "none"), grad=(True, False)):
                    for padded in (False, True):  # user logits (stride V) or the fused head's buffers
                        has_ce, write_grad = flags["ce"] != "none", flags["grad"]
                        temperature = 1.0 if flags["ce"] == "T=1" else 2.0
                        stride = aligned_row_stride(v, dtype) if padded else v
                        s = empty((n, v), dtype, (stride, 1))
                        t = empty((n, v), dtype, (stride, 1))
                        labels = empty((n,), torch.int64) if has_ce else None
                        ce_coef = empty((n,), torch.float32) if has_ce else None
                        case = dict(
                            op="logit_kd",
                            size=size,
                            dtype=str(dtype),
                            divergence=divergence.value,
                            **flags,
                            padded=padded,
                        )
                        yield (
                            case,
                            lambda: logit_kd_forward(
                                s,
                                t,
                                empty((n,), torch.float32),
                                grad=s if write_grad else None,
                                labels=labels,
                                ce_coef=ce_coef,
                                temperature=temperature,
                                divergence=divergence.value,
                                beta=0.5,
                                soft_weight=1.0,
                                hard_weight=0.5,
                                padded_cols=stride if padded else None,
                            ),
                        )


def _tier_expectations(rows: list[dict], arch: str) -> list[str]:
    """The row kernel on aligned rows (the fused head's padded buffers, Llama 3's 128,256) uses 128-bit loads;
    on BERT's 30,522-wide unpadded rows it cannot, which is why the fused LM head pads its logits buffers."""
    padded = [r for r in rows if r["example"]["padded"] or r["example"]["size"] == "llama3"]
    bert = [r for r in rows if r["example"]["size"] == "bert" and not r["example"]["padded"]]
    out = []
    if not padded or not all(r["vector_loads"] for r in padded):
        out.append(f"logit_kd_kernel on aligned rows without 128-bit loads on {arch}")
    if not bert or any(r["vector_loads"] for r in bert):
        out.append(f"logit_kd_kernel on BERT's unpadded rows: 128-bit loads expected nowhere on {arch}")
    return out


def _gpu_cases(tests, dtype, impl: str, cuda: bool) -> list:
    """The tests' check of every divergence at T = 1 and 2 (on a GPU at Llama 3's vocabulary too)."""
    shapes = tests.SHAPES + ([((8,), 128256)] if cuda else [])
    return [
        (
            dict(divergence=div, beta=beta, temperature=temp, shape=str(shape)),
            lambda div=div, beta=beta, temp=temp, shape=shape: tests.check_logit_kd(
                impl, shape[0], shape[1], dtype, div, beta, temp
            ),
        )
        for div, beta in tests.DIVERGENCES
        for temp in (1.0, 2.0)
        for shape in shapes
    ]


def _min_bytes(size: dict, variant: dict) -> int:
    """Read s and t, write dLoss/ds."""
    return 3 * size["n_rows"] * size["vocab"] * getattr(torch, size["dtype"]).itemsize


KERNEL_OP = KernelOp(
    "logit_kd",
    CompileTier(("logit_kd_kernel",), _compile_cases, _tier_expectations),
    GpuCheck("logit_kd", cases=_gpu_cases, min_bytes=_min_bytes),
)
