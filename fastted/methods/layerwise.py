"""What TED, LWD and KD share: the task loss, the KL term and a mean-squared error over mapped layers::

    loss = task_alpha * task + kl_alpha * KL(T) + mse_alpha * mean_l MSE(f_s^l(S_l), f_t^l(H_l))

:class:`LayerwiseRecipe` holds the terms, the teacher cache and the forward; a
method says what the MSE compares (:meth:`LayerwiseRecipe._mse_inputs`): TED
its stage-I filters of both models, LWD the student's projections of its
states to the teacher's raw ones, KD nothing (``mse_alpha`` 0, no layers).
The filtered MSE of all layers is one fused kernel launch; with
``fused_lm_head=True`` (language modelling) the task and KL terms are one fused
pass over both LM heads, without their logits.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from fastted.mapping import LayerMap
from fastted.methods.base import Recipe, RecipeOutput, setting
from fastted.models import check_same_vocab
from fastted.ops.checks import check_alpha, check_temperature
from fastted.ops.filtered_mse import filtered_mse
from fastted.ops.quantize import dequantize_rows


@dataclass
class LogitSettings:
    """The settings of the task and KL terms (KD's; TED's and LWD's extend them)."""

    task_alpha: float = setting(1.0, ">= 0")  # weight of the student's task loss
    kl_alpha: float = setting(1.0, ">= 0")  # weight of KL(softmax(t / T) || softmax(s / T)) * T^2
    temperature: float = setting(2.0, "> 0")  # T of the KL term (TED's and DistilBERT's 2)


@dataclass
class LayerwiseSettings(LogitSettings):
    """The settings of TED's and LWD's MSE term besides the task and KL terms."""

    mse_alpha: float = setting(1.0, ">= 0")  # weight of the mean over mapped layers of their MSE
    mask_padding: bool = True  # the MSE over the attention mask's tokens (False: every token,
    # padding included, as TED's public code)
    normalize_mse: bool = False  # each layer's MSE over its targets' mean square (measured on the
    # first batch), so one mse_alpha carries across models


# The flat distil keys of configs written before the methods owned their settings, as TED and LWD read them.
LAYERWISE_OLD_KEYS = {field.name: field.name for field in dataclasses.fields(LayerwiseSettings)}


class LayerwiseRecipe(Recipe):
    """The shared base of TED, LWD and KD: see the module.

    Args:
        student, teacher: the models (Hugging Face models or ModelAdapters).
        layer_map: the mapped layers (None: no MSE term, ``mse_alpha`` must
            be 0); :meth:`_mapped_layers` checks it.
        task_alpha, kl_alpha, mse_alpha: the weights of the three terms.
        temperature: of the KL term.
        mask_padding: average the MSE over the attention mask's tokens
            (default); False averages over every token, padding included.
        normalize_mse: divide each layer's MSE by its targets' mean square
            (per element, over the first training batch's tokens, averaged
            over ranks; then fixed, and saved with the recipe), so the term
            is the relative error and one ``mse_alpha`` carries across models
            whose hidden states differ in scale. The logged layer losses stay
            the raw MSEs.
        tokenizers: (student's, teacher's), to check that they agree.
        fused_lm_head: language modelling ("mlm", "clm") only: see
            :class:`~fastted.methods.ted.TED`.
    """

    reads_teacher_cache = True
    reads_quantized_targets = True  # the filtered MSE kernel dequantizes them (TED, LWD; KD reads no layer)

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
        tokenizers: Optional[tuple] = None,
        task: Optional[str] = None,
        impl: str = "auto",
        fused_lm_head: bool = False,
    ):
        super().__init__(student, teacher, task=task, impl=impl, fused_lm_head=fused_lm_head)
        self.layer_map = layer_map = self._mapped_layers(layer_map)
        self.alphas = {
            "task": check_alpha("task_alpha", task_alpha),
            "kd": check_alpha("kl_alpha", kl_alpha),
            "mse": check_alpha("mse_alpha", mse_alpha),
        }
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

    def _mapped_layers(self, layer_map: Optional[LayerMap]) -> Optional[LayerMap]:
        """The layer map the MSE term compares, checked against both models (None: none)."""
        return None if layer_map is None else self._checked_map(layer_map)

    def _mse_inputs(self, student_states: list[Tensor], teacher_states: list[Tensor]) -> dict:
        """:func:`~fastted.ops.filtered_mse.filtered_mse`'s inputs of the mapped layers' states: what each
        method compares."""
        raise NotImplementedError(f"{type(self).__name__} has no MSE term")

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
            raise ValueError(
                f"normalize_mse: the teacher's targets have mean squares {power.tolist()} on the first "
                f"batch; each layer's needs to be finite and > 0 to divide its MSE by"
            )
        return power

    def teacher_layers_needed(self) -> Optional[list[int]]:
        return None if self.alphas["kd"] else self._cached_layers()

    # ------------------------------------------------------------------ a cached teacher

    def teacher_cache_expect(self) -> dict:
        return {"layers": self._cached_layers(), "temperature": self.temperature, "targets": self._cache_targets()}

    def _cache_targets(self) -> str:
        """What the cache stores of a layer: the raw states (TED: its frozen teacher filters' outputs)."""
        return "raw"

    def _cached_layers(self) -> list[int]:
        return list(self.layer_map.teacher) if self.alphas["mse"] and self.layer_map is not None else []

    # ------------------------------------------------------------------ the step

    def forward(
        self, batch: dict, *, step: Optional[int] = None, epoch: int = 0, teacher_batch: Optional[dict] = None
    ) -> RecipeOutput:
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
                **inputs,
                teacher_scales=scales,
                mask=mask,
                impl=self.impl,
                layer_weights=weights,
                return_layer_losses=True,
            )
            if weights is not None:  # filtered_mse normalizes the weights by their sum: mean_l MSE_l / scale_l
                terms["mse"] = terms["mse"] * weights.mean()
        return self._total(
            terms, self.alphas, head_loss, layer_losses=layer_losses, logits=self._detached_logits(s_out)
        )
