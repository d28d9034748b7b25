"""LWD: plain layer-wise distillation, TED's stage II without task-aware filters.

The student's mapped hidden states are projected to the teacher's width by a
linear projection (randomly initialized, trained with the student; none when
the widths agree, unless ``project_equal_width``, as the TED authors' LWD) and
matched to the teacher's raw hidden states by MSE, beside the task loss and
the KL term::

    loss = task_alpha * task + kl_alpha * KL(T) + mse_alpha * mean_l MSE(W_l S_l + b_l, H_l)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor, nn

from fastted.mapping import LayerMap
from fastted.methods.base import register
from fastted.methods.layerwise import LAYERWISE_OLD_KEYS, LayerwiseRecipe, LayerwiseSettings


@dataclass
class LWDSettings(LayerwiseSettings):
    """LWD's settings (``distil.lwd`` of a config): TED's, and whether the projections train."""

    train_projection: bool = True  # False keeps the random projections fixed
    project_equal_width: bool = False  # a projection even where the widths agree (the TED authors' LWD always
    # trains one); False: the student's states are compared as they are


@register(
    "lwd",
    LWDSettings,
    old_keys=LAYERWISE_OLD_KEYS,
)
class LWD(LayerwiseRecipe):
    """Layer-wise distillation of raw hidden states.

    Args:
        student, teacher: the models.
        layer_map: the pairs; default :func:`~fastted.mapping.uniform_map`.
        train_projection: False keeps the random projections fixed.
        project_equal_width: a projection even when the widths agree (the
            TED authors' LWD always trains one); default False, none.
        fused_lm_head: the task and KL terms without the logits ("mlm",
            "clm"), as in :class:`~fastted.methods.ted.TED`.
        Others as :class:`~fastted.methods.ted.TED`.
    """

    label = "LWD"

    def __init__(
        self,
        student,
        teacher,
        layer_map: Optional[LayerMap] = None,
        *,
        task_alpha: float = 1.0,
        kl_alpha: float = 1.0,
        mse_alpha: float = 1.0,
        temperature: float = 2.0,
        mask_padding: bool = True,
        normalize_mse: bool = False,
        train_projection: bool = True,
        project_equal_width: bool = False,
        tokenizers: Optional[tuple] = None,
        task: Optional[str] = None,
        impl: str = "auto",
        fused_lm_head: bool = False,
    ):
        super().__init__(
            student,
            teacher,
            layer_map,
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
        if not isinstance(project_equal_width, bool):
            raise ValueError(f"project_equal_width must be a bool, got {project_equal_width!r}")
        s, t = self.student_model, self.teacher_model
        if s.hidden_size == t.hidden_size and not project_equal_width:
            self.projections = None
        else:
            self.projections = nn.ModuleList(nn.Linear(s.hidden_size, t.hidden_size) for _ in self.layer_map.student)
            self.projections.requires_grad_(train_projection)

    def _mapped_layers(self, layer_map: Optional[LayerMap]) -> LayerMap:
        return self._checked_map(layer_map)  # None: the uniform map

    def _mse_inputs(self, student_states: list[Tensor], teacher_states: list[Tensor]) -> dict:
        n = len(student_states)
        weights = [None] * n if self.projections is None else [p.weight for p in self.projections]
        biases = [None] * n if self.projections is None else [p.bias for p in self.projections]
        return dict(
            student_states=student_states, student_weights=weights, student_biases=biases, teacher_states=teacher_states
        )
