"""Row code the logit losses share: their checks, the CPU paths' workspace, the block loop over an LM head.

:mod:`fastted.ops.logit_kd`, :mod:`fastted.ops.fused_linear_kd` and
:mod:`fastted.ops.sparse_logit_kd` all reduce rows of logits (a user's, or a
block of an LM head's) to per-row divergences and a gradient written in
place; what they share lives here under public names, so that no op imports
another op's internals: the logit options, the compared vocabulary and the
row weights (checks); the :class:`Workspace` of the CPU row functions; the
loss of the rows (:func:`kd_loss`); the block loop over a student's LM head
(:func:`block_rows`, :func:`head_blocks`, :func:`head_loss`,
:func:`finish_head_gradients`) and the causal LM's label shift
(:func:`shifted_labels`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastted.kernels import device_arch
from fastted.ops.checks import check_float, check_int_tensor, check_temperature, flat_mask
from fastted.reference import DIVERGENCES, safe_count

# --------------------------------------------------------------------------- checks


def logit_options(temperature, divergence, beta) -> dict:
    """The checked options of every logit loss: temperature > 0, a divergence of DIVERGENCES, beta in [0, 1]."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    return dict(
        temperature=check_temperature("temperature", temperature),
        divergence=divergence,
        beta=check_float("beta", beta, 0.0, 1.0),
    )


def shared_vocab(vocab_size, v_s: int, v_t: int, what_s: str, what_t: str) -> int:
    """The number of leading vocabulary entries compared: both, or vocab_size when given."""
    if vocab_size is None:
        if v_s != v_t:
            raise ValueError(
                f"{what_s} covers a vocabulary of {v_s}, but {what_t} covers {v_t}: pass vocab_size=<n> to compare "
                f"the first n entries of both (n <= {min(v_s, v_t)}, e.g. the tokenizer's size when one "
                f"embedding matrix is padded)"
            )
        return v_s
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 1 <= vocab_size <= min(v_s, v_t):
        raise ValueError(
            f"vocab_size must be an int in [1, {min(v_s, v_t)}] (the smaller of the two vocabularies), "
            f"got {vocab_size!r}"
        )
    return vocab_size


def row_weights(lead, device, dtype, mask, labels, ignore_index, labels_name, vocab, ref_name):
    """Validate mask and labels of leading shape ``lead``; return (N,) mean weights, fp32 (fp64 for fp64 inputs).

    Returns (kd_coef, labels, ce_coef): kd_coef = mask / count over the mask's
    rows; with labels, ce_coef the same over the rows the mask keeps and the
    labels do not ignore. No host sync on a GPU.
    """
    n_rows = 1
    for n in lead:
        n_rows *= n
    acc = torch.promote_types(dtype, torch.float32)
    valid = None
    if mask is not None:
        valid = flat_mask(mask, lead, device, ref_name).to(acc)
    kd_valid = valid if valid is not None else torch.ones(n_rows, dtype=acc, device=device)
    kd_coef = kd_valid / safe_count(kd_valid.sum())
    if labels is None:
        return kd_coef, None, None
    check_int_tensor(labels_name, labels, lead, device, ref_name, " (one label per row/token)")
    labels = labels.detach().reshape(n_rows).to(torch.int64)
    ce_valid = (labels != ignore_index).to(acc)
    if valid is not None:
        ce_valid = ce_valid * (valid != 0)
    if vocab is not None and device.type == "cpu":  # no device sync here; on a GPU a bad label gives a NaN loss
        bad = (ce_valid != 0) & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            raise ValueError(
                f"{labels_name} holds {labels[bad][0].item()}, outside [0, {vocab}) (the compared vocabulary); "
                f"labels to skip must equal ignore_index={ignore_index}"
            )
    return kd_coef, labels, ce_valid / safe_count(ce_valid.sum())


# --------------------------------------------------------------------------- the rows of the CPU paths

ROW_BLOCK_ELEMENTS = 1 << 18  # logits per block of the logit losses' CPU paths


class Workspace:
    """(R, V) buffers that the blocks of one call share, by name: each is allocated once, at the first block
    that needs it, so that no block pays for fresh pages (on a CPU a fresh 32 MB buffer costs more than the
    pass that fills it)."""

    def __init__(self):
        self.buffers: dict[str, Tensor] = {}

    def get(self, name: str, like: Tensor, dtype: torch.dtype) -> Tensor:
        rows, vocab = like.shape
        buf = self.buffers.get(name)
        if buf is None or buf.shape[0] < rows or buf.shape[1] != vocab or buf.dtype != dtype:
            buf = self.buffers[name] = torch.empty((rows, vocab), dtype=dtype, device=like.device)
        return buf[:rows]


def kd_loss(kd_rows: Tensor, kd_coef: Tensor, temperature: float) -> Tensor:
    """T^2 times the rows' divergences weighted by kd_coef (mask / count): the soft term of every logit loss."""
    return temperature**2 * (kd_rows @ kd_coef.to(kd_rows.dtype))


# --------------------------------------------------------------------------- the block loop over an LM head

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


def compute_bound_rows(
    vocab: int, h_s: int, h_t: int, e_s: int, e_t: int, needs_grad: bool, balance: float, budget: int, row_bytes: int
) -> int:
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


def block_rows(
    n_rows: int,
    vocab: int,
    xs: Tensor,
    ws: Tensor,
    xt: Optional[Tensor],
    wt: Optional[Tensor],
    needs_grad: bool,
    chunk_size: Optional[int],
) -> int:
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


def head_logits(x: Tensor, w: Tensor, b: Optional[Tensor], out: Tensor) -> Tensor:
    """x w^T + b into ``out`` (a view of a logits buffer), returned."""
    return torch.addmm(b, x, w.t(), out=out) if b is not None else torch.mm(x, w.t(), out=out)


def head_blocks(
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
    :func:`~fastted.ops.fused_linear_kd.fused_linear_kd` and
    :func:`~fastted.ops.sparse_logit_kd.fused_linear_sparse_kd`.

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
        zs = head_logits(x, ws, bs, zs_buf[: x.shape[0], :vocab])  # (R, V)
        if stride > vocab:  # the row kernel wrote the padding's gradient (0) into it for the block before
            zs_buf[:, vocab:] = float("-inf")
        kd, ce = rows_fn(
            zs,
            teacher_block(r, x.shape[0]),
            kd_coef[r],
            None if labels is None else labels[r],
            None if ce_coef is None else ce_coef[r],
            zs if want else None,
            **opts,
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


def head_loss(
    kd_rows: Tensor, ce_rows: Optional[Tensor], kd_coef: Tensor, ce_coef: Optional[Tensor], opts: dict
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, kd, ce) of the blocks' rows: kd = T^2 times the rows' weighted divergences, ce the weighted
    cross-entropies (0 without labels), loss = soft_weight * kd + hard_weight * ce."""
    kd = kd_loss(kd_rows, kd_coef, opts["temperature"])
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


def shifted_labels(labels, ignore_index: int, lead: tuple) -> Tensor:
    """(B, T) labels shifted left by one, ``ignore_index`` at the end: label t + 1 for hidden state t."""
    if not isinstance(labels, Tensor) or len(lead) != 2 or tuple(labels.shape) != lead:
        got = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(
            f"shift_labels=True shifts (B, T) hard_labels along T: it needs (B, T, H) hidden states and "
            f"hard_labels of shape {lead if len(lead) == 2 else '(B, T)'}, got hard_labels {got} for "
            f"hidden states of leading shape {lead}"
        )
    return F.pad(labels[:, 1:], (0, 1), value=ignore_index)
