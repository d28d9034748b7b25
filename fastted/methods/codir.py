"""CoDIR: contrastive distillation on intermediate representations (Sun et al., EMNLP 2020).

The mapped layers of each model are pooled (the mean over their valid
tokens, or the first token as in the authors' fine-tuning code) and
concatenated, projected by a learned head (one per model) and L2-normalized.
The student's vector of an example must pick out the teacher's vector of
the same example against a memory bank of teacher vectors of other examples
(InfoNCE, the fused :func:`~fastted.ops.contrastive_kd.contrastive_kd`)::

    loss = task_alpha * task + kd_alpha * KL(T) + crd_alpha * InfoNCE(s, t; bank)

In fine-tuning the negatives are the bank entries of a different label
(``label_negatives``); in pre-training, with example ids in ``batch["index"]``,
an anchor's own entry is left out. By default every allowed entry of the
bank is a negative of every anchor (one shared bank, the fused kernel's
fastest path); ``negatives=K`` draws K per anchor instead, as the authors'
code does (100, from a bank of one entry per training example:
``bank_mode="momentum"``). After each training step the batch's teacher
vectors enter the bank. Until the bank holds an entry (the first step) the
contrastive term is 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from fastted.mapping import LayerMap
from fastted.memory_bank import MemoryBank
from fastted.methods.base import Recipe, RecipeModels, RecipeOutput, register, setting
from fastted.models import check_same_vocab
from fastted.ops.checks import check_alpha, check_positive_int, check_temperature
from fastted.ops.contrastive_kd import contrastive_kd
from fastted.ops.pooling import check_pooling, pool_states, valid_examples


@dataclass
class CoDIRSettings:
    """CoDIR's settings (``distil.codir`` of a config)."""

    proj_dim: int = setting(128, "> 0")  # width of the projected vectors
    bank_size: int = setting(4096, "> 0")  # entries of the memory bank (momentum: the run's examples)
    bank_mode: str = setting("queue", ("queue", "momentum"))  # queue: the last bank_size teacher vectors;
    # momentum: one entry per training example
    negatives: int = setting(0, ">= 0")  # 0: every bank entry is every anchor's negative; K: K drawn
    # per anchor
    temperature: float = setting(0.07, "> 0")  # of the InfoNCE
    kd_temperature: float = setting(2.0, "> 0")  # of the KL term
    task_alpha: float = setting(1.0, ">= 0")
    kd_alpha: float = setting(1.0, ">= 0")  # weight of the KL term
    crd_alpha: float = setting(0.1, ">= 0")  # weight of the contrastive term
    label_negatives: bool = True  # classification: negatives of other labels only
    pooling: str = setting("mean", ("mean", "first"))  # of the mapped layers' tokens: mean, or first ([CLS])


@register(
    "codir",
    CoDIRSettings,
    old_keys={
        "task_alpha": "task_alpha",
        "kl_alpha": "kd_alpha",
        "temperature": "kd_temperature",
        "crd_alpha": "crd_alpha",
        "bank_size": "bank_size",
        "bank_mode": "bank_mode",
        "crd_negatives": "negatives",
        "pooling": "pooling",
        "projection_dim": "proj_dim",
        "crd_temperature": "temperature",
    },
)
class CoDIR(Recipe):
    """CoDIR's recipe.

    Args:
        student, teacher: the models.
        layer_map: the layers pooled and concatenated on each side; default
            :func:`~fastted.mapping.uniform_map`.
        proj_dim: width of the projected vectors.
        bank: the memory bank; default ``MemoryBank(bank_size, proj_dim,
            mode=bank_mode)`` (momentum mode needs ``batch["index"]``).
        bank_size, bank_mode: of the default bank ("queue": the last
            bank_size teacher vectors; "momentum": one entry per example id,
            bank_size of them, and every batch needs ``batch["index"]``).
        negatives: 0 (default): every allowed bank entry, shared by the
            anchors; K > 0: K allowed entries drawn per anchor (with
            replacement; as many as the bank holds while it holds fewer
            than K, filling or smaller than K).
        temperature: of the InfoNCE; kd_temperature: of the KL term.
        task_alpha, kd_alpha, crd_alpha: the weights of the task, KL and
            contrastive terms (crd_alpha 0.1: the authors' script takes it
            from its command line, with no value recorded).
        label_negatives: use only different-label negatives when the task is
            classification and the batch has labels.
        pooling: "mean" (the average over the valid tokens) or "first" (the
            first token, [CLS]: the authors' fine-tuning code).
    """

    label = "CoDIR"
    reads_teacher_cache = True

    def __init__(
        self,
        student,
        teacher,
        layer_map: Optional[LayerMap] = None,
        *,
        proj_dim: int = 128,
        bank: Optional[MemoryBank] = None,
        bank_size: int = 4096,
        bank_mode: str = "queue",
        negatives: int = 0,
        temperature: float = 0.07,
        kd_temperature: float = 2.0,
        task_alpha: float = 1.0,
        kd_alpha: float = 1.0,
        crd_alpha: float = 0.1,
        label_negatives: bool = True,
        pooling: str = "mean",
        tokenizers: Optional[tuple] = None,
        task: Optional[str] = None,
        impl: str = "auto",
    ):
        super().__init__(student, teacher, task=task, impl=impl)
        s, t = self.student_model, self.teacher_model
        check_positive_int("proj_dim", proj_dim)
        self.layer_map = self._checked_map(layer_map)
        self.student_head = nn.Linear(len(self.layer_map.student) * s.hidden_size, proj_dim)
        self.teacher_head = nn.Linear(len(self.layer_map.teacher) * t.hidden_size, proj_dim)
        self.bank = MemoryBank(bank_size, proj_dim, mode=bank_mode) if bank is None else bank
        if not isinstance(self.bank, MemoryBank):
            raise ValueError(f"bank must be a fastted.MemoryBank, got {type(bank).__name__}")
        if self.bank.dim != proj_dim:
            raise ValueError(f"bank holds vectors of width {self.bank.dim}, but proj_dim is {proj_dim}")
        self.alphas = {
            "task": check_alpha("task_alpha", task_alpha),
            "kd": check_alpha("kd_alpha", kd_alpha),
            "crd": check_alpha("crd_alpha", crd_alpha),
        }
        if self.alphas["kd"]:
            check_same_vocab(s, t, tokenizers, "CoDIR's KL term")
        self.temperature = check_temperature("temperature", temperature)
        self.kd_temperature = check_temperature("kd_temperature", kd_temperature)
        if isinstance(negatives, bool) or not isinstance(negatives, int) or negatives < 0:
            raise ValueError(
                f"negatives must be 0 (every bank entry) or a positive int (drawn per anchor), got {negatives!r}"
            )
        check_pooling(pooling)
        self.negatives = negatives
        self.label_negatives, self.pooling = bool(label_negatives), pooling

    @classmethod
    def _config_settings(cls, settings: dict, models: RecipeModels) -> dict:
        if settings["bank_mode"] == "momentum":  # one entry per training example, whatever bank_size says
            if models.train_size is None:
                raise ValueError(
                    "distil.codir.bank_mode: momentum keeps one entry per training example and needs "
                    "the training set's size (RecipeModels.train_size)"
                )
            settings = {**settings, "bank_size": models.train_size}
        return settings

    @property
    def needs_example_ids(self) -> bool:
        """A momentum bank is keyed by example id: every training batch must carry ``index``."""
        return self.bank.mode == "momentum"

    def teacher_layers_needed(self) -> Optional[list[int]]:
        return None if self.alphas["kd"] else list(self.layer_map.teacher)

    def teacher_cache_expect(self) -> dict:
        layers = list(self.layer_map.teacher) if self.alphas["crd"] else []
        return {"layers": layers, "temperature": self.kd_temperature, "targets": f"pooled-{self.pooling}"}

    def cache_transform(self):
        """The cache stores the teacher's pooled vectors, one per mapped layer and example."""
        return lambda states, mask: pool_states(states, mask, pooling=self.pooling, concat=False, impl=self.impl)

    def vectors(self, student_out, teacher_out) -> tuple:
        """(student vectors (B, P), teacher vectors (B, P)): pooled, concatenated, projected (not normalized)."""
        ps = pool_states(student_out.hidden_states, student_out.mask, pooling=self.pooling, impl=self.impl)
        if self.teacher_cache is not None:  # the cache's pooled vectors, one (B, d) per layer
            pt = torch.cat([t.to(ps.dtype) for t in teacher_out.hidden_states], -1)
        else:
            pt = pool_states(teacher_out.hidden_states, teacher_out.mask, pooling=self.pooling, impl=self.impl)
        return self.student_head(ps), self.teacher_head(pt)

    def _labels(self, batch: dict):
        if self.label_negatives and self.student_model.task == "classification" and "labels" in batch:
            return batch["labels"], "labels"
        if "index" in batch:
            return batch["index"], "index"
        return None, None

    def forward(
        self, batch: dict, *, step: Optional[int] = None, epoch: int = 0, teacher_batch: Optional[dict] = None
    ) -> RecipeOutput:
        self._schedule_step(step)
        s_out = self.student_model(batch, self.layer_map.student)
        t_out = self._teacher_forward(batch, teacher_batch, self.layer_map.teacher)
        terms = self._output_terms(s_out, t_out, batch, self.alphas, self.kd_temperature)
        if self.alphas["crd"]:
            sv, tv = self.vectors(s_out, t_out)
            anchors = valid_examples(sv.shape[0], sv.device, s_out.mask, t_out.mask)
            labels, kind = self._labels(batch)
            if self.bank.empty:
                terms["crd"] = sv.sum() * 0.0  # the first step fills the bank; a zero that keeps the graph
            else:
                if self.negatives:  # K drawn per anchor, none of its own label (or its own entry)
                    k = min(self.negatives, self.bank.size if self.bank.full else len(self.bank))
                    # An anchor with no allowed entry yet (a filling bank) keeps forbidden draws: the labels below
                    # leave them out.
                    neg = self.bank.sample(
                        k, n_anchors=sv.shape[0], strict=False, **({} if kind is None else {kind: labels})
                    )
                else:  # every filled entry, shared by the anchors
                    neg = self.bank.negatives()
                neg_labels = None if labels is None else (neg.labels if kind == "labels" else neg.index)
                terms["crd"] = contrastive_kd(
                    sv,
                    tv,
                    neg.vectors,
                    temperature=self.temperature,
                    mask=anchors,
                    labels=labels,
                    negative_labels=neg_labels,
                    impl=self.impl,
                )
            if self.training:
                keep = anchors.nonzero().squeeze(1)
                self.bank.update(
                    tv.detach()[keep],
                    labels=batch["labels"][keep] if kind == "labels" else None,
                    index=batch["index"][keep] if "index" in batch else None,
                )
        return self._total(terms, self.alphas, logits=s_out.logits.detach())
