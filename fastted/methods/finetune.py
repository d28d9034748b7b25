"""Fine-tuning alone: the model's own task loss, no teacher (the pipeline's first jobs and the
"student alone" baseline)::

    loss = task
"""

from __future__ import annotations

from typing import Optional

from fastted.methods.base import Recipe, RecipeOutput


class FineTune(Recipe):
    """Train ``model`` on its task loss (classification CE, MLM or causal LM)."""

    def __init__(self, model, *, task: Optional[str] = None, impl: str = "auto"):
        super().__init__(model, task=task, impl=impl)

    def forward(self, batch: dict, *, step: Optional[int] = None, epoch: int = 0) -> RecipeOutput:
        self._schedule_step(step)
        out = self.student_model(batch)
        terms = {"task": self.student_model.task_loss(out.logits, batch.get("labels"))}
        return self._total(terms, {"task": 1.0}, logits=out.logits.detach())
