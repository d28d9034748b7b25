"""fastted's recipes under transformers.Trainer and TRL's SFTTrainer: real Trainer steps on tiny models with stock
datasets and collators; train, evaluate, checkpoint, resume to identical losses and weights, reload the student
with from_pretrained."""

import math

import datasets
import pytest
import torch
import transformers as tf

from fastted import KD, RAILKD, TED, CoDIR, RandomLayerMap, TaskFilters
from fastted.integrations import RECIPE_STATE, DistillationMixin, DistillationTrainer, load_recipe_checkpoint
from tests.tiny_models import LABELS, WORDS, bert, gpt2, word_tokenizer

STEPS = 6


def _texts(n, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 12, (n,), generator=g)
    words = torch.randint(0, len(WORDS), (n, 12), generator=g)
    labels = torch.randint(0, LABELS, (n,), generator=g)
    return {
        "text": [" ".join(WORDS[int(w)] for w in words[i, : lengths[i]]) for i in range(n)],
        "label": [int(x) for x in labels],
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tokenizer = word_tokenizer(tmp_path_factory.mktemp("tok"))
    split = {name: datasets.Dataset.from_dict(_texts(n, seed)) for name, n, seed in (("train", 48, 1), ("test", 16, 2))}
    split = {
        k: v.map(lambda b: tokenizer(b["text"], truncation=True, max_length=32), batched=True) for k, v in split.items()
    }
    return tokenizer, split


def _recipe(kind):
    student, teacher = bert(2, 32, seed=1), bert(4, 48, seed=2)
    torch.manual_seed(5)
    if kind == "kd":
        return KD(student, teacher, temperature=2.0)
    if kind == "codir":
        return CoDIR(student, teacher, bank_size=16, proj_dim=8, crd_alpha=1.0)
    if kind == "railkd":
        return RAILKD(student, teacher, RandomLayerMap(2, 4, per="step", seed=3), proj_dim=8)
    return TED(student, teacher, TaskFilters([0, 1], 32, 48), TaskFilters([1, 3], 48, 48))


def _trainer(kind, data, out, **overrides):
    tokenizer, split = data
    settings = dict(
        output_dir=str(out),
        max_steps=STEPS,
        per_device_train_batch_size=8,
        learning_rate=2e-3,
        save_strategy="steps",
        save_steps=3,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        per_device_eval_batch_size=8,
        lr_scheduler_type="linear",
        warmup_steps=1,
    )
    settings.update(overrides)
    return DistillationTrainer(
        recipe=_recipe(kind),
        args=tf.TrainingArguments(**settings),
        train_dataset=split["train"],
        eval_dataset=split["test"],
        processing_class=tokenizer,
        data_collator=tf.DataCollatorWithPadding(tokenizer),
    )


def _losses(trainer):
    return {r["step"]: r["loss"] for r in trainer.state.log_history if "loss" in r}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["kd", "codir", "railkd", "ted"])
def test_train_save_resume_reload(kind, data, tmp_path):
    whole = _trainer(kind, data, tmp_path / "whole")
    whole.train()
    losses = _losses(whole)
    assert sorted(losses) == list(range(1, STEPS + 1)) and all(math.isfinite(v) for v in losses.values())
    terms = [r for r in whole.state.log_history if "loss" in r][0]
    assert "task_loss" in terms and "kd_loss" in terms  # the recipe's terms beside the loss

    # A fresh trainer and recipe resumed from the step-3 checkpoint: steps 4-6 as in the whole run.
    resumed = _trainer(kind, data, tmp_path / "whole")
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-3"))
    again = _losses(resumed)  # steps 1-3 from the checkpoint's trainer state, 4-6 trained again
    assert sorted(again) == list(range(1, STEPS + 1))
    for step in (4, 5, 6):
        assert again[step] == pytest.approx(losses[step], rel=1e-5, abs=1e-7), step
    for (name, p), q in zip(resumed.recipe.named_parameters(), whole.recipe.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    if kind == "codir":
        torch.testing.assert_close(resumed.recipe.bank.vectors, whole.recipe.bank.vectors)

    metrics = whole.evaluate()
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and math.isfinite(metrics["eval_loss"])

    whole.save_model(str(tmp_path / "student"))
    reloaded = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "student")
    for (name, p), q in zip(whole.recipe.student.named_parameters(), reloaded.parameters()):
        assert torch.equal(p.detach(), q.detach()), name
    assert (tmp_path / "student" / "tokenizer.json").exists()
    if kind == "ted":
        filters = TaskFilters.from_pretrained(str(tmp_path / "student"))
        for p, q in zip(filters.parameters(), whole.recipe.student_filters.parameters()):
            assert torch.equal(p, q.detach())


def test_checkpoint_holds_the_recipe_state_and_refuses_another_recipe(data, tmp_path):
    trainer = _trainer("codir", data, tmp_path, max_steps=3)
    trainer.train()
    checkpoint = tmp_path / "checkpoint-3"
    state = torch.load(checkpoint / RECIPE_STATE, weights_only=True)
    assert any(k.startswith("bank.") for k in state) and not any(k.startswith("student.") for k in state)
    assert "_extra_state" in state and "bank._extra_state" in state  # the forward count, the bank's generator
    fresh = _recipe("codir")
    load_recipe_checkpoint(fresh, str(checkpoint))
    for (name, p), q in zip(fresh.state_dict().items(), trainer.recipe.state_dict().values()):
        if torch.is_tensor(p):
            assert torch.equal(p, q), name
    with pytest.raises(ValueError, match="does not fit this RAILKD"):
        load_recipe_checkpoint(_recipe("railkd"), str(checkpoint))
    with pytest.raises(ValueError, match="has no recipe_state.pt"):
        load_recipe_checkpoint(fresh, str(tmp_path))


def test_bad_arguments(data, tmp_path):
    with pytest.raises(ValueError, match="recipe must be a fastted Recipe"):
        DistillationTrainer(recipe=bert(2, 32), args=tf.TrainingArguments(str(tmp_path), report_to=[]))
    with pytest.raises(ValueError, match="pass the recipe as recipe="):
        DistillationTrainer(
            model=bert(2, 32), recipe=_recipe("kd"), args=tf.TrainingArguments(str(tmp_path), report_to=[])
        )


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")  # SFTConfig's own
def test_trl_sft_trainer_distils_a_causal_lm(tmp_path):
    """TRL's SFTTrainer prepares a text dataset for a causal LM (tokenizes, packs nothing, pads, labels); the mixin
    trains KD on it, evaluates the perplexity and saves a student that reloads with from_pretrained."""
    trl = pytest.importorskip("trl")
    tokenizer = word_tokenizer(tmp_path / "tok", causal=True)
    student, teacher = gpt2(2, 32, seed=1), gpt2(3, 48, seed=2)

    class DistillationSFTTrainer(DistillationMixin, trl.SFTTrainer):
        pass

    texts = datasets.Dataset.from_dict({"text": _texts(32, 3)["text"]})
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=4,
        per_device_train_batch_size=8,
        learning_rate=2e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        max_length=16,
        per_device_eval_batch_size=8,
        dataset_text_field="text",
    )
    trainer = DistillationSFTTrainer(
        recipe=KD(student, teacher, temperature=1.0),
        args=args,
        train_dataset=texts,
        eval_dataset=texts.select(range(8)),
        processing_class=tokenizer,
    )
    trainer.train()
    losses = _losses(trainer)
    assert sorted(losses) == [1, 2, 3, 4] and losses[4] < losses[1]
    metrics = trainer.evaluate()
    assert math.exp(metrics["eval_loss"]) == pytest.approx(metrics["eval_perplexity"])
    trainer.save_model(str(tmp_path / "student"))
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    for p, q in zip(student.parameters(), reloaded.parameters()):
        assert torch.equal(p.detach(), q.detach())
