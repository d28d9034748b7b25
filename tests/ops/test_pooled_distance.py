"""fastted.pooled_distance and PooledDistanceLoss (RAIL-KD) against the float64 reference, on both paths."""

import pytest
import torch

import fastted
from fastted.reference import pooled_distance_reference
from tests.tables import device, seed_for

IMPLS = ["reference", "triton"]


def _rail_inputs(
    seed,
    n_s=3,
    n_t=3,
    batch=6,
    tokens=9,
    t_tokens=None,
    d_s=20,
    d_t=28,
    proj=16,
    concat=False,
    project=True,
    dtype=torch.float32,
):
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
    loss, layer_losses = fastted.pooled_distance(
        **inputs, concat=concat, pooling=pooling, impl=impl, return_layer_losses=True
    )
    (loss * grad_out).backward()
    leaves = {
        k: [x.detach().double().requires_grad_(x.requires_grad) for x in v] if isinstance(v, list) else v
        for k, v in inputs.items()
    }
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
    inputs = _rail_inputs(seed_for("rail", impl, concat, pooling), concat=concat)
    _check_pooled_distance(impl, inputs, concat, pooling)


@pytest.mark.parametrize("impl", IMPLS)
def test_pooled_distance_concat_other_layer_counts_and_tokens(impl):
    """Concatenated: 2 student layers against 4 teacher layers, teacher tokens of its own tokenizer."""
    inputs = _rail_inputs(seed_for("rail-counts", impl), n_s=2, n_t=4, t_tokens=13, concat=True)
    _check_pooled_distance(impl, inputs, True, grad_out=-1.7)


@pytest.mark.parametrize("concat", [False, True], ids=["layerwise", "concat"])
@pytest.mark.parametrize("impl", IMPLS)
def test_pooled_distance_without_projection(impl, concat):
    inputs = _rail_inputs(seed_for("rail-identity", impl, concat), d_s=24, d_t=24, project=False)
    _check_pooled_distance(impl, inputs, concat)


@pytest.mark.parametrize("impl", IMPLS)
def test_pooled_distance_empty_examples(impl):
    """Examples without a valid token are left out of the mean; all of them gives 0 and zero gradients."""
    inputs = _rail_inputs(seed_for("rail-empty", impl))
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
    torch.manual_seed(seed_for("rail-module"))
    for concat in (False, True):
        module = fastted.PooledDistanceLoss(20, 28, 3, proj_dim=16, concat=concat)
        inputs = _rail_inputs(seed_for("rail-module", concat), project=False)
        loss = module(inputs["student_states"], inputs["teacher_states"], mask=inputs["mask"])
        loss.backward()
        heads = dict(
            student_weights=[p.weight.double() for p in module.student_proj],
            student_biases=[p.bias.double() for p in module.student_proj],
            teacher_weights=[p.weight.double() for p in module.teacher_proj],
            teacher_biases=[p.bias.double() for p in module.teacher_proj],
        )
        want = pooled_distance_reference(
            [x.double() for x in inputs["student_states"]],
            [x.double() for x in inputs["teacher_states"]],
            mask=inputs["mask"],
            concat=concat,
            **heads,
        )
        torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
        assert module.layer_losses.shape == (1 if concat else 3,)
        assert all(p.grad is not None and p.grad.any() for p in module.student_proj.parameters())
        assert all(p.grad is None for p in module.teacher_proj.parameters())  # fixed: see the collapse test
    with pytest.raises(ValueError, match="teacher_layers=4 differs from n_layers=3"):
        fastted.PooledDistanceLoss(20, 28, 3, teacher_layers=4)


def _train_projections_alone(module, steps=400, seed=1):
    """Adam (lr 1e-2) on the projections alone against a student that carries nothing of the example: its states
    are fresh noise each step, the teacher's a fixed pool of 256 examples drawn 16 a step. (Fixed student states
    would not do: a linear map fits any few fixed vectors to any targets, which is learning, not collapse.) The
    loss at the first step and the mean of the last 20."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(256, 3, 12, 96, generator=g)
    opt = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        teacher = list(pool[torch.randint(0, 256, (16,), generator=g)].unbind(1))
        student = [torch.randn(16, 12, 64, generator=g) for _ in range(3)]
        loss = module(student, teacher)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses[0], sum(losses[-20:]) / 20


@pytest.mark.parametrize("concat", [False, True])
def test_the_rail_distance_cannot_be_zeroed_by_its_projections_alone(concat):
    """RAIL-KD's distance with both projections trained collapses: both map to one constant and the term goes to
    ~0 (measured 5.87 -> 8e-5 layer-wise) whatever the student. With the teacher's side fixed (the default) the
    same training leaves it near where it started (6.01 -> 5.76): only a student that carries the teacher's
    example-to-example differences can lower it."""
    torch.manual_seed(0)
    collapsible = fastted.PooledDistanceLoss(64, 96, 3, concat=concat, train_teacher_projection=True, impl="reference")
    first, last = _train_projections_alone(collapsible)
    assert last < 0.01 * first, (first, last)
    torch.manual_seed(0)
    fixed = fastted.PooledDistanceLoss(64, 96, 3, concat=concat, impl="reference")
    first, last = _train_projections_alone(fixed)
    assert last > 0.8 * first, (first, last)


def test_the_teacher_projection_is_a_fixed_orthogonal_map_whatever_the_random_state():
    """Its columns (proj_dim above the width) or rows (below) orthonormal, no bias, not trained, the same matrix
    under any global seed; a state dict of the trained form (with a teacher bias) loads into it."""
    maps = []
    for seed, (d_t, proj) in ((0, (96, 128)), (5, (96, 128)), (1, (96, 32))):
        torch.manual_seed(seed)
        module = fastted.PooledDistanceLoss(64, d_t, 2, proj_dim=proj)
        for linear in module.teacher_proj:
            w = linear.weight.double()
            gram = w.T @ w if proj >= d_t else w @ w.T
            torch.testing.assert_close(gram, torch.eye(gram.shape[0], dtype=torch.float64), rtol=0, atol=1e-5)
            assert not linear.weight.requires_grad and not linear.bias.requires_grad and not linear.bias.any()
        assert not module.trains_teacher_projection
        maps.append(module.teacher_proj[0].weight.clone())
    assert torch.equal(maps[0], maps[1])
    old = fastted.PooledDistanceLoss(64, 96, 2, train_teacher_projection=True)
    assert old.trains_teacher_projection
    fastted.PooledDistanceLoss(64, 96, 2).load_state_dict(old.state_dict())
    with pytest.raises(ValueError, match="train_teacher_projection must be a bool, got 'no'"):
        fastted.PooledDistanceLoss(64, 96, 2, train_teacher_projection="no")
