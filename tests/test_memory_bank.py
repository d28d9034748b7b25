"""fastted.MemoryBank: queue order, momentum updates, negatives, sampling, state-dict round trip."""

import io

import pytest
import torch
import torch.nn.functional as F

import fastted
from fastted.memory_bank import NO_LABEL
from tests.tables import seed_for


def _batch(n, dim, seed, n_labels=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g, dtype=torch.float64) * 3, torch.randint(0, n_labels, (n,), generator=g)


def test_queue_order_and_wrap_around():
    bank = fastted.MemoryBank(5, 4)
    pushed = []
    for step, n in enumerate([2, 2, 3, 1]):
        v, y = _batch(n, 4, seed_for("queue", step))
        bank.update(v, labels=y)
        pushed += list(zip(F.normalize(v, dim=1), y.tolist()))
        # entry i holds the newest vector pushed at a position = i (mod 5)
        for pos, (vec, label) in enumerate(pushed):
            if pos >= len(pushed) - 5:
                torch.testing.assert_close(bank.vectors[pos % 5].double(), vec, rtol=1e-6, atol=1e-7)
                assert bank.labels[pos % 5].item() == label and bank.ids[pos % 5].item() == pos
    assert int(bank.pushed) == 8 and len(bank) == 5


def test_queue_batch_larger_than_bank_keeps_the_newest():
    bank = fastted.MemoryBank(4, 3)
    bank.update(*_batch(2, 3, 1)[:1])
    v, _ = _batch(7, 3, 2)
    bank.update(v, index=torch.arange(100, 107))
    # pushes 2..8 in order; the survivors are pushes 5..8, at slots 5 % 4 .. 8 % 4
    for j, pos in enumerate(range(5, 9)):
        torch.testing.assert_close(bank.vectors[pos % 4].double(), F.normalize(v, dim=1)[3 + j], rtol=1e-6, atol=1e-7)
        assert bank.ids[pos % 4].item() == 100 + 3 + j and bank.labels[pos % 4].item() == NO_LABEL


def test_negatives_of_a_filling_and_a_full_bank():
    bank = fastted.MemoryBank(6, 4)
    with pytest.raises(ValueError, match="the memory bank is empty"):
        bank.negatives()
    v, y = _batch(4, 4, 3)
    bank.update(v, labels=y)
    neg = bank.negatives()
    assert neg.vectors.shape == (4, 4) and neg.labels.tolist() == y.tolist() and neg.index.tolist() == [0, 1, 2, 3]
    bank.update(*_batch(2, 4, 4)[:1])
    full = bank.negatives()
    assert full.vectors is bank.vectors and full.vectors.shape == (6, 4)  # no copy once full
    torch.testing.assert_close(full.vectors.norm(dim=1), torch.ones(6))


def test_momentum_update_matches_its_formula():
    bank = fastted.MemoryBank(10, 5, mode="momentum", momentum=0.7)
    index = torch.tensor([3, 7, 1])
    v1, y1 = _batch(3, 5, 5)
    bank.update(v1, labels=y1, index=index)  # first sight: the normalized vector itself
    torch.testing.assert_close(bank.vectors[index].double(), F.normalize(v1, dim=1), rtol=1e-6, atol=1e-7)
    v2, _ = _batch(2, 5, 6)
    bank.update(v2, index=torch.tensor([7, 9]))
    want7 = F.normalize(0.7 * F.normalize(v1, dim=1)[1] + 0.3 * F.normalize(v2, dim=1)[0], dim=0)
    torch.testing.assert_close(bank.vectors[7].double(), want7, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(bank.vectors[9].double(), F.normalize(v2, dim=1)[1], rtol=1e-6, atol=1e-7)
    assert bank.filled.nonzero()[:, 0].tolist() == [1, 3, 7, 9]
    assert bank.labels[7].item() == y1[1].item()  # no labels in the second update: the old one stays
    neg = bank.negatives()
    assert neg.index.tolist() == [1, 3, 7, 9]
    with pytest.raises(ValueError, match="index is required in momentum mode"):
        bank.update(v2)
    with pytest.raises(ValueError, match=r"index holds 10, outside \[0, 10\)"):
        bank.update(v2, index=torch.tensor([2, 10]))


def test_sample_leaves_out_same_label_and_own_entries():
    bank = fastted.MemoryBank(50, 8, mode="momentum", seed=3)
    v, y = _batch(50, 8, 7)
    bank.update(v, labels=y, index=torch.arange(50))
    labels, index = y[:6], torch.arange(6)
    neg = bank.sample(40, labels=labels, index=index)
    assert neg.vectors.shape == (6, 40, 8) and neg.labels.shape == (6, 40)
    assert (neg.labels != labels[:, None]).all() and (neg.index != index[:, None]).all()
    torch.testing.assert_close(neg.vectors, bank.vectors[neg.index])
    # one allowed entry only: every draw of that anchor is it
    lonely = fastted.MemoryBank(4, 2, mode="momentum")
    lonely.update(torch.randn(4, 2), labels=torch.tensor([0, 0, 0, 1]), index=torch.arange(4))
    assert lonely.sample(3, labels=torch.tensor([0])).index.tolist() == [[3, 3, 3]]
    with pytest.raises(ValueError, match="anchor 1 has no allowed negative"):
        lonely.sample(2, labels=torch.tensor([0, 0]), index=torch.tensor([1, 3]))
    # strict=False: the anchor with no allowed entry keeps its (forbidden) draws, for the caller to mask by
    # label; the others still get allowed ones only
    loose = lonely.sample(2, labels=torch.tensor([0, 0]), index=torch.tensor([1, 3]), strict=False)
    assert loose.index.shape == (2, 2) and loose.index[0].tolist() == [3, 3]
    assert lonely.full and not fastted.MemoryBank(4, 2).full
    with pytest.raises(ValueError, match="k=5 is larger than the memory bank's 4 filled entries"):
        lonely.sample(5, n_anchors=2)
    with pytest.raises(ValueError, match="the memory bank is empty"):
        fastted.MemoryBank(4, 2).sample(1, n_anchors=1)


@pytest.mark.parametrize("mode", ["queue", "momentum"])
def test_state_dict_round_trip(mode):
    """Save, load into a fresh bank (weights_only), and both go on identically: updates and draws."""
    bank = fastted.MemoryBank(16, 6, mode=mode, momentum=0.6, seed=11)
    for step in range(3):
        v, y = _batch(5, 6, seed_for("resume", mode, step))
        bank.update(v, labels=y, index=torch.arange(5) + 4 * step)
    bank.sample(3, n_anchors=2)  # advance the sampler's random state
    buffer = io.BytesIO()
    torch.save(bank.state_dict(), buffer)
    buffer.seek(0)
    resumed = fastted.MemoryBank(16, 6, mode=mode, momentum=0.6, seed=0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for name in ("vectors", "labels", "ids", "filled", "pushed"):
        assert torch.equal(getattr(bank, name), getattr(resumed, name)), name
    v, y = _batch(4, 6, seed_for("resume-next", mode))
    for b in (bank, resumed):
        b.update(v, labels=y, index=torch.arange(4) + 9)
    assert torch.equal(bank.vectors, resumed.vectors)
    assert torch.equal(bank.sample(7, labels=y).index, resumed.sample(7, labels=y).index)
    other = fastted.MemoryBank(16, 6, mode="momentum" if mode == "queue" else "queue")
    with pytest.raises(ValueError, match="the saved memory bank is in mode"):
        other.load_state_dict(bank.state_dict())


def test_bank_feeds_contrastive_kd():
    """The bank's negatives and labels go straight into contrastive_kd (different-label negatives)."""
    bank = fastted.MemoryBank(64, 16)
    v, y = _batch(64, 16, 9)
    bank.update(v.float(), labels=y)
    s, _ = _batch(8, 16, 10)
    t, labels = _batch(8, 16, 11)
    neg = bank.negatives()
    got = fastted.contrastive_kd(s.float(), t.float(), neg.vectors, labels=labels, negative_labels=neg.labels)
    want = fastted.reference.contrastive_kd_reference(s, t, F.normalize(v, dim=1), labels=labels, negative_labels=y)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,fragments",
    [
        (dict(size=0, dim=4), ["size must be a positive int", "0"]),
        (dict(size=4, dim=2.5), ["dim must be a positive int", "2.5"]),
        (dict(size=4, dim=4, mode="fifo"), ["mode must be one of", "'fifo'"]),
        (dict(size=4, dim=4, momentum=1.0), ["momentum must be a number in [0, 1)", "1.0"]),
    ],
)
@pytest.mark.bad_input
def test_bank_bad_arguments(kwargs, fragments):
    with pytest.raises(ValueError) as info:
        fastted.MemoryBank(**kwargs)
    assert all(f in str(info.value) for f in fragments), str(info.value)


@pytest.mark.bad_input
def test_bank_bad_updates():
    bank = fastted.MemoryBank(8, 4)
    with pytest.raises(ValueError, match=r"vectors has shape \(3, 5\), but needs \(B, 4\)"):
        bank.update(torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"labels must be an integer tensor of shape \(3,\)"):
        bank.update(torch.randn(3, 4), labels=torch.zeros(3))
    with pytest.raises(ValueError, match="k must be a positive int"):
        bank.sample(0, n_anchors=1)
    with pytest.raises(ValueError, match="vectors has dtype torch.int64, but needs a floating-point dtype"):
        bank.update(torch.arange(12).reshape(3, 4))  # ids passed where the states belong
    assert not bank.filled.any()


@pytest.mark.parametrize("size, dim", [(16, 4), (8, 5)])
@pytest.mark.bad_input
def test_bank_of_another_size_refused_by_name(size, dim):
    """A saved bank loaded into a bank of another size or width: a ValueError naming both shapes, also inside a
    model's state dict (the key's prefix named), and nothing of the bank changed."""
    saved = fastted.MemoryBank(8, 4)
    saved.update(torch.randn(3, 4))
    bank = torch.nn.Sequential(fastted.MemoryBank(size, dim))
    with pytest.raises(
        ValueError,
        match=rf"0\.vectors: the saved memory bank holds 8 vectors of width 4, this one "
        rf"size={size}, dim={dim}",
    ):
        bank.load_state_dict(torch.nn.Sequential(saved).state_dict())
    assert not bank[0].filled.any()


def test_bank_numpy_scalars_are_numbers():
    """numpy's scalars are numbers: a size, width and momentum read from an array are taken as they are."""
    import numpy as np

    bank = fastted.MemoryBank(np.int64(8), np.int32(4), mode="momentum", momentum=np.float32(0.25))
    assert (bank.size, bank.dim, bank.momentum) == (8, 4, 0.25) and type(bank.momentum) is float


@pytest.mark.parametrize("mode", ["queue", "momentum"])
@pytest.mark.bad_input
def test_bank_refuses_non_finite_vectors(mode):
    """A NaN or inf vector is refused and nothing of its batch is stored: the bank stays as it was, and the
    losses it feeds stay finite."""
    bank = fastted.MemoryBank(8, 4, mode=mode)
    index = torch.arange(3)
    good = torch.randn(3, 4, generator=torch.Generator().manual_seed(seed_for("bank-nan", mode)))
    bank.update(good, index=index)
    before = {name: x.clone() for name, x in bank.named_buffers()}
    for bad_value in (float("nan"), float("inf")):
        bad = good.clone()
        bad[1, 2] = bad_value
        with pytest.raises(ValueError, match=r"vectors\[1\] holds a non-finite value"):
            bank.update(bad, index=index)
        for name, x in bank.named_buffers():
            assert torch.equal(x, before[name]), name
    assert torch.isfinite(bank.vectors).all()
