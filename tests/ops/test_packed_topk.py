"""The packed top-k teacher (fastted.ops.packed_topk): its round trip, and the sparse KL ops reading it as it is,
on both paths: equal to the ops on its unpacked tensors (loss and every gradient) and to the float64 spec."""

import pytest
import torch

import fastted
from fastted.ops import sparse_logit_kd as op
from fastted.ops.packed_topk import PackedTopK, id_bits, pack_ids, pack_topk, unpack_ids, unpack_topk, words_per_row
from fastted.reference import fused_linear_sparse_kd_reference, sparse_logit_kd_reference, topk_targets_reference
from tests.tables import DTYPES, assert_close_to_spec, check_bad_input, device, seed_for

IMPLS = ["reference", "triton"]
LOW_DTYPES = [torch.float32, torch.bfloat16]
# packed op against the op on the unpacked tensors: the same values, up to the GPU's fused multiply-add in
# ``top - level * step`` (one fp32 rounding fewer), which may move a low-precision gradient by one ulp
SAME = {torch.float32: dict(rtol=1e-5, atol=1e-7), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5)}


# --------------------------------------------------------------------------- the format


def _distinct_ids(g, rows, k, vocab):
    """(rows, k) int64 ids, distinct within each row, in [0, vocab): the last vocabulary id and 0 in row 0."""
    if vocab <= 4096:
        ids = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(rows)])
    else:  # sorted draws spread apart: distinct without a permutation of the vocabulary
        gaps = torch.randint(1, vocab // (k + 1), (rows, k), generator=g)
        ids = gaps.cumsum(-1)[:, torch.randperm(k, generator=g)]
    ids[0, 0], ids[0, -1] = vocab - 1, 0
    return ids


@pytest.mark.parametrize(
    "vocab,k",
    [(2, 1), (2, 2), (3, 1), (3, 3), (50257, 37), (65536, 64), (128256, 1), (128256, 64), (2**31, 37), (2**31, 64)],
)
def test_ids_round_trip(vocab, k):
    """Every id comes back from its bits, the vocabulary's last one included, at widths that split ids across
    words (17 and 31 bits) and that do not (1, 2 and 16 bits)."""
    g = torch.Generator().manual_seed(seed_for("ids round trip", vocab, k))
    ids = _distinct_ids(g, 5, k, vocab) if k > 1 else torch.tensor([[vocab - 1], [0], [vocab // 2]])
    bits = id_bits(vocab)
    words = pack_ids(ids.reshape(-1, 1, k), bits)
    assert words.dtype == torch.int32 and words.shape == (ids.shape[0], 1, words_per_row(k, bits))
    assert torch.equal(unpack_ids(words, bits, k).reshape(ids.shape), ids)
    assert bits == max(1, (vocab - 1).bit_length())


@pytest.mark.parametrize("vocab", [2, 3, 50257, 128256])
def test_pack_topk_round_trip(vocab):
    """pack_topk keeps the ids, the tail and the largest value exactly, every other value within step / 2."""
    g = torch.Generator().manual_seed(seed_for("topk round trip", vocab))
    k = min(vocab, 33)
    ids = _distinct_ids(g, 7, k, vocab)
    values = (torch.randn(7, k, generator=g) * 4).sort(-1, descending=True).values
    tail = torch.randn(7, generator=g)
    packed = pack_topk(values, ids, tail, vocab)
    got_values, got_ids, got_tail = unpack_topk(packed)
    assert torch.equal(got_ids, ids) and torch.equal(got_tail, tail)
    assert torch.equal(got_values[:, 0], values[:, 0])
    assert ((got_values - values).abs() <= packed.step[:, None] * 0.5001).all()


# --------------------------------------------------------------------------- the ops on it


def _teacher(g, lead, vocab, k, temperature, bits=None):
    """A packed teacher of fresh random logits (the last id among the top-k of some rows) and its unpacked
    tensors, on the tests' device."""
    t = torch.randn(*lead, vocab, generator=g, dtype=torch.float64) * 3
    t[..., -1] += 20 * (torch.rand(lead, generator=g, dtype=torch.float64) < 0.5)
    values, ids, tail = topk_targets_reference(t, k, temperature)
    packed = pack_topk(values, ids, tail, vocab)
    if bits is not None:  # more bits than the vocabulary needs: a cache of a larger vocabulary's ids
        packed = packed._replace(words=pack_ids(ids, bits), id_bits=bits)
    packed = packed.to(device())
    return packed, unpack_topk(packed)


def _rows(g, lead, vocab):
    mask = torch.rand(lead, generator=g) > 0.25
    labels = torch.randint(0, vocab, lead, generator=g)
    labels[torch.rand(lead, generator=g) < 0.2] = -100
    return mask.to(device()), labels.to(device())


def _run(fn, leaves: dict, *args, grad_out=-1.7, **kwargs):
    """fn's output and the gradients of ``leaves`` (copies that require grad) for an incoming gradient."""
    leaves = {name: x.detach().clone().requires_grad_() for name, x in leaves.items()}
    out = fn(*leaves.values(), *args, **kwargs)
    loss = out[0] if isinstance(out, tuple) else out
    (loss * grad_out).backward()
    return out, [x.grad for x in leaves.values()]


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("vocab,k,temperature,bits", [(301, 16, 2.0, None), (997, 37, 1.0, None), (517, 8, 2.0, 20)])
def test_sparse_logit_kd_reads_the_packed_teacher(vocab, k, temperature, bits, impl, dtype):
    """sparse_logit_kd on a PackedTopK equals it on unpack_topk's tensors (loss and gradient), and both are
    the float64 spec's on those values; (B, T) rows, a mask, labels that skip rows."""
    g = torch.Generator().manual_seed(seed_for("packed op", vocab, k, temperature, bits, impl, dtype))
    lead = (2, 5)
    packed, (values, ids, tail) = _teacher(g, lead, vocab, k, temperature, bits)
    mask, labels = _rows(g, lead, vocab)
    s = (torch.randn(*lead, vocab, generator=g, dtype=torch.float64) * 3).to(device(), dtype)
    opts = dict(temperature=temperature, mask=mask, labels=labels)
    got, (grad,) = _run(fastted.sparse_logit_kd, dict(s=s), packed, impl=impl, **opts)
    same, (same_grad,) = _run(fastted.sparse_logit_kd, dict(s=s), values, ids, tail, impl=impl, **opts)
    torch.testing.assert_close(got, same, **SAME[torch.float32])
    assert grad.dtype == dtype and grad.shape == s.shape
    torch.testing.assert_close(grad, same_grad, **SAME[dtype])

    rows = mask & (labels != -100)
    spec = dict(temperature=temperature, mask=rows)
    ref, (ref_grad,) = _run(sparse_logit_kd_reference, dict(s=s.double()), values.double(), ids, tail.double(), **spec)
    lowp, (lowp_grad,) = _run(sparse_logit_kd_reference, dict(s=s), values, ids, tail, **spec)
    assert_close_to_spec("loss", got, ref, lowp, DTYPES[dtype])
    assert_close_to_spec("grad", grad, ref_grad, lowp_grad, DTYPES[dtype])
    assert (grad[~rows] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_sparse_logit_kd_packed_at_a_large_vocabulary(impl):
    """Ids of 18 bits (half of them cross a word), the vocabulary's last id among them, decoded where the
    kernel reads them: the same loss and gradient as the unpacked tensors; the module takes the packed form."""
    g = torch.Generator().manual_seed(seed_for("packed large", impl))
    vocab, k = 2**17 + 3, 40
    packed, (values, ids, tail) = _teacher(g, (3,), vocab, k, 2.0)
    assert packed.id_bits == 18 and bool((ids == vocab - 1).any())
    s = (torch.randn(3, vocab, generator=g) * 3).to(device())
    loss_fn = fastted.SparseLogitKDLoss(temperature=2.0, impl=impl)
    got, (grad,) = _run(loss_fn, dict(s=s), packed)
    same, (same_grad,) = _run(loss_fn, dict(s=s), values, ids, tail)
    torch.testing.assert_close(got, same, **SAME[torch.float32])
    torch.testing.assert_close(grad, same_grad, **SAME[torch.float32])


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_fused_linear_sparse_kd_reads_the_packed_teacher(impl, dtype):
    """The fused head with a cross-entropy beside, blocks of 5 rows: on a PackedTopK (non-contiguous fields)
    the unpacked tensors' loss, terms and every student gradient, and the float64 spec's."""
    g = torch.Generator().manual_seed(seed_for("packed fused", impl, dtype))
    lead, vocab, hidden, k, temperature = (3, 7), 389, 24, 24, 2.0
    packed, (values, ids, tail) = _teacher(g, lead[::-1], vocab, k, temperature)
    flip = lambda x: x.transpose(0, 1)  # noqa: E731  (the (T, B) teacher seen as (B, T): no field contiguous)
    packed = PackedTopK(*(flip(x) for x in packed[:5]), packed.id_bits)
    values, ids, tail = flip(values), flip(ids), flip(tail)
    assert not packed.words.is_contiguous() and not packed.top.is_contiguous()
    mask, labels = _rows(g, lead, vocab)
    student = dict(
        xs=torch.randn(*lead, hidden, generator=g, dtype=torch.float64),
        ws=torch.randn(vocab, hidden, generator=g, dtype=torch.float64) * 3 * hidden**-0.5,
    )
    student = {name: x.to(device(), dtype) for name, x in student.items()}
    bias = (torch.randn(vocab, generator=g) * 0.5).to(device(), dtype)
    opts = dict(
        temperature=temperature,
        student_bias=bias,
        mask=mask,
        hard_labels=labels,
        hard_weight=0.3,
        soft_weight=0.8,
        shift_labels=True,
    )

    def fused(xs, ws, *teacher, **kwargs):
        return fastted.fused_linear_sparse_kd(xs, ws, *teacher, impl=impl, chunk_size=5, return_terms=True, **kwargs)

    got, grads = _run(fused, student, packed, grad_out=2.5, **opts)
    same, same_grads = _run(fused, student, values, ids, tail, grad_out=2.5, **opts)
    for a, b in zip(got, same):
        torch.testing.assert_close(a, b, **SAME[torch.float32])
    for a, b in zip(grads, same_grads):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b, **SAME[dtype])

    ref_opts = dict(opts, student_bias=bias.double())
    ref, ref_grads = _run(
        fused_linear_sparse_kd_reference,
        {n: x.double() for n, x in student.items()},
        values.double(),
        ids,
        tail.double(),
        grad_out=2.5,
        **ref_opts,
    )
    lowp, lowp_grads = _run(fused_linear_sparse_kd_reference, student, values, ids, tail, grad_out=2.5, **opts)
    for name, a, b, c in zip(("loss", "kd", "ce"), got, ref, lowp):
        assert_close_to_spec(name, a, b, c, DTYPES[dtype])
    for name, a, b, c in zip(student, grads, ref_grads, lowp_grads):
        assert_close_to_spec(f"grad {name}", a, b, c, DTYPES[dtype])


@pytest.mark.parametrize("impl", IMPLS)
def test_every_row_masked(impl):
    g = torch.Generator().manual_seed(seed_for("packed masked", impl))
    packed, _ = _teacher(g, (6,), 301, 16, 2.0)
    s = torch.randn(6, 301, generator=g).to(device())
    mask = torch.zeros(6, dtype=torch.bool, device=device())
    got, (grad,) = _run(fastted.sparse_logit_kd, dict(s=s), packed, temperature=2.0, mask=mask, impl=impl)
    assert got.item() == 0 and (grad == 0).all()


def test_the_cpu_path_unpacks_a_block_of_rows_at_a_time(monkeypatch):
    """The PyTorch path never unpacks the whole teacher: each block of rows it works on, on its own."""
    seen = []
    real = op.unpack_topk

    def spy(packed):
        seen.append(packed.levels.shape[0])
        return real(packed)

    monkeypatch.setattr(op, "unpack_topk", spy)
    monkeypatch.setattr(op, "ROW_BLOCK_ELEMENTS", 4 * 301)  # blocks of 4 rows of 301 logits
    g = torch.Generator().manual_seed(seed_for("packed blocks"))
    packed, (values, ids, tail) = _teacher(g, (3, 5), 301, 16, 2.0)
    packed = packed.to("cpu")
    s = torch.randn(3, 5, 301, generator=g)
    got = fastted.sparse_logit_kd(s, packed, temperature=2.0, impl="reference")
    assert seen == [4, 4, 4, 3]
    seen.clear()
    xs, ws = torch.randn(3, 5, 8, generator=g), torch.randn(301, 8, generator=g)
    fastted.fused_linear_sparse_kd(xs, ws, packed, temperature=2.0, chunk_size=6, impl="reference")
    assert seen == [6, 6, 3]
    torch.testing.assert_close(
        got, fastted.sparse_logit_kd(s, values.cpu(), ids.cpu(), tail.cpu(), temperature=2.0, impl="reference")
    )


# --------------------------------------------------------------------------- bad packed teachers


def _packed(vocab=50, k=3, bits=None):
    ids = torch.arange(k).expand(4, 6, k)
    packed = pack_topk(torch.linspace(2, 0, k).expand(4, 6, k), ids, torch.zeros(4, 6), vocab)
    return packed if bits is None else packed._replace(words=pack_ids(ids, bits), id_bits=bits)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "change,fragments",
    [
        (dict(topk_ids=torch.zeros(4, 6, 3, dtype=torch.long)), ["topk_ids must be None", "PackedTopK"]),
        (dict(tail_lse=torch.zeros(4, 6)), ["tail_lse must be None"]),
        (
            dict(levels=torch.zeros(4, 5, 3, dtype=torch.uint8)),
            ["topk_values.levels has shape (4, 5, 3)", "(4, 6, 'k')"],
        ),
        (dict(levels=torch.zeros(4, 6, 3, dtype=torch.int32)), ["topk_values.levels has dtype torch.int32", "uint8"]),
        (
            dict(words=torch.zeros(4, 6, 2, dtype=torch.int32)),
            ["topk_values.words has shape (4, 6, 2)", "(4, 6, 1)", "3 ids of 6 bits"],
        ),
        (dict(words=torch.zeros(4, 6, 1, dtype=torch.int64)), ["topk_values.words has dtype torch.int64", "int32"]),
        (dict(top=torch.zeros(4)), ["topk_values.top has shape (4,)", "(4, 6)"]),
        (dict(step=torch.zeros(4, 6, dtype=torch.long)), ["topk_values.step has dtype torch.int64"]),
        (dict(tail=torch.zeros(4, 6, 1)), ["topk_values.tail has shape (4, 6, 1)"]),
        (dict(top=[0.0] * 6), ["topk_values.top must be a tensor, got list"]),
        (dict(step=torch.zeros(4, 6, device="meta")), ["topk_values.step is on meta", "student_logits is on cpu"]),
        (dict(id_bits=0), ["topk_values.id_bits must be an int in [1, 32], got 0"]),
        (dict(id_bits=True), ["topk_values.id_bits", "got True"]),
    ],
)
def test_bad_packed_teacher(change, fragments):
    packed = _packed()._replace(**{k: v for k, v in change.items() if k in PackedTopK._fields})
    inputs = dict(
        student_logits=torch.zeros(4, 6, 50),
        topk_values=packed,
        **{k: v for k, v in change.items() if k not in PackedTopK._fields},
    )
    check_bad_input(fastted.sparse_logit_kd, inputs, fragments)


@pytest.mark.bad_input
def test_packed_ids_outside_the_vocabulary():
    """A cache of another vocabulary: more ids a row than the student's vocabulary, or an id past it (its
    bits may hold more than the vocabulary: the ids are decoded, on a CPU, and checked), in both ops."""
    xs, ws = torch.randn(4, 6, 8), torch.randn(50, 8)
    for fn, args in (
        (fastted.sparse_logit_kd, dict(student_logits=torch.zeros(4, 6, 50))),
        (fastted.fused_linear_sparse_kd, dict(student_hidden=xs, student_weight=ws)),
    ):
        check_bad_input(fn, dict(args, topk_values=_packed(k=51, vocab=64)), ["51 logits a row", "vocabulary of 50"])
        wide = _packed(vocab=64)
        wide = wide._replace(words=pack_ids(torch.tensor([0, 55, 2]).expand(4, 6, 3), 6))
        check_bad_input(
            fn,
            dict(args, topk_values=wide),
            ["topk_values.words holds the id 55", "outside [0, 50)", "another vocabulary"],
        )
    # ten bits for a vocabulary of 50: accepted while its ids are in it
    assert torch.isfinite(fastted.sparse_logit_kd(torch.randn(4, 6, 50), _packed(bits=10), impl="reference"))
