"""Logit distillation from a top-k teacher (a teacher cache), on the logits or fused with the student's LM head.

What a teacher cache stores of a token (:mod:`fastted.train.cache`) is its k largest
logits, their vocabulary ids and the log-sum-exp of the rest at temperature T
(``tail_lse``). The divergence is KL(teacher || student) over k + 1 buckets, the
k ids one by one and the rest of the vocabulary as one tail bucket, times T^2,
averaged over the rows the mask keeps: exact for what is stored, equal to the
full KL when k is the vocabulary and a lower bound below. The student's side
needs its full log-sum-exp, which the row function takes in passes over its
logits; nothing of size V is ever made for the teacher.

This file holds the op's checks, the PyTorch row function
:func:`sparse_kd_rows` (the CPU twin of the Triton row kernel
``fastted.kernels.sparse_logit_kd``), the autograd Functions, the functional
:func:`sparse_logit_kd` (on logits) and :func:`fused_linear_sparse_kd` (on the
LM head's input, a block of rows at a time through the block loop of
:mod:`fastted.ops.fused_linear_kd`, with a cross-entropy beside), and the
module :class:`SparseLogitKDLoss`. The spec is
:func:`fastted.reference.sparse_logit_kd_reference`.

The teacher comes as three tensors (values, ids, tail_lse) or as the cache's
:class:`~fastted.ops.packed_topk.PackedTopK`, which every path reads as it
is: the Triton kernel decodes its ids and values where it reads them, the
PyTorch path unpacks the block of rows it works on (:func:`unpack_topk` of
``packed.rows(r)``), never all N rows at once.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from fastted.ops.checks import check_float, check_floating, check_impl, check_like, check_temperature, check_weight
from fastted.ops.dispatch import (
    autocast_dtype,
    detach_without_grad,
    resolve_impl,
    save_gradients,
    scaled_gradients,
    to_autocast,
)
from fastted.ops.packed_topk import PackedTopK, id_bits, unpack_ids, unpack_topk, words_per_row
from fastted.ops.registry import CompileTier, GpuCheck, KernelOp
from fastted.ops.rows import (
    ROW_BLOCK_ELEMENTS,
    block_rows,
    finish_head_gradients,
    head_blocks,
    head_loss,
    kd_loss,
    row_weights,
    shifted_labels,
)

# --------------------------------------------------------------------------- checks


def check_topk(values, ids, tail_lse, lead: tuple, vocab: int, device, ref_name: str) -> tuple[Tensor, Tensor, Tensor]:
    """The cached teacher of ``lead`` rows, checked: values (..., K) float, ids (..., K) integer ids in
    [0, vocab) (checked on a CPU; a GPU would need a sync), tail_lse (...). Returns them flattened to (N, K),
    (N, K) int64, (N,) fp32."""
    for name, x in (("topk_values", values), ("topk_ids", ids), ("tail_lse", tail_lse)):
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
        if x.device != device:
            raise ValueError(f"{name} is on {x.device}, but {ref_name} is on {device}")
    if values.dim() != len(lead) + 1 or tuple(values.shape[:-1]) != lead or values.shape[-1] == 0:
        raise ValueError(
            f"topk_values has shape {tuple(values.shape)}, but needs {lead + ('k',)} with k > 0 (the "
            f"leading shape of {ref_name})"
        )
    if ids.shape != values.shape:
        raise ValueError(f"topk_ids has shape {tuple(ids.shape)}, but topk_values has {tuple(values.shape)}")
    if tuple(tail_lse.shape) != lead:
        raise ValueError(f"tail_lse has shape {tuple(tail_lse.shape)}, but needs {lead} (one per row)")
    check_floating("topk_values", values)
    check_floating("tail_lse", tail_lse)
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"topk_ids must hold integer vocabulary ids, got dtype {ids.dtype}")
    k = values.shape[-1]
    if k > vocab:
        raise ValueError(f"topk_values holds {k} logits a row, more than the student's vocabulary of {vocab}")
    ids = ids.reshape(-1, k).to(torch.int64)
    if device.type == "cpu" and ids.numel():
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab:
            raise _outside_vocabulary("topk_ids holds", low if low < 0 else high, vocab)
    return values.reshape(-1, k), ids, tail_lse.reshape(-1).to(torch.promote_types(tail_lse.dtype, torch.float32))


def _outside_vocabulary(what: str, value: int, vocab: int) -> ValueError:
    return ValueError(
        f"{what} {value}, outside [0, {vocab}) (the student's vocabulary): the cache was made with another vocabulary"
    )


def check_packed_topk(packed: PackedTopK, lead: tuple, vocab: int, device, ref_name: str) -> PackedTopK:
    """The packed teacher (:mod:`fastted.ops.packed_topk`) of ``lead`` rows, checked as :func:`check_topk`
    checks the three tensors: levels (..., K) uint8, words (..., W) int32 with W the words of K ids of
    ``id_bits`` bits, top, step and tail (...) float; K <= vocab; on a CPU its ids decoded (a block of rows at a
    time) in [0, vocab) (``2 ** id_bits`` may exceed the vocabulary). Returns it as contiguous (N, ...) rows,
    top, step and tail in fp32 or wider."""
    bits = packed.id_bits
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 32:
        raise ValueError(f"topk_values.id_bits must be an int in [1, 32], got {bits!r}")
    for name, x in zip(PackedTopK._fields, packed[:5]):
        if not isinstance(x, Tensor):
            raise ValueError(f"topk_values.{name} must be a tensor, got {type(x).__name__}")
        if x.device != device:
            raise ValueError(f"topk_values.{name} is on {x.device}, but {ref_name} is on {device}")
    words, levels = packed.words, packed.levels
    if levels.dim() != len(lead) + 1 or tuple(levels.shape[:-1]) != lead or levels.shape[-1] == 0:
        raise ValueError(
            f"topk_values.levels has shape {tuple(levels.shape)}, but needs {lead + ('k',)} with "
            f"k > 0 (the leading shape of {ref_name})"
        )
    if levels.dtype != torch.uint8:
        raise ValueError(f"topk_values.levels has dtype {levels.dtype}, but needs torch.uint8")
    k = levels.shape[-1]
    n_words = words_per_row(k, bits)
    if tuple(words.shape) != lead + (n_words,):
        raise ValueError(
            f"topk_values.words has shape {tuple(words.shape)}, but needs {lead + (n_words,)} "
            f"({k} ids of {bits} bits a row)"
        )
    if words.dtype != torch.int32:
        raise ValueError(f"topk_values.words has dtype {words.dtype}, but needs torch.int32")
    for name in ("top", "step", "tail"):
        x = getattr(packed, name)
        if tuple(x.shape) != lead:
            raise ValueError(f"topk_values.{name} has shape {tuple(x.shape)}, but needs {lead} (one per row)")
        check_floating(f"topk_values.{name}", x)
    if k > vocab:
        raise ValueError(f"topk_values holds {k} logits a row, more than the student's vocabulary of {vocab}")
    rows = PackedTopK(
        words.reshape(-1, n_words).contiguous(),
        levels.reshape(-1, k).contiguous(),
        *(
            x.reshape(-1).to(torch.promote_types(x.dtype, torch.float32)).contiguous()
            for x in (packed.top, packed.step, packed.tail)
        ),
        bits,
    )
    if device.type == "cpu" and 2**bits > vocab:  # else every id its bits can hold is in the vocabulary
        block = max(1, ROW_BLOCK_ELEMENTS // k)
        for start in range(0, rows.words.shape[0], block):
            high = int(unpack_ids(rows.words[start : start + block], bits, k).max())
            if high >= vocab:
                raise _outside_vocabulary("topk_values.words holds the id", high, vocab)
    return rows


def check_teacher(topk_values, topk_ids, tail_lse, lead: tuple, vocab: int, device, ref_name: str):
    """The teacher of the public functions: a :class:`PackedTopK` in ``topk_values`` (then ``topk_ids`` and
    ``tail_lse`` None), checked by :func:`check_packed_topk`, or the three tensors by :func:`check_topk`."""
    if isinstance(topk_values, PackedTopK):
        given = [name for name, x in (("topk_ids", topk_ids), ("tail_lse", tail_lse)) if x is not None]
        if given:
            raise ValueError(
                f"{' and '.join(given)} must be None when topk_values is a PackedTopK (it holds the ids and the tail)"
            )
        return check_packed_topk(topk_values, lead, vocab, device, ref_name)
    return check_topk(topk_values, topk_ids, tail_lse, lead, vocab, device, ref_name)


# --------------------------------------------------------------------------- the PyTorch path


def sparse_kd_rows(
    z: Tensor,
    teacher: tuple[Tensor, Tensor, Tensor],
    kd_coef: Tensor,
    labels: Optional[Tensor],
    ce_coef: Optional[Tensor],
    grad: Optional[Tensor],
    *,
    temperature: float,
    soft_weight: float,
    hard_weight: float,
) -> tuple[Tensor, Optional[Tensor]]:
    """A block of rows against a top-k teacher: the CPU twin of the Triton row kernel.

    z: (R, V) student logits; teacher: (values (R, K), ids (R, K) int64,
    tail_lse (R,)), or the R rows of a :class:`PackedTopK` (unpacked here,
    this block only); kd_coef, labels, ce_coef as
    :func:`~fastted.ops.logit_kd.logit_kd_rows` takes them. Writes dLoss/dz into
    grad (may be z itself) when given, where loss = soft_weight T^2 sum_r
    kd_coef_r KL_r + hard_weight sum_r ce_coef_r CE_r. Returns the per-row KL
    over the k + 1 buckets (without T^2) and cross-entropy, fp32 (fp64 for fp64
    logits), 0 on rows whose weight is 0.
    """
    values, ids, tail = unpack_topk(teacher) if isinstance(teacher, PackedTopK) else teacher
    acc = torch.promote_types(z.dtype, torch.float32)
    inv_t = 1.0 / temperature
    zf = z.to(acc)
    b = zf * inv_t
    lse_s = torch.logsumexp(b, -1)
    rest = b.scatter(1, ids, float("-inf"))  # the student's tail bucket: the columns that are none of the ids
    lse_r = torch.logsumexp(rest, -1)
    a = values.to(acc) * inv_t
    tail = tail.to(acc)
    lse_t = torch.logaddexp(torch.logsumexp(a, -1), tail)
    p = torch.exp(a - lse_t[:, None])
    p_tail = torch.exp(tail - lse_t)
    lq = b.gather(1, ids) - lse_s[:, None]
    kd = torch.where(p > 0, p * (a - lse_t[:, None] - lq), 0.0).sum(-1)
    kd = kd + torch.where(p_tail > 0, p_tail * (tail - lse_t - (lse_r - lse_s)), 0.0)
    kd_coef = kd_coef.to(acc)
    keep = kd_coef != 0
    kd = torch.where(keep, kd, 0.0)
    ce_rows = lse_u = None
    if labels is not None:
        ce_coef = ce_coef.to(acc)
        in_range = (labels >= 0) & (labels < z.shape[1])
        lse_u = torch.logsumexp(zf, -1)
        z_label = zf.gather(1, torch.where(in_range, labels, 0)[:, None]).squeeze(1)
        ce_rows = torch.where(ce_coef != 0, torch.where(in_range, lse_u - z_label, float("nan")), 0.0)
        keep = keep | (ce_coef != 0)
    if grad is not None:
        has_tail = p_tail > 0
        g = torch.exp(b - lse_s[:, None])
        tail_share = p_tail[:, None] * torch.exp(rest - torch.where(has_tail, lse_r, 0.0)[:, None])
        g -= torch.where(has_tail[:, None], tail_share, 0.0)
        g.scatter_add_(1, ids, -p)
        g *= (soft_weight * temperature * kd_coef)[:, None]
        if labels is not None:
            dce = torch.exp(zf - lse_u[:, None])
            dce.scatter_add_(1, torch.where(in_range, labels, 0)[:, None], -in_range.to(acc)[:, None])
            g += dce * (hard_weight * ce_coef)[:, None]
        grad.copy_(torch.where(keep[:, None], g, 0.0))
    return kd, ce_rows


def _rows_in_blocks(z: Tensor, teacher: tuple, kd_coef: Tensor, grad: Optional[Tensor], **opts) -> Tensor:
    """:func:`sparse_kd_rows` over blocks of about a quarter of a million logits (its buffers stay small)."""
    block = max(1, ROW_BLOCK_ELEMENTS // z.shape[1])
    rows = []
    for start in range(0, z.shape[0], block):
        r = slice(start, start + block)
        kd, _ = sparse_kd_rows(
            z[r], _teacher_rows(teacher, r), kd_coef[r], None, None, None if grad is None else grad[r], **opts
        )
        rows.append(kd)
    return torch.cat(rows)


def _teacher_rows(teacher, r):
    """Rows ``r`` (a slice) of a checked teacher: of the three tensors, or of a :class:`PackedTopK`, still
    packed."""
    return teacher.rows(r) if isinstance(teacher, PackedTopK) else tuple(x[r] for x in teacher)


def _triton_teacher(teacher):
    if isinstance(teacher, PackedTopK):  # checked: contiguous rows; top, step and tail as the kernel loads them
        return PackedTopK(teacher.words, teacher.levels, *(x.float() for x in teacher[2:5]), teacher.id_bits)
    values, ids, tail = teacher
    return values.contiguous(), ids.to(torch.int32).contiguous(), tail.contiguous()


# --------------------------------------------------------------------------- autograd


class SparseLogitKDFunction(torch.autograd.Function):
    """Loss and dLoss/d(student logits) in the forward; backward scales the gradient in place. teacher: the
    checked (values, ids, tail) or PackedTopK rows (constants)."""

    @staticmethod
    def forward(ctx, impl, opts, kd_coef, student_logits, teacher):
        z = student_logits.reshape(-1, student_logits.shape[-1])
        grad = torch.empty_like(z) if ctx.needs_input_grad[3] else None
        if impl == "triton":
            from fastted.kernels.sparse_logit_kd import sparse_kd_rows_triton

            rows, _ = sparse_kd_rows_triton(
                z.contiguous(),
                _triton_teacher(teacher),
                kd_coef,
                None,
                None,
                grad,
                soft_weight=1.0,
                hard_weight=0.0,
                **opts,
            )
        else:
            rows = _rows_in_blocks(z, teacher, kd_coef, grad, soft_weight=1.0, hard_weight=0.0, **opts)
        save_gradients(ctx, [None if grad is None else grad.reshape(student_logits.shape)], in_place=True)
        return kd_loss(rows, kd_coef, opts["temperature"])

    @staticmethod
    def backward(ctx, grad_loss):
        return (None,) * 3 + (*scaled_gradients(ctx, grad_loss), None)


class FusedLinearSparseKDFunction(torch.autograd.Function):
    """The student's head, loss and gradients in the forward, a block of rows at a time."""

    @staticmethod
    def forward(ctx, impl, opts, chunk_rows, kd_coef, labels, ce_coef, xs, ws, bs, teacher):
        with torch.autocast(xs.device.type, enabled=False):
            needs = tuple(bool(n) for n in ctx.needs_input_grad[6:9])
            if impl == "triton":
                from fastted.kernels.sparse_logit_kd import sparse_kd_rows_triton as rows_fn

                teacher = _triton_teacher(teacher)
            else:
                rows_fn = sparse_kd_rows
            kd_rows, ce_rows, grads = head_blocks(
                xs.reshape(-1, xs.shape[-1]),
                ws,
                bs,
                lambda r, rows: _teacher_rows(teacher, r),
                kd_coef,
                labels,
                ce_coef,
                needs,
                rows_fn=rows_fn,
                chunk_rows=chunk_rows,
                **opts,
            )
            loss, kd, ce = head_loss(kd_rows, ce_rows, kd_coef, ce_coef, opts)
            grads = finish_head_gradients(grads, xs, ws, bs, ws.shape[0])
        save_gradients(ctx, grads)
        ctx.mark_non_differentiable(kd, ce)
        return loss, kd, ce

    @staticmethod
    def backward(ctx, grad_loss, grad_kd, grad_ce):
        return (None,) * 6 + (*scaled_gradients(ctx, grad_loss), None)


# --------------------------------------------------------------------------- public API


def sparse_logit_kd(
    student_logits: Tensor,
    topk_values: Union[Tensor, PackedTopK],
    topk_ids: Optional[Tensor] = None,
    tail_lse: Optional[Tensor] = None,
    *,
    temperature: float = 2.0,
    mask: Optional[Tensor] = None,
    labels: Optional[Tensor] = None,
    ignore_index: int = -100,
    impl: str = "auto",
) -> Tensor:
    """Logit distillation against a top-k teacher (what a teacher cache stores), in one pass over the logits.

    KL(teacher || student) over k + 1 buckets (the k ids, and the rest as one
    tail bucket) times T^2, averaged over the valid rows: see the module.

    Args:
        student_logits: (N, V) or (B, T, V), any float dtype.
        topk_values: (..., K) the teacher's K largest logits (any float dtype);
            topk_ids: (..., K) their vocabulary ids, distinct within a row;
            tail_lse: (...) the log-sum-exp of the teacher's other logits
            divided by ``temperature`` (-inf when K is the vocabulary). The
            cache must have been made at the same temperature.
            Or the teacher packed as a cache stores it: a
            :class:`~fastted.ops.packed_topk.PackedTopK` of leading shape
            (...) in ``topk_values``, ``topk_ids`` and ``tail_lse`` None; it
            is read as it is (its values those of
            :func:`~fastted.ops.packed_topk.unpack_topk`), never expanded.
        mask, labels, ignore_index: the rows to average over, as
            :func:`~fastted.ops.logit_kd.logit_kd` takes them.
        impl: "auto", "triton" or "reference".

    Returns the fp32 scalar loss (float64 for float64 logits); the gradient
    reaches the student's logits only.
    """
    if not isinstance(student_logits, Tensor) or student_logits.dim() not in (2, 3) or student_logits.numel() == 0:
        got = tuple(student_logits.shape) if isinstance(student_logits, Tensor) else type(student_logits).__name__
        raise ValueError(f"student_logits has shape {got}, but needs (N, V) or (B, T, V) with N, V > 0")
    check_floating("student_logits", student_logits)
    temperature = check_temperature("temperature", temperature)
    lead = tuple(student_logits.shape[:-1])
    teacher = check_teacher(
        topk_values, topk_ids, tail_lse, lead, student_logits.shape[-1], student_logits.device, "student_logits"
    )
    kd_coef, labels, ce_coef = row_weights(
        lead, student_logits.device, student_logits.dtype, mask, labels, ignore_index, "labels", None, "student_logits"
    )
    if ce_coef is not None:
        kd_coef = ce_coef
    impl = resolve_impl(impl, student_logits.device, student_logits.dtype)
    (student_logits,) = detach_without_grad([student_logits])
    return SparseLogitKDFunction.apply(impl, dict(temperature=temperature), kd_coef, student_logits, teacher)


def fused_linear_sparse_kd(
    student_hidden: Tensor,
    student_weight: Tensor,
    topk_values: Union[Tensor, PackedTopK],
    topk_ids: Optional[Tensor] = None,
    tail_lse: Optional[Tensor] = None,
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
    chunk_size: Optional[int] = None,
    impl: str = "auto",
    return_terms: bool = False,
):
    """The student's LM head fused with logit KD against a top-k teacher (and cross-entropy).

    ``soft_weight * kd + hard_weight * ce`` with kd :func:`sparse_logit_kd` of
    the logits ``student_hidden @ student_weight^T + student_bias`` against the
    cached teacher, and ce their cross-entropy on ``hard_labels``: what
    :func:`~fastted.ops.fused_linear_kd.fused_linear_kd` computes with a live
    teacher, with the same arguments and conventions (mask, labels, shift,
    the KD rows, blocks of rows, no (N, V) tensor), the teacher's head and
    hidden states replaced by what the cache stores of them: ``topk_values``,
    ``topk_ids``, ``tail_lse`` as :func:`sparse_logit_kd` takes them, or a
    :class:`~fastted.ops.packed_topk.PackedTopK` alone in ``topk_values``,
    read as it is a block of rows at a time.

    Returns the fp32 scalar loss, or ``(loss, kd, ce)`` with ``return_terms``.
    """
    for name, x in (("student_hidden", student_hidden), ("student_weight", student_weight)):
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
    opts = dict(
        temperature=check_temperature("temperature", temperature),
        soft_weight=check_float("soft_weight", soft_weight, 0.0),
        hard_weight=check_float("hard_weight", hard_weight, 0.0),
    )
    if opts["hard_weight"] > 0 and hard_labels is None:
        raise ValueError(f"hard_weight={hard_weight} needs hard_labels: the cross-entropy is computed on them")
    xs, ws = student_hidden, student_weight
    if xs.dim() not in (2, 3) or any(n == 0 for n in xs.shape):
        raise ValueError(f"student_hidden has shape {tuple(xs.shape)}, but needs (N, H_s) or (B, T, H_s), non-empty")
    lead = tuple(xs.shape[:-1])
    check_weight("student_weight", ws, None, xs.shape[-1], "student_hidden")
    if student_bias is not None and (not isinstance(student_bias, Tensor) or student_bias.shape != (ws.shape[0],)):
        got = tuple(student_bias.shape) if isinstance(student_bias, Tensor) else type(student_bias).__name__
        raise ValueError(f"student_bias has shape {got}, but needs ({ws.shape[0]},) (one per vocabulary entry)")
    for name, flag in (("shift_labels", shift_labels), ("kd_ignored_rows", kd_ignored_rows)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be a bool, got {flag!r}")
    teacher = check_teacher(topk_values, topk_ids, tail_lse, lead, ws.shape[0], xs.device, "student_hidden")
    hard_labels = shifted_labels(hard_labels, ignore_index, lead) if shift_labels else hard_labels
    cast = autocast_dtype(xs.device.type)
    student = [to_autocast(x, cast) for x in (xs, ws, student_bias)]
    check_floating("student_hidden", student[0])
    for name, x in zip(("student_weight", "student_bias"), student[1:]):
        if x is not None:
            check_like(name, x, student[0], "student_hidden")
    kd_coef, labels, ce_coef = row_weights(
        lead, xs.device, student[0].dtype, mask, hard_labels, ignore_index, "hard_labels", ws.shape[0], "student_hidden"
    )
    if ce_coef is not None and not kd_ignored_rows:
        kd_coef = ce_coef
    impl = resolve_impl(impl, xs.device, student[0].dtype)
    needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in student)
    chunk_rows = block_rows(kd_coef.shape[0], ws.shape[0], student[0], student[1], None, None, needs_grad, chunk_size)
    student = detach_without_grad(student)
    loss, kd, ce = FusedLinearSparseKDFunction.apply(
        impl, opts, chunk_rows, kd_coef, labels, ce_coef, *student, teacher
    )
    return (loss, kd, ce) if return_terms else loss


class SparseLogitKDLoss(nn.Module):
    """nn.Module over :func:`sparse_logit_kd`: ``loss(student_logits, topk_values, topk_ids, tail_lse)``, or
    ``loss(student_logits, packed)`` with a :class:`~fastted.ops.packed_topk.PackedTopK`."""

    def __init__(self, temperature: float = 2.0, ignore_index: int = -100, impl: str = "auto"):
        super().__init__()
        check_temperature("temperature", temperature)
        check_impl(impl)
        self.temperature, self.ignore_index, self.impl = temperature, ignore_index, impl

    def forward(
        self,
        student_logits: Tensor,
        topk_values: Union[Tensor, PackedTopK],
        topk_ids: Optional[Tensor] = None,
        tail_lse: Optional[Tensor] = None,
        mask: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
    ) -> Tensor:
        return sparse_logit_kd(
            student_logits,
            topk_values,
            topk_ids,
            tail_lse,
            temperature=self.temperature,
            mask=mask,
            labels=labels,
            ignore_index=self.ignore_index,
            impl=self.impl,
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, impl={self.impl!r}"


# --------------------------------------------------------------------------- what the tools know of this op

# The sizes the compile tier records: the benchmarks' (so their variants are the ones the table shows), odd ones
# (no divisibility by 16 anywhere), and the largest the API accepts (for the grid limits; they add no variant).
# (rows, vocabulary, k): the cache's default k = 64, a wide one (BLOCK_K 256), an odd one
COMPILE_SIZES = [
    ((4096, 30522, 64), "bert"),
    ((8192, 128256, 64), "llama3"),
    ((8192, 50257, 256), "k256"),
    ((999, 1001, 37), "odd"),
    ((2**20, 262144, 64), "largest"),
]


def _compile_cases(full: bool, sizes=COMPILE_SIZES):
    """The compile tier's cases: (case, run) pairs whose runs call the launchers on meta tensors."""
    from fastted.kernels.resources import DTYPES, empty, flag_sets, reduced
    from fastted.kernels.sparse_logit_kd import sparse_kd_forward

    for dtype in DTYPES:
        for (n, v, k), size in sizes:
            for flags, _ in flag_sets(full, reduced(dtype, size), ce=("T=2", "T=1", "none"), grad=(True, False)):
                # the teacher as three tensors, or packed as a cache stores it (uint8 levels, ids in int32 words)
                for packed in (False, True):
                    has_ce, write_grad = flags["ce"] != "none", flags["grad"]
                    z = empty((n, v), dtype)
                    labels = empty((n,), torch.int64) if has_ce else None
                    ce_coef = empty((n,), torch.float32) if has_ce else None
                    case = dict(op="sparse_logit_kd", size=size, dtype=str(dtype), k=k, **flags)
                    if packed:  # (the unpacked cases keep their names: the spill lists name them)
                        bits = id_bits(v)
                        teacher = dict(
                            values=empty((n, k), torch.uint8),
                            ids=empty((n, words_per_row(k, bits)), torch.int32),
                            top=empty((n,), torch.float32),
                            step=empty((n,), torch.float32),
                            id_bits=bits,
                        )
                        case["packed"] = True
                    else:
                        teacher = dict(values=empty((n, k), torch.bfloat16), ids=empty((n, k), torch.int32))
                    yield (
                        case,
                        lambda: sparse_kd_forward(
                            z,
                            tail=empty((n,), torch.float32),
                            kd_coef=empty((n,), torch.float32),
                            **teacher,
                            grad=z if write_grad else None,
                            labels=labels,
                            ce_coef=ce_coef,
                            temperature=1.0 if flags["ce"] == "T=1" else 2.0,
                            soft_weight=1.0,
                            hard_weight=0.5,
                        ),
                    )


def _tier_expectations(rows: list[dict], arch: str) -> list[str]:
    """The kernel reads its teacher as three tensors or PACKED (a cache's uint8 levels and ids in int32 words):
    every dtype and size is compiled both ways."""

    def compiled(rows):
        return {(r["dtype"], r["example"]["size"]) for r in rows}

    both = compiled(rows)
    return [
        f"sparse_kd_kernel on {arch}: {'packed' if packed else 'unpacked'} teachers compiled for {sorted(got)}, "
        f"not every dtype and size"
        for packed in (False, True)
        if (got := compiled(r for r in rows if r["example"].get("packed", False) == packed)) != both
    ]


def _gpu_cases(tests, dtype, impl: str, cuda: bool) -> list:
    """The tests' check at k = 1, 16, 64 and V (on a GPU at Llama 3's vocabulary too)."""
    shapes = [(1, 301), (16, 1003), (64, 30522), (301, 301)] + ([(64, 128256)] if cuda else [])
    return [
        (dict(k=k, vocab=vocab), lambda k=k, vocab=vocab: tests.check_sparse_logit_kd(impl, k, vocab, dtype))
        for k, vocab in shapes
    ]


def _min_bytes(size: dict, variant: dict) -> int:
    """Read the student's logits and write their gradient; read the teacher's k values (bf16) and ids (int32)."""
    n, vocab, k = size["n_rows"], size["vocab"], size["k"]
    return 2 * n * vocab * getattr(torch, size["dtype"]).itemsize + n * k * (2 + 4)


KERNEL_OP = KernelOp(
    "sparse_logit_kd",
    CompileTier(("sparse_kd_kernel",), _compile_cases, _tier_expectations),
    GpuCheck("sparse_logit_kd", cases=_gpu_cases, min_bytes=_min_bytes),
)
