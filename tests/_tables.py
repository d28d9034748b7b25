"""Shapes, dtypes and tolerances shared by the tests of the fused losses."""
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
