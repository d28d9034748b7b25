"""fastted.fused_linear_kd against float64 references: values, every student gradient, labels, vocabularies.

Each case runs on both paths: "reference" (the chunked PyTorch path) and
"triton" (the row kernel: on a GPU, or under TRITON_INTERPRET=1 on the CPU).
The peak-memory check of the CPU path lives in benchmarks/test_fused_linear_kd.py.
"""

import pytest
import torch

import fastted
from fastted.reference import fused_linear_kd_reference
from tests.tables import DTYPES, assert_close_to_spec, device, seed_for

IMPLS = ["reference", "triton"]
DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.0), ("jsd", 1.0)]
# (leading shape, H_s, H_t, V): odd hidden sizes and vocabularies, BERT's and GPT-2's among them.
SHAPES = [((37,), 24, 40, 1003), ((3, 11), 33, 17, 30522), ((4,), 16, 24, 50257)]


def _make(lead, h_s, h_t, vocab, dtype, seed, v_t=None, labels=True, ignored=0.2):
    """Fresh random heads, hidden states, mask and hard labels (some ignored)."""
    g = torch.Generator().manual_seed(seed)
    dev = device()

    def rand(*shape, scale=1.0, grad=False):
        x = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dev, dtype)
        return x.requires_grad_(grad)

    v_t = vocab if v_t is None else v_t
    inputs = dict(
        student_hidden=rand(*lead, h_s, grad=True),
        student_weight=rand(vocab, h_s, scale=3 * h_s**-0.5, grad=True),
        teacher_hidden=rand(*lead, h_t),
        teacher_weight=rand(v_t, h_t, scale=3 * h_t**-0.5),
        student_bias=rand(vocab, scale=0.5, grad=True),
        teacher_bias=rand(v_t, scale=0.5),
        mask=(torch.rand(lead, generator=g) > 0.25).to(dev),
    )
    if labels:
        hard = torch.randint(0, min(vocab, v_t), lead, generator=g)
        hard[torch.rand(lead, generator=g) < ignored] = -100
        inputs["hard_labels"] = hard.to(dev)
    return inputs


def _trainable(inputs):
    return {k: inputs[k] for k in ("student_hidden", "student_weight", "student_bias")}


def _run(fn, inputs, grad_out, **opts):
    loss, kd, ce = fn(**inputs, **opts)
    (loss * grad_out).backward()
    return (loss.detach(), kd.detach(), ce.detach()), {
        k: x.grad for k, x in _trainable(inputs).items() if x is not None
    }


def _cast(inputs, dtype):
    return {
        k: v.detach().to(dtype).requires_grad_(v.requires_grad) if torch.is_tensor(v) and v.is_floating_point() else v
        for k, v in inputs.items()
    }


def check_fused_linear_kd(
    impl,
    shape,
    dtype,
    divergence="forward_kl",
    beta=0.5,
    temperature=2.0,
    grad_out=1.0,
    chunk_size=None,
    inputs=None,
    **opts,
):
    lead, h_s, h_t, vocab = shape
    if inputs is None:
        seed = seed_for("flkd", impl, shape, dtype, divergence, beta, temperature)
        inputs = _make(lead, h_s, h_t, vocab, dtype, seed)
    opts = dict(temperature=temperature, divergence=divergence, beta=beta, **opts)
    if "hard_labels" in inputs:
        opts.setdefault("hard_weight", 0.3)
        opts.setdefault("soft_weight", 0.8)
    ref_in, lowp_in = _cast(inputs, torch.float64), _cast(inputs, dtype)
    got, grads = _run(
        fastted.fused_linear_kd, inputs, grad_out, impl=impl, chunk_size=chunk_size, return_terms=True, **opts
    )
    ref, ref_grads = _run(fused_linear_kd_reference, ref_in, grad_out, **opts)
    lowp, lowp_grads = _run(fused_linear_kd_reference, lowp_in, grad_out, **opts)

    slack = DTYPES[dtype]
    for name, a, b, c in zip(("loss", "kd", "ce"), got, ref, lowp):
        assert a.dtype == torch.float32 and a.dim() == 0, name
        assert_close_to_spec(name, a, b, c, slack)
    for name, g in grads.items():
        assert g.dtype == inputs[name].dtype and g.shape == inputs[name].shape, name
        assert_close_to_spec(f"grad {name}", g, ref_grads[name], lowp_grads[name], slack)
    for name in ("teacher_hidden", "teacher_weight", "teacher_bias"):
        assert inputs[name].grad is None
    return got, grads


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
@pytest.mark.parametrize("impl", IMPLS)
def test_fused_linear_kd_divergences(impl, divergence, beta, temperature):
    check_fused_linear_kd(impl, SHAPES[0], torch.float32, divergence, beta, temperature, chunk_size=10)


@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"V{s[3]}")
@pytest.mark.parametrize("impl", IMPLS)
def test_fused_linear_kd_shapes_and_dtypes(impl, shape, dtype):
    check_fused_linear_kd(impl, shape, dtype)


@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("chunk_size", [1, 7, None, 1000])
@pytest.mark.parametrize("impl", IMPLS)
def test_fused_linear_kd_chunk_sizes(impl, chunk_size, dtype):
    """Blocks of 1 row, of an odd number of rows, the default and one block for all agree with float64
    (the head's gradient is accumulated over the blocks in fp32 whatever the dtype)."""
    check_fused_linear_kd(impl, ((3, 11), 20, 28, 501), dtype, chunk_size=chunk_size, grad_out=-2.5)


@pytest.mark.parametrize("grad_out", [0.37, -2.5])
@pytest.mark.parametrize("impl", IMPLS)
def test_fused_linear_kd_grad_output(impl, grad_out):
    check_fused_linear_kd(impl, SHAPES[0], torch.float32, "jsd", 0.5, grad_out=grad_out, chunk_size=16)


@pytest.mark.parametrize("impl", IMPLS)
def test_fused_linear_kd_terms(impl):
    """Soft only (no labels), hard only (DWT's alpha_s = 0), no biases: each matches its reference."""
    lead, h_s, h_t, vocab = SHAPES[0]
    inputs = _make(lead, h_s, h_t, vocab, torch.float32, seed_for("soft-only", impl), labels=False)
    got, _ = check_fused_linear_kd(impl, SHAPES[0], torch.float32, inputs=inputs)
    assert got[2].item() == 0.0

    inputs = _make(lead, h_s, h_t, vocab, torch.float32, seed_for("hard-only", impl))
    check_fused_linear_kd(impl, SHAPES[0], torch.float32, inputs=inputs, soft_weight=0.0, hard_weight=1.0)

    inputs = _make(lead, h_s, h_t, vocab, torch.float32, seed_for("no-bias", impl))
    del inputs["student_bias"], inputs["teacher_bias"]
    inputs["student_bias"] = None
    inputs["teacher_bias"] = None
    got, grads = _run(
        fastted.fused_linear_kd, inputs, 1.0, impl=impl, return_terms=True, temperature=2.0, hard_weight=0.5
    )
    ref, _ = _run(fused_linear_kd_reference, _cast(inputs, torch.float64), 1.0, temperature=2.0, hard_weight=0.5)
    torch.testing.assert_close(got[0].double(), ref[0], rtol=1e-5, atol=1e-6)
    assert set(grads) == {"student_hidden", "student_weight"} and all(g is not None for g in grads.values())


@pytest.mark.parametrize("impl", IMPLS)
def test_fused_linear_kd_all_rows_skipped(impl):
    """All rows masked: loss 0 and zero gradients; all labels ignored: ce 0 and kd 0 (the KD rows are the labelled
    ones), or with kd_ignored_rows kd over every mask row."""
    lead, h_s, h_t, vocab = SHAPES[0]
    inputs = _make(lead, h_s, h_t, vocab, torch.float32, seed_for("skipped", impl))
    inputs["mask"] = torch.zeros_like(inputs["mask"])
    (loss, kd, ce), grads = _run(fastted.fused_linear_kd, inputs, 1.0, impl=impl, return_terms=True, hard_weight=0.5)
    assert loss.item() == 0.0 and kd.item() == 0.0 and ce.item() == 0.0
    assert all(not g.any() for g in grads.values())

    inputs = _make(lead, h_s, h_t, vocab, torch.float32, seed_for("ignored", impl), ignored=1.0)
    got, _ = check_fused_linear_kd(impl, SHAPES[0], torch.float32, inputs=inputs, hard_weight=0.5)
    assert got[2].item() == 0.0 and got[1].item() == 0.0
    got, _ = check_fused_linear_kd(impl, SHAPES[0], torch.float32, inputs=inputs, hard_weight=0.5, kd_ignored_rows=True)
    assert got[2].item() == 0.0 and got[1].item() > 0


@pytest.mark.parametrize("impl", IMPLS)
def test_fused_linear_kd_padded_vocab(impl):
    """A padded student head (1010 rows) and a teacher head of 1003: compare the first 1000 entries."""
    lead, h_s, h_t, _ = SHAPES[0]
    inputs = _make(lead, h_s, h_t, 1010, torch.float32, seed_for("padded", impl), v_t=1003)
    with pytest.raises(ValueError, match="vocab_size"):
        fastted.fused_linear_kd(**inputs, impl=impl)
    _, grads = check_fused_linear_kd(impl, SHAPES[0], torch.float32, inputs=inputs, vocab_size=1000)
    assert not grads["student_weight"][1000:].any() and not grads["student_bias"][1000:].any()

    inputs["hard_labels"][0] = 1005  # a label beyond the compared vocabulary, in a counted row
    inputs["mask"][0] = True
    if device().type == "cpu":
        with pytest.raises(ValueError, match=r"hard_labels holds 1005, outside \[0, 1000\)"):
            fastted.fused_linear_kd(**inputs, vocab_size=1000, hard_weight=0.5, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_fused_linear_kd_module(impl):
    lead, h_s, h_t, vocab = SHAPES[0]
    inputs = _make(lead, h_s, h_t, vocab, torch.float32, seed_for("module", impl))
    module = fastted.FusedLinearKDLoss(temperature=2.0, hard_weight=0.4, soft_weight=0.6, impl=impl)
    got = module(
        inputs["student_hidden"],
        inputs["student_weight"],
        inputs["teacher_hidden"],
        inputs["teacher_weight"],
        student_bias=inputs["student_bias"],
        teacher_bias=inputs["teacher_bias"],
        mask=inputs["mask"],
        hard_labels=inputs["hard_labels"],
    )
    want, kd, ce = fastted.fused_linear_kd(
        **inputs, temperature=2.0, hard_weight=0.4, soft_weight=0.6, impl=impl, return_terms=True
    )
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(module.kd, kd)
    torch.testing.assert_close(module.ce, ce)
    assert not module.kd.requires_grad and "hard_weight=0.4" in repr(module)


def test_fused_linear_kd_autocast():
    """Under autocast the heads run in the autocast dtype, as nn.Linear's would."""
    lead, h_s, h_t, vocab = SHAPES[0]
    inputs = _make(lead, h_s, h_t, vocab, torch.float32, seed_for("autocast"))
    with torch.autocast(device().type, dtype=torch.bfloat16):
        got = fastted.fused_linear_kd(**inputs, temperature=2.0, hard_weight=0.3)
    got.backward()
    bf16 = _cast(inputs, torch.bfloat16)
    want = fused_linear_kd_reference(**_cast(bf16, torch.float64), temperature=2.0, hard_weight=0.3)[0]
    torch.testing.assert_close(got.double(), want, rtol=2e-3, atol=1e-3)
    assert inputs["student_weight"].grad.dtype == torch.float32


def test_fused_linear_kd_float64_reference_path():
    lead, h_s, h_t, vocab = SHAPES[0]
    inputs = _make(lead, h_s, h_t, vocab, torch.float64, seed_for("fp64"))
    got = fastted.fused_linear_kd(**inputs, temperature=2.0, hard_weight=0.3, chunk_size=5)
    want = fused_linear_kd_reference(**inputs, temperature=2.0, hard_weight=0.3)[0]
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def _head_time_share(rows, vocab, h_s, h_t, e, balance):
    """The time a block's re-read of the heads (and the fp32 weight gradient) takes, over its GEMMs' time."""
    head_bytes = vocab * (2 * e * h_s + e * h_t + 8 * h_s)
    return head_bytes * balance / (rows * 2 * vocab * (3 * h_s + h_t))


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("vocab", [32000, 128256])
def test_gpu_blocks_keep_the_gemms_compute_bound(arch, vocab):
    """At the issue's GPU size (N = 8192, H_s = 2048, H_t = 4096, bf16) the default block is the smallest
    multiple of 64 rows whose re-read of the heads costs at most 1 / AMORTIZE of its GEMMs' time, and its
    two logits buffers fit the budget (131-row blocks, the old rule's, spent more on traffic than on FLOP)."""
    from fastted.kernels import ARCHS
    from fastted.ops.rows import AMORTIZE, MEMORY_BUDGET, compute_bound_rows

    balance = ARCHS[arch].flops_per_byte
    budget = MEMORY_BUDGET["cuda"]
    rows = compute_bound_rows(vocab, 2048, 4096, 2, 2, True, balance, budget, vocab * 4)
    assert rows % 64 == 0 and rows * vocab * 4 <= budget
    assert _head_time_share(rows, vocab, 2048, 4096, 2, balance) <= 1 / AMORTIZE
    assert _head_time_share(rows - 64, vocab, 2048, 4096, 2, balance) > 1 / AMORTIZE
    assert _head_time_share(131, vocab, 2048, 4096, 2, balance) > 1  # the old rule's block


def test_block_rows_on_cpu_and_the_budget():
    """On a CPU: the issue's size gets 128-row blocks; chunk_size overrides; a vocabulary too large for
    the budget gets fewer rows than the GEMMs would like (memory wins); a small batch is one block."""
    from fastted.ops.rows import MEMORY_BUDGET, block_rows

    def rows(n, h_s, h_t, vocab, chunk_size=None, needs_grad=True):
        xs, xt = torch.empty(n, h_s), torch.empty(n, h_t)
        return block_rows(n, vocab, xs, torch.empty(vocab, h_s), xt, torch.empty(vocab, h_t), needs_grad, chunk_size)

    assert rows(2048, 256, 384, 32000) == 128
    assert rows(2048, 256, 384, 32000, chunk_size=300) == 300
    assert rows(100, 256, 384, 32000) == 100
    huge = rows(4096, 256, 384, 2_000_000)
    assert 1 <= huge < 64 and huge * 2_000_000 * (4 + 4 + 16) <= MEMORY_BUDGET["cpu"]
    assert rows(4096, 256, 384, 32000, needs_grad=False) <= rows(4096, 256, 384, 32000)
    with pytest.raises(ValueError, match="chunk_size"):
        rows(10, 8, 8, 100, chunk_size=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kd_ignored_rows", [False, True])
def test_fused_linear_kd_shifted_labels_are_a_causal_lms(impl, kd_ignored_rows):
    """shift_labels=True on (B, T, H) states is Hugging Face's causal-LM loss: position t's logits against label
    t + 1, the last position dropped; the KD rows follow the shifted labels (or every mask row with
    kd_ignored_rows). Checked against a float64 formula written out on the sliced logits, and against the
    spec, on both paths."""
    lead, h_s, h_t, vocab = (3, 11), 20, 28, 501
    inputs = _make(lead, h_s, h_t, vocab, torch.float32, seed_for("shift", impl, kd_ignored_rows), ignored=0.3)
    opts = dict(temperature=2.0, hard_weight=0.7, soft_weight=1.3, shift_labels=True, kd_ignored_rows=kd_ignored_rows)
    got, grads = _run(fastted.fused_linear_kd, inputs, 1.0, impl=impl, return_terms=True, **opts)

    x = {k: (v.detach().double() if v.is_floating_point() else v).cpu() for k, v in inputs.items()}
    s = x["student_hidden"] @ x["student_weight"].T + x["student_bias"]
    t = x["teacher_hidden"] @ x["teacher_weight"].T + x["teacher_bias"]
    labels, mask = x["hard_labels"][:, 1:], x["mask"][:, :-1].bool()
    ce_rows = (labels != -100) & mask
    ce = torch.nn.functional.cross_entropy(s[:, :-1][ce_rows], labels[ce_rows])
    kd_rows = mask if kd_ignored_rows else ce_rows
    kd_rows_full = torch.nn.functional.pad(kd_rows, (0, 1), value=False)
    if kd_ignored_rows:  # the last position has no label but is a KD row when the mask keeps it
        kd_rows_full[:, -1] = x["mask"][:, -1].bool()
    ls, lt = (torch.log_softmax(z[kd_rows_full] / 2.0, -1) for z in (s, t))
    kd = (lt.exp() * (lt - ls)).sum(-1).mean() * 4.0
    torch.testing.assert_close(got[2].double().cpu(), ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1].double().cpu(), kd, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[0].double().cpu(), 1.3 * kd + 0.7 * ce, rtol=1e-5, atol=1e-6)

    _, ref_grads = _run(fused_linear_kd_reference, _cast(inputs, torch.float64), 1.0, **opts)
    _, eager_grads = _run(fused_linear_kd_reference, _cast(inputs, torch.float32), 1.0, **opts)
    for name, g in grads.items():
        assert_close_to_spec(name, g, ref_grads[name], eager_grads[name], DTYPES[torch.float32])


def test_fused_linear_kd_rows_with_ignored_labels_match_logit_kd():
    """By default the KD term counts the rows the labels keep, as logit_kd with labels does (and Liger, TRL)."""
    lead, h_s, h_t, vocab = (37,), 24, 40, 1003
    inputs = _make(lead, h_s, h_t, vocab, torch.float32, seed_for("kd rows"), ignored=0.4)
    _, kd, _ = fastted.fused_linear_kd(**inputs, temperature=2.0, return_terms=True)
    s = inputs["student_hidden"] @ inputs["student_weight"].T + inputs["student_bias"]
    t = inputs["teacher_hidden"] @ inputs["teacher_weight"].T + inputs["teacher_bias"]
    want = fastted.logit_kd(s, t, temperature=2.0, mask=inputs["mask"], labels=inputs["hard_labels"])
    torch.testing.assert_close(kd, want.detach(), rtol=1e-5, atol=1e-7)
    _, all_rows, _ = fastted.fused_linear_kd(**inputs, temperature=2.0, return_terms=True, kd_ignored_rows=True)
    torch.testing.assert_close(
        all_rows, fastted.logit_kd(s, t, temperature=2.0, mask=inputs["mask"]).detach(), rtol=1e-5, atol=1e-7
    )
