"""Models built where they will live: whole on each rank, or partitioned by ZeRO-3 while they are built.

:func:`build_model` builds every model a run loads the same way, from a Hugging Face folder:

1. the folder's config, with the source blocks kept (``blocks``: the source's block ``blocks[j]`` becomes block
   ``j``; the others are neither built nor read), the number of classes, and for a fresh model its shape
   (:func:`reshape`);
2. the model constructed from that config, under ``deepspeed.zero.Init`` with the DeepSpeed config that will run
   it when ``zero`` is given: each module's parameters are partitioned as soon as the module is built, so no rank
   ever holds more of the model whole than one module. A model whose weights follow is built without any
   initialization;
3. its weights copied module by module from the folder's memory-mapped safetensors (or a memory-mapped
   ``pytorch_model.bin``), one tensor at a time: under ZeRO-3 each module's own parameters are gathered
   (``GatheredParameters(modifier_rank=0)``), rank 0 reads and copies them, and they are partitioned again; the
   files are unmapped every :data:`READ_WINDOW` bytes, so the reading rank does not keep the pages it has read.
   Checkpoint names are matched to the model's as transformers matches them (its renamings of legacy names, the
   base model's prefix added or removed), and the kept blocks renumbered. Parameters the folder does not hold (a
   new classification head) and every parameter of a fresh model (``random_init``) are initialized as
   transformers initializes them, module by module, gathered under ZeRO-3 and drawn on every rank from the same
   random stream.

The last section builds a run's models: :func:`build_teacher` (a fresh teacher of the shape ``teacher.*`` set,
with ``teacher.random_init``) and :func:`build_student` (``student.path``, or the teacher's kept layers read
from its files: never a copy or a second whole load of the teacher). A GGUF source is first converted once into
a plain folder (:func:`hf_folder`); without ZeRO-3 the pipeline loads models as it always has
(:func:`fastted.train.sources.load_model`, the student cut from the whole teacher). :func:`place` moves what ZeRO-3
does not partition onto a device, one tensor at a time.

``build_model(..., meta=True)`` builds the model on the meta device, without weights: what a recipe is first
built on when the pipeline must learn which teacher layers it reads before the teacher is built
(:func:`fastted.methods.base.Recipe.truncate_teacher`).
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Optional

import torch
from torch import nn

from fastted.models import ModelAdapter, is_partitioned, keep_layers
from fastted.train.config import ConfigError, ModelConfig
from fastted.train.sources import hf_config, load_model, model_class, model_source, student_layers

_SAFE_INDEX, _SAFE_SINGLE = "model.safetensors.index.json", "model.safetensors"
_BIN_INDEX, _BIN_SINGLE = "pytorch_model.bin.index.json", "pytorch_model.bin"
READ_WINDOW = 64 << 20  # bytes of the checkpoint read between unmaps (_Reader)


# --------------------------------------------------------------------------- the config


def keep_blocks(config, blocks: Sequence[int]) -> None:
    """``config`` (a Hugging Face config, in place) of the model that keeps the source blocks ``blocks``, in that
    order: the block count and the per-block entries (``layer_types``)."""
    config.num_hidden_layers = len(blocks)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in blocks]


def reshape(config, settings: ModelConfig, key: str) -> None:
    """``config`` (in place) with the shape ``settings`` give a fresh model (``random_init``): ``num_layers``,
    ``hidden_size`` (the attention heads kept, so it must be a multiple of their count), ``intermediate_size``.
    A ConfigError names ``<key>.<setting>`` when the source's config cannot take it."""
    if settings.num_layers is not None and key == "teacher":
        types = getattr(config, "layer_types", None)
        if isinstance(types, list) and settings.num_layers > len(types) and len(set(types)) > 1:
            raise ConfigError(
                f"teacher.num_layers: got {settings.num_layers}, but the source's "
                f"{len(types)} blocks have different types ({sorted(set(types))}): fastted cannot "
                f"tell the types of more blocks (at most {len(types)})"
            )
        if isinstance(types, list):
            config.layer_types = (types * settings.num_layers)[: settings.num_layers]
        config.num_hidden_layers = settings.num_layers
    if settings.hidden_size is not None:
        heads = getattr(config, "num_attention_heads", None)
        if isinstance(heads, int) and settings.hidden_size % heads:
            raise ConfigError(
                f"{key}.hidden_size: got {settings.hidden_size}, needs a multiple of the "
                f"{heads} attention heads of the source's config"
            )
        old_head_dim = config.hidden_size // heads if isinstance(heads, int) else None
        config.hidden_size = settings.hidden_size
        if isinstance(getattr(config, "head_dim", None), int) and config.head_dim == old_head_dim:
            config.head_dim = settings.hidden_size // heads  # Llama-style configs store the width per head
    if settings.intermediate_size is not None:
        if not hasattr(config, "intermediate_size") and hasattr(config, "n_inner"):
            config.n_inner = settings.intermediate_size  # GPT-2's name
        else:
            config.intermediate_size = settings.intermediate_size


# --------------------------------------------------------------------------- the checkpoint


def checkpoint_files(folder: str) -> dict[str, list[str]]:
    """{file: [its tensor names]} of the weights in ``folder``, read from the headers alone."""
    for index_name in (_SAFE_INDEX, _BIN_INDEX):
        index = os.path.join(folder, index_name)
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            files: dict[str, list[str]] = {}
            for name, file in weight_map.items():
                files.setdefault(os.path.join(folder, file), []).append(name)
            return files
    single = os.path.join(folder, _SAFE_SINGLE)
    if os.path.isfile(single):
        from safetensors import safe_open

        with safe_open(single, "pt") as f:
            return {single: list(f.keys())}
    single = os.path.join(folder, _BIN_SINGLE)
    if os.path.isfile(single):
        return {single: list(_open_bin(single))}
    raise ConfigError(
        f"{folder}: no model weights (model.safetensors, a sharded safetensors index or pytorch_model.bin)"
    )


def weight_files(folder: str) -> list[str]:
    """The weight files of ``folder`` that :func:`checkpoint_files` reads (those of its index, or the single
    file), found without opening any of them: the index alone is read."""
    for index_name in (_SAFE_INDEX, _BIN_INDEX):
        index = os.path.join(folder, index_name)
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                return [os.path.join(folder, file) for file in sorted(set(json.load(f)["weight_map"].values()))]
    for single in (_SAFE_SINGLE, _BIN_SINGLE):
        if os.path.isfile(os.path.join(folder, single)):
            return [os.path.join(folder, single)]
    raise ConfigError(
        f"{folder}: no model weights (model.safetensors, a sharded safetensors index or pytorch_model.bin)"
    )


def _open_bin(path: str) -> dict:
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


class _Reader:
    """Reads one tensor at a time from the checkpoint files, memory-mapped. The pages a read touches stay in the
    process while its file is mapped, so :meth:`unmap` closes the files every ``window`` bytes read: the reading
    rank holds at most about that much of the checkpoint beyond the module it copies."""

    def __init__(self, window: int = READ_WINDOW):
        self._open: dict[str, object] = {}
        self._stack = ExitStack()
        self._window = window
        self._read = 0

    def __call__(self, file: str, name: str) -> torch.Tensor:
        if file not in self._open:
            if file.endswith(".safetensors"):
                from safetensors import safe_open

                self._open[file] = self._stack.enter_context(safe_open(file, "pt"))
            else:
                self._open[file] = _open_bin(file)
        handle = self._open[file]
        tensor = handle.get_tensor(name) if hasattr(handle, "get_tensor") else handle[name]
        self._read += tensor.numel() * tensor.element_size()
        return tensor

    def unmap(self) -> None:
        """Close the files once ``window`` bytes were read since they were opened (call between tensors' uses)."""
        if self._read >= self._window:
            self.close()

    def close(self) -> None:
        self._stack.close()
        self._open.clear()
        self._read = 0


def source_names(model: nn.Module, files: dict[str, list[str]], blocks: Optional[Sequence[int]]) -> dict:
    """{model entry name: (file, checkpoint name)} of the entries of ``model`` the checkpoint holds. Checkpoint
    names are renamed as transformers renames them for ``model`` (legacy names, the base model's prefix added or
    removed); the source block ``blocks[j]`` is the model's block ``j`` and the other blocks are left out."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    mapping = get_model_conversion_mapping(model, None, None) or []
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    if converters:
        raise ConfigError(
            f"the {type(model).__name__} checkpoint needs transformers' weight conversions "
            f"({converters[0].source_patterns} ...), which fastted's partitioned loading does not "
            f"do: run without ZeRO-3 (engine.zero_stage < 3, engine.teacher_zero3=false)"
        )
    renamings = [m for m in mapping if m not in converters]
    wanted = set(model.state_dict().keys())
    prefix = getattr(model, "base_model_prefix", "") or ""
    layers = ModelAdapter(model).layers_path
    block = re.compile(rf"^{re.escape(layers)}\.(\d+)\.(.*)$")
    renumber = None if blocks is None else {source: j for j, source in enumerate(blocks)}
    out = {}
    for file, names in files.items():
        for name in names:
            key = rename_source_key(name, renamings, [])[0]
            candidates = [key, f"{prefix}.{key}"] + ([key[len(prefix) + 1 :]] if key.startswith(prefix + ".") else [])
            for candidate in candidates if prefix else [key]:
                match = block.match(candidate)
                if match and renumber is not None:
                    if int(match.group(1)) not in renumber:  # a block left out: never read
                        break
                    candidate = f"{layers}.{renumber[int(match.group(1))]}.{match.group(2)}"
                if candidate in wanted:
                    out[candidate] = (file, name)
                    break
    return out


# --------------------------------------------------------------------------- building


def _gathered_for_writing(params: list, zero: bool):
    """The ZeRO-3 parameters among ``params`` whole for rank 0 to write (partitioned again on exit)."""
    partitioned = [p for p in params if is_partitioned(p)]
    if not zero or not partitioned:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def initialize_missing(model: nn.Module, zero: bool) -> None:
    """Initialize the parameters of ``model`` not flagged ``_is_hf_initialized`` as transformers'
    ``initialize_weights`` does (the same modules in the same order, so the same draws), each module's own
    parameters and its direct children's gathered while it runs under ZeRO-3. Every rank draws the same numbers;
    rank 0's are kept."""
    from transformers import PreTrainedModel
    from transformers.initialization import guard_torch_init_functions

    custom = model.is_remote_code() if hasattr(model, "is_remote_code") else False

    def visit(module: nn.Module, init) -> None:
        for child in module.children():
            visit(child, child._initialize_weights if isinstance(child, PreTrainedModel) else init)
        params = list(module.parameters(recurse=False))
        for child in module.children():
            if not isinstance(child, PreTrainedModel):  # _init_weights may reach into direct children
                params += list(child.parameters(recurse=False))
        params = [p for p in params if not getattr(p, "_is_hf_initialized", False)]
        with _gathered_for_writing(params, zero):
            init(module, custom)

    with torch.no_grad(), guard_torch_init_functions():
        visit(model, model._initialize_weights)


@contextmanager
def _zero3_construction(ds_config: dict):
    """Build modules partitioned as they are built, under the DeepSpeed config that will run them (and in its
    precision: fp32 unless it enables bf16 or fp16). Transformers' own ``init_weights`` (run at the end of a
    model's ``__init__``) initializes module by module, gathered."""
    import deepspeed
    from transformers import PreTrainedModel

    original = PreTrainedModel.init_weights

    def init_weights(self):
        initialize_missing(self, zero=True)
        self.tie_weights(recompute_mapping=False)

    PreTrainedModel.init_weights = init_weights
    try:
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            yield
    finally:
        PreTrainedModel.init_weights = original


def build_model(
    folder: str,
    task: str,
    *,
    gguf: Optional[str] = None,
    num_labels: Optional[int] = None,
    blocks: Optional[Sequence[int]] = None,
    shapes: Sequence[tuple[ModelConfig, str]] = (),
    fresh: bool = False,
    seed: int = 0,
    zero: Optional[dict] = None,
    meta: bool = False,
) -> nn.Module:
    """The model of ``task`` in the Hugging Face ``folder``, built as the module docstring says.

    Args:
        folder: a model folder (config.json and weights).
        task: "classification", "mlm" or "clm".
        gguf: a GGUF file in ``folder`` whose config a fresh or meta model takes (weights are read from
            safetensors only: convert the file first, :func:`hf_folder`).
        num_labels: classification: the number of classes (a new head when the folder's differs).
        blocks: the source blocks kept, in order (None: all).
        shapes: (settings, key) pairs that reshape the config in order before ``blocks`` (:func:`reshape`).
        fresh: no weights read: every parameter drawn as transformers draws it, after ``torch.manual_seed(seed)``.
        zero: the DeepSpeed config that partitions the model (ZeRO-3), or None: whole on each rank.
        meta: on the meta device, without weights (a stand-in of the model's structure).
    """
    from transformers import initialization

    if gguf and not (fresh or meta):
        raise ValueError(f"build_model reads weights from safetensors: convert {gguf} first (hf_folder)")
    config = copy.deepcopy(hf_config(folder, gguf))
    if task == "classification" and num_labels is not None and config.num_labels != num_labels:
        config.num_labels = num_labels
    for settings, key in shapes:
        reshape(config, settings, key)
    if blocks is not None:
        keep_blocks(config, blocks)
    auto = model_class(task)
    # The architecture's module is imported before zero.Init patches module classes: a class defined inside it
    # would lose, on its exit, what decorators (the kernels hub's) later put in its __init__.
    auto._model_mapping[type(config)]
    if meta:
        with torch.device("meta"), initialization.no_init_weights():
            return auto.from_config(config)
    construction = nullcontext() if zero is None else _zero3_construction(zero)
    if fresh:
        torch.manual_seed(seed)
        with construction:
            model = auto.from_config(config)
        return model.eval()
    with construction, initialization.no_init_weights():
        model = auto.from_config(config)
    load_weights(model, folder, blocks, zero=zero is not None)
    return model.eval()


def load_weights(model: nn.Module, folder: str, blocks: Optional[Sequence[int]] = None, *, zero: bool) -> list[str]:
    """Copy the weights of ``folder`` into ``model`` module by module, one tensor at a time (see the module
    docstring), and initialize those it does not hold. Returns the names of the entries initialized."""
    model.tie_weights()  # tied entries are one parameter, loaded once (the checkpoint holds one name of them)
    files = checkpoint_files(folder)
    sources = source_names(model, files, blocks)
    names_of: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    copy_here = not zero or _rank() == 0
    read = _Reader(READ_WINDOW)
    done: set[int] = set()
    try:
        for module in model.modules():
            todo = []
            for param in module.parameters(recurse=False):
                if id(param) in done:
                    continue
                found = [sources[n] for n in names_of[id(param)] if n in sources]
                if found:
                    todo.append((param, names_of[id(param)][0], found[0]))
                    done.add(id(param))
            if not todo:
                continue
            with _gathered_for_writing([p for p, _, _ in todo], zero):
                if copy_here:
                    for param, name, (file, key) in todo:
                        _copy(param, read(file, key), name, folder)
                    read.unmap()
            for param, _, _ in todo:
                param._is_hf_initialized = True
        state = model.state_dict(keep_vars=True)
        for name, buffer in model.named_buffers():
            if name in sources and name in state:  # persistent buffers: whole on every rank
                _copy(buffer, read(*sources[name]), name, folder)
                buffer._is_hf_initialized = True
    finally:
        read.close()
    missing = [names[0] for i, names in names_of.items() if i not in done]
    if missing:
        initialize_missing(model, zero)
    return missing


def _copy(target: torch.Tensor, value: torch.Tensor, name: str, folder: str) -> None:
    if tuple(target.shape) != tuple(value.shape):
        raise ConfigError(
            f"{folder}: the checkpoint's {name} has shape {tuple(value.shape)}, the model built from "
            f"its config {tuple(target.shape)}"
        )
    with torch.no_grad():
        target.copy_(value)


def place(module: nn.Module, device: torch.device, parameters: bool = True) -> None:
    """Move the parameters (unless ``parameters`` is False) and buffers of ``module`` that ZeRO-3 does not
    partition onto ``device``, one tensor at a time; a partitioned parameter stays where DeepSpeed keeps it."""
    for sub in module.modules():
        for param in sub.parameters(recurse=False) if parameters else ():
            if not is_partitioned(param) and param.device != device:
                param.data = param.data.to(device)
        for name, buffer in list(sub.named_buffers(recurse=False)):
            if buffer is not None and buffer.device != device:
                setattr(sub, name, buffer.to(device))


# --------------------------------------------------------------------------- a run's models


def hf_folder(config, folder: str, gguf: Optional[str]) -> str:
    """A plain Hugging Face folder of a model source: ``folder`` itself, or its GGUF file converted once into
    ``<output_dir>/cache/gguf`` (:func:`fastted.train.gguf.hf_folder`; collective: every rank calls it)."""
    if not gguf:
        return folder
    from fastted.train.gguf import hf_folder as converted

    return converted(folder, gguf, os.path.join(config.output_dir, "cache", "gguf"))


def teacher_num_layers(config) -> int:
    """The teacher's blocks: ``teacher.num_layers`` of a fresh teacher, else its source's config's."""
    t = config.teacher
    if t.random_init and t.num_layers is not None:
        return t.num_layers
    return hf_config(*model_source(t, "teacher")).num_hidden_layers


def build_teacher(
    config,
    *,
    folder: Optional[str] = None,
    num_labels: Optional[int] = None,
    zero: Optional[dict] = None,
    blocks: Optional[Sequence[int]] = None,
    meta: bool = False,
):
    """The run's teacher, partitioned with ``zero`` (a DeepSpeed config) or whole: the model in ``folder`` (a
    job's output) or the teacher source, fresh and shaped by ``teacher.*`` with ``teacher.random_init``;
    ``blocks`` kept (the others neither built nor read), on the meta device with ``meta``."""
    task, gguf = config.task, None
    if folder is None:
        folder, gguf = model_source(config.teacher, "teacher")
        if config.teacher.random_init:
            return build_model(
                folder,
                task,
                gguf=gguf,
                num_labels=num_labels,
                blocks=blocks,
                shapes=[(config.teacher, "teacher")],
                fresh=True,
                seed=config.seed,
                zero=zero,
                meta=meta,
            )
    if meta:
        return build_model(folder, task, gguf=gguf, num_labels=num_labels, blocks=blocks, meta=True)
    if zero is None and blocks is None:
        return load_model(folder, task, gguf, num_labels)
    if zero is None and gguf:
        return keep_layers(load_model(folder, task, gguf, num_labels), list(blocks))
    return build_model(hf_folder(config, folder, gguf), task, num_labels=num_labels, blocks=blocks, zero=zero)


def build_student(config, *, num_labels: Optional[int] = None, zero: Optional[dict] = None):
    """The run's student, partitioned with ``zero`` or whole, never through a whole teacher: ``student.path``,
    or the teacher source's config with the kept layers only (:func:`fastted.train.sources.student_layers`), their
    weights read from the teacher's files (block ``layers[j]`` as block ``j``), or fresh with
    ``student.random_init`` (drawn after ``torch.manual_seed(seed)``, as
    :func:`fastted.train.sources.build_student`)."""
    s, task = config.student, config.task
    if s.path is not None:
        folder, gguf = model_source(s, "student")
        return build_model(hf_folder(config, folder, gguf), task, num_labels=num_labels, zero=zero)
    folder, gguf = model_source(config.teacher, "teacher")
    layers = student_layers(s, teacher_num_layers(config))
    if s.random_init:
        shapes = ([(config.teacher, "teacher")] if config.teacher.random_init else []) + [(s, "student")]
        return build_model(
            folder,
            task,
            gguf=gguf,
            num_labels=num_labels,
            blocks=layers,
            shapes=shapes,
            fresh=True,
            seed=config.seed,
            zero=zero,
        )
    return build_model(hf_folder(config, folder, gguf), task, num_labels=num_labels, blocks=layers, zero=zero)
