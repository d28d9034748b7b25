"""Typed configs of the training engine: dataclasses, YAML files, dotted overrides, presets.

A run is described by one :class:`Config`. It is built from a preset (the
embedded default is ``bbc-minilm``, the README's main command), then a YAML
file, then ``key.sub=value`` overrides from the command line, in that order;
every key is checked against the dataclasses, so a misspelt key is an error,
not a silently ignored setting. The resolved config is written beside every
checkpoint and read back with ``yaml.safe_load``.

The ``distil`` section holds what all methods share (which run, the schedule,
the teacher cache) and a section per method, ``distil.<method>``, built from
the method's own settings dataclass in its registry
(:data:`fastted.methods.METHODS`): the keys and defaults of a config are the
recipe class's keyword arguments. The flat keys of older configs
(``distil.mse_alpha``, ``distil.crd_temperature``, ...) still load: each sets
its methods' keys, with a :class:`ConfigKeyWarning` naming the new ones; so does the run's list of jobs
under its old name, ``steps`` (now ``jobs``: "step" is the optimizer's alone).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import yaml

from fastted.methods import KD, LWD, RAILKD, TED, CoDIR
from fastted.methods import METHODS as RECIPES

TASKS = ("classification", "mlm", "clm")
METHODS = tuple(RECIPES)  # the registry's names, in its order
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # auto: bf16 on a GPU that supports it, else fp32
DECAYS = ("linear", "cosine", "constant")
SAMPLE_BY = ("line", "paragraph", "document")  # the rows of a .txt source: lines, paragraphs, whole files


class ConfigError(ValueError):
    """A bad config: the message names the key, what it got and what it needs."""


class ConfigKeyWarning(DeprecationWarning):
    """An old config key, mapped onto the keys that replace it: the message names both."""


@dataclass
class DataConfig:
    source: str = "bbc-news"  # "bbc-news", "rotten-tomatoes", a file / glob / save_to_disk folder,
    # or a dataset name
    test_source: Optional[str] = None  # None: split `source` by `test_fraction` with the run's seed
    split_seed: Optional[int] = None  # the split's seed (None: `seed`; a run of several seeds keeps one split)
    test_fraction: float = 0.2
    text_field: str = "text"
    label_field: str = "label"  # classification: the labels' column (class names or ids)
    sample_by: str = "line"  # .txt files: a row per line, paragraph or document (whole file)
    max_length: int = 128  # tokens per example (fine-tuning) or per packed block (pre-training)
    max_train_examples: Optional[int] = None
    max_test_examples: Optional[int] = None
    mlm_probability: float = 0.15
    pack: bool = True  # pre-training: concatenate documents into max_length blocks
    document_mask: Optional[bool] = None  # packed blocks: positions restart, attention and the loss stay inside
    # each document (None: on for clm, off for mlm)
    test_documents: Optional[int] = None  # documents held out as the test split, by count (None: test_fraction
    # of them; for mlm / clm at most TEST_DOCUMENTS)
    num_proc: Optional[int] = None  # tokenizing workers (None: the CPU count, at most 32)
    cache: bool = True  # fine-tuning: tokenized datasets cached under <output_dir>/cache
    # (pre-training keeps its token shards there always)


@dataclass
class ModelConfig:
    path: Optional[str] = None  # a Hugging Face folder, "minilm" or "smollm2" (the packaged models)
    gguf_file: Optional[str] = None  # a GGUF file inside `path` (smollm2 sets it)
    layers: Optional[list[int]] = None  # student only: build it from these layers of the teacher
    num_layers: Optional[int] = None  # student: or from this many evenly spaced teacher layers
    # (neither, nor a path: half the teacher's layers, evenly spaced);
    # teacher, with random_init: its number of layers
    random_init: bool = False  # student: re-initialize the weights (DWT's larger student); teacher:
    # a fresh teacher of path's architecture (seeded by `seed`), no weights
    # read, shaped by num_layers, hidden_size and intermediate_size
    hidden_size: Optional[int] = None  # with random_init: another width (a multiple of the attention heads)
    intermediate_size: Optional[int] = None  # with random_init: another feed-forward width


@dataclass
class TrainConfig:
    epochs: float = 1.0
    max_steps: Optional[int] = None  # optimizer steps; overrides epochs
    batch_size: int = 32  # the global batch: micro batch x accumulation x ranks
    micro_batch_size: Optional[int] = None  # per rank and forward; None: batch_size / ranks
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    decay: str = "linear"
    clip: float = 1.0  # gradient norm; 0 disables
    log_every: int = 1
    eval_every: int = 0  # optimizer steps; 0: only at the end
    save_every: int = 0  # optimizer steps; 0: only at the end
    keep_last: int = 2
    max_tokens: Optional[int] = None  # packed pre-training: a budget in tokens (sets the optimizer steps)
    warmup_tokens: Optional[int] = None  # packed pre-training: warmup in tokens (overrides warmup_ratio)
    min_lr: float = 0.0  # the floor the decay ends at
    prefetch_steps: int = 2  # steps whose batches (and cached teacher outputs) a background
    # thread reads ahead of the loop; 0: read in the loop


@dataclass
class FiltersConfig:
    interval: Optional[int] = None  # TED: filter teacher layer l when (l + 1) % interval == 0;
    # None: teacher layers / student layers (one per student layer)
    filter_dim: Optional[int] = None  # None: the teacher's hidden size, for both models
    nonlinear: bool = False
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-3))  # stage I's schedule, both models
    per_model: dict = field(default_factory=dict)  # "teacher" / "student" -> filters.train keys for that model's
    # stage I alone (the TED authors train each at its own fine-tuning learning rate), e.g. per_model.teacher.lr
    dropout: bool = False  # the frozen model's own dropout on while its filters train (the authors': on)
    head_dropout: float = 0.1  # of the stage-I classification heads
    holdout: float = 0.0  # classification: this share of the training set held out, and stage I ended when the
    # filters' mean probe accuracy on it stops improving (0: the schedule alone)
    patience: int = 2  # with holdout: takes in a row without a gain that end stage I
    watch_every: Optional[int] = None  # with holdout: optimizer steps between takes (None: half an epoch)


@dataclass
class _SharedDistil:
    """What every method of a run shares: which methods run, their schedule, the teacher cache."""

    methods: list[str] = field(default_factory=lambda: [KD.method, LWD.method, TED.method])
    fused_lm_head: bool = True  # mlm / clm: the LM heads fused with the KL (no logits)
    truncate_teacher: bool = True  # no KL term: the teacher runs only up to its last mapped layer
    teacher_cache: bool = False  # distil from the cache-teacher job's cache, not the live teacher
    # (classification and clm; the methods whose recipes read one)
    cache_k: int = 64  # the cache's top-k logits a token (0: the layer targets alone)
    cache_quantization: str = "int8"  # the cache's layer targets: int8, fp8 or bf16
    cache_layer_bytes: int = 0  # the cache's layer targets a token, in bytes: a share of the tokens (0: all)
    cache_shard_mb: int = 256  # a cache shard is written when a rank holds this many MiB of it
    pretrained_student: bool = False  # classification: the student starts cut from the pretrained teacher with a
    # fresh head (the TED authors' KD and LWD), not as the finetune-student job left it (TED's is stage I's)
    holdout: float = 0.0  # classification: this share of the training set held out as a dev split, and the job
    # ends on the weights of its best dev accuracy (the papers' scripts' best epoch); 0: its last weights
    patience: Optional[int] = None  # with holdout: takes without a gain that end the job early (None: never)
    watch_every: Optional[int] = None  # with holdout: optimizer steps between dev takes (None: each epoch)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-4))
    # Per method, any of the shared keys above: {lwd: {train: {lr: 5e-5}}} (on the command line:
    # distil.per_method.lwd.train.lr=5e-5). Each method's job reads its own values. A method's own settings are
    # its section: distil.ted.mse_alpha.
    per_method: dict = field(default_factory=dict)


# The distil section: the shared keys, then a section per registered method, distil.<method>, of its settings
# dataclass (fastted.methods.base.register): a new method brings its own keys and defaults.
DistilConfig = dataclasses.make_dataclass(
    "DistilConfig",
    [(name, recipe.settings, field(default_factory=recipe.settings)) for name, recipe in RECIPES.items()],
    bases=(_SharedDistil,),
    namespace={"__module__": __name__, "__doc__": "The distil section of a config."},
)

# The flat distil keys of configs written before each method owned its settings, by the keys that replace them:
# each old key set every method that read it (distil.temperature: the KL temperature of them all).
OLD_KEYS: dict[str, list[str]] = {}
for _name, _recipe in RECIPES.items():
    for _old, _new in _recipe.old_keys.items():
        OLD_KEYS.setdefault(_old, []).append(f"distil.{_name}.{_new}")


@dataclass
class EngineConfig:
    precision: str = "auto"  # auto (bf16 on GPUs that support it, else fp32), fp32, bf16, fp16;
    # a run's saved config holds the resolved value
    zero_stage: int = 0
    teacher_zero3: Optional[bool] = None  # None: partition the teacher whenever there is more than one rank
    # (or its parameters are offloaded)
    teacher_offload: Optional[str] = None  # the partitioned teacher's parameters: cpu (kept in host memory, for
    # teachers larger than the GPUs), none; None: as engine.deepspeed's
    # zero_optimization.offload_param says (no offload without one)
    activation_checkpointing: bool = False  # the student recomputes its blocks' activations in backward
    deepspeed: Optional[Union[str, dict]] = None  # a DeepSpeed JSON/YAML file or dict merged over fastted's
    # (the teacher takes its stage-3 gather settings and offload_param)
    impl: str = "auto"  # the fused losses' path: auto, triton, reference
    device: str = "auto"  # auto, cpu, cuda
    threads: Optional[int] = None  # torch CPU threads per rank
    peak_tflops: Optional[float] = None  # a device's peak dense TFLOP/s in the run's precision, for MFU (None: from
    # the GPU's name, A100 / H100 / H200; the CPU reports FLOP/s alone)


@dataclass
class Config:
    task: str = "classification"
    output_dir: str = "runs/bbc-minilm"
    seed: int = 0
    seeds: Optional[list[int]] = None  # several seeds: each training job once per seed, in seed-<s>/ folders,
    # one test split for all; evaluate reports means, intervals, differences
    published: Optional[str] = None  # a paper's hyperparameters (fastted.train.published: ted-glue-mnli, ...), set
    # over the preset and under your file and overrides
    seed_teacher: bool = False  # with seeds: each seed fine-tunes its own teacher (default: the teacher's
    # jobs run once, with the first seed, and are shared)
    jobs: list[str] = field(
        default_factory=lambda: [
            "finetune-teacher",
            "finetune-student",
            "filters-teacher",
            "filters-student",
            "distil",
            "evaluate",
        ]
    )
    progress: bool = True
    resume: bool = True  # continue a job from its latest checkpoint when there is one
    data: DataConfig = field(default_factory=DataConfig)
    teacher: ModelConfig = field(default_factory=lambda: ModelConfig(path="minilm"))
    student: ModelConfig = field(default_factory=lambda: ModelConfig(layers=[0, 2, 4]))
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-4))
    filters: FiltersConfig = field(default_factory=FiltersConfig)
    distil: DistilConfig = field(default_factory=DistilConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)


# The jobs of a run (the key `jobs`, formerly `steps`), in the order they read one another's folders; each is also a
# `fastted` command.
JOBS = (
    "finetune-teacher",
    "finetune-student",
    "filters-teacher",
    "filters-student",
    "cache-teacher",
    "distil",
    "evaluate",
)
# The methods whose recipes read a teacher cache (Recipe.reads_teacher_cache).
CACHED_METHODS = tuple(name for name, recipe in RECIPES.items() if recipe.reads_teacher_cache)

# The presets: overrides of the defaults above, by dotted key.
PRESETS: dict[str, dict[str, Any]] = {
    # The README's main command: real MiniLM-L6 teacher, 3 of its layers as the student, BBC News, on 2 CPU cores.
    "bbc-minilm": {},
    # Seconds, not minutes: for smoke tests of the whole pipeline (a tiny share of the data, short sequences).
    "bbc-minilm-tiny": {
        "output_dir": "runs/bbc-minilm-tiny",
        "data.max_length": 32,
        "data.max_train_examples": 64,
        "data.max_test_examples": 32,
        "finetune.max_steps": 2,
        "filters.train.max_steps": 2,
        "distil.train.max_steps": 2,
        "finetune.batch_size": 16,
        "filters.train.batch_size": 16,
        "distil.train.batch_size": 16,
        "progress": False,
    },
    # The harder built-in task: Rotten Tomatoes critics' one-sentence reviews, fresh or rotten (binary sentiment,
    # where the teacher lands far below its 98 % on BBC News); 5,000 of the 10,201 training sentences keep a seed's
    # run near the demo's length, the whole test split (2,551) keeps the intervals narrow.
    "rt-minilm": {
        "output_dir": "runs/rt-minilm",
        "data.source": "rotten-tomatoes",
        "data.max_length": 64,
        "data.max_train_examples": 5000,
    },
    # Continual pre-training (causal LM): SmolLM2-135M into 6 of its layers on the BBC text.
    "smollm2-bbc": {
        "task": "clm",
        "output_dir": "runs/smollm2-bbc",
        "jobs": ["distil", "evaluate"],
        "teacher.path": "smollm2",
        "student.layers": None,
        "student.num_layers": 6,
        "data.max_length": 256,
        "data.max_test_examples": 64,
        "distil.methods": [LWD.method],
        "distil.lwd.temperature": 1.0,
        "distil.lwd.mse_alpha": 1e-3,
        "distil.dwt.temperature": 1.0,
        "distil.train.lr": 1e-4,
        "distil.train.batch_size": 8,
        "distil.train.max_steps": 200,
    },
    # Continual pre-training of your own causal LM on your own text: set teacher.path and data.source (a file,
    # glob or folder of .txt/.jsonl/...). The student keeps half the teacher's layers; KD and LWD (mse_alpha at
    # the scale of SmolLM2's raw hidden states, whose MSE is ~1e4).
    "clm": {
        "task": "clm",
        "output_dir": "runs/clm",
        "jobs": ["distil", "evaluate"],
        "teacher.path": "smollm2",
        "student.layers": None,
        "data.max_length": 256,
        "data.max_test_examples": 64,
        "distil.methods": [KD.method, LWD.method],
        "distil.kd.temperature": 1.0,
        "distil.lwd.temperature": 1.0,
        "distil.lwd.mse_alpha": 1e-3,
        "distil.train.lr": 1e-4,
        "distil.train.batch_size": 8,
        "distil.train.max_steps": 200,
    },
    # The same for a masked LM (BERT-like): KD at T = 2 (DistilBERT's) and LWD on the masked-LM batches.
    "mlm": {
        "task": "mlm",
        "output_dir": "runs/mlm",
        "jobs": ["distil", "evaluate"],
        "teacher.path": "minilm",
        "student.layers": None,
        "data.max_length": 128,
        "data.max_test_examples": 64,
        "distil.methods": [KD.method, LWD.method],
        "distil.train.lr": 1e-4,
        "distil.train.batch_size": 16,
        "distil.train.max_steps": 200,
    },
}

# The method comparisons of docs/comparison.md: every distillation method that a fine-tuning run compares, three
# seeds each (the teacher fine-tuned once), on each built-in task. RAIL-KD draws its layers each step here, as the
# committed results were run (its default is the paper's per-epoch draw).
COMPARED = {
    "seeds": [0, 1, 2],
    "distil.methods": [recipe.method for recipe in (KD, LWD, TED, CoDIR, RAILKD)],
    "distil.railkd.per": "step",
}
PRESETS["bbc-minilm-compare"] = {**PRESETS["bbc-minilm"], **COMPARED, "output_dir": "runs/bbc-minilm-compare"}
PRESETS["rt-minilm-compare"] = {**PRESETS["rt-minilm"], **COMPARED, "output_dir": "runs/rt-minilm-compare"}

# The TED authors' protocol beside fastted's (docs/comparison.md): KD and LWD start from the pretrained student, TED
# from the fine-tuned one (stage I's); each job ends on its best dev accuracy, taken each epoch on a tenth of the
# training set held out; one seed. Their regime is a setting beside it: published=ted-glue-sst2 (stage I included),
# Rotten Tomatoes being movie-review sentiment too.
PAPER_PROTOCOL = {
    "seeds": None,
    "distil.methods": [KD.method, LWD.method, TED.method],
    **{f"distil.per_method.{recipe.method}.pretrained_student": True for recipe in (KD, LWD)},
    "distil.holdout": 0.1,
}
PRESETS["rt-minilm-paper"] = {**PRESETS["rt-minilm"], **PAPER_PROTOCOL, "output_dir": "runs/rt-minilm-paper"}


# --------------------------------------------------------------------------- building and checking


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _strip_optional(tp):
    args = typing.get_args(tp)
    if typing.get_origin(tp) is Union and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else Union[tuple(rest)], True
    return tp, False


def _coerce(key: str, value, tp):
    """``value`` as type ``tp`` (from YAML or a command-line string), or a ConfigError naming ``key``."""
    tp, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}: got null, needs a value of type {getattr(tp, '__name__', tp)}")
    if isinstance(value, str) and tp is not str and optional and value.lower() in ("null", "none", "~"):
        return None
    origin = typing.get_origin(tp)
    if origin is Union:  # e.g. str | dict: take the value as it is when it is one of them
        if isinstance(value, tuple(typing.get_args(tp))):
            return value
        raise ConfigError(f"{key}: got {value!r}, needs one of {typing.get_args(tp)}")
    if origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: got {value!r}, needs a list")
        (item,) = typing.get_args(tp)
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: got {value!r}, needs true or false")
    if tp in (int, float):
        if isinstance(value, str):
            value = _number(value)
        if isinstance(value, float) and not math.isfinite(value):  # lr=inf trains to NaN; clip=nan turns it off
            raise ConfigError(f"{key}: got {value!r}, needs a finite number")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (tp is int and value != int(value)):
            raise ConfigError(f"{key}: got {value!r}, needs {'an int' if tp is int else 'a number'}")
        return tp(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: got {value!r}, needs a string")
        return str(value)
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: got {value!r}, needs a mapping")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: got {value!r}, needs a mapping of {tp.__name__} keys")
        return _build(tp, value, key + ".")
    return value


def _number(text: str):
    """A command-line number: "3", "3e-4", "1.5"; the text itself when it is none."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _build(cls, values: dict, prefix: str = ""):
    hints = _hints(cls)
    for key in values:
        if key not in hints:
            raise ConfigError(f"unknown config key {prefix + key!r}; {cls.__name__} has: {', '.join(hints)}")
    kwargs = {key: _coerce(prefix + key, value, hints[key]) for key, value in values.items()}
    return cls(**kwargs)


def _renamed(key: str) -> Optional[list[str]]:
    """The keys that replace ``key`` when it is an old one (None when it is not): ``steps`` (the run's jobs), a
    flat ``distil.<key>`` of :data:`OLD_KEYS`, or a method's own setting under ``distil.per_method.<method>``, which
    is now its section's."""
    if key == "steps":
        return ["jobs"]
    parts = key.split(".")
    if len(parts) == 2 and parts[0] == "distil" and parts[1] in OLD_KEYS:
        return OLD_KEYS[parts[1]]
    if len(parts) == 4 and parts[:2] == ["distil", "per_method"] and parts[2] in RECIPES:
        recipe = RECIPES[parts[2]]
        name = recipe.old_keys.get(parts[3], parts[3])
        if name in {f.name for f in dataclasses.fields(recipe.settings)}:
            return [f"distil.{parts[2]}.{name}"]
    return None


def _set_dotted(config, key: str, value, warn: bool = True) -> None:
    """Set one dotted key of ``config``; an old key (:func:`_renamed`) sets its new ones, with a
    :class:`ConfigKeyWarning` unless ``warn`` is False (a saved config: written by an older fastted, not by the
    user reading the warning)."""
    new_keys = _renamed(key)
    if new_keys is not None:
        if warn:
            warnings.warn(
                f"config key {key} is deprecated: it sets {', '.join(new_keys)} (write those instead)",
                ConfigKeyWarning,
                stacklevel=2,
            )
        for new in new_keys:
            _set_dotted(config, new, copy.deepcopy(value))
        return
    parts = key.split(".")
    target = config
    for i, part in enumerate(parts):
        hints = _hints(type(target))
        if part not in hints:
            where = ".".join(parts[:i]) or "the config"
            raise ConfigError(f"unknown config key {key!r}: {where} has no {part!r} (it has: {', '.join(hints)})")
        base, _ = _strip_optional(hints[part])
        if base is dict and i < len(parts) - 1:  # a key inside a mapping: distil.per_method.ted.mse_alpha
            node = getattr(target, part)
            if node is None:
                node = {}
                setattr(target, part, node)
            for sub in parts[i + 1 : -1]:
                if not isinstance(node.setdefault(sub, {}), dict):
                    raise ConfigError(f"{key}: {sub!r} holds {node[sub]!r}, not a mapping of keys")
                node = node[sub]
            node[parts[-1]] = value
            return
        if i == len(parts) - 1:
            tp = hints[part]
            base, _ = _strip_optional(tp)
            if dataclasses.is_dataclass(base) and not isinstance(value, dict):
                raise ConfigError(f"{key} is a section: set one of its keys, e.g. {key}.{next(iter(_hints(base)))}")
            if dataclasses.is_dataclass(base):  # a mapping sets several keys of the section
                for sub, v in value.items():
                    _set_dotted(config, f"{key}.{sub}", v)
                return
            setattr(target, part, _coerce(key, value, tp))
        else:
            target = getattr(target, part)


def _flatten(values: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}, except mappings that are values (engine.deepspeed)."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict) and key != "deepspeed":
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """``"distil.train.lr=3e-4"`` -> ("distil.train.lr", "3e-4"); the value is typed when set."""
    if "=" not in text or text.startswith("="):
        raise ConfigError(f"override {text!r}: needs the form key.sub=value, e.g. distil.train.lr=3e-4")
    key, value = text.split("=", 1)
    return key.strip(), value


def _per_method_last(pairs: list) -> list:
    """``pairs`` with the ``distil.per_method`` keys last, in order: an old file's per-method value of a setting (now
    the method's section) still overrides its flat value, wherever the file wrote it."""
    return sorted(pairs, key=lambda pair: str(pair[0]).startswith("distil.per_method."))


def load_config(path: Optional[str] = None, overrides: tuple = (), preset: Optional[str] = None) -> Config:
    """The preset (default "bbc-minilm"; a YAML file may name one with ``preset:``), then the file, then the
    overrides ("key=value" strings or (key, value) pairs)."""
    values: dict = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"--config: no such file {path!r}")
        try:
            with open(path, encoding="utf-8") as f:
                values = yaml.safe_load(f) or {}
        except UnicodeDecodeError as error:
            raise ConfigError(
                f"--config {path}: got bytes that are not UTF-8 text (at byte {error.start}), needs a YAML file"
            ) from None
        except yaml.YAMLError as error:
            raise ConfigError(f"--config {path}: not valid YAML ({str(error).splitlines()[0]})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"--config {path}: needs a mapping of config keys, got {type(values).__name__}")
        values = dict(values)
        preset = values.pop("preset", None) if preset is None else preset
    config = from_preset(preset or "bbc-minilm")
    pairs = _per_method_last(list(_flatten(values).items()))
    pairs += _per_method_last([parse_override(item) if isinstance(item, str) else tuple(item) for item in overrides])
    published = next((value for key, value in reversed(pairs) if key == "published"), config.published)
    published = _coerce("published", published, _hints(Config)["published"])  # "null" on the command line: None
    if published is not None:
        apply_published(config, published)
    explicit = set()
    for key, value in pairs:
        _set_dotted(config, key, value)
        explicit.update(_renamed(key) or [key])
    object.__setattr__(config, "preset", preset or "bbc-minilm")
    object.__setattr__(config, "explicit_keys", frozenset(explicit))
    check(config)
    return config


def apply_published(config: Config, name: str) -> None:
    """Set the hyperparameters that :data:`fastted.train.published.PUBLISHED` holds under ``name`` (a paper's, with its
    source there), merging ``distil.per_method`` entry by entry."""
    from fastted.train.published import PUBLISHED

    if name not in PUBLISHED:
        raise ConfigError(f"published: got {name!r}, needs one of {', '.join(PUBLISHED)}")
    for key, value in _flatten(copy.deepcopy(PUBLISHED[name])).items():
        _set_dotted(config, key, value)
    config.published = name


# Keys that hold for the whole run, never for one method alone.
_RUN_WIDE = ("methods", "per_method", "teacher_cache")


def method_config(config: Config, method: str) -> Config:
    """The config that ``method``'s jobs read: a copy with ``distil.per_method[method]`` set over ``distil``,
    ``per_method`` emptied, ``methods`` this one and the other methods' sections at their defaults (a job's saved
    config then holds its own values alone, so another method's entry or settings, or another method added to the
    run, never blocks its resume), checked; ConfigError names the per-method key."""
    values = (config.distil.per_method or {}).get(method) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"distil.per_method.{method}: got {values!r}, needs a mapping of distil keys")
    one = copy.deepcopy(config)
    one.distil.per_method, one.distil.methods = {}, [method]  # what the job computes, not the run's other methods
    for key, value in _flatten(values).items():
        name = f"distil.per_method.{method}.{key}"
        if key.split(".")[0] in _RUN_WIDE:
            raise ConfigError(
                f"{name}: distil.{key.split('.')[0]} holds for the whole run, not one method; set it in distil"
            )
        if key.split(".")[0] in RECIPES:
            raise ConfigError(f"{name}: a method's settings are its own section; set distil.{key}")
        try:
            _set_dotted(one, f"distil.{key}", value)
        except ConfigError as error:
            raise ConfigError(str(error).replace(f"distil.{key}", name)) from None
    for name, recipe in RECIPES.items():
        if name != method:
            setattr(one.distil, name, recipe.settings())
    try:
        check(one)
    except ConfigError as error:
        raise ConfigError(f"distil.per_method.{method}: {error}") from None
    return one


FILTERED_MODELS = ("teacher", "student")


def filters_config(config: Config, which: str) -> Config:
    """The config that the filters job of ``which`` ("teacher" or "student") reads: a copy with
    ``filters.per_model[which]`` set over ``filters.train`` and ``per_model`` emptied (the job's saved config then
    holds its own schedule alone); ConfigError names the per-model key."""
    per_model = config.filters.per_model or {}
    unknown = [key for key in per_model if key not in FILTERED_MODELS]
    if unknown:
        raise ConfigError(f"filters.per_model: got {unknown[0]!r}, needs one of {', '.join(FILTERED_MODELS)}")
    values = per_model.get(which) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"filters.per_model.{which}: got {values!r}, needs a mapping of filters.train keys")
    one = copy.deepcopy(config)
    one.filters.per_model = {}
    for key, value in _flatten(values).items():
        name = f"filters.per_model.{which}.{key}"
        try:
            _set_dotted(one, f"filters.train.{key}", value)
            _check_train("filters.train", one.filters.train)
        except ConfigError as error:
            raise ConfigError(str(error).replace(f"filters.train.{key}", name)) from None
    return one


def job_settings(values: dict) -> dict:
    """A job's saved config (the YAML values of :func:`method_config`'s config) as a job compares a checkpoint's
    settings with its own: the old keys of a checkpoint written before them moved, quietly (``steps`` onto
    ``jobs``, the flat distil keys of a checkpoint written before the methods owned their settings onto their
    sections); each section whole (its defaults where unset); and only the sections of the job's own methods
    (another method's settings never block its resume)."""
    values = _moved_top_keys(values)
    distil = values.get("distil")
    if not isinstance(distil, dict):
        return values
    moves = [(new, value) for key, value in distil.items() if key in OLD_KEYS for new in OLD_KEYS[key]]
    per_method = {}
    for method, entry in (distil.get("per_method") or {}).items():
        kept = {}
        for key, value in entry.items() if isinstance(entry, dict) else ():
            new = _renamed(f"distil.per_method.{method}.{key}")
            moves += [(n, value) for n in new] if new else []
            if not new:
                kept[key] = value
        if kept or not isinstance(entry, dict):
            per_method[method] = kept if isinstance(entry, dict) else entry
    out = {key: value for key, value in distil.items() if key not in OLD_KEYS and key not in RECIPES}
    if "per_method" in distil:
        out["per_method"] = per_method
    methods = distil.get("methods") or []
    for name in (m for m in RECIPES if m in methods):
        written = distil.get(name) or {}
        section = {**dataclasses.asdict(RECIPES[name].settings()), **written}
        section.update(
            {key: value for (method, key), value in RAN_WITHOUT.items() if method == name and key not in written}
        )
        section.update({key.split(".")[2]: value for key, value in moves if key.split(".")[1] == name})
        out[name] = section
    defaults = to_dict(Config())
    for name in RECIPES:  # another method's section is never compared, not even at its defaults
        if name not in out:
            del defaults["distil"][name]
    return _with_defaults({**values, "distil": out}, defaults)


# A method's settings added with a default that changed what a config without them ran: the value such a config
# ran with, so a checkpoint written before them resumes only under that value (never silently another form).
RAN_WITHOUT = {(RAILKD.method, "train_teacher_projection"): True}


def _with_defaults(values, defaults):
    """``values`` with every key it lacks (a key added after it was written) at its default in ``defaults``."""
    if not isinstance(values, dict) or not isinstance(defaults, dict):
        return values
    filled = {key: _with_defaults(value, defaults.get(key)) for key, value in values.items()}
    return {**filled, **{key: value for key, value in defaults.items() if key not in values}}


def origin(config, key: str) -> str:
    """ " (the value of preset P: set KEY for your model)" when ``key`` was not set by the user's file or overrides
    (a config from :func:`load_config`), else "": error messages say where a value they reject came from."""
    explicit = getattr(config, "explicit_keys", None)
    if explicit is None or key in explicit or any(key.startswith(k + ".") for k in explicit):
        return ""
    return f" (the value of the preset {getattr(config, 'preset', 'bbc-minilm')}: set {key} for your model)"


def from_preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"--preset: got {name!r}, needs one of {', '.join(PRESETS)}")
    config = Config()
    for key, value in PRESETS[name].items():
        _set_dotted(config, key, copy.deepcopy(value))
    return config


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def _moved_top_keys(values: dict) -> dict:
    """A saved config's values with its old top-level keys (:func:`_renamed`: ``steps``) moved onto their new
    ones, quietly; a new key wins where the values hold both."""
    if not isinstance(values, dict):
        return values
    out = {key: value for key, value in values.items() if _renamed(key) is None}
    for key, value in values.items():
        for new in _renamed(key) or ():
            out.setdefault(new, value)
    return out


def from_dict(values: dict) -> Config:
    """The config of saved values (a checkpoint's config.yaml read back), checked. It is set key by key as a file's
    is, so an older config's old keys (``steps``, the flat distil keys) move onto their new ones, quietly."""
    if not isinstance(values, dict):
        raise ConfigError(f"a saved config: got {type(values).__name__}, needs a mapping of config keys")
    config = Config()
    for key, value in _per_method_last(list(_flatten(_moved_top_keys(values)).items())):
        _set_dotted(config, key, value, warn=False)
    check(config)
    return config


def to_yaml(config) -> str:
    """The config as YAML text, in the dataclasses' key order."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def dump(config, path: str) -> None:
    """Write the config as YAML, atomically."""
    from fastted.files import write_atomic

    write_atomic(path, to_yaml(config))


def _choice(key, value, choices):
    if value not in choices:
        raise ConfigError(f"{key}: got {value!r}, needs one of {', '.join(map(str, choices))}")


def _positive(key, value, allow_zero=False):
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise ConfigError(f"{key}: got {value!r}, needs a number {'>= 0' if allow_zero else '> 0'}")


def _check_train(prefix: str, t: TrainConfig) -> None:
    _positive(f"{prefix}.epochs", t.epochs)
    _positive(f"{prefix}.max_steps", t.max_steps)
    _positive(f"{prefix}.batch_size", t.batch_size)
    _positive(f"{prefix}.micro_batch_size", t.micro_batch_size)
    _positive(f"{prefix}.lr", t.lr, allow_zero=True)
    _positive(f"{prefix}.weight_decay", t.weight_decay, allow_zero=True)
    if not 0 <= t.warmup_ratio < 1:
        raise ConfigError(f"{prefix}.warmup_ratio: got {t.warmup_ratio!r}, needs a number in [0, 1)")
    _choice(f"{prefix}.decay", t.decay, DECAYS)
    _positive(f"{prefix}.clip", t.clip, allow_zero=True)
    for name in ("log_every", "eval_every", "save_every"):
        _positive(f"{prefix}.{name}", getattr(t, name), allow_zero=True)
    _positive(f"{prefix}.keep_last", t.keep_last)
    _positive(f"{prefix}.max_tokens", t.max_tokens)
    _positive(f"{prefix}.warmup_tokens", t.warmup_tokens, allow_zero=True)
    _positive(f"{prefix}.min_lr", t.min_lr, allow_zero=True)
    _positive(f"{prefix}.prefetch_steps", t.prefetch_steps, allow_zero=True)
    if t.min_lr > t.lr:
        raise ConfigError(
            f"{prefix}.min_lr: got {t.min_lr!r}, more than {prefix}.lr ({t.lr!r}); needs a floor at most the peak"
        )
    if t.max_tokens is not None and t.max_steps is not None:
        raise ConfigError(
            f"{prefix}.max_tokens ({t.max_tokens}) and {prefix}.max_steps ({t.max_steps}) both set "
            f"the run's length; keep one"
        )
    if t.micro_batch_size is not None and t.batch_size % t.micro_batch_size:
        raise ConfigError(
            f"{prefix}.batch_size ({t.batch_size}) must be a multiple of {prefix}.micro_batch_size "
            f"({t.micro_batch_size})"
        )


def _check_settings(prefix: str, settings) -> None:
    """A method's settings in the ranges its dataclass declares (fastted.methods.base.setting)."""
    for f in dataclasses.fields(settings):
        rule, key, value = f.metadata.get("check"), f"{prefix}.{f.name}", getattr(settings, f.name)
        if rule == "> 0":
            _positive(key, value)
        elif rule == ">= 0":
            _positive(key, value, allow_zero=True)
        elif isinstance(rule, tuple):
            _choice(key, value, rule)
        elif rule is not None:
            raise ValueError(
                f"{type(settings).__name__}.{f.name}: check {rule!r}, needs '> 0', '>= 0' or a tuple of "
                f"the allowed values"
            )


def _check_teacher_shape(config: Config) -> None:
    """The teacher's ModelConfig keys that apply to a teacher: ``layers`` never (a student's), the shape keys
    only with ``random_init`` (a pretrained teacher keeps its shape); a student cut from a fresh teacher has no
    weights to take and must be fresh too."""
    t, s = config.teacher, config.student
    if t.layers is not None:
        raise ConfigError(
            f"teacher.layers: got {t.layers}, but it is a student setting (the teacher layers a "
            f"student keeps); a fresh teacher's depth is teacher.num_layers with teacher.random_init"
        )
    for name in ("num_layers", "hidden_size", "intermediate_size"):
        value = getattr(t, name)
        _positive(f"teacher.{name}", value)
        if value is not None and not t.random_init:
            raise ConfigError(
                f"teacher.{name}: got {value}, but it shapes a fresh teacher only: set "
                f"teacher.random_init=true, or leave it unset (a pretrained teacher keeps its shape)"
            )
    if t.random_init and s.path is None and not s.random_init:
        raise ConfigError(
            "student.random_init: got false, but the student is cut from the teacher's layers and "
            "teacher.random_init=true gives a fresh teacher with no weights to take: set "
            "student.random_init=true (a fresh student of the teacher's shape) or student.path"
        )


def packs_blocks(config: Config) -> bool:
    """Packed pre-training: task mlm or clm with ``data.pack`` (token shards, steps of a fixed number of tokens)."""
    return config.task != "classification" and config.data.pack


def run_kind(config: Config) -> str:
    """The run's task as the errors about packed blocks name it: "classification", "clm", "clm without packing"."""
    return config.task + ("" if config.task == "classification" or config.data.pack else " without packing")


def check(config: Config) -> None:
    """Every value in range; raises ConfigError naming the key."""
    _choice("task", config.task, TASKS)
    if config.seeds is not None and (not config.seeds or len(set(config.seeds)) != len(config.seeds)):
        raise ConfigError(f"seeds: got {config.seeds}, needs distinct ints (or null for the one `seed`)")
    for i, job in enumerate(config.jobs):
        _choice(f"jobs[{i}]", job, JOBS)
    if config.task != "classification":
        for job in config.jobs:
            if job.startswith("finetune"):
                raise ConfigError(
                    f"jobs: {job!r} is for classification; a {config.task} run distils the "
                    f"pretrained models (jobs: [distil, evaluate], with the filters jobs first "
                    f"for TED)"
                )
    for i, method in enumerate(config.distil.methods):
        _choice(f"distil.methods[{i}]", method, METHODS)
    if not config.distil.methods:
        raise ConfigError("distil.methods: got [], needs at least one of " + ", ".join(METHODS))
    if not 0 < config.data.test_fraction < 1:
        raise ConfigError(f"data.test_fraction: got {config.data.test_fraction!r}, needs a number in (0, 1)")
    _choice("data.sample_by", config.data.sample_by, SAMPLE_BY)
    _positive("data.max_length", config.data.max_length)
    _positive("data.max_train_examples", config.data.max_train_examples)
    _positive("data.max_test_examples", config.data.max_test_examples)
    if config.teacher.path is None:
        raise ConfigError("teacher.path: got null, needs a model folder, 'minilm' or 'smollm2'")
    s = config.student
    if s.path is not None and (s.layers is not None or s.num_layers is not None):
        raise ConfigError("student: student.path and student.layers / num_layers exclude each other")
    _positive("student.num_layers", s.num_layers)
    if s.layers is not None:
        if not s.layers:
            raise ConfigError("student.layers: got [], needs at least one teacher layer index (or null)")
        if any(i < 0 for i in s.layers) or len(set(s.layers)) != len(s.layers):
            raise ConfigError(
                f"student.layers: got {s.layers}, needs distinct teacher layer indices >= 0 (a layer "
                f"taken twice would share its weights)"
            )
    _positive("student.hidden_size", s.hidden_size)
    _positive("student.intermediate_size", s.intermediate_size)
    _check_teacher_shape(config)
    if not config.output_dir.strip():
        raise ConfigError("output_dir: got an empty path, needs a folder for the run's jobs")
    if not 0 < config.data.mlm_probability < 1:
        raise ConfigError(f"data.mlm_probability: got {config.data.mlm_probability!r}, needs a number in (0, 1)")
    packed = packs_blocks(config)
    for prefix, t in (
        ("finetune", config.finetune),
        ("filters.train", config.filters.train),
        ("distil.train", config.distil.train),
    ):
        _check_train(prefix, t)
        for name in ("max_tokens", "warmup_tokens"):
            if getattr(t, name) is not None and not packed:
                raise ConfigError(
                    f"{prefix}.{name}: got {getattr(t, name)}, but a budget in tokens needs packed "
                    f"blocks (task mlm or clm with data.pack true), whose steps hold a fixed number "
                    f"of tokens; this run is {run_kind(config)}"
                )
    _positive("data.test_documents", config.data.test_documents)
    _positive("data.num_proc", config.data.num_proc)
    if config.data.document_mask and not packed:
        raise ConfigError(
            f"data.document_mask: got true, but it applies to packed blocks (task mlm or clm with "
            f"data.pack true); this run is {run_kind(config)}"
        )
    _positive("filters.interval", config.filters.interval)
    _positive("filters.filter_dim", config.filters.filter_dim)
    if not 0 <= config.filters.head_dropout < 1:
        raise ConfigError(f"filters.head_dropout: got {config.filters.head_dropout!r}, needs a number in [0, 1)")
    if not 0 <= config.filters.holdout < 1:
        raise ConfigError(f"filters.holdout: got {config.filters.holdout!r}, needs a number in [0, 1)")
    if config.filters.holdout and config.task != "classification":
        raise ConfigError(
            f"filters.holdout: got {config.filters.holdout}, but the probes it watches are classification heads; "
            f"this run's task is {config.task}"
        )
    _positive("filters.patience", config.filters.patience)
    _positive("filters.watch_every", config.filters.watch_every)
    for which in config.filters.per_model or {}:
        filters_config(config, which)  # raises naming the key
    d = config.distil
    for name in RECIPES:
        _check_settings(f"distil.{name}", getattr(d, name))
    _positive("distil.cache_k", d.cache_k, allow_zero=True)
    _choice("distil.cache_quantization", d.cache_quantization, ("int8", "fp8", "bf16"))
    _positive("distil.cache_layer_bytes", d.cache_layer_bytes, allow_zero=True)
    _positive("distil.cache_shard_mb", d.cache_shard_mb)
    if d.teacher_cache or "cache-teacher" in config.jobs:
        what = "distil.teacher_cache" if d.teacher_cache else "jobs: cache-teacher"
        if config.task == "mlm":
            raise ConfigError(
                f"{what}: a masked LM's teacher sees each step's own random masks, which a cache "
                f"of fixed inputs cannot hold; a teacher cache serves classification and clm"
            )
        live = [m for m in d.methods if m not in CACHED_METHODS]
        if live:
            raise ConfigError(
                f"{what}: {', '.join(live)} needs the live teacher (a teacher cache serves "
                f"{', '.join(CACHED_METHODS)}): drop it from distil.methods or run it without the "
                f"cache"
            )
    for method in d.per_method or {}:
        _choice("distil.per_method", method, METHODS)
        method_config(config, method)
    if not 0 <= d.holdout < 1:
        raise ConfigError(f"distil.holdout: got {d.holdout!r}, needs a number in [0, 1)")
    if d.holdout and config.task != "classification":
        raise ConfigError(
            f"distil.holdout: got {d.holdout}, but the dev split's accuracy needs classification; this run's task "
            f"is {config.task}"
        )
    if d.holdout and d.teacher_cache:
        raise ConfigError(
            f"distil.holdout: got {d.holdout}, but a teacher cache holds the rows of the whole training set: "
            f"drop distil.teacher_cache, or the dev split"
        )
    _positive("distil.patience", d.patience)
    _positive("distil.watch_every", d.watch_every)
    for method in d.methods:
        own = method_config(config, method).distil if method in (d.per_method or {}) else d
        if own.pretrained_student and RECIPES[method].uses_stage1_filters:
            raise ConfigError(
                f"distil.pretrained_student: got true for {method}, whose student is stage I's fine-tuned one (its "
                f"filters were learnt on it); set it for the other methods alone: "
                f"distil.per_method.<method>.pretrained_student=true"
            )
    _choice("engine.precision", config.engine.precision, PRECISIONS)
    if config.engine.teacher_offload is not None:
        _choice("engine.teacher_offload", config.engine.teacher_offload, ("cpu", "none"))
        if config.engine.teacher_offload == "cpu" and config.engine.teacher_zero3 is False:
            raise ConfigError(
                "engine.teacher_offload: got 'cpu' with engine.teacher_zero3 false, needs the teacher "
                "partitioned (teacher_zero3 true or null): offload moves ZeRO-3's partitions"
            )
    _choice("engine.zero_stage", config.engine.zero_stage, (0, 1, 2, 3))
    _choice("engine.impl", config.engine.impl, ("auto", "triton", "reference"))
    _choice("engine.device", config.engine.device, ("auto", "cpu", "cuda"))
    _positive("engine.threads", config.engine.threads)
    _positive("engine.peak_tflops", config.engine.peak_tflops)
