"""KD: logit distillation alone, TED's stage II with ``mse_alpha = 0``::

    loss = task_alpha * task + kl_alpha * KL(softmax(t / T) || softmax(s / T)) * T^2
"""
from __future__ import annotations

from typing import Optional

from fastted.methods.base import Recipe
from fastted.methods.ted import TED


class KD(TED):
    """Logit distillation (Hinton et al.; DistilBERT's and TED's KL at temperature T).

    Args as :class:`~fastted.methods.ted.TED`; with ``fused_lm_head=True``
    (language modelling, "mlm" or "clm") the whole loss is one
    :func:`~fastted.losses.fused_linear_kd` call on the inputs of the two LM
    heads' vocabulary projections: no (B, T, V) logits are materialized.
    """

    def __init__(self, student, teacher, *, task_alpha: float = 1.0, kl_alpha: float = 1.0,
                 temperature: float = 2.0, tokenizers: Optional[tuple] = None, task: Optional[str] = None,
                 impl: str = "auto", fused_lm_head: bool = False):
        Recipe.__init__(self, student, teacher, task=task, impl=impl, fused_lm_head=fused_lm_head)
        self.student_filters = None
        self._setup(None, task_alpha, kl_alpha, 0.0, temperature, True, tokenizers)
