"""A layer-wise distillation loss that owns its projections: one module to drop into any training loop.

::

    loss_fn = LayerwiseMSELoss([(1, 3), (3, 7)], student_width=384, teacher_width=768)  # LWD: 384 -> 768
    optimizer = torch.optim.AdamW([*student.parameters(), *loss_fn.parameters()], lr=1e-4)
    s = student(**batch, output_hidden_states=True)
    with torch.no_grad():
        t = teacher(**batch, output_hidden_states=True)
    loss = s.loss + loss_fn(s.hidden_states, t.hidden_states, mask=batch["attention_mask"])
    loss_fn.save_pretrained("run/layerwise")  # LayerwiseMSELoss.from_pretrained("run/layerwise")

It takes the hidden states as Hugging Face models return them with
``output_hidden_states=True`` (a tuple whose element 0 is the embeddings'
output and element ``l + 1`` block ``l``'s), or the model output itself, picks
the mapped layers, and computes :func:`~fastted.ops.filtered_mse.filtered_mse`
over all of them in one fused call. Layer ``l`` is block ``l``, 0-based, as
everywhere in fastted. A decoder's last element is its final norm's output
(GPT-2's ``ln_f``, Llama's ``norm``), not block ``L - 1``'s: map the last
block only if that is what you want to match.

The projections are its parameters: per pair a ``Linear(student_width,
filter_dim)`` (LWD's projection; TED's student filter when ``student_filters``
come from stage I), and optionally the teacher's frozen TED filters
(``teacher_filters``, a :class:`~fastted.filters.TaskFilters`; without them the
teacher's raw states are the targets and ``filter_dim`` is the teacher's width).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor, nn

from fastted.files import write_atomic
from fastted.filters import TaskFilters
from fastted.mapping import LayerMap
from fastted.ops.checks import check_impl, check_positive_int
from fastted.ops.filtered_mse import filtered_mse

_CONFIG = "layerwise.json"


def _pairs(layer_map) -> LayerMap:
    if isinstance(layer_map, LayerMap):
        return layer_map
    try:
        pairs = [tuple(p) for p in layer_map]
    except TypeError:
        raise ValueError(
            f"layer_map must be a LayerMap or a list of (student_layer, teacher_layer) pairs, got {layer_map!r}"
        ) from None
    if not pairs or any(len(p) != 2 for p in pairs):
        raise ValueError(
            f"layer_map must be a non-empty list of (student_layer, teacher_layer) pairs, got {layer_map!r}"
        )
    return LayerMap(tuple(p[0] for p in pairs), tuple(p[1] for p in pairs))


class LayerwiseMSELoss(nn.Module):
    """Layer-wise MSE between mapped hidden states of a student and a teacher, through projections it owns.

    Args:
        layer_map: a :class:`~fastted.mapping.LayerMap` or a list of
            ``(student_layer, teacher_layer)`` pairs of 0-based block indices.
        student_width, teacher_width: the models' hidden sizes.
        student_filters: a :class:`~fastted.filters.TaskFilters` to train as
            the student's projections (TED's stage II, from stage I); default:
            one ``Linear(student_width, filter_dim)`` per pair, freshly
            initialized (LWD). Its layers must be the map's student layers.
        teacher_filters: the teacher's TED filters, frozen (not trained, but
            saved); default None: the teacher's raw states are the targets.
        filter_dim: the compared width; default the teacher filters' width, or
            the teacher's width.
        projection: False matches the student's raw states to the targets
            (no parameters; needs student_width == filter_dim).
        layer_weights: per-pair weights of the mean (default equal).
        impl: the fused op's path, "auto", "triton" or "reference".

    ``forward(student_hidden_states, teacher_hidden_states, mask=None)``: each
    the tuple of ``output_hidden_states=True`` (or a model output with
    ``.hidden_states``); ``mask`` the (B, T) attention mask (or any row
    weights). After a call, ``layer_losses`` holds the detached per-pair
    losses.
    """

    def __init__(
        self,
        layer_map,
        student_width: int,
        teacher_width: int,
        *,
        student_filters: Optional[TaskFilters] = None,
        teacher_filters: Optional[TaskFilters] = None,
        filter_dim: Optional[int] = None,
        projection: bool = True,
        layer_weights: Optional[Sequence[float]] = None,
        impl: str = "auto",
    ):
        super().__init__()
        self.layer_map = _pairs(layer_map)
        check_positive_int("student_width", student_width)
        check_positive_int("teacher_width", teacher_width)
        self.impl = check_impl(impl)
        for name, filters in (("student_filters", student_filters), ("teacher_filters", teacher_filters)):
            if filters is not None and not isinstance(filters, TaskFilters):
                raise ValueError(f"{name} must be a fastted TaskFilters, got {type(filters).__name__}")
        default_dim = teacher_filters.filter_dim if teacher_filters is not None else teacher_width
        filter_dim = default_dim if filter_dim is None else check_positive_int("filter_dim", filter_dim)
        if filter_dim != default_dim:
            what = "the teacher filters' width" if teacher_filters is not None else "the teacher's width (no filters)"
            raise ValueError(f"filter_dim: got {filter_dim}, needs {default_dim}, {what}")
        for name, filters, layers, width in (
            ("student_filters", student_filters, self.layer_map.student, student_width),
            ("teacher_filters", teacher_filters, self.layer_map.teacher, teacher_width),
        ):
            if filters is None:
                continue
            if filters.layers != list(layers) or filters.config["hidden_size"] != width:
                raise ValueError(
                    f"{name} filter layers {filters.layers} of width {filters.config['hidden_size']}, "
                    f"but the map's layers are {list(layers)} of width {width}"
                )
            if filters.filter_dim != filter_dim:
                raise ValueError(f"{name} map to width {filters.filter_dim}, but filter_dim is {filter_dim}")
        if not isinstance(projection, bool):
            raise ValueError(f"projection must be a bool, got {projection!r}")
        if not projection and (student_filters is not None or student_width != filter_dim):
            raise ValueError(
                f"projection=False compares the student's raw states: it needs no student_filters and "
                f"student_width == filter_dim, got {student_width} and {filter_dim}"
            )
        if student_filters is None and projection:
            student_filters = TaskFilters(list(self.layer_map.student), student_width, filter_dim)
        self.student_filters = student_filters
        self.teacher_filters = teacher_filters
        if teacher_filters is not None:
            teacher_filters.requires_grad_(False)
        self.layer_weights = layer_weights
        self.config = dict(
            student_layers=list(self.layer_map.student),
            teacher_layers=list(self.layer_map.teacher),
            student_width=student_width,
            teacher_width=teacher_width,
            filter_dim=filter_dim,
            teacher_filters=teacher_filters is not None,
            projection=projection,
            layer_weights=None if layer_weights is None else [float(w) for w in layer_weights],
        )
        self.layer_losses: Optional[Tensor] = None

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher_filters is not None:
            self.teacher_filters.eval()  # frozen: no dropout, whatever the loss's mode
        return self

    @staticmethod
    def _select(name: str, hidden_states, layers) -> list[Tensor]:
        states = getattr(hidden_states, "hidden_states", hidden_states)
        if states is None:
            raise ValueError(f"{name} is None: call the model with output_hidden_states=True")
        if isinstance(states, Tensor) or not isinstance(states, (list, tuple)):
            raise ValueError(
                f"{name} must be the tuple of output_hidden_states=True (embeddings, then one tensor per "
                f"block) or a model output holding it, got {type(states).__name__}"
            )
        if max(layers) + 1 >= len(states):
            raise ValueError(
                f"{name} holds {len(states)} states (embeddings + {len(states) - 1} blocks), but the "
                f"map needs block {max(layers)} (element {max(layers) + 1})"
            )
        return [states[layer + 1] for layer in layers]

    def forward(self, student_hidden_states, teacher_hidden_states, mask: Optional[Tensor] = None) -> Tensor:
        student = self._select("student_hidden_states", student_hidden_states, self.layer_map.student)
        teacher = [
            h.detach() for h in self._select("teacher_hidden_states", teacher_hidden_states, self.layer_map.teacher)
        ]
        if self.student_filters is None:
            inputs, weights, biases = student, [None] * len(student), None
        else:
            inputs, weights, biases = self.student_filters.split(student)
        targets, t_weights, t_biases = teacher, None, None
        if self.teacher_filters is not None:
            with torch.no_grad():
                targets, t_weights, t_biases = self.teacher_filters.split(teacher)
        loss, self.layer_losses = filtered_mse(
            inputs,
            weights,
            targets,
            student_biases=biases,
            teacher_weights=t_weights,
            teacher_biases=t_biases,
            mask=mask,
            layer_weights=self.layer_weights,
            impl=self.impl,
            return_layer_losses=True,
        )
        return loss

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"pairs={list(zip(c['student_layers'], c['teacher_layers']))}, {c['student_width']} -> "
            f"{c['filter_dim']}, teacher_filters={c['teacher_filters']}"
        )

    # ------------------------------------------------------------------ save / load

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """``layerwise.json`` and the filters (``student/``, ``teacher/`` as TaskFilters folders) in ``directory``."""
        os.makedirs(directory, exist_ok=True)
        if self.student_filters is not None:
            self.student_filters.save_pretrained(os.path.join(directory, "student"))
        if self.teacher_filters is not None:
            self.teacher_filters.save_pretrained(os.path.join(directory, "teacher"))
        write_atomic(os.path.join(directory, _CONFIG), json.dumps(self.config, indent=2))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, impl: str = "auto") -> LayerwiseMSELoss:
        """The loss saved by :meth:`save_pretrained` (JSON and safetensors: no pickle)."""
        path = os.path.join(directory, _CONFIG)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no saved LayerwiseMSELoss in {directory}: missing {path}")
        with open(path, encoding="utf-8") as f:
            c = json.load(f)
        teacher = TaskFilters.from_pretrained(os.path.join(directory, "teacher")) if c["teacher_filters"] else None
        student = TaskFilters.from_pretrained(os.path.join(directory, "student")) if c["projection"] else None
        return cls(
            list(zip(c["student_layers"], c["teacher_layers"])),
            c["student_width"],
            c["teacher_width"],
            student_filters=student,
            teacher_filters=teacher,
            filter_dim=c["filter_dim"],
            projection=c["projection"],
            layer_weights=c["layer_weights"],
            impl=impl,
        )
