"""RAIL-KD: random intermediate layer mapping (Haidar et al., 2022).

At every step (or epoch) a :class:`~fastted.mapping.RandomLayerMap` draws
as many teacher layers as the student distils, sorted, and pairs them in
order with the student's layers. The pairs are compared by RAIL-KD's pooled
distance (:func:`~fastted.ops.pooled_distance.pooled_distance`): mean-pooled,
projected, L2-normalized representations, layer by layer or concatenated::

    loss = task_alpha * task + kd_alpha * KL(T) + rail_alpha * pooled_distance
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from fastted.mapping import PER, RandomLayerMap
from fastted.methods.base import Recipe, RecipeOutput, register, setting
from fastted.models import check_same_vocab
from fastted.ops.checks import check_alpha, check_temperature
from fastted.ops.pooled_distance import PooledDistanceLoss
from fastted.ops.pooling import pool_states


@dataclass
class RAILKDSettings:
    """RAIL-KD's settings (``distil.railkd`` of a config)."""

    proj_dim: Optional[int] = setting(128, "> 0")  # width of the projections (None: none; equal widths)
    concat: bool = False  # one concatenated vector per model, not one per layer
    pooling: str = setting("mean", ("mean", "first"))  # of each layer's tokens
    temperature: float = setting(2.0, "> 0")  # of the KL term
    task_alpha: float = setting(1.0, ">= 0")
    kd_alpha: float = setting(1.0, ">= 0")  # weight of the KL term
    rail_alpha: float = setting(1.0, ">= 0")  # weight of the pooled distance
    per: str = setting("epoch", PER)  # the teacher layers drawn again each step or each epoch
    # (the paper: each epoch)
    train_teacher_projection: bool = False  # False: the teacher's projections fixed (orthogonal, no bias), so the
    # distance cannot reach zero through the projections alone; True: both trained (collapsible)


@register(
    "railkd",
    RAILKDSettings,
    old_keys={
        "task_alpha": "task_alpha",
        "kl_alpha": "kd_alpha",
        "temperature": "temperature",
        "rail_alpha": "rail_alpha",
        "rail_per": "per",
    },
)
class RAILKD(Recipe):
    """RAIL-KD's recipe.

    Args:
        student, teacher: the models.
        layer_map: the random map; default ``RandomLayerMap(n_s, n_t,
            per=per, seed=seed)``: every student layer, drawn from every
            teacher layer.
        proj_dim: width of the projections (None: none; the widths must match).
        concat: the concatenated variant (one vector per model) instead of the
            layer-wise one.
        pooling: "mean" or "first".
        per, seed: of the default map: draw again each "step" or each "epoch"
            (the paper's), from ``seed`` (a given ``layer_map`` keeps its own).
        train_teacher_projection: False (the default) fixes the teacher's
            projections (orthogonal, no bias: see
            :class:`~fastted.ops.pooled_distance.PooledDistanceLoss`), so the
            distance cannot be zeroed by the projections alone; True trains
            both sides (collapsible).
    """

    label = "RAIL-KD"
    reads_teacher_cache = True

    def __init__(
        self,
        student,
        teacher,
        layer_map: Optional[RandomLayerMap] = None,
        *,
        proj_dim: Optional[int] = 128,
        concat: bool = False,
        pooling: str = "mean",
        temperature: float = 2.0,
        task_alpha: float = 1.0,
        kd_alpha: float = 1.0,
        rail_alpha: float = 1.0,
        per: str = "epoch",
        seed: int = 0,
        train_teacher_projection: bool = False,
        tokenizers: Optional[tuple] = None,
        task: Optional[str] = None,
        impl: str = "auto",
    ):
        super().__init__(student, teacher, task=task, impl=impl)
        s, t = self.student_model, self.teacher_model
        self.layer_map = layer_map = self._checked_map(layer_map, RandomLayerMap, per=per, seed=seed)
        self.distance = PooledDistanceLoss(
            s.hidden_size,
            t.hidden_size,
            len(layer_map),
            proj_dim,
            concat=concat,
            pooling=pooling,
            train_teacher_projection=train_teacher_projection,
            impl=impl,
        )
        self.alphas = {
            "task": check_alpha("task_alpha", task_alpha),
            "kd": check_alpha("kd_alpha", kd_alpha),
            "rail": check_alpha("rail_alpha", rail_alpha),
        }
        if self.alphas["kd"]:
            check_same_vocab(s, t, tokenizers, "RAIL-KD's KL term")
        self.temperature = check_temperature("temperature", temperature)

    def teacher_layers_needed(self) -> Optional[list[int]]:
        if self.alphas["kd"]:
            return None
        return list(self.layer_map.teacher_layers) if self.alphas["rail"] else []

    def teacher_cache_expect(self) -> dict:
        """Every layer the draws may pick, pooled: the cache serves any draw."""
        layers = list(self.layer_map.teacher_layers) if self.alphas["rail"] else []
        return {"layers": layers, "temperature": self.temperature, "targets": f"pooled-{self.distance.pooling}"}

    def cache_transform(self):
        return lambda states, mask: pool_states(
            states, mask, pooling=self.distance.pooling, concat=False, impl=self.impl
        )

    def forward(
        self, batch: dict, *, step: Optional[int] = None, epoch: int = 0, teacher_batch: Optional[dict] = None
    ) -> RecipeOutput:
        pairs = self.layer_map.draw(step=self._schedule_step(step), epoch=epoch)
        use_rail = bool(self.alphas["rail"])
        s_out = self.student_model(batch, pairs.student if use_rail else ())
        t_out = self._teacher_forward(batch, teacher_batch, pairs.teacher if use_rail else ())
        terms, layer_losses = self._output_terms(s_out, t_out, batch, self.alphas, self.temperature), None
        if use_rail:
            terms["rail"] = self.distance(
                s_out.hidden_states,
                t_out.hidden_states,
                s_out.mask,
                t_out.mask,
                teacher_pooled=self.teacher_cache is not None,
            )
            layer_losses = self.distance.layer_losses
        return self._total(terms, self.alphas, layer_losses=layer_losses, logits=s_out.logits.detach())
