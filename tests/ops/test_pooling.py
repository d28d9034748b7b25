"""fastted.pool_states (the pooling op) against its float64 reference, on both paths."""

import pytest
import torch

import fastted
from fastted.reference import pool_states_reference
from tests.tables import DTYPES, assert_close_to_spec, device, seed_for

IMPLS = ["reference", "triton"]
# (B, T, d, L): odd sizes; T beyond one token block; one layer and twelve.
SHAPES = [(3, 11, 20, 4), (5, 70, 33, 2), (2, 9, 768, 1), (4, 17, 24, 12)]


def _states(batch, tokens, width, n_layers, dtype, seed, mask_kind="random"):
    g = torch.Generator().manual_seed(seed)
    states = [
        (torch.randn(batch, tokens, width, generator=g, dtype=torch.float64) * 2).to(device(), dtype).requires_grad_()
        for _ in range(n_layers)
    ]
    lengths = torch.randint(1, tokens + 1, (batch,), generator=g)
    right = torch.arange(tokens)[None, :] < lengths[:, None]  # right padding, as BERT batches
    mask = {
        "random": torch.rand(batch, tokens, generator=g) > 0.4,
        "right_padding": right,
        "left_padding": right.flip(1),
        "one_empty": right.clone().index_fill_(0, torch.tensor([batch - 1]), False),
        "none": None,
    }[mask_kind]
    return states, None if mask is None else mask.to(device())


def check_pool_states(impl, batch, tokens, width, n_layers, dtype, pooling, mask_kind="random", grad_out=None):
    seed = seed_for("pool", impl, batch, tokens, width, n_layers, dtype, pooling, mask_kind)
    states, mask = _states(batch, tokens, width, n_layers, dtype, seed, mask_kind)
    out = fastted.pool_states(states, mask, pooling=pooling, impl=impl)
    assert out.shape == (batch, n_layers * width) and out.dtype == dtype
    g = torch.Generator().manual_seed(seed + 1)
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(device())
    grads = torch.autograd.grad(out, states, grad_out.to(dtype))
    refs = []
    for cast in (torch.float64, dtype):
        leaves = [h.detach().to(cast).requires_grad_() for h in states]
        ref = pool_states_reference(leaves, mask, pooling)
        refs.append((ref.detach(), torch.autograd.grad(ref, leaves, grad_out.to(cast))))
    slack = DTYPES[dtype]
    assert_close_to_spec("pooled", out, refs[0][0], refs[1][0], slack)
    for i, grad in enumerate(grads):
        assert grad.dtype == dtype and grad.shape == states[i].shape
        assert_close_to_spec(f"grad states[{i}]", grad, refs[0][1][i], refs[1][1][i], slack)
    return out, mask, grads


@pytest.mark.parametrize("pooling", ["mean", "first"])
@pytest.mark.parametrize("batch,tokens,width,n_layers", SHAPES)
@pytest.mark.parametrize("impl", IMPLS)
def test_pool_states_shapes(impl, batch, tokens, width, n_layers, pooling):
    check_pool_states(impl, batch, tokens, width, n_layers, torch.float32, pooling)


@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("pooling", ["mean", "first"])
@pytest.mark.parametrize("impl", IMPLS)
def test_pool_states_dtypes(impl, pooling, dtype):
    check_pool_states(impl, 5, 70, 33, 3, dtype, pooling)


@pytest.mark.parametrize("mask_kind", ["none", "right_padding", "left_padding", "one_empty"])
@pytest.mark.parametrize("pooling", ["mean", "first"])
@pytest.mark.parametrize("impl", IMPLS)
def test_pool_states_masks(impl, pooling, mask_kind):
    out, mask, grads = check_pool_states(impl, 4, 13, 24, 3, torch.float32, pooling, mask_kind)
    if mask is not None:  # padding is never read, and gets no gradient
        for grad in grads:
            assert not grad[~mask].any()
    if mask_kind == "one_empty":  # an example without valid tokens pools to zeros, with no gradient
        assert not out[-1].any() and all(not grad[-1].any() for grad in grads)
    if pooling == "first" and mask_kind == "left_padding":  # the first valid token, not position 0
        states, _ = _states(
            4,
            13,
            24,
            3,
            torch.float32,
            seed_for("pool", impl, 4, 13, 24, 3, torch.float32, pooling, mask_kind),
            mask_kind,
        )
        first = mask.to(torch.int64).argmax(1)
        torch.testing.assert_close(out[:, :24], states[0][torch.arange(4), first].detach())


@pytest.mark.parametrize("impl", IMPLS)
def test_pool_states_layout(impl):
    """concat=False gives the layers' views; strided states and separate allocations pool the same."""
    states, mask = _states(3, 10, 16, 3, torch.float32, seed_for("layout", impl))
    wide = torch.randn(3, 10, 40, device=states[0].device)
    strided = [wide[:, :, :16], states[1].detach(), states[2].detach().transpose(0, 1).contiguous().transpose(0, 1)]
    got = fastted.pool_states(strided, mask, impl=impl, concat=False)
    want = pool_states_reference([x.double() for x in strided], mask)
    assert isinstance(got, list) and len(got) == 3
    for i, part in enumerate(got):
        torch.testing.assert_close(part.double(), want[:, 16 * i : 16 * (i + 1)], rtol=1e-6, atol=1e-6)
