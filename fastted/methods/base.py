"""What every recipe shares: the trained student, the frozen teacher, the step, the weighted terms.

A recipe is an ``nn.Module`` whose parameters are exactly what it trains
(the student and its filters, heads or projections) and whose ``forward(batch)``
returns a :class:`RecipeOutput` with the loss to backpropagate. The teacher
(and anything else frozen: its filters, a stage-I model) is held outside the
module tree: it is not in ``parameters()`` or ``state_dict()``, stays in eval
mode, and still follows ``recipe.to(...)``; building the recipe sets its
parameters' ``requires_grad`` to False.

With ``fused_lm_head=True`` (language modelling: TED, LWD, KD, DWT) the
models run without their vocabulary projections and the "task" and "kd"
terms come from one :func:`~fastted.losses.fused_linear_kd` call on the
projections' inputs: the (N, V) logits of student and teacher are never
materialized.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastted.losses import _check_float, _check_impl, fused_linear_kd, logit_kd
from fastted.mapping import LayerMap, RandomLayerMap, uniform_map
from fastted.models import ModelAdapter, adapt, gathered


@dataclass
class RecipeOutput:
    """One step of a recipe."""

    loss: Tensor                                              # the weighted total (fp32 scalar)
    terms: dict[str, Tensor] = field(default_factory=dict)    # each term, unweighted and detached
    weights: dict[str, float] = field(default_factory=dict)   # each term's weight at this step
    layer_losses: Optional[Tensor] = None                     # per mapped pair (or filter), detached
    logits: Optional[Tensor] = None                           # the student's logits, for metrics (None if fused)


# The terms of the logits, which the fused LM head computes in one call.
_HEAD_TERMS = ("task", "kd")


def _check_alpha(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_temperature(name: str, value) -> float:
    return _check_float(name, value, 0.0, low_open=True)


def _freeze(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()


class Recipe(nn.Module):
    """Base of the recipes.

    Args:
        student: the trained model (a Hugging Face model or a ModelAdapter).
            ``self.student`` is the model, ``self.student_model`` its adapter.
        teacher: the frozen model, or None (stage I trains filters alone);
            ``self.teacher`` and ``self.teacher_model`` likewise.
        task: "classification", "mlm" or "clm" (inferred from the classes).
        impl: the fused losses' path, "auto", "triton" or "reference".
        train_student: False freezes the student model too (TED's stage I).
        fused_lm_head: compute the "task" and "kd" terms on the LM heads'
            inputs with :func:`~fastted.losses.fused_linear_kd`, without the
            logits (tasks "mlm" and "clm" only; see the recipes).

    ``forward(batch, step=None, epoch=0)``: ``step`` drives schedules and
    per-step layer draws; None uses the recipe's own counter, which counts
    the forwards in training mode (pass the optimizer step when
    accumulating gradients). The counter is in the state dict.
    """

    def __init__(self, student, teacher=None, *, task: Optional[str] = None, impl: str = "auto",
                 train_student: bool = True, fused_lm_head: bool = False):
        super().__init__()
        self.impl = _check_impl(impl)
        self._frozen: list[nn.Module] = []  # a plain list: never registered, never in parameters()
        self.student_model = adapt(student, task)
        if train_student:
            self.student = self.student_model.model
        else:  # TED's stage I: the model is frozen, its filters train
            self.hold_frozen(self.student_model.model, "student")
        self.teacher_model: Optional[ModelAdapter] = None
        object.__setattr__(self, "teacher", None)
        if teacher is not None:
            self.teacher_model = adapt(teacher, task)
            if self.teacher_model.model is self.student_model.model:
                raise ValueError("teacher and student are the same module: the teacher must be a separate model")
            self.hold_frozen(self.teacher_model.model, "teacher")
        self.fused_lm_head = self._check_fused_lm_head(fused_lm_head)
        self.step = 0

    def _check_fused_lm_head(self, fused_lm_head) -> bool:
        if not isinstance(fused_lm_head, bool):
            raise ValueError(f"fused_lm_head must be a bool, got {fused_lm_head!r}")
        if not fused_lm_head:
            return False
        task = self.student_model.task
        if task not in ("mlm", "clm"):
            raise ValueError(f"fused_lm_head=True fuses the vocabulary projection of a language model: it needs the "
                             f"task 'mlm' or 'clm', but this {type(self).__name__} is for {task!r}")
        for adapter in (self.student_model, self.teacher_model):
            if adapter is not None:
                try:
                    adapter.lm_head_parts()  # raises where the model cannot be cut before its projection
                except ValueError as err:
                    raise ValueError(f"fused_lm_head=True: {err}") from None
        return True

    def hold_frozen(self, module: nn.Module, name: str) -> nn.Module:
        """Keep ``module`` frozen (no grad, eval mode) as ``self.<name>``, outside the module tree."""
        self._frozen.append(_freeze(module))
        object.__setattr__(self, name, module)  # bypasses nn.Module's registration
        return module

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self._frozen:
            module.eval()
        return self

    def _apply(self, fn, *args, **kwargs):
        for module in self._frozen:
            module._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    def get_extra_state(self) -> dict:
        return {"step": self.step}

    def set_extra_state(self, state: dict) -> None:
        self.step = int(state["step"])

    # ------------------------------------------------------------------ helpers for the recipes

    def _step(self, step: Optional[int]) -> int:
        if step is None:
            step = self.step
            if self.training:
                self.step += 1
        elif isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        return step

    def _student_forward(self, batch: dict, layers=()):
        """The student on ``batch``: its logits, or with fused_lm_head its LM head's input."""
        return self.student_model(batch, layers, head=not self.fused_lm_head)

    def _teacher_forward(self, batch: dict, teacher_batch: Optional[dict], layers=()):
        with torch.no_grad():
            return self.teacher_model(batch if teacher_batch is None else teacher_batch, layers,
                                      head=not self.fused_lm_head)

    @staticmethod
    def _detached_logits(student_out) -> Optional[Tensor]:
        return None if student_out.logits is None else student_out.logits.detach()

    def _checked_map(self, layer_map, kind=LayerMap):
        """``layer_map`` (default: uniform, or RAIL-KD's draw over all layers) checked against both models."""
        s, t = self.student_model, self.teacher_model
        if layer_map is None:
            layer_map = (uniform_map if kind is LayerMap else RandomLayerMap)(s.num_layers, t.num_layers)
        if not isinstance(layer_map, kind):
            raise ValueError(f"layer_map must be a {kind.__name__} (fastted.mapping), got {type(layer_map).__name__}")
        names = ("student", "teacher") if kind is LayerMap else ("student_layers", "teacher_layers")
        for adapter, name in zip((s, t), names):
            adapter.check_layers(f"layer_map.{name}", getattr(layer_map, name))
        return layer_map

    def _output_terms(self, student_out, teacher_out, batch: dict, weights: dict, temperature: float) -> dict:
        """The terms on the logits whose weight is not 0: "task" (the student's task loss) and "kd":
        KL(softmax(t / T) || softmax(s / T)) * T^2 over the examples, or the tokens of the attention mask."""
        terms = {}
        if weights["task"]:
            terms["task"] = self.student_model.task_loss(student_out.logits, batch.get("labels"))
        if weights["kd"]:
            mask = None if self.student_model.task == "classification" else student_out.mask
            terms["kd"] = logit_kd(student_out.logits, teacher_out.logits, temperature=temperature, mask=mask,
                                   impl=self.impl)
        return terms

    def _head_terms(self, student_out, teacher_out, batch: dict, weights: dict,
                    temperature: float) -> tuple[dict, Optional[Tensor]]:
        """(terms, head_loss): :meth:`_output_terms` and None, or with fused_lm_head the detached "task" and
        "kd" and their weighted sum from one fused call, which :meth:`_total` adds as it is."""
        if not self.fused_lm_head:
            return self._output_terms(student_out, teacher_out, batch, weights, temperature), None
        return self._fused_output_terms(student_out, teacher_out, batch, weights, temperature)

    def _fused_output_terms(self, student_out, teacher_out, batch: dict, weights: dict,
                            temperature: float) -> tuple[dict, Optional[Tensor]]:
        """:meth:`_output_terms` on the LM heads' inputs: ``weights["kd"] * kd + weights["task"] * task`` from
        :func:`~fastted.losses.fused_linear_kd`, over the attention mask's tokens (the task loss: those whose
        label, shifted by one for "clm" as HF shifts it, is not -100)."""
        w_task, w_kd = weights["task"], weights["kd"]
        if not (w_task or w_kd):
            return {}, None
        student = self.student_model
        xs = student_out.head_input
        ws, bs = student.lm_head_parts()
        if w_kd:
            xt = teacher_out.head_input
            wt, bt = self.teacher_model.lm_head_parts()
        else:  # no KL: the student's own head stands in as a constant teacher, whose vocabulary may differ
            xt, wt, bt = xs.detach(), ws.detach(), None if bs is None else bs.detach()
        labels = None
        if w_task:
            labels = batch.get("labels")
            if labels is None:
                raise ValueError(f"the {student.task} task loss needs batch['labels']")
            if student.task == "clm":  # hidden state t predicts the label at t + 1, as HF shifts them
                labels = F.pad(labels[:, 1:], (0, 1), value=-100)
        with gathered((wt, bt)):  # a ZeRO-3 teacher's head is partitioned outside its forward
            loss, kd, ce = fused_linear_kd(
                xs, ws, xt, wt, temperature=temperature, student_bias=bs, teacher_bias=bt, mask=student_out.mask,
                hard_labels=labels, hard_weight=w_task, soft_weight=w_kd, impl=self.impl, return_terms=True,
            )
        terms = {}
        if w_task:
            terms["task"] = ce
        if w_kd:
            terms["kd"] = kd
        return terms, loss

    @staticmethod
    def _total(terms: dict[str, Tensor], weights: dict[str, float], head_loss: Optional[Tensor] = None,
               **extra) -> RecipeOutput:
        """loss = sum of weight * term over the terms present; ``head_loss``, the fused LM head's weighted
        "task" + "kd", is added as it is, in place of those two terms."""
        parts = [weights[name] * term for name, term in terms.items()
                 if head_loss is None or name not in _HEAD_TERMS]
        loss = sum(parts if head_loss is None else [head_loss] + parts)
        if not isinstance(loss, Tensor):
            raise ValueError(f"every term of this recipe has weight 0 ({weights}): nothing to train")
        detached = {name: term.detach() for name, term in terms.items()}
        return RecipeOutput(loss=loss, terms=detached, weights={k: weights[k] for k in terms}, **extra)
