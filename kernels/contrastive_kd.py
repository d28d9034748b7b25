"""Fused contrastive distillation (InfoNCE against a memory bank): Triton kernels and launcher.

For anchor b with student vector s_b, positive (teacher) vector t_b and
negatives n_1..n_K, every vector L2-normalized (x / max(||x||, eps), as
F.normalize), the loss is

    loss_b = logsumexp(pos_b, neg_b1, ..., neg_bK) - pos_b,
    pos_b = s_b.t_b / tau,  neg_bk = s_b.n_k / tau

Two launches, flash-attention style, with the negatives as both keys and
values:

    partials  grid (anchor blocks, splits of K). Each program normalizes its
              anchors, streams its share of the negatives in tiles, normalizes
              each negative, and keeps an online log-sum-exp (max m, sum l)
              and the softmax-weighted sum O of the normalized negatives it
              saw. A shared bank (K, D) is scored with tl.dot against a block
              of anchors; per-anchor negatives (B, K, D) one anchor at a time.
              Negatives whose label equals the anchor's are skipped.
    finalize  grid (anchors,). Adds the positive, merges the splits, writes
              each anchor's loss and the gradients of the raw student and
              teacher vectors:
                      dL/d s_hat = (sum_k p_k n_hat_k - (1 - p_pos) t_hat) / tau,
                  dL/d t_hat = (p_pos - 1) s_hat / tau,
              with p the softmax weights and 1 - p_pos taken from the
              negatives' sums, so a dominant positive cancels nothing,
              pulled back through the normalization.

The B x K score matrix never exists: the kernels keep (splits, B) maxima and
sums and a (splits, B, D) fp32 accumulator. Everything is accumulated in
fp32. The negatives are constants (a memory bank): no gradient reaches them.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fastted.kernels import device_arch, interpreting, launch


@triton.jit
def contrastive_partials_kernel(
    # data pointers
    s_ptr,  # (B, D) raw student vectors
    n_ptr,  # negatives: (K, D) shared by the batch, or (B, K, D) per anchor
    anchor_labels_ptr,  # (B,) int64 anchor labels; unused without HAS_LABELS
    negative_labels_ptr,  # (K,) or (B, K) int64 labels of the negatives; unused without HAS_LABELS
    m_ptr,  # (SPLITS, B) fp32 out: running max of each anchor's scores in a split (-inf: none seen)
    l_ptr,  # (SPLITS, B) fp32 out: sum of exp(score - m)
    o_ptr,  # (SPLITS, B, D) fp32 out: sum of exp(score - m) n_hat; unused without WRITE_O
    # shapes
    B,  # anchors
    K,  # negatives per anchor
    D,  # vector width
    tiles_per_split,  # tiles of BLOCK_K negatives each split covers
    # strides (the last dimension of every tensor is unit-stride)
    stride_s,  # row stride of the student vectors
    stride_nb,  # anchor stride of the negatives (0 when shared)
    stride_nk,  # row stride of the negatives
    stride_lb,  # anchor stride of the negative labels (0 when shared)
    # scalars
    inv_temp,  # 1 / tau
    eps,  # normalization floor: x / max(||x||, eps)
    # constants
    PER_ANCHOR: tl.constexpr,  # (B, K, D) negatives, BLOCK_B == 1: no tl.dot
    HAS_LABELS: tl.constexpr,  # skip negatives whose label equals the anchor's
    WRITE_O: tl.constexpr,  # keep the weighted sum of negatives (needed for the gradient)
    UPCAST: tl.constexpr,  # run tl.dot in fp32 (the interpreter's bf16 dot is wrong)
    DOT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    row0 = pid_b * BLOCK_B
    rows = row0 + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    dcols = tl.arange(0, BLOCK_D)
    d_ok = dcols < D

    s = tl.load(s_ptr + rows[:, None] * stride_s + dcols[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    s = s.to(tl.float32)
    inv_s = 1.0 / tl.maximum(tl.sqrt(tl.sum(s * s, axis=1)), eps)
    q = s * (inv_s * inv_temp)[:, None]  # (BLOCK_B, BLOCK_D) normalized anchor / tau, fp32
    # The dot's operand, in the negatives' dtype, made once: the fp32 q is dead after it (registers).
    q_op = q.to(n_ptr.dtype.element_ty)
    if HAS_LABELS:
        anchor_labels = tl.load(anchor_labels_ptr + rows, mask=row_ok, other=0)

    m_i = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_B,), tl.float32)
    acc = tl.zeros((BLOCK_B, BLOCK_D), tl.float32)
    n_base = n_ptr + row0 * stride_nb
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(K, BLOCK_K))
    for tile in range(first, last):
        ks = tile * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
        k_ok = ks < K
        n = tl.load(n_base + ks[:, None] * stride_nk + dcols[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        n32 = n.to(tl.float32)
        inv_n = 1.0 / tl.maximum(tl.sqrt(tl.sum(n32 * n32, axis=1)), eps)  # (BLOCK_K,)
        if PER_ANCHOR:
            sc = tl.sum(n32 * q, axis=1)[None, :]  # q is (1, BLOCK_D): this anchor's scores, (1, BLOCK_K)
        elif UPCAST:
            sc = tl.dot(q_op.to(tl.float32), tl.trans(n32), input_precision=DOT_PRECISION)
        else:
            sc = tl.dot(q_op, tl.trans(n), input_precision=DOT_PRECISION)
        sc = sc * inv_n[None, :]
        keep = k_ok[None, :] & row_ok[:, None]
        if HAS_LABELS:
            negative_labels = tl.load(negative_labels_ptr + row0 * stride_lb + ks, mask=k_ok, other=0)
            keep = keep & (anchor_labels[:, None] != negative_labels[None, :])
        sc = tl.where(keep, sc, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.where(m_i == float("-inf"), 0.0, tl.exp(m_i - shift))
        p = tl.exp(sc - shift[:, None])  # 0 where skipped
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if WRITE_O:
            pn = p * inv_n[None, :]  # weights of the raw negatives: p_k n_k / ||n_k||
            if PER_ANCHOR:
                upd = tl.sum(tl.trans(pn) * n32, axis=0)[None, :]
            elif UPCAST:
                upd = tl.dot(pn, n32, input_precision=DOT_PRECISION)
            else:
                upd = tl.dot(pn.to(n.dtype), n, input_precision=DOT_PRECISION)
            acc = acc * alpha[:, None] + upd
        m_i = m_new

    tl.store(m_ptr + split * B + rows, m_i, mask=row_ok)
    tl.store(l_ptr + split * B + rows, l_i, mask=row_ok)
    if WRITE_O:
        tl.store(o_ptr + (split * B + rows[:, None]) * D + dcols[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _log1p(x):
    """log(1 + x), accurate for small x (the interpreter and every Triton version have it this way)."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / (u - 1.0)))


@triton.jit
def _unit(x, eps):
    """x / max(||x||, eps) and the norm's floor-clamped inverse."""
    inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(x * x, axis=0)), eps)
    return x * inv, inv


@triton.jit
def _unit_backward(g, x_hat, inv, norm_ok):
    """The gradient of x from that of x_hat = x / max(||x||, eps)."""
    return tl.where(norm_ok, (g - tl.sum(g * x_hat, axis=0) * x_hat) * inv, g * inv)


@triton.jit
def contrastive_finalize_kernel(
    # data pointers
    s_ptr,  # (B, D) raw student vectors
    t_ptr,  # (B, D) raw teacher (positive) vectors
    coef_ptr,  # (B,) fp32 weight of each anchor in the mean (mask / count)
    m_ptr,  # (SPLITS, B) fp32 partial maxima
    l_ptr,  # (SPLITS, B) fp32 partial sums
    o_ptr,  # (SPLITS, B, D) fp32 partial weighted sums of normalized negatives; WRITE_GS only
    loss_ptr,  # (B,) fp32 out: each anchor's loss (0 where its weight is 0)
    gs_ptr,  # (B, D) out: dLoss/ds in s's dtype; WRITE_GS only
    gt_ptr,  # (B, D) out: dLoss/dt in t's dtype; WRITE_GT only
    # shapes
    B,
    D,
    SPLITS,
    # strides
    stride_s,
    stride_t,
    # scalars
    inv_temp,  # 1 / tau
    eps,  # normalization floor
    # constants
    WRITE_GS: tl.constexpr,
    WRITE_GT: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    dcols = tl.arange(0, BLOCK_D)
    d_ok = dcols < D
    s = tl.load(s_ptr + row * stride_s + dcols, mask=d_ok, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + row * stride_t + dcols, mask=d_ok, other=0.0).to(tl.float32)
    s_hat, inv_s = _unit(s, eps)
    t_hat, inv_t = _unit(t, eps)
    pos = tl.sum(s_hat * t_hat, axis=0) * inv_temp

    row_max = pos  # the max over the positive and every split's scores: the shift of the row's log-sum-exp
    n_rows = B.to(tl.int64)  # so that split * rows is computed in 64 bits
    for sp in range(0, SPLITS):
        row_max = tl.maximum(row_max, tl.load(m_ptr + sp * n_rows + row))
    w_pos = tl.exp(pos - row_max)
    neg = 0.0  # the negatives' share of the softmax denominator
    o = tl.zeros((BLOCK_D,), tl.float32)  # and of its weighted sum of normalized vectors
    for sp in range(0, SPLITS):
        m_sp = tl.load(m_ptr + sp * n_rows + row)
        w = tl.where(m_sp == float("-inf"), 0.0, tl.exp(m_sp - row_max))
        neg += w * tl.load(l_ptr + sp * n_rows + row)
        if WRITE_GS:
            o += w * tl.load(o_ptr + (sp * n_rows + row) * D + dcols, mask=d_ok, other=0.0)
    total = w_pos + neg
    # lse - pos = (row_max - pos) + log(total), with log(total) as log1p: exact while the positive dominates
    loss = (row_max - pos) + _log1p((w_pos - 1.0) + neg)
    coef = tl.load(coef_ptr + row)
    tl.store(loss_ptr + row, tl.where(coef != 0.0, loss, 0.0))

    # With p_k the softmax weights, 1 - p_pos = neg / total: no cancellation when p_pos is near 1.
    scale = coef * inv_temp / total
    if WRITE_GS:
        g_hat = (o - neg * t_hat) * scale  # (sum_k p_k n_k - (1 - p_pos) t_hat) / tau
        g = _unit_backward(g_hat, s_hat, inv_s, inv_s < 1.0 / eps)
        tl.store(gs_ptr + row * D + dcols, g.to(gs_ptr.dtype.element_ty), mask=d_ok)
    if WRITE_GT:
        g_hat = -neg * s_hat * scale  # (p_pos - 1) s_hat / tau
        g = _unit_backward(g_hat, t_hat, inv_t, inv_t < 1.0 / eps)
        tl.store(gt_ptr + row * D + dcols, g.to(gt_ptr.dtype.element_ty), mask=d_ok)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _blocks(D: int, per_anchor: bool, n_dtype: torch.dtype, arch) -> dict:
    """Launch meta-parameters of the partials kernel: BLOCK_B, BLOCK_K, BLOCK_D, num_warps, num_stages.

    Each program holds BLOCK_B anchors, their running weighted sums (fp32) and a pipelined tile of
    BLOCK_K negatives of the full width in registers and shared memory: the wider the vectors, the fewer
    anchors and negatives per tile and the more warps, so that no variant spills (the compile tier checks
    each width class for sm_80 and sm_90). The tiles' stages must fit the block's shared memory, which
    depends on the bank's element size: an fp32 bank of width 1024 takes twice a bf16 one's.
    """
    block_d = max(16, triton.next_power_of_2(D))
    n_size = n_dtype.itemsize
    if per_anchor:  # one anchor, its own negatives: no tl.dot, a tile of about 8 KB
        return dict(
            BLOCK_B=1,
            BLOCK_K=max(16, 8192 // (block_d * n_size)),
            BLOCK_D=block_d,
            num_warps=4 if block_d < 128 else 8,
            num_stages=2,
        )
    # an fp32 bank runs the exact (FMA) dot, whose operands and products take registers a bf16 one's do not
    block_b = 32 if block_d <= 128 and n_size < 4 else 16
    # a width that is no multiple of 16 loads element by element: more registers for the addresses
    block_k = 32 if block_d * n_size <= 1024 and not (D % 16 and n_size == 4) else 16
    stages = 2
    while stages * block_k * block_d * n_size > arch.shared_per_block and block_k > 16:
        block_k //= 2
    return dict(
        BLOCK_B=block_b,
        BLOCK_K=block_k,
        BLOCK_D=block_d,
        num_warps=4 if block_d <= 128 and n_size < 4 else 8,
        num_stages=stages,
    )


def _splits(n_programs: int, n_tiles: int, device: torch.device) -> int:
    """How many ranges of K to split over: about four waves of programs on the GPU, a few under the interpreter."""
    if interpreting() or device.type != "cuda":
        return max(1, min(n_tiles, 3))  # more than one, so that every run merges splits
    target = 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(n_tiles, triton.cdiv(target, n_programs)))


def contrastive_forward(
    s: torch.Tensor,
    t: torch.Tensor,
    negatives: torch.Tensor,
    coef: torch.Tensor,
    *,
    labels: torch.Tensor | None,
    negative_labels: torch.Tensor | None,
    temperature: float,
    eps: float,
    grad_s: bool,
    grad_t: bool,
    splits: int | None = None,
):
    """Launches the two kernels.

    s, t: (B, D) raw student and teacher vectors, unit last stride; negatives:
    (K, D) or (B, K, D), contiguous; coef: (B,) fp32 weight of each anchor;
    labels (B,) and negative_labels (K,) or (B, K), int64, contiguous, or
    None. splits: ranges of K run by separate programs (default: enough to
    fill the GPU). Returns (loss_rows (B,) fp32, grad_s or None, grad_t or None).
    """
    B, D = s.shape
    per_anchor = negatives.dim() == 3
    K = negatives.shape[-2]
    meta = _blocks(D, per_anchor, negatives.dtype, device_arch(s.device))
    block_b, block_k, block_d = meta["BLOCK_B"], meta["BLOCK_K"], meta["BLOCK_D"]
    n_tiles = triton.cdiv(K, block_k)
    n_anchor_blocks = triton.cdiv(B, block_b)
    splits = splits or _splits(n_anchor_blocks, n_tiles, s.device)
    tiles_per_split = triton.cdiv(n_tiles, splits)
    splits = triton.cdiv(n_tiles, tiles_per_split)  # no split left without a tile

    f32 = dict(dtype=torch.float32, device=s.device)
    run_max = torch.empty((splits, B), **f32)
    run_sum = torch.empty((splits, B), **f32)
    run_acc = torch.empty((splits, B, D), **f32) if grad_s else None
    has_labels = labels is not None
    launch(
        contrastive_partials_kernel,
        (n_anchor_blocks, splits),
        s,
        negatives,
        labels,
        negative_labels,
        run_max,
        run_sum,
        run_acc,
        B,
        K,
        D,
        tiles_per_split,
        s.stride(0),
        negatives.stride(0) if per_anchor else 0,
        negatives.stride(-2),
        negative_labels.stride(0) if has_labels and per_anchor else 0,
        1.0 / temperature,
        eps,
        PER_ANCHOR=per_anchor,
        HAS_LABELS=has_labels,
        WRITE_O=grad_s,
        UPCAST=interpreting() and torch.bfloat16 in (s.dtype, negatives.dtype),
        # exact fp32 scores whenever an operand is fp32 (as the PyTorch path computes them); TF32 would also
        # need more registers than a 1024-wide fp32 bank leaves
        DOT_PRECISION="ieee" if torch.float32 in (s.dtype, negatives.dtype) or interpreting() else "tf32",
        **(dict(meta, num_warps=1) if interpreting() else meta),
    )
    loss_rows = torch.empty(B, **f32)
    gs = torch.empty((B, D), dtype=s.dtype, device=s.device) if grad_s else None
    gt = torch.empty((B, D), dtype=t.dtype, device=t.device) if grad_t else None
    launch(
        contrastive_finalize_kernel,
        (B,),
        s,
        t,
        coef,
        run_max,
        run_sum,
        run_acc,
        loss_rows,
        gs,
        gt,
        B,
        D,
        splits,
        s.stride(0),
        t.stride(0),
        1.0 / temperature,
        eps,
        WRITE_GS=grad_s,
        WRITE_GT=grad_t,
        BLOCK_D=block_d,
        num_warps=1 if interpreting() else 4 if block_d <= 512 else 8,
    )
    return loss_rows, gs, gt
