"""Hugging Face adapters: what a recipe needs from a model, and nothing architecture-specific beyond it.

A recipe needs from a model its hidden states at the mapped layers, its
logits (the output head), its task loss and its vocabulary. :class:`ModelAdapter`
finds the transformer blocks of any Hugging Face encoder or decoder (BERT,
RoBERTa, DeBERTa-v2/v3, GPT-2, Llama-style, ...), captures the outputs of
only the requested blocks with forward hooks (the model is never asked for
all of its hidden states), and exposes the LM head as a function of hidden
states for TED's stage-I language-modelling heads.

For the fused LM-head losses (:func:`~fastted.ops.fused_linear_kd.fused_linear_kd`) a
language model also runs without its vocabulary projection
(``adapter(batch, layers, head=False)``): the base model and the part of the
head before the output embedding give the projection's input
(``ModelOutputs.head_input``), and :meth:`ModelAdapter.lm_head_parts` the
projection's weight and bias, so that ``head_input @ weight.T + bias`` are the
model's logits, which are never computed.

Layer l (0-based) is the output of transformer block l: ``hidden_states[l + 1]``
of ``output_hidden_states=True``, except that a decoder's last block is taken
before the final norm.

:func:`keep_layers` cuts a model to some of its blocks. Loading what a run's
config names is the engine's (:mod:`fastted.train.sources`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastted.mapping import check_index

TASKS = ("classification", "mlm", "clm")

# Final norms that decoders apply after their last block, as children of the blocks' parent.
_FINAL_NORMS = ("ln_f", "norm", "final_layer_norm", "final_layernorm", "norm_f")
# Config entries of models that change their logits after the vocabulary projection (soft-capping, scaling).
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")
# Batch keys that are not model inputs: example ids (memory banks, a teacher cache), a prefetched cache read.
_NON_MODEL_KEYS = ("index", "teacher_cache")


def _infer_task(model: nn.Module) -> str:
    name = type(model).__name__
    if "SequenceClassification" in name:
        return "classification"
    if "MaskedLM" in name:
        return "mlm"
    if "CausalLM" in name or "LMHead" in name:
        return "clm"
    raise ValueError(
        f"cannot tell the task of a {name}: pass task= one of {TASKS} (a *ForSequenceClassification, *ForMaskedLM "
        f"or *ForCausalLM / *LMHeadModel is recognized)"
    )


def _find_layers(model: nn.Module, n_layers: int) -> tuple[str, nn.ModuleList]:
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers]
    if len(found) != 1:
        what = "no nn.ModuleList" if not found else f"{len(found)} nn.ModuleLists ({', '.join(n for n, _ in found)})"
        raise ValueError(
            f"found {what} of config.num_hidden_layers={n_layers} blocks in the {type(model).__name__}: pass "
            f"layers='<dotted path of the transformer blocks>' (e.g. 'bert.encoder.layer', 'transformer.h')"
        )
    return found[0]


def config_int(config, *names) -> Optional[int]:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


@dataclass
class ModelOutputs:
    """One forward of an adapted model."""

    logits: Optional[Tensor]  # (B, C) classification, (B, T, V) language modelling; None with head=False
    hidden_states: list[Tensor]  # the requested layers, (B, T, d) each, in the requested order
    mask: Optional[Tensor]  # (B, T) attention mask, the token mask of every loss
    head_input: Optional[Tensor] = None  # (B, T, H) input of the vocabulary projection (head=False only)
    topk: Optional[tuple] = (
        None  # a cached teacher's logits: a PackedTopK (fastted.ops.packed_topk), see fastted.train.cache
    )
    target_scales: Optional[list[Tensor]] = None  # a cached teacher's: row scales of quantized hidden_states
    target_mask: Optional[Tensor] = None  # a cached teacher's: (B, T) the tokens with targets, when it keeps a share


class ModelAdapter:
    """Wraps a Hugging Face model for the recipes (it is not an nn.Module: the model stays the module).

    Args:
        model: a ``*ForSequenceClassification``, ``*ForMaskedLM`` or
            ``*ForCausalLM`` model (or any model with ``task`` given).
        task: "classification", "mlm" or "clm"; inferred from the class name.
        layers: dotted path of the nn.ModuleList of transformer blocks;
            found as the only one of ``config.num_hidden_layers`` modules.
    """

    def __init__(self, model: nn.Module, task: Optional[str] = None, layers: Optional[str] = None):
        if isinstance(model, ModelAdapter):
            raise ValueError("model is already a ModelAdapter: pass its .model, or the adapter itself to the recipe")
        if not isinstance(model, nn.Module) or not hasattr(model, "config"):
            raise ValueError(f"model must be a Hugging Face model (an nn.Module with a .config), got {type(model)}")
        self.model = model
        self.task = _infer_task(model) if task is None else task
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        config = model.config
        if layers is None:
            n = config_int(config, "num_hidden_layers", "n_layer", "num_layers")
            if n is None:
                raise ValueError(f"{type(model).__name__}.config has no num_hidden_layers: pass layers=")
            self.layers_path, self.layers = _find_layers(model, n)
        else:
            module = model.get_submodule(layers)
            if not isinstance(module, nn.ModuleList):
                raise ValueError(
                    f"layers={layers!r} is a {type(module).__name__}, but needs the nn.ModuleList of blocks"
                )
            self.layers_path, self.layers = layers, module
        self.hidden_size = config_int(config, "hidden_size", "n_embd", "d_model")
        self.vocab_size = config_int(config, "vocab_size")
        self.num_labels = config.num_labels if self.task == "classification" else None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        return (
            f"ModelAdapter({type(self.model).__name__}, task={self.task!r}, layers={self.layers_path!r} "
            f"x{self.num_layers}, hidden_size={self.hidden_size})"
        )

    # ------------------------------------------------------------------ forward

    def check_layers(self, name: str, layers: Sequence[int]) -> list[int]:
        return [check_index(name, layer, self.num_layers, type(self.model).__name__) for layer in layers]

    @contextmanager
    def capture(self, layers: Sequence[int]):
        """Within the block, forwards of the model fill the yielded dict {layer: (B, T, d) output}."""
        layers = self.check_layers("layers", layers)
        captured: dict[int, Tensor] = {}
        handles = []
        for layer in set(layers):

            def hook(module, args, output, layer=layer):
                captured[layer] = output[0] if isinstance(output, (tuple, list)) else output

            handles.append(self.layers[layer].register_forward_hook(hook))
        try:
            yield captured
        finally:
            for handle in handles:
                handle.remove()

    def __call__(self, batch: dict, layers: Sequence[int] = (), *, head: bool = True) -> ModelOutputs:
        """Run the model on ``batch`` (labels are not passed: the recipes compute the task loss).

        ``head=False`` (language models only) stops before the vocabulary
        projection: ``logits`` is None and ``head_input`` the (B, T, H) input
        of the projection whose weight and bias :meth:`lm_head_parts` returns.
        """
        inputs = {k: v for k, v in batch.items() if k != "labels" and k not in _NON_MODEL_KEYS}
        if "input_ids" not in inputs and "inputs_embeds" not in inputs:
            raise ValueError(f"batch has keys {sorted(batch)}, but needs 'input_ids' (and usually 'attention_mask')")
        self.check_batch(batch)
        if "position_ids" in inputs and self.task != "classification":
            inputs = self._packed_inputs(inputs)
        split = None if head else self._head_split()
        with self.capture(layers) as captured:
            if split is None:
                out = self.model(**inputs)
                logits, head_input = (out.logits if hasattr(out, "logits") else out[0]), None
            else:
                base, pre_head, emb = split
                out = base(**inputs)
                hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
                logits, head_input = None, _projection_input(pre_head, emb, hidden)
        return ModelOutputs(logits, [captured[layer] for layer in layers], batch.get("attention_mask"), head_input)

    def _packed_inputs(self, inputs: dict) -> dict:
        """A language model's batch with ``position_ids`` is a packed one: each row holds documents whose
        positions restart at 0, and attention stays inside each document. A causal LM gets no attention mask
        and reads the documents off the position ids (transformers' packed format, for its SDPA, eager and
        flash paths; no key-value cache, which would hide the format); a masked LM gets a 4-D block-diagonal additive
        mask. The batch's ``attention_mask`` is
        still the losses' token mask (:class:`ModelOutputs`)."""
        inputs = dict(inputs)
        padding = inputs.pop("attention_mask", None)  # (B, T); the packed collators leave no padding
        if self.task == "clm":
            inputs["use_cache"] = False  # transformers reads the packed format only without a cache
            return inputs
        positions = inputs["position_ids"]  # (B, T)
        start = torch.ones_like(positions[:, :1], dtype=torch.bool)
        document = torch.cat([start, positions[:, 1:] != positions[:, :-1] + 1], dim=1).cumsum(dim=1)  # (B, T)
        allowed = document[:, :, None] == document[:, None, :]  # (B, T, T): query and key in one document
        if padding is not None:
            allowed = allowed & padding.bool()[:, None, :]
        dtype = self.model.get_input_embeddings().weight.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=positions.device)
        inputs["attention_mask"] = mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]  # (B, 1, T, T)
        return inputs

    def check_batch(self, batch: dict) -> None:
        """Raise a ValueError naming the key when a CPU batch holds an input id outside the model's embedding rows
        or a label outside its classes (vocabulary) and not -100. CUDA batches are not checked: the check would
        cost a host sync per forward, and PyTorch's device-side assert stops such a run instead."""
        name = type(self.model).__name__
        ids = batch.get("input_ids")
        embeddings = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        rows = getattr(embeddings, "num_embeddings", None)
        if torch.is_tensor(ids) and ids.device.type == "cpu" and ids.numel():
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or (rows is not None and high >= rows):
                raise ValueError(
                    f"batch['input_ids']: got ids from {low} to {high}, needs ids in [0, {rows}) (the "
                    f"{name}'s embedding rows: a tokenizer of another model?)"
                )
        labels = batch.get("labels")
        classes = self.num_labels if self.task == "classification" else rows
        if (
            torch.is_tensor(labels)
            and labels.device.type == "cpu"
            and labels.numel()
            and classes is not None
            and not labels.is_floating_point()
            and classes > 1
        ):
            valid = (labels == -100) | ((labels >= 0) & (labels < classes))
            if not bool(valid.all()):
                bad = int(labels[~valid][0])
                what = "classes (num_labels)" if self.task == "classification" else "vocabulary"
                raise ValueError(
                    f"batch['labels']: got {bad}, needs labels in [0, {classes}) (the {name}'s {what}) "
                    f"or -100 (ignored)"
                )

    # ------------------------------------------------------------------ heads

    def output_head(self) -> nn.Module:
        """The module that turns the last block's output into the LM's logits.

        A decoder's final norm followed by the top-level child of the model
        that holds the output embeddings (``cls`` of BERT, ``lm_head`` of
        RoBERTa, GPT-2 and Llama).
        """
        if self.task == "classification":
            raise ValueError("output_head() is the LM head; a classification model's head reads its pooled output")
        emb = self.model.get_output_embeddings()
        if emb is None:
            raise ValueError(f"{type(self.model).__name__} has no output embeddings (get_output_embeddings() is None)")
        head = next(
            child for _, child in self.model.named_children() if child is emb or any(m is emb for m in child.modules())
        )
        parent_path = self.layers_path.rpartition(".")[0]
        parent = self.model.get_submodule(parent_path) if parent_path else self.model
        norms = [getattr(parent, n) for n in _FINAL_NORMS if isinstance(getattr(parent, n, None), nn.Module)]
        return nn.Sequential(norms[0], head) if norms else head

    def lm_head_parts(self) -> tuple[Tensor, Optional[Tensor]]:
        """(weight (V, H), bias (V,) or None) of the vocabulary projection, as the model uses them.

        ``head_input @ weight.T + bias`` of ``adapter(batch, head=False)`` are
        the model's logits. The weight is the output embedding's (the input
        embedding's when they are tied: its gradient reaches both uses), the
        bias e.g. BERT's decoder bias. A ValueError where the model cannot be
        cut there (see :meth:`__call__`).
        """
        emb = self._head_split()[2]
        return emb.weight, emb.bias

    def _head_split(self) -> tuple[nn.Module, Optional[nn.Module], nn.Linear]:
        """(base model, part of the head before the projection or None, the projection), or a ValueError.

        The base model is ``model.base_model`` (HF's ``base_model_prefix``:
        bert, roberta, transformer, model, ...), which holds the blocks and a
        decoder's final norm; the head is the model's other top-level child,
        the one that holds the output embedding (BERT's ``cls``, RoBERTa's
        ``lm_head``), run up to the projection. Found afresh on each call, so
        that a resized vocabulary is followed.
        """
        name = type(self.model).__name__
        if self.task == "classification":
            raise ValueError(
                f"the {name} is a classification model: only a language model ('mlm' or 'clm') has a "
                f"vocabulary projection to fuse (fused_lm_head)"
            )
        emb = self.model.get_output_embeddings()
        shape = tuple(getattr(emb.weight, "ds_shape", emb.weight.shape)) if isinstance(emb, nn.Linear) else None
        if not isinstance(emb, nn.Linear) or shape[0] != self.vocab_size:  # ds_shape: ZeRO-3's full shape
            what = "None" if emb is None else f"a {type(emb).__name__}"
            if isinstance(emb, nn.Linear):
                what += f" of weight {shape}"
            raise ValueError(
                f"the {name}'s get_output_embeddings() is {what}, not the nn.Linear(hidden, "
                f"vocab_size={self.vocab_size}) projection that fused_lm_head replaces"
            )
        for attr in _LOGIT_POSTPROCESSING:
            value = getattr(self.model.config, attr, None)
            if value not in (None, 1, 1.0):
                raise ValueError(
                    f"the {name} changes its logits after the projection (config.{attr}={value}): "
                    f"the fused LM head would not reproduce them"
                )
        base = self.model.base_model
        prefix = getattr(self.model, "base_model_prefix", "")
        if base is self.model or not prefix or not self.layers_path.startswith(prefix + "."):
            raise ValueError(
                f"cannot split the {name} into base model and head (base_model_prefix={prefix!r}, "
                f"blocks at {self.layers_path!r}): fused_lm_head needs a model whose base model "
                f"holds the blocks"
            )
        heads = []
        for child_name, child in self.model.named_children():
            if child is base or isinstance(child, nn.modules.loss._Loss):
                continue
            if child is emb or any(m is emb for m in child.modules()):
                heads.append(child)
            else:  # e.g. DistilBERT's vocab_transform, ELECTRA's generator_predictions
                raise ValueError(
                    f"the {name} has a top-level {child_name!r} beside its base model {prefix!r} and "
                    f"the head that holds the output embedding: fused_lm_head cannot tell what runs "
                    f"between them"
                )
        if len(heads) != 1:
            raise ValueError(
                f"no top-level child of the {name} beside its base model {prefix!r} holds the output "
                f"embedding: fused_lm_head cannot find the head"
            )
        return base, (None if heads[0] is emb else heads[0]), emb

    def task_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """The task loss of this model's logits: see :func:`task_loss`."""
        return task_loss(logits, labels, self.task)


def _projection_input(pre_head: Optional[nn.Module], emb: nn.Module, hidden: Tensor) -> Tensor:
    """Run ``pre_head`` on the base model's output up to ``emb``, and return what ``emb`` would read.

    ``emb`` is made an identity for the call (its instance ``forward`` shadowed), so the vocabulary projection
    is never computed while every module, ``emb`` included, still enters and leaves its forward normally: the
    hooks around it (ZeRO-3's parameter gathering and release) see a complete forward."""
    if pre_head is None:
        return hidden
    captured = []

    def identity(x, *args, **kwargs):
        captured.append(x)
        return x

    emb.forward = identity
    try:
        pre_head(hidden)
    finally:
        del emb.forward
    if not captured:
        raise ValueError(
            f"the {type(pre_head).__name__} head never called its output embedding: fused_lm_head "
            f"cannot find the projection's input"
        )
    return captured[0]


def is_partitioned(param: Tensor) -> bool:
    """True for a ZeRO-3 parameter (DeepSpeed gives it an id and partitions its data)."""
    return hasattr(param, "ds_id")


def gathered(params):
    """A context in which the ZeRO-3 partitioned tensors among ``params`` are whole, to be read (not written)
    outside their module's forward, as the fused LM head reads a frozen teacher's output embeddings; a no-op
    for ordinary tensors."""
    partitioned = [p for p in params if p is not None and is_partitioned(p)]
    if not partitioned:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)


def weights_hash(model: torch.nn.Module) -> str:
    """SHA-256 of a model's state: every entry's name, dtype, shape and bytes (the teacher's identity). A ZeRO-3
    partitioned entry is gathered alone while it is read (so every rank must call it), and hashes as the whole
    tensor does."""
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict(keep_vars=True).items()):
        if torch.is_tensor(value):
            with gathered([value]):
                digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
                digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def adapt(model, task: Optional[str] = None) -> ModelAdapter:
    """A ModelAdapter for ``model`` (returned as is when it already is one)."""
    return model if isinstance(model, ModelAdapter) else ModelAdapter(model, task=task)


def task_loss(logits: Tensor, labels: Tensor, task: str) -> Tensor:
    """The task loss, computed as Hugging Face's heads compute it, in fp32.

    - classification: cross entropy over (B, C) logits, or the MSE of (B, 1)
      logits against float labels (regression, num_labels = 1);
    - mlm: cross entropy over the (B, T, V) logits at labels != -100;
    - clm: cross entropy of position t's logits against the label at t + 1
      (labels are the input ids, -100 where ignored).
    """
    if labels is None:
        raise ValueError(f"the {task} task loss needs batch['labels']")
    logits = logits.float()
    if task == "classification":
        if logits.shape[-1] == 1:
            return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
        return F.cross_entropy(logits, labels.long())
    if task == "clm":
        logits, labels = logits[:, :-1], labels[:, 1:]
    elif task != "mlm":
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).long(), ignore_index=-100)


def same_tokenizer(student_tokenizer, teacher_tokenizer) -> bool:
    """Whether two tokenizers give every token the same id: what a token-by-token comparison of two models needs."""
    return student_tokenizer.get_vocab() == teacher_tokenizer.get_vocab()


def check_same_vocab(
    student: ModelAdapter, teacher: ModelAdapter, tokenizers: Optional[tuple] = None, what: str = "this recipe"
) -> None:
    """Raise a ValueError when the two models' output spaces (vocabularies, label sets, tokenizers) differ."""
    if student.task != teacher.task:
        raise ValueError(f"the student's task is {student.task!r} and the teacher's {teacher.task!r}: {what} needs one")
    if student.task == "classification":
        if student.num_labels != teacher.num_labels:
            raise ValueError(
                f"the student has num_labels={student.num_labels} and the teacher {teacher.num_labels}: "
                f"{what} compares their logits, so they must match"
            )
    elif student.vocab_size != teacher.vocab_size:
        raise ValueError(
            f"the student's vocab_size is {student.vocab_size} and the teacher's {teacher.vocab_size}: {what} "
            f"compares their logits token by token, so the vocabularies must be equal (use one tokenizer)"
        )
    if tokenizers is not None:
        s_tok, t_tok = tokenizers
        if not same_tokenizer(s_tok, t_tok):
            raise ValueError(
                f"the student's and the teacher's tokenizers have different vocabularies: {what} needs "
                f"one tokenizer for both (the token positions of the two models must align)"
            )


def keep_layers(model, layers: list[int]):
    """``model`` cut down to the transformer blocks ``layers`` (in that order), in place: the student of
    DistilBERT-style initialization. The config follows (num_hidden_layers, per-layer types)."""
    adapter = ModelAdapter(model)
    adapter.check_layers("student.layers", layers)
    parent_path, _, name = adapter.layers_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    blocks = [adapter.layers[i] for i in layers]
    for new, block in enumerate(blocks):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new
    setattr(parent, name, nn.ModuleList(blocks))
    model.config.num_hidden_layers = len(layers)
    if isinstance(getattr(model.config, "layer_types", None), list):
        model.config.layer_types = [model.config.layer_types[i] for i in layers]
    return model
