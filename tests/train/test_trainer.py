"""The thin loop in one process: data order, atomic checkpoints, keep-last-N, and resumes that continue exactly
(CoDIR's memory bank and RAIL-KD's per-step draws included)."""

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fastted import RAILKD, CoDIR, RandomLayerMap
from fastted.train.config import EngineConfig, TrainConfig
from fastted.train.data import ClassificationCollator, data_order
from fastted.train.engine import Engine
from fastted.train.trainer import Training, latest_checkpoint, micro_batches, read_metrics, run
from tests.tiny_models import bert

STEPS = 5


def _dataset(n=40, tokens=10):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 97, (n, tokens), generator=g)
    lengths = torch.randint(4, tokens + 1, (n,), generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    return [{"input_ids": ids[i, : lengths[i]].tolist(), "label": int(labels[i]), "index": i} for i in range(n)]


def _recipe(kind):
    student, teacher = bert(2, 32, seed=1), bert(3, 48, seed=2)
    torch.manual_seed(5)
    if kind == "codir":
        return CoDIR(student, teacher, bank_size=16, proj_dim=8, crd_alpha=1.0, impl="reference")
    return RAILKD(student, teacher, RandomLayerMap(2, 3, per="step", seed=3), proj_dim=8, impl="reference")


class _Crash(Exception):
    pass


def train_run(
    kind, directory, crash_at=None, save_every=2, keep_last=2, engine_hook=None, log_every=1, evaluate=None, watch=None
):
    """Train the tiny ``kind`` recipe for STEPS steps in ``directory`` (resuming when it holds a checkpoint);
    ``crash_at`` raises _Crash in the collator after that many micro batches."""
    recipe = _recipe(kind)
    train = TrainConfig(
        batch_size=8,
        max_steps=STEPS,
        lr=5e-3,
        warmup_ratio=0.2,
        save_every=save_every,
        keep_last=keep_last,
        log_every=log_every,
    )
    engine = Engine(recipe, train, EngineConfig(impl="reference"), STEPS, torch.device("cpu"))
    if engine_hook is not None:
        engine_hook(engine)
    collate = ClassificationCollator(0)
    calls = {"n": 0}

    def collator(examples, generator=None):
        calls["n"] += 1
        if crash_at is not None and calls["n"] > crash_at:
            raise _Crash()
        return collate(examples, generator)

    training = Training(
        name=kind,
        directory=str(directory),
        recipe=recipe,
        dataset=_dataset(),
        collator=collator,
        train=train,
        progress=False,
        config_text="kind: " + kind + "\n",
        evaluate=evaluate,
        watch=watch,
    )
    return run(training, engine), recipe


def test_data_order_is_a_pure_function_of_seed_and_epoch():
    a, b = data_order(50, 3, 1), data_order(50, 3, 1)
    assert np.array_equal(a, b) and sorted(a) == list(range(50))
    assert not np.array_equal(a, data_order(50, 3, 2)) and not np.array_equal(a, data_order(50, 4, 1))


def test_micro_batches_cover_the_global_batch_once():
    """Two ranks x two accumulation steps: the four micro batches are the step's global batch, each example once."""
    data = [{"input_ids": [3 + i], "label": 0} for i in range(32)]
    training = SimpleNamespace(dataset=data, train=SimpleNamespace(batch_size=8), seed=1, collator=lambda ex, g: ex)
    seen = []
    for rank in range(2):
        engine = SimpleNamespace(micro_batch=2, accumulation=2, world=2, rank=rank)
        for step in (0, 5):
            seen += [(step, e["input_ids"][0]) for _, batch in micro_batches(training, step, engine) for e in batch]
    for step in (0, 5):
        epoch, pos = divmod(step, 4)
        want = {3 + int(i) for i in data_order(32, 1, epoch)[pos * 8 : (pos + 1) * 8]}
        got = [i for s, i in seen if s == step]
        assert sorted(got) == sorted(want) and len(got) == 8


@pytest.mark.parametrize("kind", ["codir", "railkd"])
def test_resume_after_a_crash_continues_exactly(kind, tmp_path):
    whole, _ = train_run(kind, tmp_path / "whole")
    losses = [r["loss"] for r in read_metrics(str(tmp_path / "whole")) if "loss" in r]
    assert len(losses) == STEPS
    with pytest.raises(_Crash):  # dies during step 4 (after the step-2 checkpoint, before the step-4 one)
        train_run(kind, tmp_path / "cut", crash_at=3)
    assert latest_checkpoint(str(tmp_path / "cut")).endswith("step-0000002")
    summary, recipe = train_run(kind, tmp_path / "cut")
    assert summary["resumed_from"] == 2
    again = [r["loss"] for r in read_metrics(str(tmp_path / "cut")) if "loss" in r]
    assert [r["step"] for r in read_metrics(str(tmp_path / "cut")) if "loss" in r] == [1, 2, 3, 4, 5]
    assert again == pytest.approx(losses, rel=1e-6, abs=1e-9)
    if kind == "codir":
        assert int(recipe.bank.filled.sum()) > 0  # the bank was restored and filled further


def _scores(*values):
    """A watch's score that returns ``values`` in turn, one a take."""
    taken = iter(values)
    return lambda engine: next(taken)


def test_a_watch_ends_training_when_its_score_stops_improving_and_a_resume_trains_no_further(tmp_path):
    """Takes every step, patience 2: 0.5, 0.6 (best), 0.6, 0.55: two takes without a gain end training at step 4
    of 5, in a checkpoint marked stopped; the run again trains nothing."""
    from fastted.train.trainer import Watch

    watch = Watch(_scores(0.5, 0.6, 0.6, 0.55), every=1, patience=2, name="probe")
    result, _ = train_run("railkd", tmp_path, watch=watch, save_every=0)
    assert result["watch"] == {"best": 0.6, "stopped_at": 4} and result["steps"] == STEPS
    records = read_metrics(str(tmp_path))
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert [(r["step"], r["probe"], r["best"]) for r in records if "probe" in r] == [
        (1, 0.5, 0.5),
        (2, 0.6, 0.6),
        (3, 0.6, 0.6),
        (4, 0.55, 0.6),
    ]
    assert latest_checkpoint(str(tmp_path)).endswith("step-0000004")
    again, _ = train_run("railkd", tmp_path, watch=Watch(_scores(), every=1, patience=2, name="probe"), save_every=0)
    assert again["resumed_from"] == 4 and again["watch"] == {"best": 0.6, "stopped_at": 4}
    assert [r["step"] for r in read_metrics(str(tmp_path)) if "loss" in r] == [1, 2, 3, 4]


def test_a_watch_resumed_before_its_end_counts_on_from_its_checkpoint(tmp_path):
    """Killed during step 4 (after the step-2 checkpoint): the resumed run's watch starts from step 2's best
    (0.6) and stops at step 4 as the whole run did; a non-finite score is an error that names it."""
    from fastted.train.engine import NonFiniteError
    from fastted.train.trainer import Watch

    with pytest.raises(_Crash):
        train_run("railkd", tmp_path, crash_at=3, watch=Watch(_scores(0.5, 0.6, 0.7), every=1, patience=2))
    result, _ = train_run("railkd", tmp_path, watch=Watch(_scores(0.6, 0.55), every=1, patience=2))
    assert result["resumed_from"] == 2 and result["watch"] == {"best": 0.6, "stopped_at": 4}
    with pytest.raises(NonFiniteError, match="the watch's holdout score is nan at step 1"):
        train_run("railkd", tmp_path / "nan", watch=Watch(_scores(float("nan")), every=1, patience=2))


def _fingerprint(engine) -> list[float]:
    """Each trained parameter's sum and norm (float64): equal lists, equal weights, for any practical purpose."""
    return [v for p in engine.recipe.parameters() for v in (float(p.double().sum()), float(p.double().norm()))]


def test_a_watch_that_keeps_its_best_ends_on_the_best_takes_weights(tmp_path):
    """keep_best (a dev-set selection): takes every step and at the last, best at step 2; the run ends restored to
    step 2's weights (what the final evaluation sees), whose checkpoint outlives keep_last; resumed, it ends there
    again."""
    from fastted.train.trainer import Watch

    seen, values = {}, iter([0.5, 0.9, 0.6, 0.7, 0.65])

    def score(engine):
        seen[len(seen) + 1] = _fingerprint(engine)
        return next(values)

    def final(engine):
        return {"weights": _fingerprint(engine)}

    watch = Watch(score, every=1, patience=None, keep_best=True)
    result, _ = train_run("railkd", tmp_path, watch=watch, save_every=0, keep_last=1, evaluate=final)
    assert result["watch"] == {"best": 0.9, "stopped_at": None, "best_step": 2} and len(seen) == STEPS
    assert result["eval"]["weights"] == seen[2] and seen[5] != seen[2]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step-0000002", "step-0000005"]
    again, _ = train_run("railkd", tmp_path, watch=watch, save_every=0, keep_last=1, evaluate=final)
    assert again["resumed_from"] == STEPS and again["watch"]["best_step"] == 2
    assert again["eval"]["weights"] == seen[2]


def test_a_kill_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    def hook(engine):
        real = engine.save

        def save(directory):
            real(directory)
            if directory.endswith("step-0000004.tmp"):
                raise _Crash()  # files written, rename not done: as a kill before the commit

        engine.save = save

    with pytest.raises(_Crash):
        train_run("railkd", tmp_path, engine_hook=hook)
    root = tmp_path / "checkpoints"
    assert latest_checkpoint(str(tmp_path)).endswith("step-0000002")
    assert (root / "step-0000004.tmp").is_dir() and not (root / "step-0000004").exists()
    summary, _ = train_run("railkd", tmp_path)  # resumes from step 2; the leftover is replaced
    assert summary["resumed_from"] == 2
    assert sorted(os.listdir(root)) == ["latest", "step-0000004", "step-0000005"]


def test_keep_last_n(tmp_path):
    train_run("railkd", tmp_path, save_every=1, keep_last=3)
    kept = sorted(d for d in os.listdir(tmp_path / "checkpoints") if d.startswith("step-"))
    assert kept == ["step-0000003", "step-0000004", "step-0000005"]
    assert latest_checkpoint(str(tmp_path)).endswith("step-0000005")
    lines = read_metrics(str(tmp_path))
    assert all(set(r["terms"]) >= {"task", "kd"} for r in lines if "loss" in r)


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """batch 8 as two accumulated micro batches of 4 takes the same steps as one batch of 8 (RAIL-KD: every
    term is a mean over examples, so the two means of 4 average to the mean of 8)."""

    def losses(directory, micro):
        recipe = _recipe("railkd")
        train = TrainConfig(batch_size=8, micro_batch_size=micro, max_steps=3, lr=5e-3, warmup_ratio=0.0)
        engine = Engine(recipe, train, EngineConfig(impl="reference"), 3, torch.device("cpu"))
        assert engine.accumulation == (1 if micro is None else 8 // micro)
        training = Training(
            name="acc",
            directory=str(directory),
            recipe=recipe,
            dataset=_dataset(),
            collator=ClassificationCollator(0),
            train=train,
            progress=False,
        )
        run(training, engine)
        return [r["loss"] for r in read_metrics(str(directory)) if "loss" in r], recipe

    whole, a = losses(tmp_path / "whole", None)
    split, b = losses(tmp_path / "split", 4)
    assert split == pytest.approx(whole, rel=1e-5)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)


def test_metrics_go_to_tensorboard_when_installed(tmp_path, monkeypatch):
    import sys
    import types

    from fastted.train.trainer import Metrics

    written = []

    class Writer:
        def __init__(self, logdir):
            written.append(("dir", logdir))

        def add_scalar(self, key, value, step):
            written.append((key, value, step))

        def close(self):
            written.append(("closed",))

    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = Writer
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    metrics = Metrics(str(tmp_path), True, 0)
    metrics.log(
        {"step": 3, "loss": 1.5, "terms": {"task": 1.0, "mse": 0.5}, "layer_losses": [0.2, 0.3], "training": "x"}
    )
    metrics.close()
    assert written[0] == ("dir", os.path.join(str(tmp_path), "tensorboard"))
    assert set(written[1:-1]) == {
        ("loss", 1.5, 3),
        ("terms/task", 1.0, 3),
        ("terms/mse", 0.5, 3),
        ("layer_losses/0", 0.2, 3),
        ("layer_losses/1", 0.3, 3),
    }
    assert written[-1] == ("closed",)
    assert read_metrics(str(tmp_path))[0]["terms"] == {"task": 1.0, "mse": 0.5}


@pytest.mark.parametrize("task", ["clm", "mlm"])
def test_the_lm_evaluation_loss_is_the_full_logits_cross_entropy(task, monkeypatch):
    """evaluate_model's LM loss, its logits made 7 token rows at a time from the head's input, against the
    cross-entropy of the model's own whole logits in float64 (labels shifted for clm)."""
    import fastted.train.trainer as trainer
    from fastted.models import ModelAdapter
    from tests.tiny_models import batch, gpt2

    monkeypatch.setattr(trainer, "EVAL_ROWS", 7)
    model = (gpt2(2, 16, seed=4) if task == "clm" else bert(2, 16, "mlm", seed=4)).double().eval()
    b = batch(task, 3)
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        labels = b["labels"]
        if task == "clm":
            logits, labels = logits[:, :-1], labels[:, 1:]
        ref = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
        loss, count = trainer.lm_loss_sum(ModelAdapter(model), b)
    assert count == int((labels != -100).sum()) and count > 14  # more than two chunks
    assert loss == pytest.approx(float(ref), rel=1e-6)
