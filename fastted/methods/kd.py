"""KD: logit distillation alone, TED's stage II with ``mse_alpha = 0``::

    loss = task_alpha * task + kl_alpha * KL(softmax(t / T) || softmax(s / T)) * T^2
"""
from __future__ import annotations

from typing import Optional

from fastted.methods.base import Recipe, RecipeModels
from fastted.methods.ted import TED


class KD(TED):
    """Logit distillation (Hinton et al.; DistilBERT's and TED's KL at temperature T).

    Args as :class:`~fastted.methods.ted.TED`; with ``fused_lm_head=True``
    (language modelling, "mlm" or "clm") the whole loss is one
    :func:`~fastted.ops.fused_linear_kd.fused_linear_kd` call on the inputs of the two LM
    heads' vocabulary projections: no (B, T, V) logits are materialized.
    """

    label = "KD"
    uses_stage1_filters = False

    def __init__(self, student, teacher, *, task_alpha: float = 1.0, kl_alpha: float = 1.0,
                 temperature: float = 2.0, tokenizers: Optional[tuple] = None, task: Optional[str] = None,
                 impl: str = "auto", fused_lm_head: bool = False):
        Recipe.__init__(self, student, teacher, task=task, impl=impl, fused_lm_head=fused_lm_head)
        self.student_filters = None
        self._setup(None, task_alpha, kl_alpha, 0.0, temperature, True, tokenizers)

    @classmethod
    def from_config(cls, config, models: RecipeModels) -> "KD":
        d = config.distil
        return cls(models.student, models.teacher, task_alpha=d.task_alpha, kl_alpha=d.kl_alpha,
                   temperature=d.temperature, **cls._config_options(config, models, fused_lm_head=True))
