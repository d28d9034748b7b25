"""fastted's recipes inside Hugging Face's ``transformers.Trainer`` and the trainers built on it (TRL's).

::

    from fastted import TED
    from fastted.integrations import DistillationTrainer

    trainer = DistillationTrainer(recipe=TED(student, teacher, ...), args=TrainingArguments(...),
                                  train_dataset=tokenized, eval_dataset=tokenized_test, processing_class=tokenizer)
    trainer.train()                      # resume_from_checkpoint=True continues exactly
    trainer.save_model("student")        # AutoModel...from_pretrained("student") (+ TED's filters.safetensors)

:class:`DistillationMixin` puts the same behaviour in front of any
``transformers.Trainer`` subclass, e.g. TRL's ``SFTTrainer`` (which prepares a
text or chat dataset for a causal LM)::

    class DistillationSFTTrainer(DistillationMixin, trl.SFTTrainer):
        pass

    DistillationSFTTrainer(recipe=KD(student, teacher), args=SFTConfig(...), train_dataset=chats)

What the mixin changes in the trainer it is mixed into:

- The trainer is built around the student (a ``PreTrainedModel``: its forward
  signature picks the dataset's columns, TRL reads its config), then the
  recipe takes the student's place as ``trainer.model``, so the optimizer
  trains every parameter of the recipe (the student, TED's filters, LWD's
  projections, CoDIR's projections) and the teacher stays frozen.
- The loss is the recipe's at the trainer's optimizer step
  (``recipe(batch, step=state.global_step, epoch=...)``): DWT's schedule and
  RAIL-KD's draws follow the optimizer step, so a resumed run repeats them.
  The recipe's terms are logged beside the loss (averaged over the steps of a
  logging interval). Batch keys the student's forward does not take (TRL's
  ``completion_mask``, a dataset's extra columns) are left out, except
  ``labels`` and ``index`` (CoDIR's example ids, added to a ``datasets``
  training set that lacks them).
- Evaluation runs the student alone: the task loss, and the accuracy
  (classification) or the perplexity (language modelling) unless
  ``compute_metrics`` is given.
- A checkpoint holds the student as a ``from_pretrained`` folder (with TED's
  filters), ``recipe_state.pt`` (everything else the recipe holds: filters,
  projections, CoDIR's memory bank, the forward count; tensors, numbers and
  strings, loaded with ``weights_only=True``) and the trainer's own files
  (optimizer, schedule, RNG, trainer state). ``save_model`` writes the
  student folder (and the tokenizer).

Not covered: DeepSpeed ZeRO-3 and FSDP under the Trainer (the recipe's state is
saved from the unsharded module; use ``fastted``'s own engine for sharded
runs) and PEFT-wrapped students.
"""

from __future__ import annotations

import inspect
import math
import os
from typing import Optional

import torch

from fastted.methods.base import Recipe
from fastted.models import task_loss

RECIPE_STATE = "recipe_state.pt"
_KEPT_KEYS = ("labels", "index")  # batch keys the recipes read beside the student's inputs


def _student_keys(recipe: Recipe) -> set[str]:
    """The keys of the recipe's state dict that hold the student model's parameters and buffers."""
    model = recipe.student_model.model
    student = {id(t) for t in (*model.parameters(), *model.buffers())}
    return {k for k, v in recipe.state_dict(keep_vars=True).items() if torch.is_tensor(v) and id(v) in student}


def recipe_state(recipe: Recipe) -> dict:
    """The recipe's state dict without the student model's weights (those go to its ``from_pretrained`` folder)."""
    student = _student_keys(recipe)
    return {k: v for k, v in recipe.state_dict().items() if k not in student}


def load_recipe_checkpoint(recipe: Recipe, directory: str) -> None:
    """Restore what :class:`DistillationMixin` saved in ``directory`` into ``recipe``: the student through its
    class's ``from_pretrained`` (so tied and renamed weights load as transformers loads them), the rest from
    ``recipe_state.pt``. Raises a ValueError naming a missing file or a key that does not fit."""
    path = os.path.join(directory, RECIPE_STATE)
    if not os.path.isfile(path):
        raise ValueError(
            f"resume_from_checkpoint: {directory} has no {RECIPE_STATE}: it was not saved by a "
            f"fastted DistillationTrainer"
        )
    student = recipe.student_model.model
    saved = type(student).from_pretrained(directory)
    student.load_state_dict(saved.state_dict())  # copied into the student's own dtype and device
    state = torch.load(path, map_location="cpu", weights_only=True)
    missing, unexpected = recipe.load_state_dict(state, strict=False)
    student_keys = _student_keys(recipe)
    missing = [k for k in missing if k not in student_keys]
    if missing or unexpected:
        raise ValueError(
            f"resume_from_checkpoint: {path} does not fit this {type(recipe).__name__} (missing: "
            f"{missing[:5]}, unexpected: {unexpected[:5]}): resume with the recipe it was saved from"
        )


def _accuracy(prediction) -> dict:
    logits, labels = prediction.predictions, prediction.label_ids
    logits = logits[0] if isinstance(logits, tuple) else logits
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


class DistillationMixin:
    """Trains a fastted :class:`~fastted.methods.base.Recipe` under a ``transformers.Trainer`` subclass (see the
    module's docstring). Mix it in front: ``class T(DistillationMixin, SomeTrainer)``.

    Args:
        recipe: the recipe (a fastted Recipe: TED, LWD, KD, CoDIR, RAILKD, DWT, TEDStage1, FineTune, your own).
        *args, **kwargs: the trainer's own arguments (``args``, ``train_dataset``, ``eval_dataset``,
            ``data_collator``, ``processing_class``, ``compute_metrics``, ``callbacks`` ...), without ``model``.
    """

    def __init__(self, *args, recipe: Recipe, **kwargs):
        if not isinstance(recipe, Recipe):
            raise ValueError(
                f"recipe must be a fastted Recipe (TED, LWD, KD, CoDIR, RAILKD, DWT, ...), got {type(recipe).__name__}"
            )
        if "model" in kwargs or args:
            raise ValueError("pass the recipe as recipe=..., and no model: the trainer trains the recipe's student")
        student = recipe.student_model.model
        self.recipe = recipe
        self._task = recipe.student_model.task
        if kwargs.get("compute_metrics") is None and self._task == "classification":
            kwargs["compute_metrics"] = _accuracy
        train_dataset = kwargs.get("train_dataset")
        if getattr(recipe, "bank", None) is not None and train_dataset is not None:
            kwargs["train_dataset"] = with_index(train_dataset)
        super().__init__(model=student, **kwargs)
        # The recipe takes the student's place: the optimizer and the checkpoints cover all it trains.
        self.model = self.model_wrapped = recipe
        if getattr(self, "place_model_on_device", False):
            recipe.to(self.args.device)
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False  # the recipe's loss is a per-batch mean: the Trainer divides it by GA
        if not self.label_names:
            self.label_names = ["labels"]
        accepted = inspect.signature(student.forward).parameters
        self._batch_keys = set(accepted) | set(_KEPT_KEYS)
        self._term_sums: dict[str, torch.Tensor] = {}
        self._term_count = 0

    # ------------------------------------------------------------------ columns and batches

    def _set_signature_columns_if_needed(self) -> None:
        """The columns a dataset keeps: the student's forward arguments, the labels and ``index`` (the Trainer
        would read the recipe's forward, ``(batch, step, epoch)``, and drop every column)."""
        if self._signature_columns is None:
            self._signature_columns = sorted(self._batch_keys | {"label", "label_ids", *self.label_names})

    def _batch(self, inputs: dict) -> dict:
        return {k: v for k, v in inputs.items() if k in self._batch_keys}

    # ------------------------------------------------------------------ training

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        epoch = int(self.state.epoch or 0)
        out = model(self._batch(inputs), step=self.state.global_step, epoch=epoch)
        if model.training:
            for name, value in out.terms.items():
                self._term_sums[name] = self._term_sums.get(name, 0.0) + value.detach().float()
            self._term_count += 1
        return (out.loss, out) if return_outputs else out.loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        """The trainer's log, with the recipe's terms (their mean since the last log) when training."""
        if self._term_count and "loss" in logs:
            for name, total in self._term_sums.items():
                logs[f"{name}_loss"] = round(float(total) / self._term_count, 6)
            self._term_sums, self._term_count = {}, 0
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------ evaluation: the student alone

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        batch = self._batch(inputs)
        labels = batch.get("labels")
        with torch.no_grad():
            logits = self.recipe.student_model(batch).logits
            loss = None if labels is None else task_loss(logits.float(), labels, self._task).detach()
        if prediction_loss_only or self._task != "classification":
            return loss, None, None  # an LM's (B, T, V) logits are not gathered
        return loss, logits.detach(), labels

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        metrics = super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        loss = metrics.get(f"{metric_key_prefix}_loss")
        if self._task != "classification" and loss is not None:
            metrics[f"{metric_key_prefix}_perplexity"] = math.exp(min(loss, 50.0))
        return metrics

    # ------------------------------------------------------------------ saving and resuming

    def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.recipe.save_pretrained(output_dir)
        torch.save(recipe_state(self.recipe), os.path.join(output_dir, RECIPE_STATE))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_recipe_checkpoint(self.recipe, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        load_recipe_checkpoint(self.recipe, self.state.best_model_checkpoint)


def with_index(dataset):
    """A ``datasets.Dataset`` with an ``index`` column of example ids, if it lacks one: CoDIR's memory bank keys,
    and the rows a cached teacher reads (packed blocks carry theirs). Anything without columns is returned as is."""
    names = getattr(dataset, "column_names", None)
    if names is None or "index" in names:
        return dataset
    return dataset.add_column("index", list(range(len(dataset))))


def _trainer_class():
    from transformers import Trainer

    class DistillationTrainer(DistillationMixin, Trainer):
        """``transformers.Trainer`` training a fastted recipe: ``DistillationTrainer(recipe=..., args=...,
        train_dataset=..., eval_dataset=..., processing_class=...)``. See :mod:`fastted.integrations`."""

    DistillationTrainer.__module__ = __name__
    return DistillationTrainer


def __getattr__(name: str):
    if name == "DistillationTrainer":  # built on first use: importing fastted does not import the Trainer
        cls = _trainer_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
