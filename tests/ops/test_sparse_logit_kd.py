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
    g_got, = torch.autograd.grad(got, s)
    g_want, = torch.autograd.grad(want, s)
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

    g_got, = torch.autograd.grad(got, s)
    g_want, = torch.autograd.grad(want, s)
    torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-12)
    assert g_got[~mask].abs().max() == 0


def test_the_targets_are_what_the_logits_say():
    _, t, _ = _logits(seed_for("targets"))
    values, indices, tail = topk_targets_reference(t, 5, 2.0)
    assert torch.equal(values, t.gather(-1, indices)) and (values[:, :-1] >= values[:, 1:]).all()
    rest = torch.ones_like(t, dtype=torch.bool).scatter(-1, indices, False)
    want = torch.stack([torch.logsumexp(t[i][rest[i]] / 2.0, -1) for i in range(t.shape[0])])
    torch.testing.assert_close(tail, want, rtol=1e-12, atol=1e-12)
