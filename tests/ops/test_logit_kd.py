"""fastted.logit_kd against float64 references: values, gradients, masks, -inf, vocabularies.

Each case runs on both paths: "reference" (the chunked PyTorch path) and
"triton" (the real row kernel: on a GPU, or under TRITON_INTERPRET=1 on the CPU).
"""

import pytest
import torch

import fastted
from fastted.ops.logit_kd import logit_kd_rows
from fastted.reference import logit_kd_reference
from tests.tables import DTYPES, assert_close_to_spec, device, seed_for

IMPLS = ["reference", "triton"]
# (divergence, beta): the three divergences, and JSD at its two limits.
DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.0), ("jsd", 1.0), ("jsd", 0.2)]
# (leading shape, V): odd vocabularies, BERT's and GPT-2's among them.
SHAPES = [((37,), 101), ((3, 29), 1000), ((2, 3), 30522), ((3,), 50257)]


def _logits(lead, vocab, dtype, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(*lead, vocab, generator=g, dtype=torch.float64) * scale).to(device(), dtype)
    t = (torch.randn(*lead, vocab, generator=g, dtype=torch.float64) * scale).to(device(), dtype)
    mask = (torch.rand(lead, generator=g) > 0.3).to(device())
    return s.requires_grad_(), t, mask


def check_logit_kd(
    impl, lead, vocab, dtype, divergence, beta, temperature, mask_kind="random", grad_out=1.0, s=None, t=None
):
    seed = seed_for("logit_kd", impl, lead, vocab, dtype, divergence, beta, temperature, mask_kind)
    s0, t0, mask = _logits(lead, vocab, dtype, seed)
    s = s0 if s is None else s
    t = t0 if t is None else t
    mask = {"random": mask, "none": None, "all_zero": torch.zeros_like(mask), "all_one": torch.ones_like(mask)}[
        mask_kind
    ]
    opts = dict(temperature=temperature, divergence=divergence, beta=beta, mask=mask)

    loss = fastted.logit_kd(s, t, impl=impl, **opts)
    (loss * grad_out).backward()
    results = []
    for cast in (torch.float64, dtype):  # the float64 oracle, and PyTorch's own computation in the dtype
        s_ref = s.detach().to(cast).requires_grad_()
        ref = logit_kd_reference(s_ref, t.to(cast), **opts)
        (ref * grad_out).backward()
        results.append((ref.detach(), s_ref.grad))

    assert loss.dtype == torch.float32 and loss.dim() == 0
    slack = DTYPES[dtype]
    assert_close_to_spec("loss", loss, results[0][0], results[1][0], slack)
    assert s.grad.dtype == s.dtype and s.grad.shape == s.shape
    assert_close_to_spec("grad student_logits", s.grad, results[0][1], results[1][1], slack)
    return loss, s.grad


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
@pytest.mark.parametrize("impl", IMPLS)
def test_logit_kd_divergences(impl, divergence, beta, temperature):
    check_logit_kd(impl, (3, 29), 1000, torch.float32, divergence, beta, temperature)


@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("lead,vocab", SHAPES)
@pytest.mark.parametrize("impl", IMPLS)
def test_logit_kd_shapes_and_dtypes(impl, lead, vocab, dtype):
    check_logit_kd(impl, lead, vocab, dtype, "forward_kl", 0.5, 2.0)


@pytest.mark.parametrize("divergence,beta", DIVERGENCES[:3])
@pytest.mark.parametrize("mask_kind", ["none", "all_one", "all_zero"])
@pytest.mark.parametrize("impl", IMPLS)
def test_logit_kd_masks(impl, mask_kind, divergence, beta):
    loss, grad = check_logit_kd(impl, (37,), 101, torch.float32, divergence, beta, 2.0, mask_kind=mask_kind)
    if mask_kind == "all_zero":
        assert loss.item() == 0.0 and not grad.any()


@pytest.mark.parametrize("grad_out", [0.37, -2.5])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES[:3])
@pytest.mark.parametrize("impl", IMPLS)
def test_logit_kd_grad_output(impl, divergence, beta, grad_out):
    check_logit_kd(impl, (37,), 101, torch.float32, divergence, beta, 2.0, grad_out=grad_out)


@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
@pytest.mark.parametrize("impl", IMPLS)
def test_logit_kd_banned_tokens(impl, divergence, beta):
    """-inf logits (banned tokens, in both models) give exact, finite losses and gradients."""
    s, t, _ = _logits((37,), 101, torch.float32, seed_for("banned", impl, divergence, beta))
    banned = torch.zeros(37, 101, dtype=torch.bool, device=s.device)
    banned[:, 10:25] = True
    banned[5, :-1] = True  # one row with a single allowed token
    s = s.detach().masked_fill(banned, float("-inf")).requires_grad_()
    t = t.masked_fill(banned, float("-inf"))
    _, grad = check_logit_kd(impl, (37,), 101, torch.float32, divergence, beta, 2.0, s=s, t=t)
    assert not grad[banned].any()


@pytest.mark.parametrize("impl", IMPLS)
def test_logit_kd_teacher_bans_more(impl):
    """Tokens only the teacher bans: forward KL is finite, and matches float64."""
    s, t, _ = _logits((37,), 101, torch.float32, seed_for("teacher-bans", impl))
    t = t.clone()
    t[:, :30] = float("-inf")
    check_logit_kd(impl, (37,), 101, torch.float32, "forward_kl", 0.5, 2.0, s=s, t=t)


@pytest.mark.parametrize("impl", IMPLS)
def test_logit_kd_ignore_index(impl):
    """Rows whose label is ignore_index are skipped, as a mask would skip them; all ignored gives 0."""
    s, t, mask = _logits((4, 9), 257, torch.float32, seed_for("ignore", impl))
    labels = torch.randint(0, 257, (4, 9), device=s.device)
    labels[~mask] = -100
    got = fastted.logit_kd(s, t, labels=labels, impl=impl)
    want = logit_kd_reference(s.double(), t.double(), mask=mask)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)

    s.grad = None
    none = fastted.logit_kd(s, t, labels=torch.full_like(labels, 7), ignore_index=7, impl=impl)
    none.backward()
    assert none.item() == 0.0 and not s.grad.any()


@pytest.mark.parametrize("impl", IMPLS)
def test_logit_kd_padded_vocab(impl):
    """Differing vocabularies compare their shared prefix when vocab_size says so; the rest gets no gradient."""
    s, _, mask = _logits((5, 7), 1010, torch.float32, seed_for("vocab-s", impl))
    _, t, _ = _logits((5, 7), 1003, torch.float32, seed_for("vocab-t", impl))
    with pytest.raises(ValueError, match="vocab_size"):
        fastted.logit_kd(s, t, impl=impl)
    loss = fastted.logit_kd(s, t, mask=mask, vocab_size=1000, impl=impl)
    loss.backward()
    s64 = s.detach().double().requires_grad_()
    want = logit_kd_reference(s64[..., :1000], t.double()[..., :1000], mask=mask)
    want.backward()
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-4, atol=1e-8)
    assert not s.grad[..., 1000:].any()


@pytest.mark.parametrize("impl", IMPLS)
def test_logit_kd_strided_logits(impl):
    """Logits that are views (a vocabulary slice, a transposed batch) give the same result as contiguous ones."""
    s, t, mask = _logits((6, 4), 300, torch.float32, seed_for("strided", impl))
    s_view = s.detach().transpose(0, 1).requires_grad_()  # (4, 6, V), non-contiguous rows
    got = fastted.logit_kd(s_view, t.transpose(0, 1), mask=mask.t(), impl=impl)
    got.backward()
    s.grad = None
    want = fastted.logit_kd(s, t, mask=mask, impl=impl)
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(s_view.grad.transpose(0, 1), s.grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
def test_kernel_matches_rows_reference_across_blocks(divergence, beta):
    """The row kernel with small vocabulary blocks (the online rescaling at work) and a cross-entropy
    equals the PyTorch twin the CPU path runs, row by row and element by element."""
    from fastted.kernels.logit_kd import divergence_code, logit_kd_forward

    g = torch.Generator().manual_seed(seed_for("blocks", divergence, beta))
    n, vocab = 9, 1000
    s = (torch.randn(n, vocab, generator=g) * 4).to(device())
    t = (torch.randn(n, vocab, generator=g) * 4).to(device())
    s[0, 500:] = float("-inf")  # a block of banned tokens at the end of a row
    t[0, 500:] = float("-inf")
    kd_coef = torch.rand(n, generator=g).to(device())
    kd_coef[3] = 0.0
    ce_coef = torch.rand(n, generator=g).to(device())
    ce_coef[3] = 0.0
    labels = torch.randint(0, 500, (n,), generator=g).to(device())
    for temperature in (1.0, 2.0):
        opts = dict(temperature=temperature, beta=beta, soft_weight=0.8, hard_weight=0.3)
        grad = torch.empty_like(s)
        kd, ce = logit_kd_forward(
            s,
            t,
            kd_coef,
            grad=grad,
            labels=labels,
            ce_coef=ce_coef,
            divergence=divergence_code(divergence, beta),
            block_v=128,
            **opts,
        )
        grad_ref = torch.empty_like(s)
        kd_ref, ce_ref = logit_kd_rows(s, t, kd_coef, labels, ce_coef, grad_ref, divergence=divergence, **opts)
        torch.testing.assert_close(kd, kd_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ce, ce_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-6)
        assert kd[3] == 0 and ce[3] == 0 and not grad[3].any()


def test_logit_kd_module_and_float64():
    s, t, mask = _logits((3, 29), 1000, torch.float32, seed_for("module"))
    module = fastted.LogitKDLoss(temperature=4.0, divergence="jsd", beta=0.3)
    got = module(s, t, mask=mask)
    want = fastted.logit_kd(s, t, temperature=4.0, divergence="jsd", beta=0.3, mask=mask)
    torch.testing.assert_close(got, want)
    assert "jsd" in repr(module)
    # A module's ignore_index applies when labels come, and is harmless when they do not.
    labels = torch.randint(1, 5, (3, 29), device=s.device)
    labels[0] = 0
    ignoring = fastted.LogitKDLoss(ignore_index=0)
    torch.testing.assert_close(ignoring(s, t), fastted.logit_kd(s, t))
    torch.testing.assert_close(ignoring(s, t, labels=labels), fastted.logit_kd(s, t, mask=labels != 0))
    # float64 logits run the reference path, in float64.
    s64 = s.detach().double().requires_grad_()
    got64 = fastted.logit_kd(s64, t.double(), mask=mask)
    assert got64.dtype == torch.float64
    torch.testing.assert_close(got64, logit_kd_reference(s64, t.double(), mask=mask), rtol=1e-12, atol=1e-12)
