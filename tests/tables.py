"""Shapes, dtypes, tolerances and the closeness check shared by the tests of the fused losses."""

import zlib

import pytest
import torch

# (leading shape, d_s, d_t, d_f): odd, non-power-of-two sizes on purpose.
SHAPES = [
    ((37,), 24, 40, 20),
    ((3, 29), 33, 17, 45),
    ((2, 64), 64, 96, 48),
]

# dtype -> absolute slack added to "twice PyTorch's own error in that dtype".
DTYPES = {
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 1e-2,
}


def device():
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def seed_for(*key) -> int:
    """A fresh but reproducible seed per test case."""
    return zlib.crc32(repr(key).encode())


def assert_close_to_spec(name, got, ref64, lowp, slack):
    """|got - ref| <= 2 |PyTorch's own low-precision error| + slack * |ref| (max norms)."""
    assert got is not None, f"{name}: no gradient"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got.double().cpu() - ref64.cpu()).abs().max().item()
    torch_err = (lowp.double().cpu() - ref64.cpu()).abs().max().item()
    bound = 2 * torch_err + slack * max(ref64.abs().max().item(), 1e-6)
    assert err <= bound, f"{name}: error {err:.3e} > bound {bound:.3e} (PyTorch's own error {torch_err:.3e})"


def check_bad_input(fn, inputs, fragments):
    """fn(**inputs) raises a ValueError whose message holds every fragment (argument names, shapes)."""
    with pytest.raises(ValueError) as info:
        fn(**inputs)
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in {str(info.value)!r}"
