"""fastted.pool_states and fastted.pooled_distance (RAIL-KD) against float64 references."""
import pytest
import torch

import fastted
from fastted.reference import pool_states_reference, pooled_distance_reference

from tests._tables import DTYPES, _assert_close, _seed, device

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


def _check_pool_states(impl, batch, tokens, width, n_layers, dtype, pooling, mask_kind="random", grad_out=None):
    seed = _seed("pool", impl, batch, tokens, width, n_layers, dtype, pooling, mask_kind)
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
    _assert_close("pooled", out, refs[0][0], refs[1][0], slack)
    for i, grad in enumerate(grads):
        assert grad.dtype == dtype and grad.shape == states[i].shape
        _assert_close(f"grad states[{i}]", grad, refs[0][1][i], refs[1][1][i], slack)
    return out, mask, grads


@pytest.mark.parametrize("pooling", ["mean", "first"])
@pytest.mark.parametrize("batch,tokens,width,n_layers", SHAPES)
@pytest.mark.parametrize("impl", IMPLS)
def test_pool_states_shapes(impl, batch, tokens, width, n_layers, pooling):
    _check_pool_states(impl, batch, tokens, width, n_layers, torch.float32, pooling)


@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("pooling", ["mean", "first"])
@pytest.mark.parametrize("impl", IMPLS)
def test_pool_states_dtypes(impl, pooling, dtype):
    _check_pool_states(impl, 5, 70, 33, 3, dtype, pooling)


@pytest.mark.parametrize("mask_kind", ["none", "right_padding", "left_padding", "one_empty"])
@pytest.mark.parametrize("pooling", ["mean", "first"])
@pytest.mark.parametrize("impl", IMPLS)
def test_pool_states_masks(impl, pooling, mask_kind):
    out, mask, grads = _check_pool_states(impl, 4, 13, 24, 3, torch.float32, pooling, mask_kind)
    if mask is not None:  # padding is never read, and gets no gradient
        for grad in grads:
            assert not grad[~mask].any()
    if mask_kind == "one_empty":  # an example without valid tokens pools to zeros, with no gradient
        assert not out[-1].any() and all(not grad[-1].any() for grad in grads)
    if pooling == "first" and mask_kind == "left_padding":  # the first valid token, not position 0
        states, _ = _states(4, 13, 24, 3, torch.float32, _seed("pool", impl, 4, 13, 24, 3, torch.float32, pooling,
                                                                     mask_kind), mask_kind)
        first = mask.to(torch.int64).argmax(1)
        torch.testing.assert_close(out[:, :24], states[0][torch.arange(4), first].detach())


@pytest.mark.parametrize("impl", IMPLS)
def test_pool_states_layout(impl):
    """concat=False gives the layers' views; strided states and separate allocations pool the same."""
    states, mask = _states(3, 10, 16, 3, torch.float32, _seed("layout", impl))
    wide = torch.randn(3, 10, 40, device=states[0].device)
    strided = [wide[:, :, :16], states[1].detach(), states[2].detach().transpose(0, 1).contiguous().transpose(0, 1)]
    got = fastted.pool_states(strided, mask, impl=impl, concat=False)
    want = pool_states_reference([x.double() for x in strided], mask)
    assert isinstance(got, list) and len(got) == 3
    for i, part in enumerate(got):
        torch.testing.assert_close(part.double(), want[:, 16 * i:16 * (i + 1)], rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- pooled_distance


def _rail_inputs(seed, n_s=3, n_t=3, batch=6, tokens=9, t_tokens=None, d_s=20, d_t=28, proj=16, concat=False,
                 project=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape, scale=1.0, grad=True):
        x = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device(), dtype)
        return x.requires_grad_(grad)

    t_tokens = t_tokens or tokens
    inputs = dict(
        student_states=[leaf(batch, tokens, d_s) for _ in range(n_s)],
        teacher_states=[leaf(batch, t_tokens, d_t, grad=False) for _ in range(n_t)],
        mask=(torch.rand(batch, tokens, generator=g) > 0.3).to(device()),
    )
    if t_tokens != tokens:
        inputs["teacher_mask"] = (torch.rand(batch, t_tokens, generator=g) > 0.3).to(device())
    if project:
        widths = [(n_s * d_s, n_t * d_t)] if concat else [(d_s, d_t)] * n_s
        inputs.update(
            student_weights=[leaf(proj, w_s, scale=0.3) for w_s, _ in widths],
            student_biases=[leaf(proj, scale=0.1) for _ in widths],
            teacher_weights=[leaf(proj, w_t, scale=0.3) for _, w_t in widths],  # a trainable teacher head
            teacher_biases=[leaf(proj, scale=0.1) for _ in widths],
        )
    return inputs


def _check_pooled_distance(impl, inputs, concat, pooling="mean", grad_out=1.0):
    loss, layer_losses = fastted.pooled_distance(**inputs, concat=concat, pooling=pooling, impl=impl,
                                                 return_layer_losses=True)
    (loss * grad_out).backward()
    leaves = {k: [x.detach().double().requires_grad_(x.requires_grad) for x in v] if isinstance(v, list) else v
              for k, v in inputs.items()}
    ref = pooled_distance_reference(**leaves, concat=concat, pooling=pooling)
    (ref * grad_out).backward()
    assert loss.dim() == 0 and layer_losses.shape == (1 if concat else len(inputs["student_states"]),)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer_losses.sum().double(), ref.detach(), rtol=1e-5, atol=1e-6)
    checked = 0
    for key, values in inputs.items():
        if not isinstance(values, list):
            continue
        for i, (x, x64) in enumerate(zip(values, leaves[key])):
            if x.requires_grad:
                torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-6, msg=f"{key}[{i}]")
                checked += 1
    assert checked > 0
    return loss


@pytest.mark.parametrize("pooling", ["mean", "first"])
@pytest.mark.parametrize("concat", [False, True], ids=["layerwise", "concat"])
@pytest.mark.parametrize("impl", IMPLS)
def test_pooled_distance(impl, concat, pooling):
    inputs = _rail_inputs(_seed("rail", impl, concat, pooling), concat=concat)
    _check_pooled_distance(impl, inputs, concat, pooling)


@pytest.mark.parametrize("impl", IMPLS)
def test_pooled_distance_concat_other_layer_counts_and_tokens(impl):
    """Concatenated: 2 student layers against 4 teacher layers, teacher tokens of its own tokenizer."""
    inputs = _rail_inputs(_seed("rail-counts", impl), n_s=2, n_t=4, t_tokens=13, concat=True)
    _check_pooled_distance(impl, inputs, True, grad_out=-1.7)


@pytest.mark.parametrize("concat", [False, True], ids=["layerwise", "concat"])
@pytest.mark.parametrize("impl", IMPLS)
def test_pooled_distance_without_projection(impl, concat):
    inputs = _rail_inputs(_seed("rail-identity", impl, concat), d_s=24, d_t=24, project=False)
    _check_pooled_distance(impl, inputs, concat)


@pytest.mark.parametrize("impl", IMPLS)
def test_pooled_distance_empty_examples(impl):
    """Examples without a valid token are left out of the mean; all of them gives 0 and zero gradients."""
    inputs = _rail_inputs(_seed("rail-empty", impl))
    inputs["mask"][1] = False
    _check_pooled_distance(impl, inputs, False)
    for values in inputs.values():
        for x in values if isinstance(values, list) else []:
            x.grad = None
    inputs["mask"] = torch.zeros_like(inputs["mask"])
    loss = _check_pooled_distance(impl, inputs, False)
    assert loss.item() == 0.0
    assert all(not x.grad.any() for x in inputs["student_states"] + inputs["student_weights"])


def test_pooled_distance_module():
    torch.manual_seed(_seed("rail-module"))
    for concat in (False, True):
        module = fastted.PooledDistanceLoss(20, 28, 3, proj_dim=16, concat=concat)
        inputs = _rail_inputs(_seed("rail-module", concat), project=False)
        loss = module(inputs["student_states"], inputs["teacher_states"], mask=inputs["mask"])
        loss.backward()
        heads = dict(
            student_weights=[p.weight.double() for p in module.student_proj],
            student_biases=[p.bias.double() for p in module.student_proj],
            teacher_weights=[p.weight.double() for p in module.teacher_proj],
            teacher_biases=[p.bias.double() for p in module.teacher_proj],
        )
        want = pooled_distance_reference([x.double() for x in inputs["student_states"]],
                                         [x.double() for x in inputs["teacher_states"]], mask=inputs["mask"],
                                         concat=concat, **heads)
        torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
        assert module.layer_losses.shape == (1 if concat else 3,)
        assert all(p.grad is not None and p.grad.any() for p in module.parameters())
    with pytest.raises(ValueError, match="teacher_layers=4 differs from n_layers=3"):
        fastted.PooledDistanceLoss(20, 28, 3, teacher_layers=4)
