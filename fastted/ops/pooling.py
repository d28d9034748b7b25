"""Pooling the hidden states of every mapped layer over their valid tokens: CoDIR's and RAIL-KD's first step.

:func:`pool_states` turns L tensors (B, T, d) of one model into one (B, L * d)
tensor: the mean over the tokens the mask keeps (all layers in one launch of
``fastted.kernels.pooling`` on a GPU, one batched matmul per layer on a CPU),
or the first token it keeps. This file also holds the checks of per-layer
states and :func:`valid_examples`, the examples that keep a token, shared by
the losses on pooled vectors (:mod:`fastted.ops.contrastive_kd`,
:mod:`fastted.ops.pooled_distance`). The spec is
:func:`fastted.reference.pool_states_reference`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from fastted.ops.checks import as_list, check_floating, flat_mask
from fastted.ops.dispatch import aligned, detach_without_grad, resolve_impl
from fastted.ops.registry import CompileTier, GpuCheck, KernelOp
from fastted.reference import POOLINGS, pool_states_reference, safe_count

# --------------------------------------------------------------------------- checks


def check_states(name: str, states) -> list[Tensor]:
    """The per-layer states of one model: a non-empty list of (B, T, d) float tensors of one shape, dtype, device."""
    states = as_list(name, states, None, False)
    if not states:
        raise ValueError(f"{name} is empty: it needs at least one layer's states (B, T, d)")
    ref = states[0]
    for i, h in enumerate(states):
        if h.dim() != 3 or h.numel() == 0:
            raise ValueError(f"{name}[{i}] has shape {tuple(h.shape)}, but needs (B, T, d), non-empty")
        if h.shape != ref.shape or h.dtype != ref.dtype or h.device != ref.device:
            raise ValueError(
                f"{name}[{i}] is {tuple(h.shape)} {h.dtype} on {h.device}, but {name}[0] is {tuple(ref.shape)} "
                f"{ref.dtype} on {ref.device}: the layers of one model must match"
            )
        check_floating(f"{name}[{i}]", h)
    return states


def check_pooling(pooling: str) -> str:
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    return pooling


def valid_examples(n_examples: int, device, *masks: Optional[Tensor]) -> Tensor:
    """(B,) bool: the examples with a valid token under every given token mask ((B, T) or flat (B * T,))."""
    valid = torch.ones(n_examples, dtype=torch.bool, device=device)
    for m in masks:
        if m is not None:
            valid = valid & (m.reshape(n_examples, -1) != 0).any(1)
    return valid


def token_weights(mask: Optional[Tensor], shape: tuple, dtype: torch.dtype, device, ref_name: str) -> Tensor:
    """(B, T) mask / count in fp32 (fp64 for fp64 states): an example without valid tokens gets all zeros."""
    acc = torch.promote_types(dtype, torch.float32)
    if mask is None:
        return torch.full(shape, 1.0 / shape[1], dtype=acc, device=device)
    m = flat_mask(mask, shape, device, ref_name).reshape(shape).to(acc)
    return (m / safe_count(m.sum(1, keepdim=True))).contiguous()


# --------------------------------------------------------------------------- autograd


class MeanPoolFunction(torch.autograd.Function):
    """All layers pooled by one kernel; their gradients written by one kernel into one buffer."""

    @staticmethod
    def forward(ctx, weights, *states):
        from fastted.kernels.pooling import mean_pool_forward

        ctx.save_for_backward(weights)
        ctx.n_layers, ctx.dtype = len(states), states[0].dtype
        return mean_pool_forward(list(states), weights)

    @staticmethod
    def backward(ctx, grad):
        from fastted.kernels.pooling import mean_pool_backward

        (weights,) = ctx.saved_tensors
        grads = mean_pool_backward(aligned(grad, False), weights, ctx.n_layers, ctx.dtype)
        return (None, *grads.unbind(0))


class MeanPoolCPUFunction(torch.autograd.Function):
    """The PyTorch path: one batched matvec per layer forward; backward gives each layer's gradient as the
    token weights times the pooled gradient (a broadcast product, cheaper than autograd's batched outer
    product)."""

    @staticmethod
    def forward(ctx, weights, *states):
        ctx.save_for_backward(weights)
        ctx.n_layers = len(states)
        w = weights.to(states[0].dtype)[:, None, :]  # (B, 1, T)
        return torch.cat([torch.bmm(w, h)[:, 0] for h in states], dim=1)  # no (B, T, d) temporary

    @staticmethod
    def backward(ctx, grad):
        (weights,) = ctx.saved_tensors
        n, batch = ctx.n_layers, weights.shape[0]
        g = grad.reshape(batch, n, 1, -1)  # (B, L, 1, d)
        w = weights.to(grad.dtype)[:, :, None]  # (B, T, 1)
        return (None, *(w * g[:, layer] for layer in range(n)))


# --------------------------------------------------------------------------- public API


def pool_states(
    states: Sequence[Tensor],
    mask: Optional[Tensor] = None,
    *,
    pooling: str = "mean",
    concat: bool = True,
    impl: str = "auto",
):
    """Pool the hidden states of every mapped layer over their valid tokens.

    Args:
        states: L tensors (B, T, d) of one model (one shape and dtype).
        mask: (B, T) token mask (the attention mask); None: every token.
        pooling: "mean" over the valid tokens (CoDIR's paper), or "first":
            the first valid token (BERT's [CLS] with right padding; CoDIR's
            released code).
        concat: return one (B, L * d) tensor (layer l in columns l*d..);
            otherwise a list of L (B, d) views of it.
        impl: "auto", "triton" or "reference" (mean pooling; "first" is a
            gather on every path).

    An example without any valid token pools to zeros; the losses on pooled
    vectors leave such examples out of their means.
    """
    check_pooling(pooling)
    states = check_states("states", states)
    ref = states[0]
    shape = tuple(ref.shape[:2])
    width = ref.shape[2]
    if pooling == "first":  # a gather: the spec's is the implementation on every path
        m = None if mask is None else flat_mask(mask, shape, ref.device, "states").reshape(shape)
        out = pool_states_reference(states, m, "first")
    else:
        weights = token_weights(mask, shape, ref.dtype, ref.device, "states")
        if resolve_impl(impl, ref.device, ref.dtype) == "triton":
            states = detach_without_grad(aligned(h, True) for h in states)
            out = MeanPoolFunction.apply(weights, *states)
        else:
            out = MeanPoolCPUFunction.apply(weights, *detach_without_grad(states))
    return out if concat else list(out.split(width, dim=1))


# --------------------------------------------------------------------------- what the tools know of this op

# The sizes the compile tier records: the benchmarks' (so their variants are the ones the table shows), odd ones
# (no divisibility by 16 anywhere), and the largest the API accepts (for the grid limits; they add no variant).
COMPILE_SIZES = [
    ((32, 128, 768, 12), "benchmark"),
    ((8, 4096, 4096, 32), "large"),
    ((3, 77, 100, 5), "odd"),
    ((2, 2**20, 4096, 64), "largest"),
    ((2**17, 128, 768, 12), "largest"),
]


def _compile_cases(full: bool, sizes=COMPILE_SIZES):
    """The compile tier's cases: (case, run) pairs whose runs call the launchers on meta tensors."""
    from fastted.kernels.pooling import mean_pool_backward, mean_pool_forward
    from fastted.kernels.resources import DTYPES, empty

    for dtype in DTYPES:
        for (b, t, d, layers), size in sizes:
            states = [empty((b, t, d), dtype) for _ in range(layers)]
            weights = empty((b, t), torch.float32)
            case = dict(op="pool_states", size=size, dtype=str(dtype))
            yield dict(case, direction="forward"), lambda: mean_pool_forward(states, weights)
            yield (
                dict(case, direction="backward"),
                lambda: mean_pool_backward(empty((b, layers * d), dtype), weights, layers, dtype),
            )


def _tier_expectations(rows: list[dict], arch: str) -> list[str]:
    """Aligned layers (every size but the odd one) are pooled with 128-bit loads."""
    aligned_rows = [r for r in rows if r["kernel"] == "mean_pool_fwd_kernel" and r["example"]["size"] != "odd"]
    if aligned_rows and all(r["vector_loads"] for r in aligned_rows):
        return []
    return [f"mean_pool_fwd_kernel on aligned layers without 128-bit loads on {arch}"]


def _gpu_cases(tests, dtype, impl: str, cuda: bool) -> list:
    """The tests' check of mean pooling under three masks (on a GPU at BERT-base's sizes too)."""
    shapes = tests.SHAPES + ([(256, 128, 768, 12)] if cuda else [])
    return [
        (
            dict(shape=str(shape), mask=mask),
            lambda shape=shape, mask=mask: tests.check_pool_states(impl, *shape, dtype, "mean", mask),
        )
        for shape in shapes
        for mask in ("random", "right_padding", "one_empty")
    ]


def states_bytes(size: dict) -> int:
    """The bytes of one model's hidden states at a benchmark size (every layer): what pooling reads."""
    states = size["n_layers"] * size["batch"] * size["seq"] * size["width"]
    return states * getattr(torch, size["dtype"]).itemsize


KERNEL_OP = KernelOp(
    "pooling",
    CompileTier(("mean_pool_fwd_kernel", "mean_pool_bwd_kernel"), _compile_cases, _tier_expectations),
    # read every state once, write the student's gradient
    GpuCheck("pool_states", cases=_gpu_cases, min_bytes=lambda size, variant: 2 * states_bytes(size)),
)
