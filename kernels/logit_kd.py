"""Fused logit distillation: the Triton row kernel and its launcher.

One program handles one row (token) of student logits s and teacher logits t
over the vocabulary, V in blocks of BLOCK_V:

    pass 1  online log-sum-exp of s / T and t / T (and of s when a
            cross-entropy at temperature 1 is wanted), and for the KL
            divergences the divergence itself, with the running sums rescaled
            whenever the running max grows;
    pass 2  (JSD only) the divergence and KL(student || M), which need the
            normalized probabilities;
    last    the gradient dLoss/ds of the row, written in the logits' dtype
            (it may overwrite s: the fused LM-head path reuses the logits
            buffer of a chunk as its gradient).

Nothing of size V is kept between blocks, so the only N x V tensor the
kernel writes is the gradient. Everything is accumulated in fp32. Logits of
-inf (banned tokens) contribute nothing instead of NaN; rows whose weight is
0 (masked, ignored) are skipped and get zero gradient and zero loss.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastted.kernels import interpreting, launch

# The divergences, as the kernel's DIVERGENCE (named constexprs, never bare numbers in the kernel).
FORWARD_KL = tl.constexpr(0)  # KL(teacher || student)
REVERSE_KL = tl.constexpr(1)  # KL(student || teacher)
JSD = tl.constexpr(2)  # beta KL(teacher || M) + (1 - beta) KL(student || M), 0 < beta < 1


@triton.jit
def _fold_max(m, x):
    """The running max after block x, and a finite shift to exponentiate against."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, shift


@triton.jit
def row_coefs(kd_coef_ptr, ce_coef_ptr, row, HAS_CE: tl.constexpr):
    """(divergence weight, cross-entropy weight, skip) of a row: it is skipped when every weight it has is 0."""
    kd_c = tl.load(kd_coef_ptr + row)
    skip = kd_c == 0.0
    ce_c = 0.0
    if HAS_CE:
        ce_c = tl.load(ce_coef_ptr + row)
        skip = skip & (ce_c == 0.0)
    return kd_c, ce_c, skip


@triton.jit
def skipped_row(
    kd_out_ptr,
    ce_out_ptr,
    grad_ptr,
    row,
    stride_g,
    V,
    HAS_CE: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """A masked or ignored row: no loss, and a zero gradient over its V columns."""
    tl.store(kd_out_ptr + row, 0.0)
    if HAS_CE:
        tl.store(ce_out_ptr + row, 0.0)
    if WRITE_GRAD:
        g_row = grad_ptr + row * stride_g
        cols = tl.arange(0, BLOCK_V)
        for i in range(0, tl.cdiv(V, BLOCK_V)):
            c = i * BLOCK_V + cols
            tl.store(g_row + c, tl.zeros((BLOCK_V,), tl.float32).to(grad_ptr.dtype.element_ty), mask=c < V)


@triton.jit
def logit_kd_kernel(
    # data pointers
    s_ptr,  # (N, V) student logits
    t_ptr,  # (N, V) teacher logits
    grad_ptr,  # (N, V) out: dLoss/ds in s's dtype (may be s_ptr itself); unused without WRITE_GRAD
    kd_coef_ptr,  # (N,) fp32 weight of each row's divergence in the mean (mask / count)
    labels_ptr,  # (N,) int64 hard labels; unused without HAS_CE
    ce_coef_ptr,  # (N,) fp32 weight of each row's cross-entropy in the mean; unused without HAS_CE
    kd_out_ptr,  # (N,) fp32 out: each row's divergence, without T^2 (0 on skipped rows)
    ce_out_ptr,  # (N,) fp32 out: each row's cross-entropy (NaN for a label outside [0, V)); HAS_CE only
    # shapes
    V,  # vocabulary size (columns compared)
    V_LOAD,  # columns loaded and written: V, or the padded width of rows whose columns V..V_LOAD-1 hold -inf
    #          (they contribute nothing and get gradient 0): a multiple of 16 lets every load be 128-bit
    # strides (columns are unit-stride)
    stride_s,  # row stride of s
    stride_t,  # row stride of t
    stride_g,  # row stride of grad
    # scalars
    inv_temp,  # 1 / T
    kd_grad_scale,  # soft_weight * T: d(soft_weight T^2 D)/ds = kd_grad_scale * dD/d(s/T)
    ce_scale,  # hard_weight
    beta,  # JSD mixture weight, strictly between 0 and 1
    # constants
    DIVERGENCE: tl.constexpr,  # FORWARD_KL, REVERSE_KL or JSD
    HAS_CE: tl.constexpr,  # add a cross-entropy on hard labels
    SEPARATE_CE: tl.constexpr,  # T != 1: the cross-entropy needs its own log-sum-exp of s
    WRITE_GRAD: tl.constexpr,  # write dLoss/ds
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    cols = tl.arange(0, BLOCK_V)
    n_blocks = tl.cdiv(V_LOAD, BLOCK_V)

    kd_c, ce_c, skip = row_coefs(kd_coef_ptr, ce_coef_ptr, row, HAS_CE)
    if skip:
        skipped_row(kd_out_ptr, ce_out_ptr, grad_ptr, row, stride_g, V_LOAD, HAS_CE, WRITE_GRAD, BLOCK_V)
    else:
        # ---- pass 1: log-sum-exps (and the KL divergences), online over V
        m_s = float("-inf")  # running max of b = s / T
        d_s = 0.0  # sum exp(b - shift_s)
        m_t = float("-inf")  # running max of a = t / T
        d_t = 0.0
        m_u = float("-inf")  # running max of s itself (cross-entropy at T = 1)
        d_u = 0.0
        acc = 0.0  # forward KL: sum exp(a - shift_t) (a - b); reverse KL: sum exp(b - shift_s) (b - a)
        shift_s = 0.0
        shift_t = 0.0
        shift_u = 0.0
        for i in range(0, n_blocks):
            c = i * BLOCK_V + cols
            ok = c < V_LOAD
            s = tl.load(s_row + c, mask=ok, other=float("-inf")).to(tl.float32)
            t = tl.load(t_row + c, mask=ok, other=float("-inf")).to(tl.float32)
            b = s * inv_temp
            a = t * inv_temp
            m_s, new_shift_s = _fold_max(m_s, b)
            m_t, new_shift_t = _fold_max(m_t, a)
            alpha_s = tl.exp(shift_s - new_shift_s)
            alpha_t = tl.exp(shift_t - new_shift_t)
            e_b = tl.exp(b - new_shift_s)
            e_a = tl.exp(a - new_shift_t)
            d_s = d_s * alpha_s + tl.sum(e_b, axis=0)
            d_t = d_t * alpha_t + tl.sum(e_a, axis=0)
            if DIVERGENCE == FORWARD_KL:
                acc = acc * alpha_t + tl.sum(tl.where(a > float("-inf"), e_a * (a - b), 0.0), axis=0)
            if DIVERGENCE == REVERSE_KL:
                acc = acc * alpha_s + tl.sum(tl.where(b > float("-inf"), e_b * (b - a), 0.0), axis=0)
            shift_s = new_shift_s
            shift_t = new_shift_t
            if SEPARATE_CE:
                m_u, new_shift_u = _fold_max(m_u, s)
                d_u = d_u * tl.exp(shift_u - new_shift_u) + tl.sum(tl.exp(s - new_shift_u), axis=0)
                shift_u = new_shift_u
        lse_s = shift_s + tl.log(d_s)
        lse_t = shift_t + tl.log(d_t)

        kd = 0.0
        if DIVERGENCE == FORWARD_KL:
            kd = acc / d_t - lse_t + lse_s
        if DIVERGENCE == REVERSE_KL:
            kd = acc / d_s - lse_s + lse_t

        # ---- pass 2 (JSD): the divergence and KL(student || M)
        kl_sm = 0.0
        if DIVERGENCE == JSD:
            jsd = 0.0
            for i in range(0, n_blocks):
                c = i * BLOCK_V + cols
                ok = c < V_LOAD
                lq = tl.load(s_row + c, mask=ok, other=float("-inf")).to(tl.float32) * inv_temp - lse_s
                lp = tl.load(t_row + c, mask=ok, other=float("-inf")).to(tl.float32) * inv_temp - lse_t
                q = tl.exp(lq)
                p = tl.exp(lp)
                lm = tl.log((1.0 - beta) * q + beta * p)
                q_term = tl.where(q > 0.0, q * (lq - lm), 0.0)
                p_term = tl.where(p > 0.0, p * (lp - lm), 0.0)
                kl_sm += tl.sum(q_term, axis=0)
                jsd += tl.sum(beta * p_term + (1.0 - beta) * q_term, axis=0)
            kd = jsd
        kd = tl.where(kd_c != 0.0, kd, 0.0)
        tl.store(kd_out_ptr + row, kd)

        lse_u = lse_s
        if HAS_CE:
            if SEPARATE_CE:
                lse_u = shift_u + tl.log(d_u)
            label = tl.load(labels_ptr + row)
            in_range = (label >= 0) & (label < V)
            s_label = tl.load(s_row + tl.where(in_range, label, 0)).to(tl.float32)
            ce = tl.where(in_range, lse_u - s_label, float("nan"))
            tl.store(ce_out_ptr + row, tl.where(ce_c != 0.0, ce, 0.0))

        # ---- last pass: the gradient (each block is read before it is overwritten)
        if WRITE_GRAD:
            g_row = grad_ptr + row * stride_g
            kd_scale = kd_grad_scale * kd_c
            for i in range(0, n_blocks):
                c = i * BLOCK_V + cols
                ok = c < V_LOAD
                s = tl.load(s_row + c, mask=ok, other=float("-inf")).to(tl.float32)
                t = tl.load(t_row + c, mask=ok, other=float("-inf")).to(tl.float32)
                lq = s * inv_temp - lse_s
                lp = t * inv_temp - lse_t
                q = tl.exp(lq)
                if DIVERGENCE == FORWARD_KL:
                    g = q - tl.exp(lp)
                if DIVERGENCE == REVERSE_KL:
                    g = tl.where(q > 0.0, q * (lq - lp - kd), 0.0)
                if DIVERGENCE == JSD:
                    lm = tl.log((1.0 - beta) * q + beta * tl.exp(lp))
                    g = (1.0 - beta) * (tl.where(q > 0.0, q * (lq - lm), 0.0) - q * kl_sm)
                g = g * kd_scale
                if HAS_CE:
                    onehot = tl.where(c == label, 1.0, 0.0)
                    g += (ce_scale * ce_c) * (tl.exp(s - lse_u) - onehot)
                tl.store(g_row + c, g.to(grad_ptr.dtype.element_ty), mask=ok)  # 0 on the -inf padding


def _block_v(V: int) -> int:
    # The interpreter pays per block, a GPU per register: a wide block there; 2048 columns on a GPU, 8 a
    # thread (at 4096 the JSD + cross-entropy + gradient variant spills on sm_90).
    return min(triton.next_power_of_2(V), 16384 if interpreting() else 2048)


def logit_kd_forward(
    s: torch.Tensor,
    t: torch.Tensor,
    kd_coef: torch.Tensor,
    *,
    grad: torch.Tensor | None,
    labels: torch.Tensor | None = None,
    ce_coef: torch.Tensor | None = None,
    temperature: float,
    divergence: int,
    beta: float,
    soft_weight: float,
    hard_weight: float = 0.0,
    block_v: int | None = None,
    padded_cols: int | None = None,
):
    """Launches the row kernel over the rows of s and t (N, V), unit column stride.

    kd_coef: (N,) fp32 weight of each row's divergence (mask / count);
    grad: (N, V) output for dLoss/ds (may be s itself) or None; labels,
    ce_coef: (N,) int64 and fp32, or None. padded_cols: the rows of s and t
    (and grad) are views of padded_cols-wide rows whose columns past V hold
    -inf (the fused LM head's buffers): loaded, and their gradient (0)
    written. Returns
    (kd_rows, ce_rows): (N,) fp32 divergences without T^2, and
    cross-entropies (None without labels).
    """
    n_rows, V = s.shape
    kd_rows = torch.empty(n_rows, dtype=torch.float32, device=s.device)
    ce_rows = torch.empty(n_rows, dtype=torch.float32, device=s.device) if labels is not None else None
    v_load = padded_cols or V
    block = block_v or _block_v(v_load)
    launch(
        logit_kd_kernel,
        (n_rows,),
        s,
        t,
        grad,
        kd_coef,
        labels,
        ce_coef,
        kd_rows,
        ce_rows,
        V,
        v_load,
        s.stride(0),
        t.stride(0),
        grad.stride(0) if grad is not None else 0,
        1.0 / temperature,
        soft_weight * temperature,
        hard_weight,
        beta,
        DIVERGENCE=divergence,
        HAS_CE=labels is not None,
        SEPARATE_CE=labels is not None and temperature != 1.0,
        WRITE_GRAD=grad is not None,
        BLOCK_V=block,
        # 8 warps at most: ptxas gives a 16-warp block 64 registers a thread, and the JSD pass spills
        num_warps=1 if interpreting() else min(8, max(4, block // 256)),
    )
    return kd_rows, ce_rows


def divergence_code(divergence: str, beta: float) -> int:
    """The kernel's DIVERGENCE for a divergence name (JSD at beta 0 and 1 is the forward and reverse KL)."""
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0.0):
        return FORWARD_KL.value
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1.0):
        return REVERSE_KL.value
    return JSD.value


def logit_kd_rows_triton(
    zs, zt, kd_coef, labels, ce_coef, grad, *, temperature, divergence, beta, soft_weight, hard_weight, padded_cols=None
):
    """The contract of :func:`fastted.ops.logit_kd.logit_kd_rows`, on the Triton kernel (padded_cols: as
    :func:`logit_kd_forward` takes it)."""
    return logit_kd_forward(
        zs,
        zt,
        kd_coef,
        grad=grad,
        labels=labels,
        ce_coef=ce_coef,
        temperature=temperature,
        divergence=divergence_code(divergence, beta),
        beta=beta,
        soft_weight=soft_weight,
        hard_weight=hard_weight,
        padded_cols=padded_cols,
    )
