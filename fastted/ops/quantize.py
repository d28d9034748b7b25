"""Rows of layer targets stored in fewer bytes: int8 or fp8 e4m3 with an fp32 scale per row, or bf16.

The teacher cache (:mod:`fastted.train.cache`) stores its layer targets so, and the fused filtered MSE
(:func:`fastted.ops.filtered_mse.filtered_mse`) dequantizes int8 and fp8 targets inside its kernel.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

QUANTIZATIONS = ("int8", "fp8", "bf16")


def quantize_rows(x: Tensor, kind: str) -> tuple[Tensor, Optional[Tensor]]:
    """(values, per-row scale) of (rows, d) ``x``: int8 or fp8 e4m3 with an fp32 scale per row, or bf16 (no
    scale). int8: round(x / s) with s = max|row| / 127, so an entry's error is at most s / 2."""
    if kind not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {kind!r}")
    x = x.detach().float()
    if kind == "bf16":
        return x.bfloat16(), None
    top = 127.0 if kind == "int8" else 448.0  # e4m3's largest finite value
    scale = (x.abs().amax(dim=-1) / top).clamp_min(torch.finfo(torch.float32).tiny)
    scaled = x / scale.float()[:, None]
    if kind == "int8":
        return scaled.round().clamp(-127, 127).to(torch.int8), scale
    return scaled.to(torch.float8_e4m3fn), scale


def dequantize_rows(values: Tensor, scale: Optional[Tensor]) -> Tensor:
    """The fp32 rows :func:`quantize_rows` stored."""
    return values.float() if scale is None else values.float() * scale.float()[:, None]
