"""fastted.contrastive_kd against float64 references: values, gradients, banks, labels, masks.

Each case runs on both paths: "reference" (the chunked PyTorch path) and
"triton" (the real kernels: on a GPU, or under TRITON_INTERPRET=1 on the CPU).
"""

import pytest
import torch
import torch.nn.functional as F

import fastted
from fastted.ops.contrastive_kd import contrastive_kd_chunked
from fastted.reference import contrastive_kd_reference, pool_states_reference
from tests.tables import DTYPES, assert_close_to_spec, device, seed_for

IMPLS = ["reference", "triton"]
# (B, K, D): odd widths, K from a single negative to 4096.
SHAPES = [(5, 1, 16), (7, 2, 33), (19, 63, 17), (16, 100, 128), (3, 1000, 100), (9, 4096, 24)]


def _vectors(n_anchors, k, width, dtype, seed, per_anchor=False, n_labels=3):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n_anchors, width, generator=g, dtype=torch.float64) * 2
    t = s + torch.randn(n_anchors, width, generator=g, dtype=torch.float64)  # a positive near its anchor
    bank_shape = (n_anchors, k, width) if per_anchor else (k, width)
    n = torch.randn(*bank_shape, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, n_labels, (n_anchors,), generator=g)
    negative_labels = torch.randint(0, n_labels, bank_shape[:-1], generator=g)
    mask = torch.rand(n_anchors, generator=g) > 0.25
    on = lambda x: x.to(device())  # noqa: E731
    return (
        on(s.to(dtype)).requires_grad_(),
        on(t.to(dtype)).requires_grad_(),
        on(n.to(dtype)),
        on(labels),
        on(negative_labels),
        on(mask),
    )


def check_contrastive_kd(
    impl,
    n_anchors,
    k,
    width,
    dtype,
    *,
    temperature=0.07,
    per_anchor=False,
    use_labels=False,
    mask_kind="random",
    grad_out=1.0,
    vectors=None,
):
    seed = seed_for("contrastive_kd", impl, n_anchors, k, width, dtype, temperature, per_anchor, use_labels, mask_kind)
    s, t, n, labels, negative_labels, mask = vectors or _vectors(n_anchors, k, width, dtype, seed, per_anchor)
    mask = {"random": mask, "none": None, "all_zero": torch.zeros_like(mask)}[mask_kind]
    opts = dict(temperature=temperature, mask=mask)
    if use_labels:
        opts.update(labels=labels, negative_labels=negative_labels)

    loss = fastted.contrastive_kd(s, t, n, impl=impl, **opts)
    (loss * grad_out).backward()
    results = []
    for cast in (torch.float64, dtype):  # the float64 oracle, and PyTorch's own computation in the dtype
        s_ref = s.detach().to(cast).requires_grad_()
        t_ref = t.detach().to(cast).requires_grad_()
        ref = contrastive_kd_reference(s_ref, t_ref, n.to(cast), **opts)
        (ref * grad_out).backward()
        results.append((ref.detach(), s_ref.grad, t_ref.grad))

    assert loss.dtype == torch.promote_types(dtype, torch.float32) and loss.dim() == 0
    slack = DTYPES.get(dtype, 1e-12)
    assert_close_to_spec("loss", loss, results[0][0], results[1][0], slack)
    for name, x, i in (("grad student_vecs", s, 1), ("grad teacher_vecs", t, 2)):
        assert x.grad.dtype == x.dtype and x.grad.shape == x.shape
        assert_close_to_spec(name, x.grad, results[0][i], results[1][i], slack)
    return loss, s.grad, t.grad


@pytest.mark.parametrize("n_anchors,k,width", SHAPES)
@pytest.mark.parametrize("per_anchor", [False, True], ids=["shared", "per_anchor"])
@pytest.mark.parametrize("impl", IMPLS)
def test_contrastive_kd_shapes(impl, per_anchor, n_anchors, k, width):
    if per_anchor and k * n_anchors * width > 2e5:
        k = 200  # per-anchor banks of thousands are the same code with more tiles; keep the interpreter quick
    check_contrastive_kd(impl, n_anchors, k, width, torch.float32, per_anchor=per_anchor)


@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("per_anchor", [False, True], ids=["shared", "per_anchor"])
@pytest.mark.parametrize("impl", IMPLS)
def test_contrastive_kd_dtypes(impl, per_anchor, dtype):
    check_contrastive_kd(impl, 19, 300, 48, dtype, per_anchor=per_anchor)


@pytest.mark.parametrize("temperature", [0.02, 0.07, 0.2, 1.0, 3.0])
@pytest.mark.parametrize("impl", IMPLS)
def test_contrastive_kd_temperatures(impl, temperature):
    check_contrastive_kd(impl, 19, 257, 33, torch.float32, temperature=temperature)


@pytest.mark.parametrize("per_anchor", [False, True], ids=["shared", "per_anchor"])
@pytest.mark.parametrize("impl", IMPLS)
def test_contrastive_kd_label_aware_negatives(impl, per_anchor):
    check_contrastive_kd(impl, 19, 150, 33, torch.float32, per_anchor=per_anchor, use_labels=True)


@pytest.mark.parametrize("impl", IMPLS)
def test_contrastive_kd_labels_leave_negatives_out(impl):
    """Leaving a negative out by its label is the same as not passing it (one anchor at a time)."""
    s, t, n, labels, negative_labels, _ = _vectors(6, 40, 16, torch.float32, seed_for("labels-drop", impl))
    for b in range(6):
        got = fastted.contrastive_kd(
            s[b : b + 1], t[b : b + 1], n, labels=labels[b : b + 1], negative_labels=negative_labels, impl=impl
        )
        keep = negative_labels != labels[b]
        want = contrastive_kd_reference(s[b : b + 1].double(), t[b : b + 1].double(), n[keep].double())
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_contrastive_kd_every_negative_left_out(impl):
    """An anchor whose negatives all share its label has loss 0 and zero gradient, not NaN."""
    s, t, n, _, _, _ = _vectors(4, 30, 16, torch.float32, seed_for("all-out", impl))
    labels = torch.tensor([0, 1, 1, 2], device=s.device)
    negative_labels = torch.zeros(30, dtype=torch.int64, device=s.device)  # anchor 0 has no negative
    loss = fastted.contrastive_kd(s, t, n, labels=labels, negative_labels=negative_labels, impl=impl)
    loss.backward()
    want = contrastive_kd_reference(s[1:].double(), t[1:].double(), n.double()) * 3 / 4
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(s.grad).all() and not s.grad[0].any() and not t.grad[0].any()


@pytest.mark.parametrize("mask_kind", ["none", "all_zero"])
@pytest.mark.parametrize("impl", IMPLS)
def test_contrastive_kd_masks(impl, mask_kind):
    loss, gs, gt = check_contrastive_kd(impl, 19, 100, 33, torch.float32, mask_kind=mask_kind)
    if mask_kind == "all_zero":
        assert loss.item() == 0.0 and not gs.any() and not gt.any()


@pytest.mark.parametrize("grad_out", [0.37, -2.5])
@pytest.mark.parametrize("impl", IMPLS)
def test_contrastive_kd_grad_output(impl, grad_out):
    check_contrastive_kd(impl, 19, 100, 33, torch.float32, grad_out=grad_out, use_labels=True)


@pytest.mark.parametrize("impl", IMPLS)
def test_contrastive_kd_zero_vectors(impl):
    """A zero vector (an example that pooled nothing) or a zero bank entry scores 0: finite, like F.normalize."""
    vectors = list(_vectors(5, 20, 16, torch.float32, seed_for("zero", impl)))
    with torch.no_grad():
        vectors[0][2] = 0.0
        vectors[2][7] = 0.0
    check_contrastive_kd(impl, 5, 20, 16, torch.float32, vectors=vectors)


@pytest.mark.parametrize("splits", [1, 2, 3, 7])
@pytest.mark.parametrize("per_anchor", [False, True], ids=["shared", "per_anchor"])
def test_contrastive_kd_kernel_splits(per_anchor, splits):
    """Splitting K over programs and merging the splits gives the CPU twin's rows and gradients."""
    from fastted.kernels.contrastive_kd import contrastive_forward

    s, t, n, labels, negative_labels, mask = _vectors(
        21, 500, 40, torch.float32, seed_for("splits", per_anchor), per_anchor
    )
    coef = mask.float() / mask.sum()
    opts = dict(temperature=0.1, eps=1e-12, grad_s=True, grad_t=True)
    got = contrastive_forward(
        s.detach(), t.detach(), n, coef, labels=labels, negative_labels=negative_labels, splits=splits, **opts
    )
    want = contrastive_kd_chunked(s.detach(), t.detach(), n, coef, labels, negative_labels, **opts)
    for name, a, b in zip(("rows", "grad_s", "grad_t"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("impl", IMPLS)
def test_contrastive_kd_bank_dtype_differs(impl):
    """A bf16 model against an fp32 bank (the MemoryBank default): the bank's precision is kept."""
    s, t, n, _, _, mask = _vectors(19, 300, 48, torch.bfloat16, seed_for("bank-dtype", impl))
    n32 = n.float() * 1.5
    loss = fastted.contrastive_kd(s, t, n32, mask=mask, impl=impl)
    loss.backward()
    s64 = s.detach().double().requires_grad_()
    ref = contrastive_kd_reference(s64, t.detach().double(), n32.double(), mask=mask)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=5e-2, atol=1e-2)


@pytest.mark.parametrize("pooling", ["mean", "first"])
@pytest.mark.parametrize("impl", IMPLS)
def test_codir_pipeline_gradients(impl, pooling):
    """Pool -> project -> InfoNCE: gradients of the hidden states, the pooled states and both projections."""
    g = torch.Generator().manual_seed(seed_for("pipeline", impl, pooling))
    n_layers, batch, tokens, d_s, d_t, proj = 3, 6, 11, 20, 28, 16

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device()).requires_grad_()

    hs = [leaf(batch, tokens, d_s) for _ in range(n_layers)]
    ht = [leaf(batch, tokens, d_t).detach() for _ in range(n_layers)]
    ws, bs = leaf(proj, n_layers * d_s, scale=0.2), leaf(proj, scale=0.1)
    wt, bt = leaf(proj, n_layers * d_t, scale=0.2), leaf(proj, scale=0.1)
    bank = torch.randn(64, proj, generator=g, dtype=torch.float64).to(device())
    mask = (torch.rand(batch, tokens, generator=g) > 0.3).to(device())
    mask[:, 0] = True

    def run(path, cast):
        leaves = [x.detach().to(cast).requires_grad_() for x in (*hs, ws, bs, wt, bt)]
        h, (w1, b1, w2, b2) = leaves[:n_layers], leaves[n_layers:]
        if path == "reference64":
            ps, pt = (
                pool_states_reference(h, mask, pooling),
                pool_states_reference([x.to(cast) for x in ht], mask, pooling),
            )
        else:
            ps = fastted.pool_states(h, mask, pooling=pooling, impl=impl)
            pt = fastted.pool_states([x.to(cast) for x in ht], mask, pooling=pooling, impl=impl)
        ps.retain_grad()
        sv, tv = F.linear(ps, w1, b1), F.linear(pt, w2, b2)
        if path == "reference64":
            loss = contrastive_kd_reference(sv, tv, bank.to(cast), temperature=0.1)
        else:
            loss = fastted.contrastive_kd(sv, tv, bank.to(cast), temperature=0.1, impl=impl)
        loss.backward()
        return loss, ps.grad, [x.grad for x in leaves]

    loss64, pooled64, grads64 = run("reference64", torch.float64)
    loss, pooled, grads = run("fastted", torch.float32)
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pooled.double(), pooled64, rtol=1e-4, atol=1e-6)
    names = [f"states[{i}]" for i in range(n_layers)] + [
        "student weight",
        "student bias",
        "teacher weight",
        "teacher bias",
    ]
    for name, a, b in zip(names, grads, grads64):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6, msg=name)


def test_contrastive_kd_module_and_no_grad():
    s, t, n, labels, negative_labels, mask = _vectors(9, 50, 24, torch.float32, seed_for("module"))
    module = fastted.ContrastiveKDLoss(temperature=0.2)
    assert "temperature=0.2" in repr(module)
    got = module(s, t, n, mask=mask, labels=labels, negative_labels=negative_labels)
    want = contrastive_kd_reference(
        s.double(), t.double(), n.double(), temperature=0.2, mask=mask, labels=labels, negative_labels=negative_labels
    )
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        evaluated = fastted.contrastive_kd(s, t, n, temperature=0.2, mask=mask)
    assert not evaluated.requires_grad
    torch.testing.assert_close(
        evaluated.double(), contrastive_kd_reference(s.double(), t.double(), n.double(), temperature=0.2, mask=mask)
    )


def test_contrastive_kd_float64_runs_the_reference_path():
    s, t, n, *_ = _vectors(5, 20, 16, torch.float64, seed_for("fp64"))
    loss = fastted.contrastive_kd(s, t, n)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, contrastive_kd_reference(s, t, n))
