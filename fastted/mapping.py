"""Layer maps: which student layer learns from which teacher layer.

Layers are 0-based transformer blocks (layer l is the output of block l, see
:mod:`fastted.models`). Every map is a :class:`LayerMap` of pairs
(student layer, teacher layer), sorted by student layer:

- :func:`interval_map`: TED's rule, a filter on layer l when
  ``(l + 1) % interval == 0``, separately for each model, the same count;
- :func:`uniform_map`: the smaller model's layers spread over the larger's
  (student layer i of 6 <-> teacher layer 2i + 1 of 12);
- :func:`last_k_map`: the last k layers of both, in order;
- :func:`explicit_map`: pairs you give, checked;
- :class:`RandomLayerMap`: RAIL-KD, a random sorted draw of teacher layers
  per step or per epoch, a pure function of (seed, step or epoch) so that the
  same seed gives the same draws, also after a resume.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from fastted.ops.checks import check_positive_int

PER = ("step", "epoch")


def check_index(name: str, value, n: int, model: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < n:
        raise ValueError(f"{name} holds {value!r}, but the {model} has layers 0..{n - 1}")
    return int(value)


@dataclass(frozen=True)
class LayerMap:
    """Pairs of mapped layers: ``student[i]`` learns from ``teacher[i]``."""

    student: tuple[int, ...]
    teacher: tuple[int, ...]

    def __post_init__(self):
        for name in ("student", "teacher"):
            for layer in getattr(self, name):
                if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
                    raise ValueError(f"a layer map's {name} layers must be ints >= 0 (layer indices), got {layer!r}")
        if len(self.student) != len(self.teacher):
            raise ValueError(
                f"a layer map needs as many student layers ({len(self.student)}) as teacher layers "
                f"({len(self.teacher)})"
            )

    @property
    def pairs(self) -> list[tuple[int, int]]:
        return list(zip(self.student, self.teacher))

    def __len__(self) -> int:
        return len(self.student)


def interval_layers(n_layers: int, interval: int) -> list[int]:
    """TED's rule: the layers l of a model with ``(l + 1) % interval == 0``."""
    check_positive_int("n_layers", n_layers)
    check_positive_int("interval", interval)
    return [layer for layer in range(n_layers) if (layer + 1) % interval == 0]


def interval_map(n_student: int, n_teacher: int, student_interval: int, teacher_interval: int) -> LayerMap:
    """TED's filters: each model's interval rule, paired in order; the counts must agree.

    E.g. a 12-layer teacher with interval 2 and a 6-layer student with
    interval 1 map student layers 0..5 to teacher layers 1, 3, .., 11.
    """
    s = interval_layers(n_student, student_interval)
    t = interval_layers(n_teacher, teacher_interval)
    if len(s) != len(t) or not s:
        raise ValueError(
            f"student_interval={student_interval} puts filters on {len(s)} of the student's {n_student} layers and "
            f"teacher_interval={teacher_interval} on {len(t)} of the teacher's {n_teacher}: TED needs the same, "
            f"non-zero count (e.g. teacher_interval = n_teacher / n_student with student_interval=1)"
        )
    return LayerMap(tuple(s), tuple(t))


def uniform_map(n_student: int, n_teacher: int) -> LayerMap:
    """min(n_s, n_t) pairs spread evenly: pair i maps layer (i+1)*n/c - 1 of each model (c the count)."""
    check_positive_int("n_student", n_student)
    check_positive_int("n_teacher", n_teacher)
    c = min(n_student, n_teacher)
    return LayerMap(
        tuple((i + 1) * n_student // c - 1 for i in range(c)), tuple((i + 1) * n_teacher // c - 1 for i in range(c))
    )


def last_k_map(n_student: int, n_teacher: int, k: int) -> LayerMap:
    """The last k layers of both models, in order."""
    check_positive_int("k", k)
    if k > min(n_student, n_teacher):
        raise ValueError(f"k={k} exceeds the layers of the student ({n_student}) or the teacher ({n_teacher})")
    return LayerMap(tuple(range(n_student - k, n_student)), tuple(range(n_teacher - k, n_teacher)))


def explicit_map(pairs: Sequence[tuple[int, int]], n_student: int, n_teacher: int) -> LayerMap:
    """Your own pairs (student layer, teacher layer), checked against both models' depths."""
    if isinstance(pairs, LayerMap):
        pairs = pairs.pairs
    pairs = list(pairs)
    if not pairs or any(not isinstance(p, (tuple, list)) or len(p) != 2 for p in pairs):
        raise ValueError(f"pairs must be a non-empty list of (student_layer, teacher_layer), got {pairs!r}")
    s = tuple(check_index("pairs (student side)", p[0], n_student, "student") for p in pairs)
    t = tuple(check_index("pairs (teacher side)", p[1], n_teacher, "teacher") for p in pairs)
    if len(set(s)) != len(s):
        raise ValueError(f"pairs map a student layer twice: {pairs!r}")
    return LayerMap(s, t)


class RandomLayerMap:
    """RAIL-KD's random intermediate layer mapping.

    At each draw, ``len(student_layers)`` teacher layers are drawn without
    replacement from ``teacher_layers`` and sorted, and mapped in order to the
    student layers. The draw is a pure function of ``(seed, step)`` (``per=
    "step"``) or ``(seed, epoch)`` (``per="epoch"``): the same seed gives the
    same sequence of draws, and a resumed run draws what it would have drawn.

    Args:
        n_student, n_teacher: the models' depths.
        student_layers: the student layers to distil into (default: all).
        teacher_layers: the teacher layers to draw from (default: all).
        per: "step" or "epoch".
        seed: the seed of the draws.
    """

    def __init__(
        self,
        n_student: int,
        n_teacher: int,
        *,
        student_layers: Optional[Sequence[int]] = None,
        teacher_layers: Optional[Sequence[int]] = None,
        per: str = "epoch",
        seed: int = 0,
    ):
        check_positive_int("n_student", n_student)
        check_positive_int("n_teacher", n_teacher)
        if per not in PER:
            raise ValueError(f"per must be one of {PER}, got {per!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        s = list(range(n_student)) if student_layers is None else list(student_layers)
        t = list(range(n_teacher)) if teacher_layers is None else list(teacher_layers)
        self.student_layers = tuple(sorted(check_index("student_layers", x, n_student, "student") for x in s))
        self.teacher_layers = tuple(sorted({check_index("teacher_layers", x, n_teacher, "teacher") for x in t}))
        if not self.student_layers or len(set(self.student_layers)) != len(self.student_layers):
            raise ValueError(f"student_layers must be distinct layers, at least one, got {s!r}")
        if len(self.teacher_layers) < len(self.student_layers):
            raise ValueError(
                f"teacher_layers offers {len(self.teacher_layers)} distinct layers, but "
                f"{len(self.student_layers)} student layers each need their own"
            )
        self.per, self.seed = per, seed

    def __len__(self) -> int:
        return len(self.student_layers)

    def draw(self, step: int = 0, epoch: int = 0) -> LayerMap:
        """The map at this step (``per="step"``) or epoch (``per="epoch"``)."""
        counter = step if self.per == "step" else epoch
        if isinstance(counter, bool) or not isinstance(counter, int) or counter < 0:
            raise ValueError(f"{self.per} must be a non-negative int, got {counter!r}")
        state = np.random.SeedSequence([self.seed, counter]).generate_state(2)
        generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        picked = torch.randperm(len(self.teacher_layers), generator=generator)[: len(self.student_layers)]
        teacher = tuple(self.teacher_layers[i] for i in sorted(picked.tolist()))
        return LayerMap(self.student_layers, teacher)

    def __repr__(self) -> str:
        return (
            f"RandomLayerMap(student_layers={list(self.student_layers)}, teacher_layers="
            f"{list(self.teacher_layers)}, per={self.per!r}, seed={self.seed})"
        )
