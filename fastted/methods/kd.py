"""KD: logit distillation alone, the layer-wise base without layers (``mse_alpha = 0``)::

loss = task_alpha * task + kl_alpha * KL(softmax(t / T) || softmax(s / T)) * T^2
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from fastted.methods.base import register
from fastted.methods.layerwise import LayerwiseRecipe, LogitSettings


@dataclass
class KDSettings(LogitSettings):
    """KD's settings: the weights of the task and KL terms and the temperature (``distil.kd`` of a config)."""


@register("kd", KDSettings, old_keys={key: key for key in ("task_alpha", "kl_alpha", "temperature")})
class KD(LayerwiseRecipe):
    """Logit distillation (Hinton et al.; DistilBERT's and TED's KL at temperature T).

    Args as :class:`~fastted.methods.ted.TED`; with ``fused_lm_head=True``
    (language modelling, "mlm" or "clm") the whole loss is one
    :func:`~fastted.ops.fused_linear_kd.fused_linear_kd` call on the inputs of the two LM
    heads' vocabulary projections: no (B, T, V) logits are materialized.
    """

    label = "KD"

    def __init__(
        self,
        student,
        teacher,
        *,
        task_alpha: float = 1.0,
        kl_alpha: float = 1.0,
        temperature: float = 2.0,
        tokenizers: Optional[tuple] = None,
        task: Optional[str] = None,
        impl: str = "auto",
        fused_lm_head: bool = False,
    ):
        super().__init__(
            student,
            teacher,
            None,
            task_alpha=task_alpha,
            kl_alpha=kl_alpha,
            mse_alpha=0.0,
            temperature=temperature,
            tokenizers=tokenizers,
            task=task,
            impl=impl,
            fused_lm_head=fused_lm_head,
        )
