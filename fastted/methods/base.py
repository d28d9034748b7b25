"""What every recipe shares: the trained student, the frozen teacher, the step, the weighted terms.

A recipe is an ``nn.Module`` whose parameters are exactly what it trains
(the student and its filters, heads or projections) and whose ``forward(batch)``
returns a :class:`RecipeOutput` with the loss to backpropagate. The teacher
(and anything else frozen: its filters, a stage-I model) is held outside the
module tree: it is not in ``parameters()`` or ``state_dict()``, stays in eval
mode, and still follows ``recipe.to(...)``; building the recipe sets its
parameters' ``requires_grad`` to False.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

from fastted.losses import _check_float, _check_impl, logit_kd
from fastted.mapping import LayerMap, RandomLayerMap, uniform_map
from fastted.models import ModelAdapter, adapt


@dataclass
class RecipeOutput:
    """One step of a recipe."""

    loss: Tensor                                              # the weighted total (fp32 scalar)
    terms: dict[str, Tensor] = field(default_factory=dict)    # each term, unweighted and detached
    weights: dict[str, float] = field(default_factory=dict)   # each term's weight at this step
    layer_losses: Optional[Tensor] = None                     # per mapped pair (or filter), detached
    logits: Optional[Tensor] = None                           # the student's logits, for metrics


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

    ``forward(batch, step=None, epoch=0)``: ``step`` drives schedules and
    per-step layer draws; None uses the recipe's own counter, which counts
    the forwards in training mode (pass the optimizer step when
    accumulating gradients). The counter is in the state dict.
    """

    def __init__(self, student, teacher=None, *, task: Optional[str] = None, impl: str = "auto",
                 train_student: bool = True):
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
        self.step = 0

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

    def _teacher_forward(self, batch: dict, teacher_batch: Optional[dict], layers=()):
        with torch.no_grad():
            return self.teacher_model(batch if teacher_batch is None else teacher_batch, layers)

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

    @staticmethod
    def _total(terms: dict[str, Tensor], weights: dict[str, float], **extra) -> RecipeOutput:
        """loss = sum of weight * term over the terms present."""
        loss = sum(weights[name] * term for name, term in terms.items())
        if not isinstance(loss, Tensor):
            raise ValueError(f"every term of this recipe has weight 0 ({weights}): nothing to train")
        detached = {name: term.detach() for name, term in terms.items()}
        return RecipeOutput(loss=loss, terms=detached, weights={k: weights[k] for k in terms}, **extra)
