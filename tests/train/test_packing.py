"""Packed blocks without cross-document attention: inside a block, each document's logits (and mapped hidden
states) equal those of the document run alone, for the student and the teacher; the token-level recipes' terms
on a packed batch equal the sum of their terms over its documents."""

import numpy as np
import pytest
import torch

from fastted import DWT, KD, LWD, TED, TaskFilters, explicit_map
from fastted.models import ModelAdapter
from fastted.train.data import CLMCollator, MLMCollator, document_positions
from tests.tiny_models import VOCAB, bert, gpt2

LENGTHS = [(7, 5, 9, 3), (4, 11, 6, 3)]  # two packed rows of 24 tokens, four documents each


def _documents(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randint(5, VOCAB, (n,), generator=g) for n in row] for row in LENGTHS]


def _packed(docs, collator):
    examples = [{"input_ids": torch.cat(row), "doc_starts": np.cumsum([len(d) for d in row])[:-1]} for row in docs]
    return collator(examples)


def _alone(doc, collator):
    return collator([{"input_ids": doc}])


def test_document_positions_restart_at_each_start():
    positions, starts = document_positions([{"doc_starts": [3, 5]}, {"doc_starts": []}, {}], 7)
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0, 1], list(range(7)), list(range(7))]
    assert starts.tolist() == [[False, False, False, True, False, True, False], [False] * 7, [False] * 7]


def test_clm_collator_keeps_the_loss_inside_each_document():
    out = _packed(
        [[torch.tensor([7, 8, 2]), torch.tensor([9, 2]), torch.tensor([10, 11])]], CLMCollator(0, document_mask=True)
    )
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1]]
    assert out["labels"].tolist() == [[7, 8, 2, -100, 2, -100, 11]]  # no document's first token predicted
    assert out["attention_mask"].tolist() == [[1] * 7]  # the losses' token mask: every token
    plain = _packed([[torch.tensor([7, 8, 2]), torch.tensor([9, 2])]], CLMCollator(0))
    assert "position_ids" not in plain and plain["labels"].tolist() == [[7, 8, 2, 9, 2]]


@pytest.mark.parametrize("which", ["student", "teacher"])
def test_causal_lm_documents_see_only_themselves(which):
    model = (gpt2(3, 32, seed=1) if which == "student" else gpt2(4, 48, seed=2)).eval()
    adapter = ModelAdapter(model)
    docs = _documents()
    layers = [0, 1]
    with torch.no_grad():
        packed = adapter(_packed(docs, CLMCollator(0, document_mask=True)), layers)
        flat = adapter(_packed(docs, CLMCollator(0)), layers)  # the old packing: attention across documents
        worst, worst_flat = 0.0, 0.0
        for r, row in enumerate(docs):
            at = 0
            for doc in row:
                alone = adapter(_alone(doc, CLMCollator(0)), layers)
                cut = slice(at, at + len(doc))
                worst = max(
                    worst,
                    (packed.logits[r, cut] - alone.logits[0]).abs().max().item(),
                    *((p[r, cut] - a[0]).abs().max().item() for p, a in zip(packed.hidden_states, alone.hidden_states)),
                )
                worst_flat = max(worst_flat, (flat.logits[r, cut] - alone.logits[0]).abs().max().item())
                at += len(doc)
    assert worst <= 1e-5, worst
    assert worst_flat > 1e-2  # without the document mask, a document attends to the one before it


def test_masked_lm_documents_see_only_themselves():
    adapter = ModelAdapter(bert(2, 32, "mlm", seed=3).eval())
    docs = _documents(1)
    positions = None
    with torch.no_grad():
        examples = [{"input_ids": torch.cat(row), "doc_starts": np.cumsum([len(d) for d in row])[:-1]} for row in docs]
        positions = document_positions(examples, 24)[0]
        batch = {
            "input_ids": torch.stack([e["input_ids"] for e in examples]),
            "attention_mask": torch.ones(2, 24, dtype=torch.long),
            "position_ids": positions,
        }
        packed = adapter(batch).logits
        worst = 0.0
        for r, row in enumerate(docs):
            at = 0
            for doc in row:
                alone = adapter({"input_ids": doc[None], "attention_mask": torch.ones(1, len(doc))}).logits
                worst = max(worst, (packed[r, at : at + len(doc)] - alone[0]).abs().max().item())
                at += len(doc)
    assert worst <= 1e-5, worst


class _Tokenizer:
    mask_token_id, pad_token_id, eos_token_id = 4, 0, 3
    all_special_ids = [0, 1, 2, 3, 4]

    def __len__(self):
        return VOCAB


def test_mlm_collator_restarts_positions():
    out = _packed([[torch.tensor([7, 8, 9]), torch.tensor([10, 11])]], MLMCollator(_Tokenizer(), document_mask=True))
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1]]


def _recipes():
    def student():
        return gpt2(3, 32, seed=1)

    teacher = gpt2(4, 48, seed=2)
    torch.manual_seed(4)
    filters = TaskFilters([0, 1], 32, 48), TaskFilters([1, 2], 48, 48)
    with torch.no_grad():
        for f in filters:
            for p in f.parameters():
                p.mul_(3)
    return {
        "kd": KD(student(), teacher, task_alpha=0.5, kl_alpha=1.0),
        "lwd": LWD(
            student(), teacher, explicit_map([(0, 1), (1, 2)], 3, 4), task_alpha=0.5, kl_alpha=1.0, mse_alpha=2.0
        ),
        "ted": TED(student(), teacher, *filters, task_alpha=0.5, kl_alpha=1.0, mse_alpha=2.0),
        "dwt": DWT(student(), teacher, alpha_h=1.0, alpha_s=2.0, alpha_s_end=None),
    }


def _counts(batch) -> dict:
    """The rows each term averages over: "task" the shifted labels that are not -100, the others every token."""
    task = int((batch["labels"][:, 1:] != -100).sum())
    tokens = int(batch["attention_mask"].sum())
    return {"task": task, "kd": tokens, "mse": tokens}


@pytest.mark.parametrize("method", ["kd", "lwd", "ted", "dwt"])
def test_recipe_terms_on_a_packed_batch_are_the_sum_over_its_documents(method):
    recipe = _recipes()[method].eval()
    docs = _documents(2)
    packed_batch = _packed(docs, CLMCollator(0, document_mask=True))
    with torch.no_grad():
        packed = recipe(packed_batch)
        sums = {name: 0.0 for name in packed.terms}
        for row in docs:
            for doc in row:
                alone_batch = _alone(doc, CLMCollator(0))
                alone = recipe(alone_batch)
                for name, value in alone.terms.items():
                    sums[name] += float(value) * _counts(alone_batch)[name]
    counts = _counts(packed_batch)
    assert set(packed.terms) >= {"task", "kd"}
    for name, value in packed.terms.items():
        got = float(value) * counts[name]
        assert abs(got - sums[name]) <= 1e-4 * abs(sums[name]) + 1e-6, (name, got, sums[name])
    total = sum(packed.weights[name] * float(value) for name, value in packed.terms.items())
    assert abs(float(packed.loss) - total) <= 1e-5 * abs(total) + 1e-6
