"""Masked mean pooling of every mapped layer in one launch: Triton kernels and launchers.

Forward: pooled[b, l * D + j] = sum_t w[b, t] h_l[b, t, j], with the token
weights w = mask / count, for all L layers at once, written straight into the
concatenated (B, L * D) output. Tokens of weight 0 (padding) are never read.

Backward: dLoss/dh_l[b, t, j] = w[b, t] g[b, l * D + j], all layers in one
launch into one (L, B, T, D) buffer whose slices are the layers' gradients
(grid: examples x token blocks on the first axis, whose limit is 2^31 - 1,
layers on the second).

Each layer is addressed as a base pointer plus a per-layer element offset, so
the states stay where the model put them (they share shape, strides, dtype).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastted.kernels import element_offsets, interpreting, launch


@triton.jit
def mean_pool_fwd_kernel(
    # data pointers
    h_ptr,  # the first layer's states (B, T, D); layer l starts at h_ptr + offsets[l]
    offsets_ptr,  # (L,) int64 element offsets of the layers from h_ptr
    w_ptr,  # (B, T) fp32 token weights (mask / count), contiguous
    out_ptr,  # (B, L * D) out: the pooled layers, concatenated, in the states' dtype
    # shapes
    T,  # tokens
    D,  # width of a layer
    L,  # layers
    # strides (the states' last dimension is unit-stride)
    stride_hb,  # example stride of the states
    stride_ht,  # token stride of the states
    # constants
    ALIGN: tl.constexpr,  # elements per 16 bytes: every layer offset is a multiple of it
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    layer = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    c_ok = cols < D
    base = h_ptr + tl.multiple_of(tl.load(offsets_ptr + layer), ALIGN) + b * stride_hb
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for t0 in range(0, T, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        w = tl.load(w_ptr + b * T + ts, mask=ts < T, other=0.0)
        x = tl.load(base + ts[:, None] * stride_ht + cols[None, :], mask=(w != 0.0)[:, None] & c_ok[None, :], other=0.0)
        acc += tl.sum(x.to(tl.float32) * w[:, None], axis=0)
    tl.store(out_ptr + b * L * D + layer * D + cols, acc.to(out_ptr.dtype.element_ty), mask=c_ok)


@triton.jit
def mean_pool_bwd_kernel(
    # data pointers
    g_ptr,  # (B, L * D) dLoss/dpooled
    w_ptr,  # (B, T) fp32 token weights, contiguous
    gh_ptr,  # (L, B, T, D) out: dLoss/dh of every layer, contiguous, in the states' dtype
    # shapes
    B,
    T,
    D,
    L,
    # strides
    stride_gb,  # example stride of g (its last dimension is unit-stride)
    # constants
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # one grid axis for (example, block of tokens): y and z stop at 65,535, and T / BLOCK_T passes that
    pid = tl.program_id(0).to(tl.int64)
    t_blocks = tl.cdiv(T, BLOCK_T)
    b = pid // t_blocks
    ts = (pid % t_blocks) * BLOCK_T + tl.arange(0, BLOCK_T)
    layer = tl.program_id(1).to(tl.int64)
    t_ok = ts < T
    w = tl.load(w_ptr + b * T + ts, mask=t_ok, other=0.0)
    out = gh_ptr + ((layer * B + b) * T + ts[:, None]) * D
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        c_ok = cols < D
        g = tl.load(g_ptr + b * stride_gb + layer * D + cols, mask=c_ok, other=0.0).to(tl.float32)
        tl.store(
            out + cols[None, :],
            (w[:, None] * g[None, :]).to(gh_ptr.dtype.element_ty),
            mask=t_ok[:, None] & c_ok[None, :],
        )


def _blocks(D: int) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_D): tiles of about 4K elements on a GPU; wide ones under the interpreter."""
    block_d = min(triton.next_power_of_2(D), 1024 if interpreting() else 256)
    return (64 if interpreting() else max(1, 4096 // block_d)), block_d


def mean_pool_forward(states: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """states: L tensors (B, T, D) of one dtype, shape and strides, unit last stride; weights: (B, T) fp32
    contiguous. Returns the (B, L * D) concatenated weighted sums over the tokens."""
    B, T, D = states[0].shape
    L = len(states)
    out = torch.empty((B, L * D), dtype=states[0].dtype, device=states[0].device)
    block_t, block_d = _blocks(D)
    launch(
        mean_pool_fwd_kernel,
        (B, L, triton.cdiv(D, block_d)),
        states[0],
        element_offsets(states, states[0], states[0].device),
        weights,
        out,
        T,
        D,
        L,
        states[0].stride(0),
        states[0].stride(1),
        ALIGN=16 // states[0].element_size(),
        BLOCK_T=block_t,
        BLOCK_D=block_d,
        num_warps=1 if interpreting() else 4,
    )
    return out


def mean_pool_backward(grad: torch.Tensor, weights: torch.Tensor, n_layers: int, dtype: torch.dtype) -> torch.Tensor:
    """grad: (B, L * D) with unit last stride; weights (B, T) fp32 contiguous. Returns the (L, B, T, D)
    gradients of the layers' states."""
    B, T = weights.shape
    D = grad.shape[1] // n_layers
    out = torch.empty((n_layers, B, T, D), dtype=dtype, device=grad.device)
    block_t, block_d = _blocks(D)
    launch(
        mean_pool_bwd_kernel,
        (B * triton.cdiv(T, block_t), n_layers),
        grad,
        weights,
        out,
        B,
        T,
        D,
        n_layers,
        grad.stride(0),
        BLOCK_T=block_t,
        BLOCK_D=block_d,
        num_warps=1 if interpreting() else 4,
    )
    return out
