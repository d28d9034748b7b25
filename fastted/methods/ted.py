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
from typing import Optional

import torch
from torch import Tensor, nn

from fastted.ops.quantize import dequantize_rows
from fastted.filters import ClassificationHead, TaskFilters
from fastted.mapping import LayerMap, interval_layers
from fastted.methods.base import Recipe, RecipeModels, RecipeOutput
from fastted.models import check_same_vocab, weights_hash
from fastted.ops.checks import check_alpha, check_temperature
from fastted.ops.filtered_mse import filtered_mse


class TEDStage1(Recipe):
    """TED's stage I: learn task-aware filters on a frozen model.

    Args:
        model: the frozen model (a fine-tuned teacher or student).
        filters: the filters to train; default: one per layer of the
            interval rule (``interval``), of width ``filter_dim``.
        interval, filter_dim, nonlinear, activation: build the default
            filters (see :class:`~fastted.filters.TaskFilters`).
        dropout: of the classification heads.

    The heads: classification, one :class:`~fastted.filters.ClassificationHead`
    per filter; language modelling, the model's own (frozen) LM head applied
    to each filter's output when ``filter_dim`` is the hidden size, otherwise
    one ``Linear(filter_dim, vocab_size)`` per filter.
    """

    def __init__(self, model, filters: Optional[TaskFilters] = None, *, interval: int = 1,
                 filter_dim: Optional[int] = None, nonlinear: bool = False, activation: str = "gelu",
                 dropout: float = 0.1, task: Optional[str] = None, impl: str = "auto"):
        super().__init__(model, task=task, impl=impl, train_student=False)
        adapter = self.student_model
        if filters is None:
            filters = TaskFilters(interval_layers(adapter.num_layers, interval), adapter.hidden_size, filter_dim,
                                  nonlinear=nonlinear, activation=activation)
        _check_filters("filters", filters, adapter)
        self.filters = filters
        d_f = filters.filter_dim
        if adapter.task == "classification":
            self.heads = nn.ModuleList(ClassificationHead(d_f, adapter.num_labels, dropout=dropout)
                                       for _ in range(len(filters)))
        elif d_f == adapter.hidden_size:
            self.heads = None
            self.hold_frozen(adapter.output_head(), "lm_head")
        else:
            self.heads = nn.ModuleList(nn.Linear(d_f, adapter.vocab_size) for _ in range(len(filters)))

    def forward(self, batch: dict, *, step: Optional[int] = None, epoch: int = 0) -> RecipeOutput:
        self._schedule_step(step)
        with torch.no_grad():  # the model is frozen: its states are constants for the filters
            out = self.student_model(batch, self.filters.layers)
        filtered = self.filters(out.hidden_states)
        heads = [self.lm_head] * len(filtered) if self.heads is None else self.heads
        losses = torch.stack([self.student_model.task_loss(head(x), batch.get("labels"))
                              for head, x in zip(heads, filtered)])
        return self._total({"task": losses.mean()}, {"task": 1.0}, layer_losses=losses.detach())

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


def _check_filters(name: str, filters, adapter) -> None:
    if not isinstance(filters, TaskFilters):
        raise ValueError(f"{name} must be a TaskFilters, got {type(filters).__name__}")
    adapter.check_layers(f"{name}.layers", filters.layers)
    if filters.config["hidden_size"] != adapter.hidden_size:
        raise ValueError(f"{name} read width {filters.config['hidden_size']}, but the {type(adapter.model).__name__} "
                         f"has hidden_size {adapter.hidden_size}")


class TED(Recipe):
    """TED's stage II (and, through its subclasses, LWD and KD).

    Args:
        student, teacher: the models (Hugging Face models or ModelAdapters).
        student_filters, teacher_filters: from stage I; they fix the layer
            map (the student's filter i learns from the teacher's filter i).
        task_alpha, kl_alpha, mse_alpha: the weights of the three terms.
        temperature: of the KL term (TED: 2).
        mask_padding: average the MSE over the attention mask's tokens
            (default); False averages over every token, padding included, as
            TED's public code does.
        normalize_mse: divide each layer's MSE by its targets' mean square
            (per element, over the first training batch's tokens, averaged
            over ranks; then fixed, and saved with the recipe), so the term
            is the relative error and one ``mse_alpha`` carries across models
            whose hidden states differ in scale. The logged layer losses stay
            the raw MSEs.
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
    reads_teacher_cache = True
    reads_quantized_targets = True  # the filtered MSE kernel dequantizes them

    def __init__(self, student, teacher, student_filters: TaskFilters, teacher_filters: TaskFilters, *,
                 task_alpha: float = 1.0, kl_alpha: float = 1.0, mse_alpha: float = 1.0, temperature: float = 2.0,
                 mask_padding: bool = True, normalize_mse: bool = False, tokenizers: Optional[tuple] = None,
                 task: Optional[str] = None, impl: str = "auto", fused_lm_head: bool = False):
        super().__init__(student, teacher, task=task, impl=impl, fused_lm_head=fused_lm_head)
        _check_filters("student_filters", student_filters, self.student_model)
        _check_filters("teacher_filters", teacher_filters, self.teacher_model)
        if student_filters.filter_dim != teacher_filters.filter_dim or len(student_filters) != len(teacher_filters):
            raise ValueError(
                f"student_filters map {len(student_filters)} layers to width {student_filters.filter_dim} and "
                f"teacher_filters {len(teacher_filters)} layers to width {teacher_filters.filter_dim}: TED needs one "
                f"count and one filter_dim for both"
            )
        self.student_filters = student_filters
        self.hold_frozen(teacher_filters, "teacher_filters")
        self._setup(LayerMap(tuple(student_filters.layers), tuple(teacher_filters.layers)), task_alpha, kl_alpha,
                    mse_alpha, temperature, mask_padding, tokenizers, normalize_mse)

    @classmethod
    def from_config(cls, config, models: RecipeModels) -> "TED":
        d = config.distil
        if not isinstance(models.filters, tuple) or len(models.filters) != 2:
            raise ValueError(f"TED needs models.filters = (student's, teacher's) stage-I TaskFilters, got "
                             f"{type(models.filters).__name__}")
        student_filters, teacher_filters = models.filters
        return cls(models.student, models.teacher, student_filters, teacher_filters, task_alpha=d.task_alpha,
                   kl_alpha=d.kl_alpha, mse_alpha=d.mse_alpha, temperature=d.temperature,
                   mask_padding=d.mask_padding, normalize_mse=d.normalize_mse,
                   **cls._config_options(config, models, fused_lm_head=True))

    def _setup(self, layer_map: Optional[LayerMap], task_alpha, kl_alpha, mse_alpha, temperature, mask_padding,
               tokenizers, normalize_mse: bool = False) -> None:
        self.layer_map = layer_map
        self.alphas = {"task": check_alpha("task_alpha", task_alpha), "kd": check_alpha("kl_alpha", kl_alpha),
                       "mse": check_alpha("mse_alpha", mse_alpha)}
        self.temperature = check_temperature("temperature", temperature)
        self.mask_padding = bool(mask_padding)
        if self.alphas["kd"]:
            check_same_vocab(self.student_model, self.teacher_model, tokenizers, f"{type(self).__name__}'s KL term")
        elif tokenizers is not None:
            check_same_vocab(self.student_model, self.teacher_model, tokenizers, type(self).__name__)
        if self.alphas["mse"] and layer_map is None:
            raise ValueError(f"mse_alpha={mse_alpha} needs a layer map")
        self.normalize_mse = bool(normalize_mse) and layer_map is not None
        if self.normalize_mse:  # 0 until the first batch measures the targets' mean square of each layer
            self.register_buffer("mse_scales", torch.zeros(len(layer_map.student), dtype=torch.float32))
            self._scales_known = False

    def _target_power(self, inputs: dict, teacher_scales, mask: Optional[Tensor]) -> Tensor:
        """Each layer's targets' mean square per element, over the (masked) tokens of this batch and every
        rank: what ``normalize_mse`` divides the layer's MSE by."""
        states = inputs["teacher_states"]
        weights = inputs.get("teacher_weights") or [None] * len(states)
        biases = inputs.get("teacher_biases") or [None] * len(states)
        row_scales = teacher_scales or [None] * len(states)  # a cache's int8 / fp8 targets: their row scales
        powers = []
        with torch.no_grad():
            for t, w, b, q in zip(states, weights, biases, row_scales):
                y = dequantize_rows(t.reshape(-1, t.shape[-1]), None if q is None else q.reshape(-1))
                if w is not None:  # TED's frozen teacher filter makes the targets
                    y = y @ w.float().t()
                if b is not None:
                    y = y + b.float()
                per_token = y.pow(2).mean(-1)
                m = torch.ones_like(per_token) if mask is None else mask.reshape(per_token.shape).float()
                powers.append(torch.stack([(per_token * m).sum(), m.sum()]))
            sums = torch.stack(powers)  # (L, 2): sum of squares, tokens
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(sums)
            power = sums[:, 0] / sums[:, 1].clamp_min(1.0)
        if not bool(torch.isfinite(power).all()) or not bool((power > 0).all()):
            raise ValueError(f"normalize_mse: the teacher's targets have mean squares {power.tolist()} on the first "
                             f"batch; each layer's needs to be finite and > 0 to divide its MSE by")
        return power

    def teacher_layers_needed(self) -> Optional[list[int]]:
        return None if self.alphas["kd"] else self._cached_layers()

    # ------------------------------------------------------------------ a cached teacher

    def teacher_cache_expect(self) -> dict:
        # LWD and KD (no filters) store the raw states; TED its frozen teacher filters' outputs
        targets = "raw" if self.student_filters is None else f"filters:{weights_hash(self.teacher_filters)}"
        return {"layers": self._cached_layers(), "temperature": self.temperature, "targets": targets}

    def _cached_layers(self) -> list[int]:
        return list(self.layer_map.teacher) if self.alphas["mse"] and self.layer_map is not None else []

    def cache_transform(self):
        """TED's targets are the frozen teacher filters' outputs: what the cache stores of each layer."""
        return None if self.student_filters is None else lambda states, mask: self.teacher_filters(states)

    def _cache_replaces(self) -> list[nn.Module]:
        filters = [] if self.student_filters is None else [self.teacher_filters]
        return [self.teacher_model.model] + filters

    def _mse_inputs(self, student_states: list[Tensor], teacher_states: list[Tensor]) -> dict:
        xs, ws, bs = self.student_filters.split(student_states)
        if self.teacher_cache is not None:  # the cache holds the teacher filters' outputs
            return dict(student_states=xs, student_weights=ws, student_biases=bs, teacher_states=teacher_states)
        with torch.no_grad():
            xt, wt, bt = self.teacher_filters.split(teacher_states)
        return dict(student_states=xs, student_weights=ws, student_biases=bs, teacher_states=xt,
                    teacher_weights=wt, teacher_biases=bt)

    def forward(self, batch: dict, *, step: Optional[int] = None, epoch: int = 0,
                teacher_batch: Optional[dict] = None) -> RecipeOutput:
        self._schedule_step(step)
        use_mse = bool(self.alphas["mse"])
        s_layers = self.layer_map.student if use_mse else ()
        t_layers = self.layer_map.teacher if use_mse else ()
        s_out = self._student_forward(batch, s_layers)
        t_out = self._teacher_forward(batch, teacher_batch, t_layers)
        terms, head_loss = self._head_terms(s_out, t_out, batch, self.alphas, self.temperature)
        layer_losses = None
        if use_mse:
            if teacher_batch is not None and teacher_batch["input_ids"].shape != batch["input_ids"].shape:
                raise ValueError("the MSE term compares token by token: teacher_batch must have the student's shape")
            mask = s_out.mask if self.mask_padding else None
            if t_out.target_mask is not None:  # a cache that keeps a share of the tokens: the MSE over those
                kept = t_out.target_mask.to(torch.long)
                mask = kept if mask is None else mask * kept
            t_states, scales = t_out.hidden_states, t_out.target_scales
            if self.teacher_cache is not None and scales is None:  # bf16 targets: in the student's dtype
                t_states = [t.to(s_out.hidden_states[0].dtype) for t in t_states]
            inputs = self._mse_inputs(s_out.hidden_states, t_states)
            weights = None
            if self.normalize_mse:
                if not self._scales_known:  # one host sync, until the scales are measured (or loaded)
                    if not bool(self.mse_scales.any()):
                        self.mse_scales.copy_(self._target_power(inputs, scales, mask))
                    self._scales_known = True
                weights = 1.0 / self.mse_scales.float()
            terms["mse"], layer_losses = filtered_mse(
                **inputs, teacher_scales=scales, mask=mask, impl=self.impl, layer_weights=weights,
                return_layer_losses=True,
            )
            if weights is not None:  # filtered_mse normalizes the weights by their sum: mean_l MSE_l / scale_l
                terms["mse"] = terms["mse"] * weights.mean()
        return self._total(terms, self.alphas, head_loss, layer_losses=layer_losses,
                           logits=self._detached_logits(s_out))

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Save the student and its filters (LWD and KD have none) into one directory."""
        _save_with_filters(self.student, self.student_filters, directory)

