"""DWT: distillation from a weaker, smaller teacher into a larger student (Lee et al., 2023).

::

    loss = alpha_h * (task or MLM / LM loss) + alpha_s(step) * KL(softmax(t / T) || softmax(s / T)) * T^2

``alpha_s`` follows a :class:`Schedule`: constant, or decaying from a start to
an end value over a number of steps, linearly or along a cosine (the paper
recommends starting high, e.g. 4, and decaying to 1). :func:`remap_parameters`
optionally initializes the larger student from the teacher (copy the first
layers, repeat the last; widen where the student is wider); random
initialization is the default, since the paper found remapping hurts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from fastted.methods.base import Recipe, RecipeOutput, register, setting
from fastted.models import adapt, check_same_vocab
from fastted.ops.checks import check_alpha, check_temperature

KINDS = ("constant", "linear", "cosine")


class Schedule:
    """A weight as a pure function of the step.

    - ``constant``: ``start`` at every step;
    - ``linear``: ``start + (end - start) * min(step / steps, 1)``;
    - ``cosine``: ``end + (start - end) * (1 + cos(pi * min(step / steps, 1))) / 2``.

    Both decays give ``start`` at step 0, ``(start + end) / 2`` at ``steps / 2``
    and ``end`` from ``steps`` on.
    """

    def __init__(
        self, kind: str = "constant", start: float = 1.0, end: Optional[float] = None, steps: Optional[int] = None
    ):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.kind, self.start = kind, check_alpha("start", start)
        if kind == "constant":
            self.end, self.steps = self.start, None
            return
        if end is None or steps is None:
            raise ValueError(f"a {kind} schedule needs end and steps, got end={end!r}, steps={steps!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        self.end, self.steps = check_alpha("end", end), steps

    def __call__(self, step: int) -> float:
        if self.kind == "constant":
            return self.start
        progress = min(step / self.steps, 1.0)
        if self.kind == "linear":
            return self.start + (self.end - self.start) * progress
        return self.end + (self.start - self.end) * (1.0 + math.cos(math.pi * progress)) / 2.0

    def __repr__(self) -> str:
        if self.kind == "constant":
            return f"Schedule('constant', {self.start})"
        return f"Schedule({self.kind!r}, start={self.start}, end={self.end}, steps={self.steps})"


@dataclass
class DWTSettings:
    """DWT's settings (``distil.dwt`` of a config): ``alpha_h * task + alpha_s(step) * KL``."""

    alpha_h: float = setting(1.0, ">= 0")  # weight of the task loss
    alpha_s: float = setting(4.0, ">= 0")  # weight of the KL term at the first step (the paper's 4)
    alpha_s_end: Optional[float] = setting(1.0, ">= 0")  # ... decayed to this at the last (the paper's 1);
    # None: a constant alpha_s
    alpha_s_schedule: str = setting("cosine", KINDS)  # the decay's shape (the paper names the end points)
    temperature: float = setting(2.0, "> 0")  # of the KL term
    remap: bool = False  # start the student from the teacher (the paper: it hurts)


@register(
    "dwt",
    DWTSettings,
    old_keys={key: key for key in ("alpha_h", "alpha_s", "alpha_s_end", "alpha_s_schedule", "temperature", "remap")},
)
class DWT(Recipe):
    """DWT's recipe.

    Args:
        student: the larger model; teacher: the smaller, weaker one (same
            tokenizer and output space).
        alpha_h: weight of the task (MLM / LM / classification) loss.
        alpha_s, alpha_s_end, alpha_s_schedule, total_steps: the weight of
            the KL term, from ``alpha_s`` at step 0 to ``alpha_s_end`` at
            ``total_steps`` (the run's optimizer steps) along
            ``alpha_s_schedule`` (:class:`Schedule`); constant with
            ``alpha_s_end=None`` or ``alpha_s_schedule="constant"``. A
            :class:`Schedule` as ``alpha_s`` is taken as it is (the other
            three then unused).
        temperature: of the KL term.
        remap: initialize the student from the teacher with
            :func:`remap_parameters` (default False: keep the student's init).
        fused_lm_head: continual pre-training ("mlm", "clm") only: the whole
            loss, ``alpha_h * task + alpha_s(step) * KL``, is one
            :func:`~fastted.ops.fused_linear_kd.fused_linear_kd` call on the inputs of the
            two models' vocabulary projections, so neither model's (B, T, V)
            logits are ever materialized (the models may differ in width,
            not in vocabulary). Loss, terms and gradients are the unfused
            ones (up to rounding) given labels that are -100 outside the
            attention mask (see :class:`~fastted.methods.ted.TED`);
            ``RecipeOutput.logits`` is then None.
    """

    label = "DWT"

    def __init__(
        self,
        student,
        teacher,
        *,
        alpha_h: float = 1.0,
        alpha_s: float | Schedule = 4.0,
        alpha_s_end: Optional[float] = 1.0,
        alpha_s_schedule: str = "cosine",
        temperature: float = 2.0,
        remap: bool = False,
        total_steps: Optional[int] = None,
        tokenizers: Optional[tuple] = None,
        task: Optional[str] = None,
        impl: str = "auto",
        fused_lm_head: bool = False,
    ):
        super().__init__(student, teacher, task=task, impl=impl, fused_lm_head=fused_lm_head)
        self.alpha_h = check_alpha("alpha_h", alpha_h)
        self.alpha_s = (
            alpha_s
            if isinstance(alpha_s, Schedule)
            else _kl_schedule(alpha_s, alpha_s_end, alpha_s_schedule, total_steps)
        )
        self.temperature = check_temperature("temperature", temperature)
        check_same_vocab(self.student_model, self.teacher_model, tokenizers, "DWT's KL term")
        if remap:
            remap_parameters(self.student_model, self.teacher_model)

    def forward(
        self, batch: dict, *, step: Optional[int] = None, epoch: int = 0, teacher_batch: Optional[dict] = None
    ) -> RecipeOutput:
        step = self._schedule_step(step)
        weights = {"task": self.alpha_h, "kd": self.alpha_s(step)}
        s_out = self._student_forward(batch)
        t_out = self._teacher_forward(batch, teacher_batch)
        terms, head_loss = self._head_terms(s_out, t_out, batch, weights, self.temperature)
        return self._total(terms, weights, head_loss, logits=self._detached_logits(s_out))


def _kl_schedule(alpha_s, end, kind: str, total_steps: Optional[int]) -> Schedule:
    """DWT's alpha_s from its settings: constant, or decaying from ``alpha_s`` to ``end`` over the run."""
    start = check_alpha("alpha_s", alpha_s)
    if end is None or kind == "constant":
        return Schedule("constant", start)
    if total_steps is None:
        raise ValueError(
            f"alpha_s decays from {start} to {end} ({kind}) over the run: DWT needs total_steps, the "
            f"run's optimizer steps (or alpha_s_end=None for a constant alpha_s)"
        )
    return Schedule(kind, start, end, total_steps)


def _source_name(name: str, s_prefix: str, t_prefix: str, n_teacher: int) -> str:
    """The teacher parameter a student parameter starts from: layer i <- layer min(i, n_t - 1)."""
    if not name.startswith(s_prefix):
        return name
    index, rest = name[len(s_prefix) :].split(".", 1)
    return f"{t_prefix}{min(int(index), n_teacher - 1)}.{rest}"


@torch.no_grad()
def remap_parameters(student, teacher) -> dict[str, Optional[str]]:
    """Initialize ``student`` from ``teacher`` (same architecture family, student as large or larger).

    - Depth: student layer i starts from teacher layer ``min(i, n_t - 1)``:
      the first layers are copied, the last is repeated.
    - Width: where a student tensor is larger, the teacher's values fill its
      leading block (rows and columns); the rest keeps the student's init,
      except that the weights of a Linear (or GPT-2's Conv1D) that read
      new input features are zeroed, so new features change nothing downstream. That
      makes a wider feed-forward (intermediate size) exactly
      function-preserving; a wider hidden size is not (LayerNorm statistics
      then span the new features).
    - Parameters outside the blocks (embeddings, final norm, heads) are
      matched by name.

    Returns {student parameter name: teacher parameter it copied, or None
    when the teacher has no such parameter (left as initialized)}.
    """
    s, t = adapt(student), adapt(teacher)
    s_prefix, t_prefix = s.layers_path + ".", t.layers_path + "."
    t_params = dict(t.model.named_parameters())
    # Weights whose input features are dim 1 (nn.Linear) or dim 0 (GPT-2's Conv1D, stored (in, out)).
    input_dim = {f"{n}.weight": 1 for n, m in s.model.named_modules() if isinstance(m, nn.Linear)}
    input_dim.update({f"{n}.weight": 0 for n, m in s.model.named_modules() if type(m).__name__ == "Conv1D"})
    report: dict[str, Optional[str]] = {}
    copies = []
    for name, param in s.model.named_parameters():  # check every shape before writing any: no half-remapped student
        source = _source_name(name, s_prefix, t_prefix, t.num_layers)
        src = t_params.get(source)
        if src is None or src.dim() != param.dim():
            report[name] = None
            continue
        if any(a < b for a, b in zip(param.shape, src.shape)):
            raise ValueError(
                f"student parameter {name} has shape {tuple(param.shape)}, smaller than the teacher's "
                f"{source} {tuple(src.shape)}: remapping needs a student at least as large"
            )
        report[name] = source
        copies.append((name, param, src))
    for name, param, src in copies:
        block = tuple(slice(0, n) for n in src.shape)
        param[block] = src.to(param.dtype)
        dim = input_dim.get(name)
        if dim is not None and param.shape[dim] > src.shape[dim]:
            param.narrow(dim, src.shape[dim], param.shape[dim] - src.shape[dim]).zero_()
    return report
