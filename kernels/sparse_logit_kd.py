"""Logit distillation from a top-k teacher: the Triton row kernel and its launcher.

One program handles one row (token) of student logits z over the vocabulary
against what a teacher cache stores for it: the teacher's k largest logits,
their vocabulary ids and the log-sum-exp of its other logits at temperature T
(the tail). The divergence is KL over k + 1 buckets (the k ids one by one, the
rest as one tail bucket), as :func:`fastted.reference.sparse_logit_kd_reference`
specifies it:

    pass 1  online log-sum-exp of z / T over the whole row and over the
            columns that are not among the ids (the student's tail bucket,
            summed exactly: each block's columns are compared with the ids,
            never subtracted from the total); and of z itself when a
            cross-entropy at temperature 1 is wanted;
    then    the teacher's bucket probabilities from the k values and the
            tail, the student's from z at the ids: the row's divergence;
    pass 2  the gradient of every column as if it were in the tail,
            written in z's dtype (it may overwrite z: the fused LM-head path
            reuses its logits buffer), then, after a barrier, the k columns
            of the ids overwritten with theirs (from z at the ids, read
            before pass 2).

Nothing of size V is kept between blocks; the only N x V tensor written is
the gradient. Everything is accumulated in fp32. Rows whose weights are 0
are skipped (zero loss, zero gradient).

The teacher is read as the op was given it: k values and int32 ids, or
(``PACKED``) a cache's packed rows (:mod:`fastted.ops.packed_topk`) as they
are stored, each id decoded from its bits where it is read and each value
``top - level * step`` from its uint8 level.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastted.kernels import interpreting, launch
from fastted.kernels.logit_kd import _fold_max, row_coefs, skipped_row

# ids compared with a block of columns at a time: a (BLOCK_V, IDS_CHUNK) tile of comparisons.
IDS_CHUNK = tl.constexpr(16)


@triton.jit
def _load_ids(ids_row, kk, ok, other, W, ID_BITS, PACKED: tl.constexpr):
    """The row's ids at positions ``kk`` as int32 (``other`` where not ``ok``): loaded, or PACKED decoded from
    the row's W int32 words, id j at bits [j * ID_BITS, (j + 1) * ID_BITS) from bit 0 of word 0. An id spans
    at most two words: both are read as unsigned 32 bits (the second only where it exists), joined into 64
    and shifted down."""
    if PACKED:
        bit = kk.to(tl.int64) * ID_BITS
        word = bit >> 5
        lo = tl.load(ids_row + word, mask=ok, other=0).to(tl.uint32, bitcast=True).to(tl.uint64)
        hi = tl.load(ids_row + word + 1, mask=ok & (word + 1 < W), other=0).to(tl.uint32, bitcast=True)
        pair = lo | (hi.to(tl.uint64) << 32)
        low_bits = (tl.full((), 1, tl.uint64) << ID_BITS) - 1
        ids = tl.where(ok, ((pair >> (bit & 31).to(tl.uint64)) & low_bits).to(tl.int32), other)
    else:
        ids = tl.load(ids_row + kk, mask=ok, other=other)
    return ids


@triton.jit
def _not_ids(c, ids_row, K, W, ID_BITS, BLOCK_V: tl.constexpr, CHUNK: tl.constexpr, PACKED: tl.constexpr):
    """True for the columns ``c`` (BLOCK_V of them) that are none of the row's K ids."""
    hits = tl.zeros((BLOCK_V,), dtype=tl.int32)
    for j in range(0, K, CHUNK):
        kk = j + tl.arange(0, CHUNK)
        ids = _load_ids(ids_row, kk, kk < K, -1, W, ID_BITS, PACKED)
        hits += tl.sum((c[:, None] == ids[None, :]).to(tl.int32), axis=1)
    return hits == 0


@triton.jit
def sparse_kd_kernel(
    # data pointers
    z_ptr,  # (N, V) student logits
    grad_ptr,  # (N, V) out: dLoss/dz in z's dtype (may be z_ptr itself); unused without WRITE_GRAD
    values_ptr,  # (N, K) the teacher's top-k logits (any float dtype); PACKED: (N, K) uint8 their levels
    ids_ptr,  # (N, K) int32 their vocabulary ids, distinct within a row, in [0, V); PACKED: (N, W) int32 words
    tail_ptr,  # (N,) fp32 log-sum-exp of the teacher's other logits / T (-inf: no tail)
    top_ptr,  # (N,) fp32 each row's largest value; PACKED only (value = top - level * step)
    step_ptr,  # (N,) fp32 each row's step between levels; PACKED only
    kd_coef_ptr,  # (N,) fp32 weight of each row's divergence in the mean (mask / count)
    labels_ptr,  # (N,) int64 hard labels; unused without HAS_CE
    ce_coef_ptr,  # (N,) fp32 weight of each row's cross-entropy in the mean; unused without HAS_CE
    kd_out_ptr,  # (N,) fp32 out: each row's divergence, without T^2 (0 on skipped rows)
    ce_out_ptr,  # (N,) fp32 out: each row's cross-entropy (NaN for a label outside [0, V)); HAS_CE only
    # shapes and strides (columns are unit-stride)
    V,
    K,
    W,  # PACKED: the int32 words of a row's ids
    ID_BITS,  # PACKED: the bits of an id
    stride_z,
    stride_g,
    stride_values,  # of the values, or PACKED the levels
    stride_ids,  # of the ids, or PACKED the words
    # scalars
    inv_temp,  # 1 / T
    kd_grad_scale,  # soft_weight * T
    ce_scale,  # hard_weight
    # constants
    HAS_CE: tl.constexpr,
    SEPARATE_CE: tl.constexpr,  # T != 1: the cross-entropy needs its own log-sum-exp of z
    WRITE_GRAD: tl.constexpr,
    PACKED: tl.constexpr,  # the teacher packed (fastted.ops.packed_topk): levels, words, top and step
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,  # a power of two >= K: the top-k of a row in one block
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    ids_row = ids_ptr + row * stride_ids
    cols = tl.arange(0, BLOCK_V)
    n_blocks = tl.cdiv(V, BLOCK_V)

    kd_c, ce_c, skip = row_coefs(kd_coef_ptr, ce_coef_ptr, row, HAS_CE)
    if skip:
        skipped_row(kd_out_ptr, ce_out_ptr, grad_ptr, row, stride_g, V, HAS_CE, WRITE_GRAD, BLOCK_V)
    else:
        # ---- pass 1: log-sum-exp of b = z / T over the row and over its tail; of z for the cross-entropy
        m_s = float("-inf")
        d_s = 0.0
        shift_s = 0.0
        m_r = float("-inf")  # the tail: the columns that are none of the ids
        d_r = 0.0
        shift_r = 0.0
        m_u = float("-inf")
        d_u = 0.0
        shift_u = 0.0
        for i in range(0, n_blocks):
            c = i * BLOCK_V + cols
            z = tl.load(z_row + c, mask=c < V, other=float("-inf")).to(tl.float32)
            b = z * inv_temp
            m_s, new_shift_s = _fold_max(m_s, b)
            d_s = d_s * tl.exp(shift_s - new_shift_s) + tl.sum(tl.exp(b - new_shift_s), axis=0)
            shift_s = new_shift_s
            r = tl.where(_not_ids(c, ids_row, K, W, ID_BITS, BLOCK_V, IDS_CHUNK, PACKED), b, float("-inf"))
            m_r, new_shift_r = _fold_max(m_r, r)
            d_r = d_r * tl.exp(shift_r - new_shift_r) + tl.sum(tl.exp(r - new_shift_r), axis=0)
            shift_r = new_shift_r
            if SEPARATE_CE:
                m_u, new_shift_u = _fold_max(m_u, z)
                d_u = d_u * tl.exp(shift_u - new_shift_u) + tl.sum(tl.exp(z - new_shift_u), axis=0)
                shift_u = new_shift_u
        lse_s = shift_s + tl.log(d_s)
        lse_r = shift_r + tl.log(d_r)  # -inf when the ids cover the row

        # ---- the k + 1 buckets: the teacher's from what is stored, the student's from z at the ids
        ks = tl.arange(0, BLOCK_K)
        k_ok = ks < K
        ids = _load_ids(ids_row, ks, k_ok, 0, W, ID_BITS, PACKED)
        if PACKED:  # value = top - level * step
            level = tl.load(values_ptr + row * stride_values + ks, mask=k_ok, other=0).to(tl.float32)
            value = tl.load(top_ptr + row).to(tl.float32) - level * tl.load(step_ptr + row).to(tl.float32)
            a = tl.where(k_ok, value, float("-inf"))
        else:
            a = tl.load(values_ptr + row * stride_values + ks, mask=k_ok, other=float("-inf")).to(tl.float32)
        a = a * inv_temp
        tail = tl.load(tail_ptr + row).to(tl.float32)
        m_t = tl.maximum(tl.max(a, axis=0), tail)
        lse_t = m_t + tl.log(tl.sum(tl.exp(a - m_t), axis=0) + tl.exp(tail - m_t))
        p = tl.exp(a - lse_t)
        p_tail = tl.exp(tail - lse_t)
        z_ids = tl.load(z_row + ids, mask=k_ok, other=float("-inf")).to(tl.float32)
        lq = z_ids * inv_temp - lse_s
        kd = tl.sum(tl.where(p > 0.0, p * (a - lse_t - lq), 0.0), axis=0)
        kd += tl.where(p_tail > 0.0, p_tail * (tail - lse_t - (lse_r - lse_s)), 0.0)
        kd = tl.where(kd_c != 0.0, kd, 0.0)
        tl.store(kd_out_ptr + row, kd)

        lse_u = lse_s
        label = -1
        if HAS_CE:
            if SEPARATE_CE:
                lse_u = shift_u + tl.log(d_u)
            label = tl.load(labels_ptr + row)
            in_range = (label >= 0) & (label < V)
            z_label = tl.load(z_row + tl.where(in_range, label, 0)).to(tl.float32)
            ce = tl.where(in_range, lse_u - z_label, float("nan"))
            tl.store(ce_out_ptr + row, tl.where(ce_c != 0.0, ce, 0.0))

        # ---- pass 2: the gradient, every column as a tail column; then the ids' columns
        if WRITE_GRAD:
            g_row = grad_ptr + row * stride_g
            kd_scale = kd_grad_scale * kd_c
            tail_share = tl.where(p_tail > 0.0, p_tail, 0.0)
            lse_r_safe = tl.where(p_tail > 0.0, lse_r, 0.0)
            for i in range(0, n_blocks):
                c = i * BLOCK_V + cols
                ok = c < V
                z = tl.load(z_row + c, mask=ok, other=float("-inf")).to(tl.float32)
                b = z * inv_temp
                g = kd_scale * (tl.exp(b - lse_s) - tail_share * tl.exp(b - lse_r_safe))
                if HAS_CE:
                    g += (ce_scale * ce_c) * (tl.exp(z - lse_u) - tl.where(c == label, 1.0, 0.0))
                tl.store(g_row + c, g.to(grad_ptr.dtype.element_ty), mask=ok)
            tl.debug_barrier()  # the ids' columns below are stored after every thread's pass-2 stores
            g_ids = kd_scale * (tl.exp(lq) - p)
            if HAS_CE:
                g_ids += (ce_scale * ce_c) * (tl.exp(z_ids - lse_u) - tl.where(ids == label, 1.0, 0.0))
            tl.store(g_row + ids, g_ids.to(grad_ptr.dtype.element_ty), mask=k_ok)


def _block_v(V: int) -> int:
    # Each block compares its columns with the ids IDS_CHUNK at a time: 1024 columns keep that tile at 64
    # comparisons a thread with 8 warps; the interpreter pays per block, so a wide one there.
    return min(triton.next_power_of_2(V), 16384 if interpreting() else 1024)


def sparse_kd_forward(
    z: torch.Tensor,
    values: torch.Tensor,
    ids: torch.Tensor,
    tail: torch.Tensor,
    kd_coef: torch.Tensor,
    *,
    grad: torch.Tensor | None,
    labels: torch.Tensor | None = None,
    ce_coef: torch.Tensor | None = None,
    temperature: float,
    soft_weight: float,
    hard_weight: float = 0.0,
    block_v: int | None = None,
    top: torch.Tensor | None = None,
    step: torch.Tensor | None = None,
    id_bits: int | None = None,
):
    """Launches the row kernel over the rows of z (N, V) and the top-k teacher (values, ids: (N, K), unit
    column stride; ids int32; tail (N,) fp32). grad: (N, V) output for dLoss/dz (may be z itself) or None.
    A packed teacher (:mod:`fastted.ops.packed_topk`) as it is, with ``id_bits``: values its (N, K) uint8
    levels, ids its (N, W) int32 words (unit column stride), top and step (N,) fp32.
    Returns (kd_rows, ce_rows): (N,) fp32 divergences without T^2, and cross-entropies (None without labels).
    """
    n_rows, V = z.shape
    K = values.shape[1]
    packed = id_bits is not None
    kd_rows = torch.empty(n_rows, dtype=torch.float32, device=z.device)
    ce_rows = torch.empty(n_rows, dtype=torch.float32, device=z.device) if labels is not None else None
    block = block_v or _block_v(V)
    launch(
        sparse_kd_kernel,
        (n_rows,),
        z,
        grad,
        values,
        ids,
        tail,
        top,
        step,
        kd_coef,
        labels,
        ce_coef,
        kd_rows,
        ce_rows,
        V,
        K,
        ids.shape[1] if packed else 0,
        id_bits if packed else 0,
        z.stride(0),
        grad.stride(0) if grad is not None else 0,
        values.stride(0),
        ids.stride(0),
        1.0 / temperature,
        soft_weight * temperature,
        hard_weight,
        HAS_CE=labels is not None,
        SEPARATE_CE=labels is not None and temperature != 1.0,
        WRITE_GRAD=grad is not None,
        PACKED=packed,
        BLOCK_V=block,
        BLOCK_K=max(16, triton.next_power_of_2(K)),
        num_warps=1 if interpreting() else 8,
    )
    return kd_rows, ce_rows


def sparse_kd_rows_triton(z, teacher, kd_coef, labels, ce_coef, grad, *, temperature, soft_weight, hard_weight):
    """The contract of :func:`fastted.ops.sparse_logit_kd.sparse_kd_rows`, on the Triton kernel: the teacher
    (values, ids int32, tail), or a :class:`~fastted.ops.packed_topk.PackedTopK` read as it is (top and step
    fp32)."""
    opts = dict(
        grad=grad,
        labels=labels,
        ce_coef=ce_coef,
        temperature=temperature,
        soft_weight=soft_weight,
        hard_weight=hard_weight,
    )
    if hasattr(teacher, "id_bits"):  # a PackedTopK (its fields by name: the kernels import nothing of the ops)
        return sparse_kd_forward(
            z,
            teacher.levels,
            teacher.words,
            teacher.tail,
            kd_coef,
            top=teacher.top,
            step=teacher.step,
            id_bits=teacher.id_bits,
            **opts,
        )
    values, ids, tail = teacher
    return sparse_kd_forward(z, values, ids, tail, kd_coef, **opts)
