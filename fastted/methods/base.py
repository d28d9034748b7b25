"""What every recipe shares: the trained student, the frozen teacher, the step, the weighted terms.

A recipe is an ``nn.Module`` whose parameters are exactly what it trains
(the student and its filters, heads or projections) and whose ``forward(batch)``
returns a :class:`RecipeOutput` with the loss to backpropagate. The teacher
(and anything else frozen: its filters, a stage-I model) is held outside the
module tree: it is not in ``parameters()`` or ``state_dict()``, stays in eval
mode, and still follows ``recipe.to(...)``; building the recipe sets its
parameters' ``requires_grad`` to False.

What the engine (and any other trainer) may rely on, and nothing else:

- ``recipe(batch, step=..., epoch=...)`` -> :class:`RecipeOutput`;
- ``recipe.parameters()``: what trains; ``recipe.teacher``: the frozen
  teacher model or None; :meth:`Recipe.frozen_modules`: every frozen module
  held outside the tree (to cast, partition or move them);
- :meth:`Recipe.external_parameters`: the trained parameters that the fused
  losses read outside their own module's forward (ZeRO-3 must gather them);
- :meth:`Recipe.save_pretrained`: the trained model, loadable with
  ``from_pretrained``;
- :meth:`Recipe.from_config`: the recipe of a run's config (:func:`register`
  puts each method in :data:`REGISTRY`, by its name in a config, with its
  settings dataclass, from which the config builds ``distil.<name>``);
- :meth:`Recipe.use_teacher_cache`: distil from a teacher cache
  (:mod:`fastted.train.cache`) instead of running the teacher (TED, LWD, KD).

With ``fused_lm_head=True`` (language modelling: TED, LWD, KD, DWT) the
models run without their vocabulary projections and the "task" and "kd"
terms come from one :func:`~fastted.ops.fused_linear_kd.fused_linear_kd` call
on the projections' inputs: the (N, V) logits of student and teacher are
never materialized.

"step" here is always the optimizer step: the schedules and the layer draws
are functions of it.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

import torch
from torch import Tensor, nn

from fastted.mapping import LayerMap, RandomLayerMap, uniform_map
from fastted.models import ModelAdapter, ModelOutputs, adapt, gathered
from fastted.ops.checks import check_impl
from fastted.ops.fused_linear_kd import fused_linear_kd
from fastted.ops.logit_kd import logit_kd
from fastted.ops.sparse_logit_kd import fused_linear_sparse_kd, sparse_logit_kd


@dataclass
class RecipeOutput:
    """One step of a recipe."""

    loss: Tensor  # the weighted total (fp32 scalar)
    terms: dict[str, Tensor] = field(default_factory=dict)  # each term, unweighted and detached
    weights: dict[str, float] = field(default_factory=dict)  # each term's weight at this step
    layer_losses: Optional[Tensor] = None  # per mapped pair (or filter), detached
    logits: Optional[Tensor] = None  # the student's logits, for metrics (None if fused)

    def as_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (the tensors themselves, not copies): what DeepSpeed can hook."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass
class RecipeModels:
    """What a recipe is built from besides its settings (see :meth:`Recipe.from_config`)."""

    student: Any  # the trained model
    teacher: Any  # the frozen teacher
    tokenizers: Optional[tuple] = None  # (student's, teacher's): the recipes check that they agree
    total_steps: Optional[int] = None  # optimizer steps of the run (for schedules over the run)
    train_size: Optional[int] = None  # training examples (CoDIR's momentum bank: one entry each)
    filters: Optional[tuple] = None  # TED: (student's, teacher's) stage-I TaskFilters


# The terms of the logits, which the fused LM head computes in one call.
_HEAD_TERMS = ("task", "kd")

# The batch key under which Recipe.prefetch puts a teacher cache's read of the batch (a dict of tensors).
PREFETCHED = "teacher_cache"


def _map_tensors(fn, value):
    """``value`` with ``fn`` applied to each tensor in it, through dicts, lists, tuples and named tuples (a
    :class:`~fastted.ops.packed_topk.PackedTopK`); anything else as it is."""
    if torch.is_tensor(value):
        return fn(value)
    if isinstance(value, dict):
        return {key: _map_tensors(fn, v) for key, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_map_tensors(fn, v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(fn, v) for v in value)
    return value


def _freeze(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()


# ------------------------------------------------------------------ the methods and their settings

# A recipe's keyword arguments that the run supplies, never its method's settings: the tokenizers to check, the
# task, the fused losses' path, the fused LM head (distil.fused_lm_head, shared by the methods), the run's
# optimizer steps and its seed. Recipe.from_config passes each that the recipe's __init__ takes.
RUN_OPTIONS = ("tokenizers", "task", "impl", "fused_lm_head", "total_steps", "seed")

# The distillation methods by their names in a config (distil.methods, distil.<name>), in registration order:
# the order of fastted.methods' imports.
REGISTRY: dict[str, type[Recipe]] = {}


def setting(default, check: Union[str, tuple, None] = None, **kwargs):
    """A field of a method's settings dataclass: its default and the range a config checks it against (``"> 0"``,
    ``">= 0"`` or a tuple of the allowed values); the recipe's own checks stay in its ``__init__``."""
    return field(default=default, metadata={} if check is None else {"check": check}, **kwargs)


def register(name: str, settings: type, old_keys: Optional[dict[str, str]] = None):
    """Class decorator: the recipe of method ``name`` with its settings dataclass, whose fields are the recipe's
    keyword arguments with the same names and defaults (besides the models and :data:`RUN_OPTIONS`).
    ``old_keys``: the flat ``distil.<key>`` of configs written before the methods owned their settings, by the
    field each set (a config maps them with a deprecation notice)."""
    if not dataclasses.is_dataclass(settings):
        raise ValueError(f"register({name!r}): settings must be a dataclass, got {settings!r}")

    def wrap(cls: type[Recipe]) -> type[Recipe]:
        if name in REGISTRY:
            raise ValueError(f"method {name!r} is registered twice: {REGISTRY[name].__name__} and {cls.__name__}")
        fields = {f.name for f in dataclasses.fields(settings)}
        unknown = {old: new for old, new in (old_keys or {}).items() if new not in fields}
        if unknown:
            raise ValueError(
                f"register({name!r}): old_keys map to {sorted(unknown.values())}, not fields of {settings.__name__}"
            )
        cls.method, cls.settings, cls.old_keys = name, settings, dict(old_keys or {})
        REGISTRY[name] = cls
        return cls

    return wrap


class Recipe(nn.Module):
    """Base of the recipes.

    Args:
        student: the trained model (a Hugging Face model or a ModelAdapter).
            ``self.student`` is the model, ``self.student_model`` its adapter.
        teacher: the frozen model, or None (stage I trains filters alone);
            ``self.teacher`` and ``self.teacher_model`` likewise.
        task: "classification", "mlm" or "clm" (inferred from the classes).
        impl: the fused losses' path, "auto", "triton" or "reference".
        train_student: False freezes the student model too (TED's stage I).
        fused_lm_head: compute the "task" and "kd" terms on the LM heads'
            inputs with :func:`~fastted.ops.fused_linear_kd.fused_linear_kd`,
            without the logits (tasks "mlm" and "clm" only; see the recipes).

    ``forward(batch, step=None, epoch=0)``: ``step``, the optimizer step,
    drives schedules and per-step layer draws; None uses the recipe's own
    ``forward_count``, which counts the forwards in training mode (pass the
    optimizer step when accumulating gradients). The count is in the state
    dict.

    Class attributes of the distillation recipes: ``label``, the method's
    name in reports; ``uses_stage1_filters``, whether it distils through
    TED's stage-I filters (the pipeline then loads the filters jobs' models).
    """

    label: str = ""
    uses_stage1_filters: bool = False
    method: ClassVar[str] = ""  # register(): the name in a config
    settings: ClassVar[Optional[type]] = None  # register(): the settings dataclass, distil.<method> of a config
    old_keys: ClassVar[dict[str, str]] = {}  # register(): old flat distil keys -> settings fields
    reads_teacher_cache: bool = False  # use_teacher_cache() works: a config allows distil.teacher_cache for it
    needs_example_ids: bool = False  # every training batch must carry batch["index"] (CoDIR's momentum bank)
    reads_quantized_targets: bool = False  # its loss takes a cache's int8 / fp8 targets with their row scales

    def __init__(
        self,
        student,
        teacher=None,
        *,
        task: Optional[str] = None,
        impl: str = "auto",
        train_student: bool = True,
        fused_lm_head: bool = False,
    ):
        super().__init__()
        self.impl = check_impl(impl)
        self._frozen: list[nn.Module] = []  # a plain list: never registered, never in parameters()
        self.student_model = adapt(student, task)
        if train_student:
            self.student = self.student_model.model
        else:  # TED's stage I: the model is frozen, its filters train
            self.hold_frozen(self.student_model.model, "student")
        self.teacher_model: Optional[ModelAdapter] = None
        object.__setattr__(self, "teacher", None)
        if teacher is not None:
            self.teacher_model = adapt(teacher, task)
            if self.teacher_model.model is self.student_model.model:
                raise ValueError("teacher and student are the same module: the teacher must be a separate model")
            self.hold_frozen(self.teacher_model.model, "teacher")
        self.fused_lm_head = self._check_fused_lm_head(fused_lm_head)
        self.forward_count = 0
        self._teacher_truncated = False  # truncate_teacher() cut it: an LM teacher then skips its head
        self.teacher_cache = None  # use_teacher_cache(): the teacher's outputs come from it

    def _check_fused_lm_head(self, fused_lm_head) -> bool:
        if not isinstance(fused_lm_head, bool):
            raise ValueError(f"fused_lm_head must be a bool, got {fused_lm_head!r}")
        if not fused_lm_head:
            return False
        task = self.student_model.task
        if task not in ("mlm", "clm"):
            raise ValueError(
                f"fused_lm_head=True fuses the vocabulary projection of a language model: it needs the "
                f"task 'mlm' or 'clm', but this {type(self).__name__} is for {task!r}"
            )
        for adapter in (self.student_model, self.teacher_model):
            if adapter is not None:
                try:
                    adapter.lm_head_parts()  # raises where the model cannot be cut before its projection
                except ValueError as err:
                    raise ValueError(f"fused_lm_head=True: {err}") from None
        return True

    def hold_frozen(self, module: nn.Module, name: str) -> nn.Module:
        """Keep ``module`` frozen (no grad, eval mode) as ``self.<name>``, outside the module tree."""
        self._frozen.append(_freeze(module))
        object.__setattr__(self, name, module)  # bypasses nn.Module's registration
        return module

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self._frozen:
            module.eval()
        return self

    def _apply(self, fn, *args, **kwargs):
        for module in self._frozen:
            module._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    def get_extra_state(self) -> dict:
        return {"forward_count": self.forward_count}

    def set_extra_state(self, state: dict) -> None:
        # "step": the key of checkpoints written before the counter was named forward_count
        self.forward_count = int(state["forward_count"] if "forward_count" in state else state["step"])

    # ------------------------------------------------------------------ the interface beyond forward

    @classmethod
    def from_config(cls, config, models: RecipeModels) -> Recipe:
        """The recipe of a run: its method's settings read from ``config.distil.<method>`` (a
        :class:`fastted.train.config.Config`), its models from ``models``, the run's options
        (:data:`RUN_OPTIONS`) that its ``__init__`` takes. The registered recipes have it; the registry of
        :mod:`fastted.methods` calls it."""
        if cls.settings is None:
            raise NotImplementedError(f"{cls.__name__} is not built from a run's config")
        settings = dataclasses.asdict(getattr(config.distil, cls.method))
        return cls(
            *cls._config_models(models), **cls._config_settings(settings, models), **cls._config_options(config, models)
        )

    @classmethod
    def _config_models(cls, models: RecipeModels) -> tuple:
        """The positional arguments of :meth:`from_config`: (student, teacher)."""
        return models.student, models.teacher

    @classmethod
    def _config_settings(cls, settings: dict, models: RecipeModels) -> dict:
        """The method's settings as its keyword arguments (a recipe may resolve one against the run)."""
        return settings

    @classmethod
    def _config_options(cls, config, models: RecipeModels) -> dict:
        """The run's options that the recipe's ``__init__`` takes: tokenizers, task, impl; the run's steps
        and seed; and ``distil.fused_lm_head`` on LM tasks for the recipes that can fuse the LM heads."""
        run = dict(
            tokenizers=models.tokenizers,
            task=config.task,
            impl=config.engine.impl,
            total_steps=models.total_steps,
            seed=config.seed,
        )
        if config.task != "classification":
            run["fused_lm_head"] = config.distil.fused_lm_head
        takes = inspect.signature(cls).parameters
        return {name: value for name, value in run.items() if name in takes}

    def frozen_modules(self) -> list[nn.Module]:
        """The frozen modules held outside the module tree: the teacher, its filters, a stage-I model."""
        return list(self._frozen)

    def external_parameters(self) -> list[nn.Parameter]:
        """The trained parameters that the fused losses read outside their owning module's forward.

        Conservatively everything that is not the student model (filters,
        projections and heads go straight into the fused kernels), and with
        ``fused_lm_head`` the student's output embeddings. Under ZeRO-3 the
        engine registers them with the module it runs, which gathers them for
        its forward and backward.
        """
        student = self.student
        inside = {id(p) for p in student.parameters()} if isinstance(student, nn.Module) else set()
        params = [p for p in self.parameters() if id(p) not in inside]
        if self.fused_lm_head:
            params += [p for p in self.student_model.lm_head_parts() if p is not None]
        unique = {id(p): p for p in params}
        return list(unique.values())

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Save what the recipe trained, loadable with ``from_pretrained``: by default the student model."""
        self.student_model.model.save_pretrained(directory)

    def teacher_layers_needed(self) -> Optional[list[int]]:
        """The teacher layers this recipe reads when none of its terms needs the teacher's logits, else None (the
        whole teacher). The distillation recipes implement it; by default the whole teacher is needed."""
        return None

    def truncate_teacher(self) -> Optional[int]:
        """Cut the teacher after the last layer the recipe reads when no term needs its logits (LWD or TED without
        the KL term, CoDIR or RAIL-KD without KD): its later blocks never run, and under ZeRO-3 are never
        partitioned or gathered. In place, on the teacher module; call it before training (the pipeline does,
        ``distil.truncate_teacher``). Returns the number of blocks kept, or None when nothing was cut."""
        layers = self.teacher_layers_needed()
        if self.teacher_model is None or layers is None:
            return None
        keep = max(layers) + 1 if layers else 1
        if keep >= self.teacher_model.num_layers:
            return None
        from fastted.models import keep_layers

        model, task = self.teacher_model.model, self.teacher_model.task
        keep_layers(model, list(range(keep)))
        self.teacher_model = adapt(model, task)
        self._teacher_truncated = True
        return keep

    @property
    def teacher_truncated(self) -> bool:
        """Whether :meth:`truncate_teacher` cut the teacher (a language model's teacher then runs no head)."""
        return self._teacher_truncated

    def replace_teacher(self, model) -> None:
        """Hold ``model`` as the teacher in place of the one the recipe was built on: the pipeline builds a
        recipe on a meta-device stand-in of the teacher, learns from :meth:`truncate_teacher` the blocks it reads,
        and builds (partitioned) only those. ``model`` must match the current teacher's blocks (after the cut),
        width and vocabulary; the recipe reads nothing else of the stand-in."""
        old = self.teacher_model
        if old is None:
            raise ValueError(f"{type(self).__name__} has no teacher to replace")
        new = adapt(model, old.task)
        got, want = [(a.num_layers, a.hidden_size, a.vocab_size) for a in (new, old)]
        if got != want:
            raise ValueError(
                f"replace_teacher: the new teacher has (blocks, width, vocabulary) {got}, the recipe's {want}"
            )
        self._frozen = [_freeze(model) if m is old.model else m for m in self._frozen]
        if self.teacher is old.model:
            object.__setattr__(self, "teacher", model)
        self.teacher_model = new

    # ------------------------------------------------------------------ a cached teacher

    def teacher_cache_expect(self) -> dict:
        """What a teacher cache must hold for this recipe, as :class:`~fastted.train.cache.TeacherCache` checks it:
        ``layers`` (the teacher layers stored, in order), ``temperature`` (of the stored tail) and ``targets``
        (what a layer's target is: "raw" states, "filters:<hash>" of TED's frozen teacher filters, or
        "pooled-<pooling>" vectors of CoDIR and RAIL-KD)."""
        served = ", ".join(recipe.label for recipe in REGISTRY.values() if recipe.reads_teacher_cache)
        raise ValueError(
            f"{type(self).__name__} reads no teacher cache: it needs the live teacher (a teacher cache serves {served})"
        )

    def cache_transform(self):
        """What the cache stores of the captured layer states: ``build_teacher_cache``'s ``transform(states,
        mask)``, or None for the raw states."""
        return None

    def use_teacher_cache(self, cache) -> None:
        """Distil from ``cache`` (a :class:`~fastted.train.cache.TeacherCache` of this run's training data) instead of
        running the teacher: the KL term reads its top-k logits (:func:`~fastted.ops.sparse_logit_kd.sparse_logit_kd`,
        or fused with the student's head), the MSE term its stored layer targets. Batches then need
        ``batch["index"]``, their dataset rows. The teacher (and its TED filters) leave the frozen modules:
        nothing moves, casts or partitions them, and ``recipe.teacher`` is None. A cache that holds other
        layers, another temperature or other targets than the recipe needs is a ValueError naming each."""
        expect = self.teacher_cache_expect()
        differ = [
            f"{key}: cache {cache.manifest.get(key)!r}, recipe {want!r}"
            for key, want in expect.items()
            if cache.manifest.get(key) != want
        ]
        if self._needs_cached_logits() and cache.manifest.get("logits") is None:
            differ.append("logits: the cache holds none (k = 0), the KL term needs them")
        if differ:
            raise ValueError(
                f"teacher cache {cache.directory} does not hold what this {type(self).__name__} "
                f"needs ({'; '.join(differ)})"
            )
        self.teacher_cache = cache
        self._cache_slot = {layer: i for i, layer in enumerate(cache.manifest["layers"])}
        dropped = {id(m) for m in self._cache_replaces()}
        self._frozen = [m for m in self._frozen if id(m) not in dropped]
        object.__setattr__(self, "teacher", None)

    def _needs_cached_logits(self) -> bool:
        """Whether a KL term reads the cached logits (the recipes that read a cache weigh it by alphas["kd"])."""
        return bool(self.alphas["kd"])

    def _cache_replaces(self) -> list[nn.Module]:
        """The frozen modules a cache stands in for: the teacher."""
        return [self.teacher_model.model]

    def prefetch(self, batch: dict, pin: bool = False) -> dict:
        """``batch`` with the teacher cache's read of its rows under ``batch["teacher_cache"]``
        (:data:`PREFETCHED`), made now on the host: a trainer calls it ahead of the step (in a background thread,
        :class:`fastted.train.trainer.Prefetcher`), so the forward reads nothing. ``pin``: the read's tensors in pinned
        memory, for a CUDA run whose copies to the device then overlap the step. Without a cache, or a batch
        without ``index``, ``batch`` itself (the forward then reads, or raises, as it would have)."""
        if self.teacher_cache is None or "index" not in batch:
            return batch
        stored = self._read_cache(batch)
        if pin:
            stored = _map_tensors(Tensor.pin_memory, stored)
        return {**batch, PREFETCHED: stored}

    def _read_cache(self, batch: dict, device=None) -> dict:
        """The cache's stored outputs of ``batch``'s rows (:meth:`fastted.train.cache.TeacherCache.batch`), on
        ``device`` (None: the host)."""
        # int8 / fp8 targets stay quantized: the filtered MSE kernel dequantizes them by their row scales
        return self.teacher_cache.batch(
            batch["index"], batch.get("attention_mask"), device=device, dequantize=not self.reads_quantized_targets
        )

    def _cached_teacher(self, batch: dict, layers) -> ModelOutputs:
        """The teacher's outputs of ``batch`` read from the cache (or read ahead by :meth:`prefetch`): top-k
        logits and the layers' targets."""
        if "index" not in batch:
            raise ValueError(
                "a cached teacher needs batch['index'], the batch's rows of the dataset the cache was "
                "made from (the run's collators add it)"
            )
        missing = [layer for layer in layers if layer not in self._cache_slot]
        if missing:
            raise ValueError(
                f"teacher cache {self.teacher_cache.directory} holds layers {list(self._cache_slot)}, not {missing}"
            )
        mask = batch.get("attention_mask")
        device = batch["input_ids"].device
        stored = batch.get(PREFETCHED)
        if stored is None:
            stored = self._read_cache(batch, device)
        else:  # read ahead on the host (pinned on a CUDA run): the host does not wait for the copies
            stored = _map_tensors(lambda x: x.to(device, non_blocking=True), stored)
        slots = [self._cache_slot[layer] for layer in layers]
        scales = None if stored["scales"] is None else [stored["scales"][i] for i in slots]
        return ModelOutputs(
            None,
            [stored["targets"][i] for i in slots],
            mask,
            topk=stored["topk"],
            target_scales=scales,
            target_mask=stored.get("target_mask"),
        )

    def activation_checkpointing_enable(self, **kwargs) -> None:
        """Recompute the student's activations in its backward (``transformers.Trainer``'s
        ``gradient_checkpointing``): handed to the student model, under whichever name its transformers has."""
        self._student_checkpointing("activation", kwargs)

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        """The older name of :meth:`activation_checkpointing_enable`."""
        self._student_checkpointing("gradient", kwargs)

    def _student_checkpointing(self, kind: str, kwargs: dict) -> None:
        model = self.student_model.model
        if not hasattr(model, f"{kind}_checkpointing_enable"):
            other = "gradient" if kind == "activation" else "activation"
            kwargs = {
                k.replace(kind, other, 1) if k == f"{kind}_checkpointing_kwargs" else k: v for k, v in kwargs.items()
            }
            kind = other
        getattr(model, f"{kind}_checkpointing_enable")(**kwargs)

    # ------------------------------------------------------------------ helpers for the recipes

    def _schedule_step(self, step: Optional[int]) -> int:
        """The optimizer step the schedules and draws of this forward follow: ``step``, or the forward count."""
        if step is None:
            step = self.forward_count
            if self.training:
                self.forward_count += 1
        elif isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        return step

    def _student_forward(self, batch: dict, layers=()):
        """The student on ``batch``: its logits, or with fused_lm_head its LM head's input."""
        return self.student_model(batch, layers, head=not self.fused_lm_head)

    def _teacher_forward(self, batch: dict, teacher_batch: Optional[dict], layers=()):
        if self.teacher_cache is not None:
            return self._cached_teacher(batch if teacher_batch is None else teacher_batch, layers)
        # A truncated LM teacher stops before its vocabulary projection: its logits would be of a middle layer.
        head = not (self.fused_lm_head or (self._teacher_truncated and self.teacher_model.task != "classification"))
        with torch.no_grad():
            return self.teacher_model(batch if teacher_batch is None else teacher_batch, layers, head=head)

    @staticmethod
    def _detached_logits(student_out) -> Optional[Tensor]:
        return None if student_out.logits is None else student_out.logits.detach()

    def _checked_map(self, layer_map, kind=LayerMap, **default):
        """``layer_map`` (default: uniform, or RAIL-KD's draw over all layers, with the keyword arguments
        ``default``) checked against both models."""
        s, t = self.student_model, self.teacher_model
        if layer_map is None:
            layer_map = (uniform_map if kind is LayerMap else RandomLayerMap)(s.num_layers, t.num_layers, **default)
        if not isinstance(layer_map, kind):
            raise ValueError(f"layer_map must be a {kind.__name__} (fastted.mapping), got {type(layer_map).__name__}")
        names = ("student", "teacher") if kind is LayerMap else ("student_layers", "teacher_layers")
        for adapter, name in zip((s, t), names):
            adapter.check_layers(f"layer_map.{name}", getattr(layer_map, name))
        return layer_map

    def _output_terms(self, student_out, teacher_out, batch: dict, weights: dict, temperature: float) -> dict:
        """The terms on the logits whose weight is not 0: "task" (the student's task loss) and "kd":
        KL(softmax(t / T) || softmax(s / T)) * T^2 over the examples, or the tokens of the attention mask."""
        terms = {}
        if weights["task"]:
            terms["task"] = self.student_model.task_loss(student_out.logits, batch.get("labels"))
        if weights["kd"]:
            mask = None if self.student_model.task == "classification" else student_out.mask
            if teacher_out.topk is not None:  # a cached teacher's top-k, packed: read as it is
                terms["kd"] = sparse_logit_kd(
                    student_out.logits, teacher_out.topk, temperature=temperature, mask=mask, impl=self.impl
                )
            else:
                terms["kd"] = logit_kd(
                    student_out.logits, teacher_out.logits, temperature=temperature, mask=mask, impl=self.impl
                )
        return terms

    def _head_terms(
        self, student_out, teacher_out, batch: dict, weights: dict, temperature: float
    ) -> tuple[dict, Optional[Tensor]]:
        """(terms, head_loss): :meth:`_output_terms` and None, or with fused_lm_head the detached "task" and
        "kd" and their weighted sum from one fused call, which :meth:`_total` adds as it is."""
        if not self.fused_lm_head:
            return self._output_terms(student_out, teacher_out, batch, weights, temperature), None
        return self._fused_output_terms(student_out, teacher_out, batch, weights, temperature)

    def _fused_output_terms(
        self, student_out, teacher_out, batch: dict, weights: dict, temperature: float
    ) -> tuple[dict, Optional[Tensor]]:
        """:meth:`_output_terms` on the LM heads' inputs: ``weights["kd"] * kd + weights["task"] * task`` from
        :func:`~fastted.ops.fused_linear_kd.fused_linear_kd`, over the attention mask's tokens (the task loss:
        those whose label, shifted by one for "clm" as HF shifts it, is not -100)."""
        w_task, w_kd = weights["task"], weights["kd"]
        if not (w_task or w_kd):
            return {}, None
        student = self.student_model
        xs = student_out.head_input
        ws, bs = student.lm_head_parts()
        labels = None
        if w_task:
            labels = batch.get("labels")
            if labels is None:
                raise ValueError(f"the {student.task} task loss needs batch['labels']")
        options = dict(
            temperature=temperature,
            mask=student_out.mask,
            hard_labels=labels,
            hard_weight=w_task,
            soft_weight=w_kd,
            impl=self.impl,
            return_terms=True,
            shift_labels=labels is not None and student.task == "clm",  # state t predicts label t + 1
            kd_ignored_rows=True,
        )  # the KL over every token the mask keeps, as the unfused recipes
        if w_kd and teacher_out.topk is not None:  # a cached teacher: its top-k logits, no head of its own
            loss, kd, ce = fused_linear_sparse_kd(xs, ws, teacher_out.topk, student_bias=bs, **options)
        else:
            if w_kd:
                xt = teacher_out.head_input
                wt, bt = self.teacher_model.lm_head_parts()
            else:  # no KL: the student's own head stands in as a constant teacher, whose vocabulary may differ
                xt, wt, bt = xs.detach(), ws.detach(), None if bs is None else bs.detach()
            with gathered((wt, bt)):  # a ZeRO-3 teacher's head is partitioned outside its forward
                loss, kd, ce = fused_linear_kd(xs, ws, xt, wt, student_bias=bs, teacher_bias=bt, **options)
        terms = {}
        if w_task:
            terms["task"] = ce
        if w_kd:
            terms["kd"] = kd
        return terms, loss

    @staticmethod
    def _total(
        terms: dict[str, Tensor], weights: dict[str, float], head_loss: Optional[Tensor] = None, **extra
    ) -> RecipeOutput:
        """loss = sum of weight * term over the terms present; ``head_loss``, the fused LM head's weighted
        "task" + "kd", is added as it is, in place of those two terms."""
        parts = [weights[name] * term for name, term in terms.items() if head_loss is None or name not in _HEAD_TERMS]
        loss = sum(parts if head_loss is None else [head_loss] + parts)
        if not isinstance(loss, Tensor):
            raise ValueError(f"every term of this recipe has weight 0 ({weights}): nothing to train")
        detached = {name: term.detach() for name, term in terms.items()}
        return RecipeOutput(loss=loss, terms=detached, weights={k: weights[k] for k in terms}, **extra)
