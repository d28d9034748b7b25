"""The spec of the cached teacher's logit KD (top-k teacher + tail bucket), against formulas written out here in
float64: exact at k = V, a lower bound of the full KL below it, its gradient the bucketed one."""

import pytest
import torch

from fastted.reference import logit_kd_reference, sparse_logit_kd_reference, topk_targets_reference
from tests.tables import seed_for


def _logits(seed, rows=23, vocab=301):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 3).requires_grad_()
    t = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 3
    mask = torch.rand(rows, generator=g) > 0.2
    return s, t, mask


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_all_of_the_vocabulary_is_the_full_kl(temperature):
    s, t, mask = _logits(seed_for("sparse full", temperature))
    targets = topk_targets_reference(t, t.shape[-1], temperature)
    assert torch.isneginf(targets[2]).all()
    got = sparse_logit_kd_reference(s, *targets, temperature=temperature, mask=mask)
    want = logit_kd_reference(s, t, temperature=temperature, mask=mask)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    (g_got,) = torch.autograd.grad(got, s)
    (g_want,) = torch.autograd.grad(want, s)
    torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("k", [1, 8, 64])
def test_top_k_is_the_bucketed_kl_and_a_lower_bound(k):
    temperature = 2.0
    s, t, mask = _logits(seed_for("sparse", k))
    values, indices, tail = topk_targets_reference(t, k, temperature)
    got = sparse_logit_kd_reference(s, values, indices, tail, temperature=temperature, mask=mask)

    # Written out: both distributions over the k ids and one bucket for all the others.
    p = torch.softmax(t / temperature, -1)
    q = torch.softmax(s / temperature, -1)
    p_top, q_top = p.gather(-1, indices), q.gather(-1, indices)
    p_b = torch.cat([p_top, 1 - p_top.sum(-1, keepdim=True)], -1)
    q_b = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
    rows = (p_b * (p_b.log() - q_b.log())).sum(-1)
    want = (rows * mask).sum() / mask.sum() * temperature**2
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    full = logit_kd_reference(s, t, temperature=temperature, mask=mask)
    assert got <= full + 1e-12

    (g_got,) = torch.autograd.grad(got, s)
    (g_want,) = torch.autograd.grad(want, s)
    torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-12)
    assert g_got[~mask].abs().max() == 0


def test_the_targets_are_what_the_logits_say():
    _, t, _ = _logits(seed_for("targets"))
    values, indices, tail = topk_targets_reference(t, 5, 2.0)
    assert torch.equal(values, t.gather(-1, indices)) and (values[:, :-1] >= values[:, 1:]).all()
    rest = torch.ones_like(t, dtype=torch.bool).scatter(-1, indices, False)
    want = torch.stack([torch.logsumexp(t[i][rest[i]] / 2.0, -1) for i in range(t.shape[0])])
    torch.testing.assert_close(tail, want, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- the op: both paths against the spec

import fastted  # noqa: E402
from fastted.reference import fused_linear_sparse_kd_reference  # noqa: E402
from tests.tables import DTYPES, assert_close_to_spec, check_bad_input, device  # noqa: E402

IMPLS = ["reference", "triton"]


def _cached(seed, lead, vocab, k, temperature, dtype, scale=3.0, hidden=None):
    """Fresh student logits (or head inputs), a teacher's top-k targets, a mask and labels (some ignored)."""
    g = torch.Generator().manual_seed(seed)
    dev = device()
    t = torch.randn(*lead, vocab, generator=g, dtype=torch.float64) * scale
    values, ids, tail = topk_targets_reference(t, k, temperature)
    out = dict(topk_values=values.to(dev, torch.bfloat16), topk_ids=ids.to(dev, torch.int32), tail_lse=tail.to(dev))
    if hidden is None:
        out["student_logits"] = (torch.randn(*lead, vocab, generator=g, dtype=torch.float64) * scale).to(dev, dtype)
    else:
        out["student_hidden"] = torch.randn(*lead, hidden, generator=g, dtype=torch.float64).to(dev, dtype)
        out["student_weight"] = (torch.randn(vocab, hidden, generator=g, dtype=torch.float64) * 3 * hidden**-0.5).to(
            dev, dtype
        )
        out["student_bias"] = (torch.randn(vocab, generator=g, dtype=torch.float64) * 0.5).to(dev, dtype)
    mask = (torch.rand(lead, generator=g) > 0.25).to(dev)
    labels = torch.randint(0, vocab, lead, generator=g)
    labels[torch.rand(lead, generator=g) < 0.2] = -100
    return out, mask, labels.to(dev)


def _grads(fn, inputs, trainable, grad_out=1.0, **opts):
    leaves = {k: inputs[k].detach().clone().requires_grad_() for k in trainable}
    out = fn(**{**inputs, **leaves}, **opts)
    loss = out[0] if isinstance(out, tuple) else out
    (loss * grad_out).backward()
    return out, {k: x.grad for k, x in leaves.items()}


def _as(inputs, dtype):
    return {
        k: v.to(dtype)
        if k.startswith("student")
        else (v.to(torch.float64) if k == "topk_values" and dtype == torch.float64 else v)
        for k, v in inputs.items()
    }


@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("k,vocab", [(1, 301), (16, 1003), (64, 30522), (301, 301)])
@pytest.mark.parametrize("impl", IMPLS)
def test_sparse_logit_kd_against_float64(impl, k, vocab, dtype):
    """Loss and gradient of both paths against the float64 spec on the same (bf16-stored) targets, with a mask,
    in (B, T, V); k = V is the full KL (an empty tail)."""
    check_sparse_logit_kd(impl, k, vocab, dtype)


def check_sparse_logit_kd(impl, k, vocab, dtype):
    """The check of test_sparse_logit_kd_against_float64 (the GPU check runs it too)."""
    temperature = 2.0
    inputs, mask, _ = _cached(seed_for("sparse op", impl, k, vocab, dtype), (3, 7), vocab, k, temperature, dtype)
    got, grads = _grads(
        fastted.sparse_logit_kd, inputs, ["student_logits"], -1.7, temperature=temperature, mask=mask, impl=impl
    )
    ref, ref_grads = _grads(
        sparse_logit_kd_reference,
        _as(inputs, torch.float64),
        ["student_logits"],
        -1.7,
        temperature=temperature,
        mask=mask,
    )
    lowp, lowp_grads = _grads(
        sparse_logit_kd_reference, inputs, ["student_logits"], -1.7, temperature=temperature, mask=mask
    )
    assert got.dtype == torch.float32 and got.dim() == 0
    assert_close_to_spec("loss", got, ref, lowp, DTYPES[dtype])
    g = grads["student_logits"]
    assert g.dtype == dtype and g.shape == inputs["student_logits"].shape
    assert_close_to_spec("grad", g, ref_grads["student_logits"], lowp_grads["student_logits"], DTYPES[dtype])
    assert (g[~mask] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_sparse_logit_kd_peaked_teacher_and_labels(impl):
    """A confident teacher (its top 8 hold nearly all the mass: the tail bucket is tiny) and rows chosen by
    labels (ignore_index skips a row), in fp32 against float64."""
    inputs, mask, labels = _cached(seed_for("peaked", impl), (41,), 517, 8, 1.0, torch.float32, scale=9.0)
    got, grads = _grads(
        fastted.sparse_logit_kd, inputs, ["student_logits"], temperature=1.0, mask=mask, labels=labels, impl=impl
    )
    rows = mask & (labels != -100)
    ref, ref_grads = _grads(
        sparse_logit_kd_reference, _as(inputs, torch.float64), ["student_logits"], temperature=1.0, mask=rows
    )
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads["student_logits"].double(), ref_grads["student_logits"], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("chunk_size", [1, 13, None])
@pytest.mark.parametrize("impl", IMPLS)
def test_fused_linear_sparse_kd_against_float64(impl, chunk_size, dtype):
    """The fused head with a cross-entropy beside (a causal LM's shift), every student gradient, blocks of 1,
    13 and the default rows, against the eager float64 head + spec."""
    temperature = 2.0
    inputs, mask, labels = _cached(
        seed_for("fused sparse", impl, chunk_size, dtype), (3, 11), 1003, 32, temperature, dtype, hidden=24
    )
    opts = dict(
        temperature=temperature, mask=mask, hard_labels=labels, hard_weight=0.3, soft_weight=0.8, shift_labels=True
    )
    trainable = ["student_hidden", "student_weight", "student_bias"]
    got, grads = _grads(
        fastted.fused_linear_sparse_kd,
        inputs,
        trainable,
        2.5,
        impl=impl,
        chunk_size=chunk_size,
        return_terms=True,
        **opts,
    )
    ref, ref_grads = _grads(fused_linear_sparse_kd_reference, _as(inputs, torch.float64), trainable, 2.5, **opts)
    lowp, lowp_grads = _grads(fused_linear_sparse_kd_reference, inputs, trainable, 2.5, **opts)
    for name, a, b, c in zip(("loss", "kd", "ce"), got, ref, lowp):
        assert_close_to_spec(name, a, b, c, DTYPES[dtype])
    for name in trainable:
        assert grads[name].dtype == dtype, name
        assert_close_to_spec(f"grad {name}", grads[name], ref_grads[name], lowp_grads[name], DTYPES[dtype])


@pytest.mark.parametrize("impl", IMPLS)
def test_fused_linear_sparse_kd_is_fused_linear_kd_at_k_equal_v(impl):
    """With the whole vocabulary cached, the cached KL is the live teacher's: fused_linear_sparse_kd on the
    teacher's top-V equals fused_linear_kd with the teacher's head, loss and gradients."""
    g = torch.Generator().manual_seed(seed_for("k=V", impl))
    dev = device()
    xs = torch.randn(2, 9, 16, generator=g).to(dev).requires_grad_()
    ws = (torch.randn(211, 16, generator=g) * 0.5).to(dev).requires_grad_()
    xt, wt = torch.randn(2, 9, 20, generator=g).to(dev), (torch.randn(211, 20, generator=g) * 0.5).to(dev)
    mask = (torch.rand(2, 9, generator=g) > 0.2).to(dev)
    values, ids, tail = topk_targets_reference(xt @ wt.t(), 211, 2.0)
    live = fastted.fused_linear_kd(xs, ws, xt, wt, temperature=2.0, mask=mask, impl=impl)
    gx, gw = torch.autograd.grad(live, (xs, ws))
    cached = fastted.fused_linear_sparse_kd(xs, ws, values, ids, tail, temperature=2.0, mask=mask, impl=impl)
    cx, cw = torch.autograd.grad(cached, (xs, ws))
    torch.testing.assert_close(cached, live, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cx, gx, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(cw, gw, rtol=1e-4, atol=1e-6)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "change,fragments",
    [
        (dict(topk_values=torch.zeros(4, 5, 3)), ["topk_values has shape (4, 5, 3)", "(4, 6, 'k')"]),
        (dict(topk_ids=torch.zeros(4, 6, 2, dtype=torch.long)), ["topk_ids has shape (4, 6, 2)"]),
        (dict(topk_ids=torch.zeros(4, 6, 3)), ["topk_ids must hold integer", "float32"]),
        (dict(topk_ids=torch.full((4, 6, 3), 50, dtype=torch.long)), ["topk_ids holds 50", "[0, 50)"]),
        (dict(tail_lse=torch.zeros(4)), ["tail_lse has shape (4,)", "(4, 6)"]),
        (
            dict(topk_values=torch.zeros(4, 6, 51), topk_ids=torch.zeros(4, 6, 51, dtype=torch.long)),
            ["51 logits a row", "vocabulary of 50"],
        ),
        (dict(temperature=0.0), ["temperature"]),
        (dict(student_logits=torch.zeros(4, 6, 50, dtype=torch.long)), ["student_logits"]),
    ],
)
def test_sparse_logit_kd_bad_input(change, fragments):
    inputs = dict(
        student_logits=torch.zeros(4, 6, 50),
        topk_values=torch.zeros(4, 6, 3),
        topk_ids=torch.arange(3).expand(4, 6, 3),
        tail_lse=torch.zeros(4, 6),
    )
    check_bad_input(fastted.sparse_logit_kd, {**inputs, **change}, fragments)
