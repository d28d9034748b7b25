"""Fused multi-layer filtered MSE: Triton kernel and launcher.

For each mapped layer l the kernel computes one tile of the filtered error

    E_l = S_l W_l^T + b_l - (H_l V_l^T + c_l)            # (N, D_F)

as a single GEMM over the concatenated K dimension (the student projection
and the negated teacher projection accumulate into one fp32 accumulator), and
reduces the masked squared error in the epilogue. Targets given directly may
be quantized (int8 or fp8 e4m3 with an fp32 scale per row, as a teacher cache
stores them): the epilogue loads them as they are stored and dequantizes them
in registers, a quarter (int8 against fp32) or half (against bf16) of the
bytes of dequantized targets. The projected tensors never reach memory; when
a gradient is wanted the epilogue writes dLoss/dE_l (the only thing the
backward GEMMs need) and its column sums (the bias gradient).

All L layers of a group are covered by one launch: program_id(1) is the layer,
and each role (student states, student weights, ...) is addressed as a base
pointer plus a per-layer element offset, so the layers stay where the caller's
model put them. The host side guarantees that every offset is 16-byte aligned.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastted.kernels import device_arch, element_offsets, interpreting, launch

# Tile configs of the autotuner (they parametrize the decorator, so they come first). bf16 and fp16 run
# tl.dot on tensor cores; fp32 runs it exactly ("ieee": FMA, no TF32), whose operands live in registers,
# so fp32 gets smaller tiles of its own (128 x 256 tiles spill 9-73 KB per thread there). Widths that
# are not multiples of 16 elements make every load of a tile scalar, and the large tiles spill: those
# get the small tile only. Each list is pruned for the device's shared memory at the first call, and
# the compile tier checks that none of them spills on sm_80 or sm_90.
TENSOR_CORE_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=3),
]
UNALIGNED_CONFIGS = TENSOR_CORE_CONFIGS[-1:]
FP32_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 16, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=3),
]
# The one config the interpreter runs (it runs every config of a sweep on the CPU). Not in the lists
# above: it is tuned for nothing but the interpreter's speed.
INTERPRETER_CONFIG = triton.Config(
    {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4, num_stages=2
)
AUTOTUNE_CONFIGS = TENSOR_CORE_CONFIGS + FP32_CONFIGS + [INTERPRETER_CONFIG]
# How many configs the interpreter's autotuner keeps: one, except in the test that makes the autotuner
# sweep on the CPU to see that no config's run leaks into the result.
INTERPRETER_SWEEP = 1


def shared_bytes(config: triton.Config, element_size: int) -> int:
    """Shared memory of a config: its pipeline stages of the A and B operand tiles (the compile tier
    checks that this bounds what the compiler allocates)."""
    kw = config.kwargs
    return config.num_stages * (kw["BLOCK_M"] + kw["BLOCK_N"]) * kw["BLOCK_K"] * element_size


def configs_for(dtype: torch.dtype, arch, aligned: bool = True) -> list[triton.Config]:
    """The configs the autotuner may try for inputs of ``dtype`` on ``arch`` (``aligned``: every width and
    row stride a multiple of 16 elements): the dtype's list, less any config whose tiles would not fit in a
    block's shared memory there."""
    if dtype == torch.float32:
        configs = FP32_CONFIGS
    else:
        configs = TENSOR_CORE_CONFIGS if aligned else UNALIGNED_CONFIGS
    size = dtype.itemsize
    return [c for c in configs if shared_bytes(c, size) <= arch.shared_per_block]


# The interpreter's timer for a sweep (INTERPRETER_SWEEP above one): a function (kernel_call, quantiles) ->
# timings, set by the test and the GPU check that make the autotuner sweep on the CPU. None: configs are not
# run to be timed, and the first one kept wins.
INTERPRETER_TIMER = None
# The per-tile partial sums each config of a sweep writes into the call's own buffers. colsum_ptr is None
# where no bias takes a gradient (no biases, frozen ones, a forward without gradient).
PARTIAL_SUMS = ("sq_err_ptr", "colsum_ptr")


def _zero_partial_sums(nargs, reset_only=False):
    """The autotuner's pre_hook, before each config of a sweep and after the sweep: the partial sums start
    at zero. reset_to_zero does the same, but Triton before 3.8 calls ``.zero_()`` on every argument it
    names, None included, so the first call without colsum crashed there."""
    for name in PARTIAL_SUMS:
        if nargs[name] is not None:
            nargs[name].zero_()


def _bench(kernel_call, quantiles):
    """The autotuner's timer: the driver's on a GPU. The interpreter has none, and Triton before 3.8 times a
    sweep of one config too: there each config times 0 without being run, unless INTERPRETER_TIMER is set."""
    if not interpreting():
        from triton.runtime import driver

        return driver.active.get_benchmarker()(kernel_call, quantiles=quantiles)
    if INTERPRETER_TIMER is not None:
        return INTERPRETER_TIMER(kernel_call, quantiles)
    return [0.0] * len(quantiles)


def _prune_configs(configs, named_args, **kwargs):
    if interpreting():
        return sorted(configs, key=lambda c: c is not INTERPRETER_CONFIG)[:INTERPRETER_SWEEP]
    states = named_args["s_base"]
    aligned = all(named_args[name] % 16 == 0 for name in ("D_S", "D_T", "D_F", "stride_s", "stride_t"))
    return configs_for(states.dtype, device_arch(states.device), aligned)


@triton.jit
def _project(
    acc,  # (BM, BN) fp32 accumulator, returned with x W^T added
    x_ptr,  # this layer's states, (N, K) with row stride stride_x
    w_ptr,  # this layer's filter weight, (D_F, K), contiguous
    rows,  # int64 (BM,) row indices of the tile
    cols,  # int64 (BN,) column indices of the tile
    row_ok,  # (BM,) rows < N
    col_ok,  # (BN,) cols < D_F
    K,  # the states' width
    stride_x,  # row stride of the states
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    ks = tl.arange(0, BLOCK_K).to(tl.int64)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        kk = k * BLOCK_K + ks
        a = tl.load(
            x_ptr + rows[:, None] * stride_x + kk[None, :], mask=row_ok[:, None] & (kk[None, :] < K), other=0.0
        )  # (BM, BK)
        b = tl.load(
            w_ptr + cols[None, :] * K + kk[:, None], mask=col_ok[None, :] & (kk[:, None] < K), other=0.0
        )  # (BK, BN): a tile of W^T
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return acc


@triton.autotune(
    configs=AUTOTUNE_CONFIGS,
    key=["N_KEY", "D_S", "D_T", "D_F", "stride_s", "stride_t"],  # (Triton adds the tensors' dtypes)
    prune_configs_by={"early_config_prune": _prune_configs},
    # Each config of a sweep runs on the call's own buffers: the per-tile partial sums must start at zero.
    pre_hook=_zero_partial_sums,
    do_bench=_bench,
)
@triton.heuristics(
    {
        "HAS_W": lambda args: args["w_base"] is not None,
        "HAS_B": lambda args: args["b_base"] is not None,
        "HAS_V": lambda args: args["v_base"] is not None,
        "HAS_C": lambda args: args["c_base"] is not None,
        "HAS_Q": lambda args: args["q_base"] is not None,
        "HAS_MASK": lambda args: args["mask_ptr"] is not None,
        "WRITE_GRAD": lambda args: args["g_base"] is not None,
        "WRITE_COLSUM": lambda args: args["colsum_ptr"] is not None,
    }
)
@triton.jit
def filtered_mse_fwd_kernel(
    # --- data pointers: layer l of a role lives at base + offsets[l] (elements)
    s_base,  # student states, (N, D_S) per layer (identity student: (N, D_F)), row stride stride_s
    s_offsets,  # int64 (L,) element offsets of the student states
    w_base,  # student filter weights, (D_F, D_S) per layer, contiguous; None: identity
    w_offsets,  # int64 (L,)
    b_base,  # student filter biases, (D_F,) per layer; None: no bias
    b_offsets,  # int64 (L,)
    t_base,  # teacher states (N, D_T) when v_base is given, else targets (N, D_F); row stride stride_t
    t_offsets,  # int64 (L,)
    v_base,  # teacher filter weights, (D_F, D_T) per layer, contiguous; None: targets given
    v_offsets,  # int64 (L,)
    c_base,  # teacher filter biases, (D_F,) per layer; None: no bias
    c_offsets,  # int64 (L,)
    q_base,  # fp32 (N,) per layer: the row scales of quantized targets (int8 / fp8 t); None: t as it is
    q_offsets,  # int64 (L,)
    g_base,  # out: dLoss/dE, (N, D_F) per layer, contiguous; None: no gradient wanted
    g_offsets,  # int64 (L,)
    mask_ptr,  # fp32 (N,) token weights; None: every token counts 1
    count_ptr,  # fp32 (1,): sum of the token weights (N without a mask)
    layer_scale_ptr,  # fp32 (L,): w_l / sum(w) for the layers of this launch
    sq_err_ptr,  # out: fp32 (L, stride_sq) partial sums of m_i * E_l,ij^2, one per tile
    colsum_ptr,  # out: fp32 (L, stride_cs_m, D_F) partial column sums of dLoss/dE; None: not wanted
    # --- shapes
    N,  # tokens
    D_S,  # student width (0 for an identity student)
    D_T,  # teacher width (0 when targets are given)
    D_F,  # filter width
    N_KEY,  # next power of two of N: the autotune key, so that every new N does not retune
    # --- strides
    stride_s,  # row stride of the student states
    stride_t,  # row stride of the teacher states or targets
    stride_sq,  # layer stride of sq_err_ptr (in tiles)
    stride_cs_m,  # row-block count of colsum_ptr per layer
    # --- constants
    IN_DTYPE: tl.constexpr,  # element type of every data tensor
    ALIGN: tl.constexpr,  # elements per 16 bytes: every layer offset is a multiple of it
    T_ALIGN: tl.constexpr,  # the same for the teacher states or targets (int8 / fp8 targets: 16)
    UPCAST: tl.constexpr,  # run tl.dot in fp32 (the interpreter's bf16 dot is wrong)
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs, so fp32 is not silently tf32
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_V: tl.constexpr,
    HAS_C: tl.constexpr,
    HAS_Q: tl.constexpr,
    HAS_MASK: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    WRITE_COLSUM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)

    # Grouped tile order: GROUP_M row blocks share the same weight columns in L2.
    num_pid_m = tl.cdiv(N, BLOCK_M)
    num_pid_n = tl.cdiv(D_F, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # (BM,)
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # (BN,)
    row_ok = rows < N
    col_ok = cols < D_F

    s_ptr = s_base + tl.multiple_of(tl.load(s_offsets + layer), ALIGN)
    t_ptr = t_base + tl.multiple_of(tl.load(t_offsets + layer), T_ALIGN)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_W:
        # acc = S W^T
        w_ptr = w_base + tl.multiple_of(tl.load(w_offsets + layer), ALIGN)
        acc = _project(acc, s_ptr, w_ptr, rows, cols, row_ok, col_ok, D_S, stride_s, UPCAST, DOT_PRECISION, BLOCK_K)
    if HAS_V:
        # acc = H V^T - S W^T over the teacher's K; negating the accumulator (not
        # an operand) around it lets both projections share one accumulator.
        v_ptr = v_base + tl.multiple_of(tl.load(v_offsets + layer), ALIGN)
        acc = -_project(-acc, t_ptr, v_ptr, rows, cols, row_ok, col_ok, D_T, stride_t, UPCAST, DOT_PRECISION, BLOCK_K)

    # --- epilogue: the identity sides, the biases, the masked squared error
    tile_ok = row_ok[:, None] & col_ok[None, :]
    if not HAS_W:
        acc += tl.load(s_ptr + rows[:, None] * stride_s + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    if not HAS_V:
        target = tl.load(t_ptr + rows[:, None] * stride_t + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        if HAS_Q:  # quantized targets: dequantized here, by their row's scale
            q_ptr = q_base + tl.multiple_of(tl.load(q_offsets + layer), 4)
            target = target * tl.load(q_ptr + rows, mask=row_ok, other=0.0)[:, None]
        acc -= target
    if HAS_B:
        b_ptr = b_base + tl.multiple_of(tl.load(b_offsets + layer), ALIGN)
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_C:
        c_ptr = c_base + tl.multiple_of(tl.load(c_offsets + layer), ALIGN)
        acc -= tl.load(c_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    err = tl.where(tile_ok, acc, 0.0)  # (BM, BN) fp32

    if HAS_MASK:
        m = tl.load(mask_ptr + rows, mask=row_ok, other=0.0)
        weighted = err * m[:, None]
    else:
        weighted = err
    tl.store(sq_err_ptr + layer * stride_sq + pid, tl.sum(tl.sum(weighted * err, axis=1), axis=0))

    if WRITE_GRAD:
        count = tl.load(count_ptr)
        count = tl.where(count > 0, count, 1.0)  # all tokens masked: the error is 0 anyway
        scale = 2.0 * tl.load(layer_scale_ptr + layer) / (D_F * count)
        grad = weighted * scale  # (BM, BN) fp32: dLoss/dE
        g_ptr = g_base + tl.multiple_of(tl.load(g_offsets + layer), ALIGN)
        tl.store(g_ptr + rows[:, None] * D_F + cols[None, :], grad.to(IN_DTYPE), mask=tile_ok)
        if WRITE_COLSUM:
            tl.store(
                colsum_ptr + (layer * stride_cs_m + pid_m) * D_F + cols,
                tl.sum(grad, axis=0),
                mask=col_ok,
            )


_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
# Smallest tile of the config list: sizes the per-tile output buffers for any config.
_MIN_BLOCK_M = min(config.kwargs["BLOCK_M"] for config in AUTOTUNE_CONFIGS)
_MIN_BLOCK_N = min(config.kwargs["BLOCK_N"] for config in AUTOTUNE_CONFIGS)


def filtered_mse_forward(s, w, b, t, v, c, q, mask, count, layer_scale, *, write_grad, write_colsum):
    """Launch the fused kernel once over the L layers of a uniform group.

    s: L student states (N, D_S) with unit column stride and one row stride;
    w: L weights (D_F, D_S), contiguous, or None (identity student, D_S = D_F);
    b, c: L biases (D_F,) or None; t: L teacher states (N, D_T) (with v) or
    targets (N, D_F) (v None), one row stride; v: L weights (D_F, D_T) or None;
    q: L fp32 row scales (N,) of quantized targets (t int8 or float8_e4m3fn,
    v None), or None; mask: fp32 (N,) or None; count: fp32 (1,) sum of the mask; layer_scale:
    fp32 (L,). Every tensor's address is 16-byte aligned (the caller copies
    the ones that are not).

    Returns (sq_err, grads, colsum): fp32 (L,) sums of m_i * E_l,ij^2; L
    tensors dLoss/dE_l (N, D_F) in the input dtype, or None; fp32 (L, D_F)
    column sums of those gradients, or None.
    """
    device = s[0].device
    dtype = s[0].dtype
    n_layers = len(s)
    n_rows = s[0].shape[0]
    d_f = w[0].shape[0] if w is not None else s[0].shape[1]
    d_s = s[0].shape[1] if w is not None else 0
    d_t = t[0].shape[1] if v is not None else 0

    max_pid_m = triton.cdiv(n_rows, _MIN_BLOCK_M)
    max_tiles = max_pid_m * triton.cdiv(d_f, _MIN_BLOCK_N)
    # Tiles a larger config does not reach stay zero and add nothing.
    sq_err = torch.zeros((n_layers, max_tiles), dtype=torch.float32, device=device)
    grads = None
    g_base = None
    if write_grad:
        grads = [torch.empty((n_rows, d_f), dtype=dtype, device=device) for _ in range(n_layers)]
        g_base = grads[0]
    colsum = None
    if write_grad and write_colsum:
        colsum = torch.zeros((n_layers, max_pid_m, d_f), dtype=torch.float32, device=device)

    grid = lambda meta: (triton.cdiv(n_rows, meta["BLOCK_M"]) * triton.cdiv(d_f, meta["BLOCK_N"]), n_layers)
    launch(
        filtered_mse_fwd_kernel,
        grid,
        s[0],
        element_offsets(s, s[0], device),
        None if w is None else w[0],
        element_offsets(w, None if w is None else w[0], device),
        None if b is None else b[0],
        element_offsets(b, None if b is None else b[0], device),
        t[0],
        element_offsets(t, t[0], device),
        None if v is None else v[0],
        element_offsets(v, None if v is None else v[0], device),
        None if c is None else c[0],
        element_offsets(c, None if c is None else c[0], device),
        None if q is None else q[0],
        element_offsets(q, None if q is None else q[0], device),
        g_base,
        element_offsets(grads, g_base, device),
        mask,
        count,
        layer_scale,
        sq_err,
        colsum,
        n_rows,
        d_s,
        d_t,
        d_f,
        triton.next_power_of_2(n_rows),
        s[0].stride(0),
        t[0].stride(0),
        max_tiles,
        max_pid_m,
        IN_DTYPE=_TL_DTYPES[dtype],
        ALIGN=16 // s[0].element_size(),
        T_ALIGN=16 // t[0].element_size(),
        UPCAST=interpreting() and dtype == torch.bfloat16,
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
    )
    return sq_err.sum(1), grads, (colsum.sum(1) if colsum is not None else None)
