"""TED: task-aware layer-wise distillation (Liang et al., ICML 2023), as its public code does it.

Stage I (:class:`TEDStage1`), once for the teacher and once for the student:
the model is frozen; a task-aware filter on each mapped layer is followed by
its own head, and the loss is the task loss averaged over the filters. Only
the filters and heads train.

Stage II (:class:`TED`): the student learns from the frozen teacher::

    loss = task_alpha * task + kl_alpha * KL(T = 2) + mse_alpha * mean_l MSE(F_s^l(S_l), F_t^l(H_l))

with the teacher and its filters frozen, the student and its filters trained
and the stage-I heads dropped. The filtered MSE of all layers is one fused
kernel launch; with ``fused_lm_head=True`` (language modelling) the task and
KL terms are one fused pass over both LM heads, without their logits.
:class:`~fastted.methods.lwd.LWD` and :class:`~fastted.methods.kd.KD` are
this recipe without filters.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from fastted.filters import ClassificationHead, TaskFilters
from fastted.mapping import LayerMap, interval_layers
from fastted.methods.base import Recipe, RecipeModels, RecipeOutput, register
from fastted.methods.layerwise import LAYERWISE_OLD_KEYS, LayerwiseRecipe, LayerwiseSettings
from fastted.models import weights_hash


class TEDStage1(Recipe):
    """TED's stage I: learn task-aware filters on a frozen model.

    Args:
        model: the frozen model (a fine-tuned teacher or student).
        filters: the filters to train; default: one per layer of the
            interval rule (``interval``), of width ``filter_dim``.
        interval, filter_dim, nonlinear, activation: build the default
            filters (see :class:`~fastted.filters.TaskFilters`).
        dropout: of the classification heads.
        model_dropout: the frozen model's own dropout on while the filters
            train (its weights stay frozen): the TED authors' stage I, whose
            model is in training mode. False (the default) runs it in eval mode.

    The heads: classification, one :class:`~fastted.filters.ClassificationHead`
    per filter; language modelling, the model's own (frozen) LM head applied
    to each filter's output when ``filter_dim`` is the hidden size, otherwise
    one ``Linear(filter_dim, vocab_size)`` per filter.
    """

    def __init__(
        self,
        model,
        filters: Optional[TaskFilters] = None,
        *,
        interval: int = 1,
        filter_dim: Optional[int] = None,
        nonlinear: bool = False,
        activation: str = "gelu",
        dropout: float = 0.1,
        model_dropout: bool = False,
        task: Optional[str] = None,
        impl: str = "auto",
    ):
        super().__init__(model, task=task, impl=impl, train_student=False)
        if not isinstance(model_dropout, bool):
            raise ValueError(f"model_dropout must be a bool, got {model_dropout!r}")
        self.model_dropout = model_dropout
        adapter = self.student_model
        if filters is None:
            filters = TaskFilters(
                interval_layers(adapter.num_layers, interval),
                adapter.hidden_size,
                filter_dim,
                nonlinear=nonlinear,
                activation=activation,
            )
        _check_filters("filters", filters, adapter)
        self.filters = filters
        d_f = filters.filter_dim
        if adapter.task == "classification":
            self.heads = nn.ModuleList(
                ClassificationHead(d_f, adapter.num_labels, dropout=dropout) for _ in range(len(filters))
            )
        elif d_f == adapter.hidden_size:
            self.heads = None
            self.hold_frozen(adapter.output_head(), "lm_head")
        else:
            self.heads = nn.ModuleList(nn.Linear(d_f, adapter.vocab_size) for _ in range(len(filters)))

    def train(self, mode: bool = True):
        """As every recipe's (the frozen model in eval mode), but with ``model_dropout`` the frozen model follows
        ``mode``: its dropout is on while the filters train, off while they are evaluated."""
        super().train(mode)
        if self.model_dropout:
            self.student.train(mode)
        return self

    def _probe_outputs(self, batch: dict) -> list[Tensor]:
        """Each filter's head's output (classification logits or LM logits) on ``batch``."""
        with torch.no_grad():  # the model is frozen: its states are constants for the filters
            out = self.student_model(batch, self.filters.layers)
        filtered = self.filters(out.hidden_states)
        heads = [self.lm_head] * len(filtered) if self.heads is None else self.heads
        return [head(x) for head, x in zip(heads, filtered)]

    def forward(self, batch: dict, *, step: Optional[int] = None, epoch: int = 0) -> RecipeOutput:
        self._schedule_step(step)
        outputs = self._probe_outputs(batch)
        losses = torch.stack([self.student_model.task_loss(logits, batch.get("labels")) for logits in outputs])
        return self._total({"task": losses.mean()}, {"task": 1.0}, layer_losses=losses.detach())

    @torch.no_grad()
    def probe_correct(self, batch: dict) -> Tensor:
        """Classification: how many of ``batch``'s examples each filter, read by its head as a probe, classifies
        right: (n_filters,) int64. Whether the filters are task-aware, layer by layer."""
        if self.heads is None or self.student_model.task != "classification":
            raise ValueError(
                f"probe_correct reads classification heads; this TEDStage1 is for {self.student_model.task!r}"
            )
        labels = batch["labels"]
        return torch.stack([(logits.argmax(-1) == labels).sum() for logits in self._probe_outputs(batch)])

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Save the model and its filters into one directory: what TED's stage II loads."""
        _save_with_filters(self.student, self.filters, directory)


def _save_with_filters(model, filters: Optional[TaskFilters], directory) -> None:
    model.save_pretrained(directory)
    if filters is not None:
        filters.save_pretrained(directory)


def load_stage1(directory: str | os.PathLike, model_class, device=None, **kwargs):
    """(model, filters) from a stage-I directory; ``model_class`` e.g. AutoModelForSequenceClassification."""
    model = model_class.from_pretrained(directory, **kwargs)
    filters = TaskFilters.from_pretrained(directory, device=device)
    return (model if device is None else model.to(device)), filters


def _check_filters_type(name: str, filters) -> None:
    if not isinstance(filters, TaskFilters):
        raise ValueError(f"{name} must be a TaskFilters, got {type(filters).__name__}")


def _check_filters(name: str, filters, adapter) -> None:
    _check_filters_type(name, filters)
    adapter.check_layers(f"{name}.layers", filters.layers)
    if filters.config["hidden_size"] != adapter.hidden_size:
        raise ValueError(
            f"{name} read width {filters.config['hidden_size']}, but the {type(adapter.model).__name__} "
            f"has hidden_size {adapter.hidden_size}"
        )


@dataclass
class TEDSettings(LayerwiseSettings):
    """TED's stage II: the weights of its task, KL and filtered-MSE terms (``distil.ted`` of a config)."""


@register(
    "ted",
    TEDSettings,
    old_keys=LAYERWISE_OLD_KEYS,
)
class TED(LayerwiseRecipe):
    """TED's stage II.

    Args:
        student, teacher: the models (Hugging Face models or ModelAdapters).
        student_filters, teacher_filters: from stage I; they fix the layer
            map (the student's filter i learns from the teacher's filter i).
        task_alpha, kl_alpha, mse_alpha: the weights of the three terms.
        temperature: of the KL term (TED: 2).
        mask_padding: average the MSE over the attention mask's tokens
            (default); False averages over every token, padding included, as
            TED's public code does.
        normalize_mse: divide each layer's MSE by its targets' mean square,
            so that one ``mse_alpha`` carries across models (see
            :class:`~fastted.methods.layerwise.LayerwiseRecipe`).
        tokenizers: (student's, teacher's), to check that they agree.
        fused_lm_head: language modelling ("mlm", "clm") only: the task and
            KL terms come from one :func:`~fastted.ops.fused_linear_kd.fused_linear_kd`
            call on the inputs of the two models' vocabulary projections
            (:meth:`~fastted.models.ModelAdapter.lm_head_parts`), so neither
            model's (B, T, V) logits are ever materialized; the teacher may
            be wider than the student, the vocabularies must match. The loss,
            its terms and the gradients are the unfused ones (up to rounding),
            given labels that are -100 outside the attention mask (as HF's
            collators make them; for "clm" with left padding, the label of
            the first real token, predicted from the last pad, is dropped):
            the fused task loss counts the labelled tokens inside the mask.
            ``RecipeOutput.logits`` is then None.
    """

    label = "TED"
    uses_stage1_filters = True

    def __init__(
        self,
        student,
        teacher,
        student_filters: TaskFilters,
        teacher_filters: TaskFilters,
        *,
        task_alpha: float = 1.0,
        kl_alpha: float = 1.0,
        mse_alpha: float = 1.0,
        temperature: float = 2.0,
        mask_padding: bool = True,
        normalize_mse: bool = False,
        tokenizers: Optional[tuple] = None,
        task: Optional[str] = None,
        impl: str = "auto",
        fused_lm_head: bool = False,
    ):
        for name, filters in (("student_filters", student_filters), ("teacher_filters", teacher_filters)):
            _check_filters_type(name, filters)
        if student_filters.filter_dim != teacher_filters.filter_dim or len(student_filters) != len(teacher_filters):
            raise ValueError(
                f"student_filters map {len(student_filters)} layers to width {student_filters.filter_dim} and "
                f"teacher_filters {len(teacher_filters)} layers to width {teacher_filters.filter_dim}: TED needs one "
                f"count and one filter_dim for both"
            )
        super().__init__(
            student,
            teacher,
            LayerMap(tuple(student_filters.layers), tuple(teacher_filters.layers)),
            task_alpha=task_alpha,
            kl_alpha=kl_alpha,
            mse_alpha=mse_alpha,
            temperature=temperature,
            mask_padding=mask_padding,
            normalize_mse=normalize_mse,
            tokenizers=tokenizers,
            task=task,
            impl=impl,
            fused_lm_head=fused_lm_head,
        )
        _check_filters("student_filters", student_filters, self.student_model)
        _check_filters("teacher_filters", teacher_filters, self.teacher_model)
        self.student_filters = student_filters
        self.hold_frozen(teacher_filters, "teacher_filters")

    def _mapped_layers(self, layer_map: LayerMap) -> LayerMap:
        # the filters' layers: __init__ checks them against the models as the filters' own, by their names
        return layer_map

    @classmethod
    def _config_models(cls, models: RecipeModels) -> tuple:
        if not isinstance(models.filters, tuple) or len(models.filters) != 2:
            raise ValueError(
                f"TED needs models.filters = (student's, teacher's) stage-I TaskFilters, got "
                f"{type(models.filters).__name__}"
            )
        return (models.student, models.teacher, *models.filters)

    # ------------------------------------------------------------------ a cached teacher

    def _cache_targets(self) -> str:
        return f"filters:{weights_hash(self.teacher_filters)}"

    def cache_transform(self):
        """TED's targets are the frozen teacher filters' outputs: what the cache stores of each layer."""
        return lambda states, mask: self.teacher_filters(states)

    def _cache_replaces(self) -> list[nn.Module]:
        return [self.teacher_model.model, self.teacher_filters]

    def _mse_inputs(self, student_states: list[Tensor], teacher_states: list[Tensor]) -> dict:
        xs, ws, bs = self.student_filters.split(student_states)
        if self.teacher_cache is not None:  # the cache holds the teacher filters' outputs
            return dict(student_states=xs, student_weights=ws, student_biases=bs, teacher_states=teacher_states)
        with torch.no_grad():
            xt, wt, bt = self.teacher_filters.split(teacher_states)
        return dict(
            student_states=xs,
            student_weights=ws,
            student_biases=bs,
            teacher_states=xt,
            teacher_weights=wt,
            teacher_biases=bt,
        )

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Save the student and its filters into one directory."""
        _save_with_filters(self.student, self.student_filters, directory)
