"""Checkpoints that prove themselves and runs that stop on a non-finite value.

Every damaged-checkpoint case damages the newest of three checkpoints of a finished run (steps 2, 4, 5) and runs
again: the run passes over it with a warning naming it and the checkpoint it resumes from, trains the lost
step again, and ends with the losses and weights of the uninterrupted run. Nothing damaged is deleted."""

import json
import math
import os

import pytest
import torch

from fastted.train.checkpoints import verify_checkpoint
from fastted.train.engine import CheckpointError, NonFiniteError
from fastted.train.trainer import CheckpointWarning, latest_checkpoint, read_metrics
from tests.train.test_trainer import STEPS, _Crash, train_run

pytestmark = pytest.mark.bad_input

MODEL_STATE = os.path.join("state", "mp_rank_00_model_states.pt")


def _losses(directory):
    return [r["loss"] for r in read_metrics(str(directory)) if "loss" in r]


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """The uninterrupted run: its losses and trained parameters."""
    directory = tmp_path_factory.mktemp("whole")
    _, recipe = train_run("railkd", directory, keep_last=3)
    return _losses(directory), [p.detach().clone() for p in recipe.parameters()]


def _finished_run(tmp_path):
    train_run("railkd", tmp_path, keep_last=3)
    root = tmp_path / "checkpoints"
    assert sorted(os.listdir(root)) == ["latest", "step-0000002", "step-0000004", "step-0000005"]
    for name in ("step-0000002", "step-0000004", "step-0000005"):
        assert verify_checkpoint(str(root / name)) is None
    return root


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt(path):
    """4 KiB of different bytes in the middle of the file (its size unchanged)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = bytes((b + 1) % 256 for b in data[middle : middle + 4096])
    path.write_bytes(bytes(data))


DAMAGE = {
    "model state truncated": lambda c: _truncate(c / MODEL_STATE),
    "model state empty": lambda c: (c / MODEL_STATE).write_bytes(b""),
    "model state corrupted": lambda c: _corrupt(c / MODEL_STATE),
    "rng state deleted": lambda c: (c / "rng-rank0.pt").unlink(),
    "rng state truncated": lambda c: _truncate(c / "rng-rank0.pt"),
    "trainer state deleted": lambda c: (c / "trainer.json").unlink(),
    "trainer state edited": lambda c: (c / "trainer.json").write_text(json.dumps({"step": 3, "stage": "railkd"})),
    "manifest deleted": lambda c: (c / "manifest.json").unlink(),
    "manifest torn": lambda c: (c / "manifest.json").write_text('{"format": 1, "fil'),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(damage, tmp_path, whole):
    root = _finished_run(tmp_path)
    DAMAGE[damage](root / "step-0000005")
    assert verify_checkpoint(str(root / "step-0000005")) is not None
    with pytest.warns(CheckpointWarning, match=r"step-0000005 is damaged \(.+\).*resuming from step-0000004"):
        summary, recipe = train_run("railkd", tmp_path, keep_last=3)
    assert summary["resumed_from"] == 4
    assert _losses(tmp_path) == whole[0]  # step 5 trained again, to the same loss, its line not doubled
    for p, q in zip(recipe.parameters(), whole[1]):
        assert torch.equal(p.detach(), q)
    assert verify_checkpoint(str(root / "step-0000005")) is None  # rewritten by the resumed run


@pytest.mark.parametrize("pointer", ["step-0000009", "../../elsewhere", "/tmp", ""])
def test_latest_naming_no_checkpoint_of_the_folder_is_passed_over(pointer, tmp_path, whole):
    root = _finished_run(tmp_path)
    _corrupt(root / "step-0000005" / MODEL_STATE)  # so that resuming must pick step 4 by itself
    (root / "latest").write_text(pointer)
    with pytest.warns(CheckpointWarning) as caught:
        path = latest_checkpoint(str(tmp_path))
    assert path == str(root / "step-0000004")
    text = " ".join(str(w.message) for w in caught)
    assert "step-0000005 is damaged" in text and (pointer == "step-0000009") == ("names step-0000009" in text)


def test_no_intact_checkpoint_is_an_error_and_nothing_is_deleted(tmp_path):
    root = _finished_run(tmp_path)
    for name in ("step-0000002", "step-0000004", "step-0000005"):
        _corrupt(root / name / MODEL_STATE)
    with pytest.raises(
        CheckpointError,
        match=r"checkpoints: no intact checkpoint \(step-0000005 is damaged .*"
        r"set resume=false to start over",
    ):
        train_run("railkd", tmp_path, keep_last=3)
    assert sorted(os.listdir(root)) == ["latest", "step-0000002", "step-0000004", "step-0000005"]


def test_latest_naming_a_missing_checkpoint_and_no_other_is_an_error(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / "latest").write_text("step-0000004")
    with pytest.raises(CheckpointError, match="latest names step-0000004, which is not in .*resume=false"):
        train_run("railkd", tmp_path)


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path, whole):
    with pytest.raises(_Crash):
        train_run("railkd", tmp_path, crash_at=4, keep_last=3)  # dies in step 5, after the step-4 checkpoint
    metrics = tmp_path / "metrics.jsonl"
    with open(metrics, "a", encoding="utf-8") as f:
        f.write('{"step": 5, "loss": 0.12')  # a write cut short by a kill
    with pytest.warns(CheckpointWarning, match=r"metrics.jsonl, line 5: a torn last line"):
        summary, _ = train_run("railkd", tmp_path, keep_last=3)
    assert summary["resumed_from"] == 4
    assert _losses(tmp_path) == whole[0]


def test_a_damaged_metrics_line_before_the_last_is_an_error_naming_it(tmp_path):
    train_run("railkd", tmp_path)
    metrics = tmp_path / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    lines[1] = lines[1][:20]
    metrics.write_text("\n".join(lines) + "\n")
    with pytest.raises(CheckpointError, match=r"metrics.jsonl, line 2: not a JSON record"):
        train_run("railkd", tmp_path)


def test_a_rerun_of_a_finished_run_adds_no_line(tmp_path):
    calls = []

    def evaluate(engine):
        calls.append(1)
        return {"accuracy": 0.5}

    train_run("railkd", tmp_path, evaluate=evaluate)
    before = read_metrics(str(tmp_path))
    summary, _ = train_run("railkd", tmp_path, evaluate=evaluate)
    assert summary["resumed_from"] == STEPS and len(calls) == 2
    assert read_metrics(str(tmp_path)) == before
    assert [r["step"] for r in before if "eval" in r] == [STEPS]


# --------------------------------------------------------------------------- non-finite values stop the run


def _inject(at_step, what):
    """An engine hook making step ``at_step`` (0-based) non-finite: its loss and "kd" term, or its gradients
    alone (the loss stays finite)."""

    def hook(engine):
        recipe = engine.recipe
        forward = recipe.forward

        def poisoned(batch, step=None, **kwargs):
            out = forward(batch, step=step, **kwargs)
            if step == at_step and what == "loss":
                out.loss = out.loss * math.nan
                out.terms["kd"] = out.terms["kd"] * math.nan
            if step == at_step and what == "gradient":
                out.loss.register_hook(lambda g: g * math.inf)
            return out

        recipe.forward = poisoned

    return hook


@pytest.mark.parametrize(
    "what, at_step, terms, good", [("loss", 2, "loss, kd, gradient norm", 2), ("gradient", 4, "gradient norm", 4)]
)
def test_a_non_finite_step_stops_the_run_before_it_is_saved(what, at_step, terms, good, tmp_path):
    """No host sync until a checkpoint (log_every 5): a NaN loss at step 3 stops the run at the step-4 save, an
    infinite gradient (finite loss) at step 5 at the last save, each naming the step, what was not finite and
    the last good checkpoint; nothing is saved after it."""
    with pytest.raises(NonFiniteError) as info:
        train_run("railkd", tmp_path, log_every=5, engine_hook=_inject(at_step, what))
    message = str(info.value)
    assert len(message.splitlines()) == 1
    assert f"non-finite {terms} at step {at_step + 1} of {STEPS}" in message
    good = f"step-{good:07d}"
    assert f"Last good checkpoint: {tmp_path / 'checkpoints' / good}" in message
    assert sorted(os.listdir(tmp_path / "checkpoints"))[-1] == good
    assert latest_checkpoint(str(tmp_path)).endswith(good)


def test_non_finite_weights_are_never_saved(tmp_path):
    """Weights made NaN by the second optimizer step (its loss and gradient norm finite): the step-2 checkpoint
    is refused."""

    def hook(engine):
        step, calls = engine.step, []

        def poisoned_step():
            norm = step()
            calls.append(1)
            if len(calls) == 2:
                with torch.no_grad():
                    next(engine.recipe.parameters()).fill_(math.nan)  # as an optimizer gone wrong
            return norm

        engine.step = poisoned_step

    with pytest.raises(NonFiniteError, match="after step 2 of 5: non-finite weights .*Last good checkpoint: none"):
        train_run("railkd", tmp_path, log_every=5, engine_hook=hook)
    assert not (tmp_path / "checkpoints").exists() or os.listdir(tmp_path / "checkpoints") == []


# --------------------------------------------------------------------------- the model export


def test_a_kill_during_the_model_export_leaves_the_previous_export(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from fastted.methods import FineTune
    from fastted.train.pipeline import _export
    from tests.tiny_models import bert

    class Tokenizer:
        def __init__(self, fail=False):
            self.fail = fail

        def save_pretrained(self, directory):
            if self.fail:
                raise _Crash()  # the weights are written, the tokenizer not: as a kill midway
            with open(os.path.join(directory, "tokenizer.json"), "w") as f:
                f.write("{}")

    first, second = FineTune(bert(2, 32, seed=1)), FineTune(bert(2, 32, seed=2))
    _export(str(tmp_path), first, Tokenizer(), {"steps": 1})
    with pytest.raises(_Crash):
        _export(str(tmp_path), second, Tokenizer(fail=True), {"steps": 2})
    assert sorted(os.listdir(tmp_path)) == ["model", "model.tmp", "result.json"]
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model")
    for p, q in zip(loaded.parameters(), first.student.parameters()):
        assert torch.equal(p, q)  # the first export, whole
    assert json.loads((tmp_path / "result.json").read_text()) == {"steps": 1}
    _export(str(tmp_path), second, Tokenizer(), {"steps": 2})  # the rerun replaces it and clears the leftover
    assert sorted(os.listdir(tmp_path)) == ["model", "result.json"]
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model")
    for p, q in zip(loaded.parameters(), second.student.parameters()):
        assert torch.equal(p, q)
