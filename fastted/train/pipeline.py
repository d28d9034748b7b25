"""The jobs of a run (the config key ``jobs``), each reading what the jobs before it wrote under ``output_dir``.

::

    finetune-teacher   teacher + classification head, fine-tuned      -> finetune-teacher/model
    finetune-student   the student (layers of the teacher), fine-tuned -> finetune-student/model
    filters-teacher    TED stage I on the fine-tuned teacher          -> filters-teacher/model (+ filters)
    filters-student    TED stage I on the fine-tuned student          -> filters-student/model (+ filters)
    cache-teacher      the teacher once over the training data        -> cache-teacher-<method>/ (a cache)
    distil             stage II of each method in distil.methods      -> distil-<method>/model
                       (from the cache with distil.teacher_cache)
    evaluate           every model above on the test split            -> results.json, report.md, report.png

A language-modelling run (task mlm or clm: continual pre-training) starts
from the pretrained teacher and its student and runs ``distil`` and
``evaluate`` (and the filters jobs first when TED is among the methods).

This module holds the jobs alone: the models come from
:mod:`fastted.models` (loading, the student cut from the teacher), the data
from :func:`fastted.train.data.prepare_data`, the recipes from the registry of
:mod:`fastted.methods`, the training from :mod:`fastted.train.trainer` under
:class:`fastted.train.engine.Engine`. Each training job is a
:class:`~fastted.train.trainer.Training` of the same name, in the folder of that name.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from typing import Optional

import torch

from fastted.files import write_atomic
from fastted.integrations import with_index
from fastted.models import is_partitioned
from fastted.train.config import (
    Config,
    ConfigError,
    TrainConfig,
    filters_config,
    method_config,
    packs_blocks,
    run_kind,
    to_yaml,
)
from fastted.train.data import Data, prepare_data
from fastted.train.engine import (
    Engine,
    barrier,
    batch_layout,
    deepspeed_config,
    init_distributed,
    partitions_teacher,
    resolve_device,
    resolve_precision,
    seed_everything,
    teacher_deepspeed_config,
)
from fastted.train.loading import build_teacher, place, teacher_num_layers
from fastted.train.sources import build_student, hf_config, load_model, load_tokenizer, model_source, student_layers
from fastted.train.trainer import Training, Watch, evaluate_model, run, total_steps


def run_dir(config: Config, name: str) -> str:
    """The folder of the job ``name`` (e.g. "distil-ted") under ``output_dir``."""
    return os.path.join(config.output_dir, name)


def _model_dir(config: Config, name: str) -> str:
    path = os.path.join(run_dir(config, name), "model")
    if not os.path.isdir(path):
        raise ConfigError(f"{path} does not exist: run the {name} job first (fastted {name.split('-')[0]} ...)")
    return path


def _train_key(config: Config, train: TrainConfig) -> str:
    """The config section of ``train``: finetune, filters.train or distil.train."""
    return {id(config.finetune): "finetune", id(config.filters.train): "filters.train"}.get(id(train), "distil.train")


def check_prerequisites(config: Config, jobs: list[str], methods: list[str], command: str = "pipeline") -> None:
    """Every job's inputs exist under ``output_dir`` or an earlier job of ``jobs`` writes them: a ConfigError
    naming what is missing before any job trains (TED's stage II needs both filters jobs; in classification
    the filters jobs and KD, LWD and the others need the fine-tuned models)."""
    from fastted.methods import recipe_class

    made = {name for name in JOBS_WRITING if os.path.isdir(os.path.join(run_dir(config, name), "model"))}
    made |= {
        f"cache-teacher-{m}"
        for m in methods
        if os.path.isfile(os.path.join(run_dir(config, f"cache-teacher-{m}"), "manifest.json"))
    }
    for job in jobs:
        needs = []
        if job.startswith("filters-") and config.task == "classification":
            needs = ["finetune-" + job.split("-", 1)[1]]
        elif job in ("distil", "cache-teacher"):
            for method in methods:
                if recipe_class(method).uses_stage1_filters:
                    needs += ["filters-teacher", "filters-student"]
                elif config.task == "classification":
                    needs.append("finetune-teacher")
                    if not method_config(config, method).distil.pretrained_student:
                        needs.append("finetune-student")
                if job == "distil" and config.distil.teacher_cache:
                    needs.append(f"cache-teacher-{method}")
        missing = [name for name in dict.fromkeys(needs) if name not in made]
        if missing:
            what = f"{job} ({', '.join(methods)})" if job in ("distil", "cache-teacher") else job
            runs = " and ".join(f"`fastted {_command_of(name)}`" for name in dict.fromkeys(missing))
            jobs_of = dict.fromkeys("cache-teacher" if n.startswith("cache-") else n for n in missing)
            where = f"add {', '.join(jobs_of)} to jobs before {job!r}" if command == "pipeline" else f"run {runs} first"
            made_of = [n + ("/manifest.json" if n.startswith("cache-") else "/model") for n in missing]
            raise ConfigError(
                f"jobs: {what} needs {', '.join(made_of)} in {config.output_dir}, which no earlier job writes: {where}"
            )
        if job == "distil":
            made |= {f"distil-{m}" for m in methods}
        elif job == "cache-teacher":
            made |= {f"cache-teacher-{m}" for m in methods}
        else:
            made.add(job)


def _command_of(name: str) -> str:
    """The command that writes the job folder ``name``: "finetune teacher", "cache-teacher --method kd"."""
    if name.startswith("cache-teacher-"):
        return f"cache-teacher --method {name[len('cache-teacher-') :]}"
    return " ".join(name.split("-", 1))


JOBS_WRITING = ("finetune-teacher", "finetune-student", "filters-teacher", "filters-student")


def tokens_per_step(data: Data, train: TrainConfig) -> Optional[int]:
    """The tokens of an optimizer step when they are fixed: packed blocks (batch_size x block tokens)."""
    block = getattr(data.train, "block_size", None)
    return None if block is None else train.batch_size * block


def _train(
    config: Config,
    name: str,
    recipe,
    data: Data,
    train: TrainConfig,
    device,
    evaluate_adapter,
    evaluate=None,
    watch: Optional[Watch] = None,
) -> dict:
    """Train ``recipe`` as the job ``name`` and export it; the result holds the test metric of
    ``evaluate_adapter`` (a model), or what ``evaluate(engine)`` returns, or neither; ``watch`` may end it early."""
    per_step = tokens_per_step(data, train)
    steps = total_steps(len(data.train), train, _train_key(config, train), per_step)
    engine = Engine(recipe, train, config.engine, steps, device, tokens_per_step=per_step)

    if evaluate_adapter is not None:

        def evaluate(eng):
            return evaluate_model(evaluate_adapter, data, config.task, eng.micro_batch, eng.device, eng.rank, eng.world)

    training = Training(
        name=name,
        directory=run_dir(config, name),
        recipe=recipe,
        dataset=data.train,
        collator=data.collator,
        train=train,
        evaluate=evaluate,
        config_text=to_yaml(config),
        seed=config.seed,
        progress=config.progress,
        resume=config.resume,
        watch=watch,
    )
    result = run(training, engine)
    with engine.gathered():
        if engine.is_main:
            _export(training.directory, recipe, data.tokenizer, result)
    barrier()
    return result


def _export(directory: str, recipe, tokenizer, result: dict) -> None:
    """Write the trained model to ``directory/model`` and the run's result to ``result.json``, each under a
    temporary name and renamed: a kill leaves the previous export (or none), never half of one."""
    out, tmp, old = (os.path.join(directory, name) for name in ("model", "model.tmp", "model.old"))
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    recipe.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if os.path.isdir(out):
        os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    write_atomic(os.path.join(directory, "result.json"), json.dumps(result, indent=1))


@dataclass
class _Start:
    device: torch.device
    rank: int
    world: int
    path: str  # the teacher's folder
    gguf: Optional[str]  # and GGUF file
    data: Data


def _start(config: Config) -> _Start:
    """What every job begins with: threads, device and ranks (``engine.precision`` resolved in ``config``, so that
    the job's saved config holds the precision it ran in), seeds, the teacher's tokenizer and the data."""
    if config.engine.threads:
        torch.set_num_threads(config.engine.threads)
    if not config.progress:  # no bars at all (transformers' save and load, datasets' maps): a log line per logged step
        import datasets
        import transformers

        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()
    device = resolve_device(config.engine)
    config.engine.precision = resolve_precision(config.engine, device)  # what every job reads and saves
    rank, world = init_distributed(device)
    seed_everything(config.seed)
    path, gguf = model_source(config.teacher, "teacher")
    data = prepare_data(config, load_tokenizer(path, gguf), rank)
    return _Start(device, rank, world, path, gguf, data)


def _partitioning(config: Config, st: _Start, train: Optional[TrainConfig], micro: int) -> tuple:
    """(teacher's, student's) DeepSpeed configs that partition them while they are built (ZeRO-3), None for a
    model built whole: the teacher by :func:`fastted.train.engine.partitions_teacher`, the student when the training's
    DeepSpeed config (``train``'s) is at stage 3; with ``train`` None (evaluation) a ZeRO-3 student runs as the
    teacher does, under the teacher's inference config."""
    engine = config.engine
    inference = teacher_deepspeed_config(engine, micro)
    teacher = inference if partitions_teacher(engine, st.world) else None
    # evaluation has no batch layout to check: a global batch of one example per rank
    ds_config = deepspeed_config(train or TrainConfig(batch_size=st.world), engine, st.world)
    if ds_config["zero_optimization"].get("stage", 0) != 3:
        return teacher, None
    return teacher, (inference if train is None else ds_config)


def _legacy(config: Config, zeros: tuple) -> bool:
    """Nothing partitioned and no fresh teacher: the models load whole as they always have (the student cut from
    a whole teacher); otherwise every model is built by :mod:`fastted.train.loading`."""
    return zeros == (None, None) and not config.teacher.random_init


def _student(config: Config, legacy: bool, zero: Optional[dict], num_labels: Optional[int] = None, teacher=None):
    """The run's student: :func:`fastted.train.sources.build_student` (cut from ``teacher`` when it is given) when
    ``legacy`` (:func:`_legacy`), else :func:`fastted.train.loading.build_student`, partitioned with ``zero``."""
    from fastted.train import loading

    if legacy:
        return build_student(config, num_labels, teacher=teacher)
    return loading.build_student(config, num_labels=num_labels, zero=zero)


def _labels(config: Config, st: _Start) -> Optional[int]:
    """The classes of a classification run's task (a fresh head's outputs), else None."""
    return len(st.data.label_names) if config.task == "classification" else None


def _run_partitioned(model, config: Config, micro: int):
    """Put ``model`` under DeepSpeed's inference engine when ZeRO-3 partitions it (the engine's forward hooks
    gather each module's parameters for its forward); returns the engine to keep while the model runs, or None
    for a whole model."""
    if not any(is_partitioned(p) for p in model.parameters()):
        return None
    import deepspeed

    return deepspeed.initialize(model=model, config=teacher_deepspeed_config(config.engine, micro, model))[0]


# --------------------------------------------------------------------------- the jobs


def finetune(config: Config, which: str) -> dict:
    """Fine-tune the teacher or the student alone on the task (no distillation)."""
    from fastted.methods import FineTune

    st = _start(config)
    n_labels = len(st.data.label_names)
    zeros = _partitioning(config, st, config.finetune, batch_layout(config.finetune, st.world)[0])
    zero = zeros[1]  # the model trains: partitioned as a student is
    model = (
        build_teacher(config, num_labels=n_labels, zero=zero)
        if which == "teacher"
        else _student(config, _legacy(config, zeros), zero, n_labels)
    )
    model.config.id2label = dict(enumerate(st.data.label_names))  # saved with the model: its classes by name
    model.config.label2id = {name: i for i, name in enumerate(st.data.label_names)}
    recipe = FineTune(model, task=config.task, impl=config.engine.impl)
    return _train(config, f"finetune-{which}", recipe, st.data, config.finetune, st.device, recipe.student_model)


def learn_filters(config: Config, which: str) -> dict:
    """TED's stage I on the fine-tuned (classification) or pretrained (LM) model."""
    from fastted.methods import TEDStage1
    from fastted.train.trainer import evaluate_probes

    config = filters_config(config, which)  # this model's stage-I schedule
    st = _start(config)
    # the frozen model is held outside the recipe's tree: whole on each rank (the engine partitions a teacher alone)
    legacy = _legacy(config, _partitioning(config, st, config.filters.train, 1))
    if config.task == "classification":
        model = load_model(_model_dir(config, f"finetune-{which}"), config.task)
    else:
        model = build_teacher(config) if which == "teacher" else _student(config, legacy, None)
    fresh_width = config.teacher.hidden_size if config.teacher.random_init else None
    filter_dim = config.filters.filter_dim or fresh_width or hf_config(st.path, st.gguf).hidden_size
    recipe = TEDStage1(
        model,
        interval=_interval(config, which),
        filter_dim=filter_dim,
        nonlinear=config.filters.nonlinear,
        dropout=config.filters.head_dropout,
        model_dropout=config.filters.dropout,
        task=config.task,
        impl=config.engine.impl,
    )
    probes, watch, data = None, None, st.data
    if config.task == "classification":  # each filter's accuracy as a probe on the test split, in result.json

        def probes(engine):
            return evaluate_probes(recipe, st.data, engine.micro_batch, engine.device, engine.rank, engine.world)

    if config.filters.holdout:  # stage I ends when the probes stop improving on a held-out part of the training set
        kept, held = _holdout(st.data.train, config.filters.holdout, config.seed)
        data = dataclasses.replace(st.data, train=kept)
        on_held = dataclasses.replace(st.data, train=held, test=held)

        def score(engine):
            found = evaluate_probes(recipe, on_held, engine.micro_batch, engine.device, engine.rank, engine.world)
            return sum(found["probe_accuracy"]) / len(found["probe_accuracy"])

        every = config.filters.watch_every or max(len(kept) // config.filters.train.batch_size // 2, 1)
        watch = Watch(score, every, config.filters.patience, name="holdout_probe_accuracy")
    return _train(config, f"filters-{which}", recipe, data, config.filters.train, st.device, None, probes, watch)


def _holdout(dataset, fraction: float, seed: int) -> tuple:
    """(the rest, the held-out part) of ``dataset``: ``fraction`` of its examples (at least one, and one kept),
    drawn by ``seed``."""
    n = len(dataset)
    n_held = min(max(round(n * fraction), 1), n - 1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    held, kept = sorted(order[:n_held]), sorted(order[n_held:])
    if hasattr(dataset, "select"):
        return dataset.select(kept), dataset.select(held)
    return [dataset[i] for i in kept], [dataset[i] for i in held]


def _num_layers(config: Config, which: str) -> int:
    if which == "student" and config.student.path is None:
        n_teacher = _num_layers(config, "teacher")
        return len(student_layers(config.student, n_teacher))
    if which == "teacher":
        return teacher_num_layers(config)
    return hf_config(*model_source(config.student, "student")).num_hidden_layers


def _interval(config: Config, which: str) -> int:
    """The teacher's interval is ``filters.interval`` (default: teacher layers / student layers, one filter per
    student layer); the student's interval gives it as many filters as the teacher has."""
    n_teacher, n_student = _num_layers(config, "teacher"), _num_layers(config, "student")
    interval = config.filters.interval or max(n_teacher // n_student, 1)
    if which == "teacher":
        return interval
    n_filters = n_teacher // interval
    if n_filters == 0 or n_student % n_filters:
        raise ConfigError(
            f"filters.interval {interval}: the teacher gets {n_filters} filters, which do not divide "
            f"the student's {n_student} layers"
        )
    return n_student // n_filters


def _step_models(config: Config, cls) -> tuple[Optional[str], Optional[str]]:
    """(teacher's, student's) model folders that earlier jobs wrote for the recipe class ``cls``: the filters
    jobs' for a recipe on TED's stage-I filters, the fine-tuning jobs' in classification, else (None, None)
    (the run's teacher source and the student cut from it); no student folder with ``distil.pretrained_student``
    (the student is then cut from the pretrained teacher, with a fresh head)."""
    if cls.uses_stage1_filters:
        return _model_dir(config, "filters-teacher"), _model_dir(config, "filters-student")
    if config.task == "classification":
        student = None if config.distil.pretrained_student else _model_dir(config, "finetune-student")
        return _model_dir(config, "finetune-teacher"), student
    return None, None


def _recipe(config: Config, method: str, st: _Start, truncate: bool = False, cached: bool = False):
    """The stage-II recipe of ``method`` on the run's models (what distil trains and cache-teacher runs), its
    teacher cut after the last layer it reads with ``truncate`` (:meth:`~fastted.methods.base.Recipe.truncate_teacher`).

    Partitioned (:func:`_partitioning`), the models are built by :mod:`fastted.train.loading`, each partition by
    partition, and a teacher to cut is cut before it is built: the recipe is built on a meta-device stand-in of
    it, cut, and handed the teacher built with the kept blocks alone (the others are never built nor read).

    ``cached`` (distil from a teacher cache): the teacher is the meta-device stand-in alone, on every rank, and no
    byte of its weights is read; the recipe takes its shape from it until
    :meth:`~fastted.methods.base.Recipe.use_teacher_cache` drops it. A student cut from the teacher reads its
    kept blocks from the teacher's files itself (:func:`fastted.train.loading.build_student`): its initialization,
    never the teacher's other blocks."""
    from fastted.filters import TaskFilters
    from fastted.methods import RecipeModels, build_recipe, recipe_class
    from fastted.methods.base import Recipe
    from fastted.train.loading import build_model

    tokenizer = st.data.tokenizer
    s_tokenizer = load_tokenizer(*model_source(config.student, "student")) if config.student.path else tokenizer
    zeros = _partitioning(config, st, config.distil.train, batch_layout(config.distil.train, st.world)[0])
    legacy = _legacy(config, zeros)
    filters = None
    t_dir, s_dir = _step_models(config, recipe_class(method))
    if recipe_class(method).uses_stage1_filters:
        filters = (TaskFilters.from_pretrained(s_dir), TaskFilters.from_pretrained(t_dir))
    fresh_teacher = t_dir is None and config.teacher.random_init  # drawn whole, then cut (its draws stay the same)
    cut_first = (
        truncate
        and not cached
        and not legacy
        and zeros[0] is not None
        and not fresh_teacher
        and recipe_class(method).teacher_layers_needed is not Recipe.teacher_layers_needed
    )
    teacher = build_teacher(config, folder=t_dir, zero=zeros[0], meta=cut_first or cached)
    if s_dir is not None:
        student = load_model(s_dir, config.task) if legacy else build_model(s_dir, config.task, zero=zeros[1])
    elif cached:  # never a copy of the stand-in: the kept blocks read from the teacher's files
        student = _student(config, False, zeros[1], _labels(config, st))
    elif t_dir is not None:  # a fine-tuned teacher: the pretrained student is cut from the pretrained one
        student = _student(config, legacy, zeros[1], _labels(config, st))
    else:
        student = _student(config, legacy, zeros[1], teacher=teacher)
    steps = total_steps(
        len(st.data.train), config.distil.train, "distil.train", tokens_per_step(st.data, config.distil.train)
    )
    models = RecipeModels(
        student,
        teacher,
        tokenizers=(s_tokenizer, tokenizer),
        total_steps=steps,
        filters=filters,
        train_size=len(st.data.train),
    )
    recipe = build_recipe(method, config, models)
    if cut_first:
        kept = recipe.truncate_teacher() or recipe.teacher_model.num_layers
        recipe.replace_teacher(build_teacher(config, folder=t_dir, zero=zeros[0], blocks=range(kept)))
    elif truncate:
        recipe.truncate_teacher()  # before the engine: ZeRO-3 never gathers the blocks cut off
    return recipe


def _cache_cuts_teacher(config: Config) -> bool:
    """Whether a teacher cache's teacher is cut after its last mapped layer: it stores the layer targets alone
    (``distil.cache_k`` 0) and ``distil.truncate_teacher``. The cache's identity is its source's all the same
    (:func:`fastted.train.identity.teacher_identity`): the cut is the config's, and the layers are in the manifest."""
    return not config.distil.cache_k and config.distil.truncate_teacher


def _cache_identity(config: Config, recipe, data: Data) -> dict:
    """What a run's teacher cache is checked against: the teacher (:func:`fastted.train.identity.teacher_identity` of
    the
    folder its recipe's teacher is built from: its config and its checkpoint files' headers, none of its weights,
    the same whether the teacher is loaded or a meta-device stand-in), the tokenizer's vocabulary, the training
    data (tokens, packing, order of rows), the task; with the recipe's layers, temperature and targets, k and the
    quantization and the layer targets' budget."""
    from fastted.train.cache import data_fingerprint
    from fastted.train.data import tokenizer_key
    from fastted.train.identity import teacher_identity

    name, _, vocab = tokenizer_key(data.tokenizer)
    teacher = teacher_identity(config, _step_models(config, type(recipe))[0])
    return {
        "teacher": teacher,
        "tokenizer": f"{name}:{vocab}",
        "data": data_fingerprint(data.train),
        "task": config.task,
        "k": config.distil.cache_k,
        "quantization": config.distil.cache_quantization,
        "layer_bytes": config.distil.cache_layer_bytes,
        **recipe.teacher_cache_expect(),
    }


def cache_teacher(config: Config, method: str) -> dict:
    """Run the teacher of ``method``'s recipe once over the training data (its rows, packing and order, each rank
    every world-th row) and store its top-k logits and the recipe's layer targets in cache-teacher-<method>/."""
    from fastted.train.cache import build_teacher_cache, finish_teacher_cache

    config = method_config(config, method)
    st = _start(config)
    k = config.distil.cache_k
    # the layer targets alone (k = 0): the teacher stops at its last mapped layer (the identity is the cut one's)
    recipe = _recipe(config, method, st, truncate=_cache_cuts_teacher(config))
    identity = _cache_identity(config, recipe, st.data)
    teacher = recipe.teacher_model
    batch_size = config.distil.train.micro_batch_size or max(config.distil.train.batch_size // st.world, 1)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.engine.precision)
    live = _run_partitioned(teacher.model, config, batch_size)  # noqa: F841 (its hooks gather the teacher)
    for module in recipe.frozen_modules():  # the teacher (and TED's teacher filters), as the engine places them
        place(module, st.device)
        if not any(is_partitioned(p) for p in module.parameters()):
            module.to(dtype=dtype if st.device.type == "cuda" else None)
        module.eval()
    directory = run_dir(config, f"cache-teacher-{method}")
    if st.rank == 0:
        shutil.rmtree(directory, ignore_errors=True)  # a rebuild leaves nothing of an older cache behind
        os.makedirs(directory)
    barrier()
    n = len(range(st.rank, len(st.data.train), st.world))
    bar = None
    if config.progress and st.rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc=f"cache-teacher-{method}", unit="ex")
    manifest = build_teacher_cache(
        teacher,
        st.data.train,
        st.data.collator,
        directory,
        layers=identity["layers"],
        k=k,
        temperature=identity["temperature"],
        quantization=config.distil.cache_quantization,
        transform=recipe.cache_transform(),
        identity=identity,
        batch_size=batch_size,
        shard_bytes=config.distil.cache_shard_mb << 20,
        layer_bytes=config.distil.cache_layer_bytes,
        seed=config.seed,
        rank=st.rank,
        world=st.world,
        device=st.device,
        progress=None if bar is None else bar.update,
    )
    if bar is not None:
        bar.close()
    barrier()
    if st.world > 1:
        if st.rank == 0:
            manifest = finish_teacher_cache(directory, st.world)
        barrier()
        with open(os.path.join(directory, "manifest.json"), encoding="utf-8") as f:
            manifest = json.load(f)
    stored = sum(record["bytes"] for record in manifest["shards"].values())
    tokens = manifest["tokens"]
    result = {
        "examples": manifest["examples"],
        "bytes": stored,
        "tokens": tokens,
        "bytes_per_token": manifest["bytes_per_token"]["total"],
        "bytes_per_token_by_part": manifest["bytes_per_token"],
        "k": k,
        "quantization": config.distil.cache_quantization,
        "layers": identity["layers"],
        "layer_bytes": manifest["layer_bytes"],
        "layer_fraction": manifest["layer_fraction"],
    }
    if st.rank == 0:
        write_atomic(os.path.join(directory, "result.json"), json.dumps(result, indent=1))
        if not config.progress:
            print(
                f"cache-teacher-{method}: {result['examples']} examples, {stored / 2**20:.1f} MiB, "
                f"{result['bytes_per_token']} B/token",
                flush=True,
            )
    return result


def _open_on_every_rank(open_cache):
    """``open_cache()`` on every rank, or the first refusal on all of them: each rank checks the teacher's
    identity from its own files, and a node whose copy differs must not leave the others waiting in a
    collective."""
    from fastted.train.engine import gather_over_ranks

    try:
        cache, reason = open_cache(), None
    except ValueError as error:
        cache, reason = None, str(error)
    reasons = gather_over_ranks(reason)
    refused = [(rank, r) for rank, r in enumerate(reasons) if r is not None]
    if refused:
        rank, reason = refused[0]
        raise ValueError(reason if len(reasons) == 1 else f"rank {rank}: {reason}")
    return cache


def distil(config: Config, method: str) -> dict:
    """Training II of ``method``: the student learns from the frozen teacher (or, with ``distil.teacher_cache``,
    from what cache-teacher stored of it)."""
    from fastted.train.cache import TeacherCache

    config = method_config(config, method)  # distil.per_method's values for this method
    st = _start(config)
    d = config.distil
    held = None
    if d.holdout:  # a dev split: the job ends on the weights of its best dev accuracy (the papers' scripts')
        kept, held = _holdout(st.data.train, d.holdout, config.seed)
        st = dataclasses.replace(st, data=dataclasses.replace(st.data, train=kept))
    # cut before the engine (ZeRO-3 never gathers the blocks cut off); with a cache, a meta-device stand-in alone
    recipe = _recipe(config, method, st, truncate=d.truncate_teacher and not d.teacher_cache, cached=d.teacher_cache)
    data = st.data
    if config.distil.teacher_cache:
        directory = run_dir(config, f"cache-teacher-{method}")
        cache = _open_on_every_rank(
            lambda: TeacherCache(
                directory,
                expect=_cache_identity(config, recipe, data),
                rebuild=f"run `fastted cache-teacher --method {method}` with this run's settings",
            )
        )
        recipe.use_teacher_cache(cache)  # before the engine: the stand-in is then never moved or partitioned
    if config.distil.teacher_cache or recipe.needs_example_ids:  # the cache's rows, a momentum bank's entries
        data = Data(with_index(data.train), data.test, data.collator, data.tokenizer, data.label_names)
    watch = None
    if held is not None:
        dev = dataclasses.replace(st.data, train=held, test=held)

        def score(engine):
            found = evaluate_model(
                recipe.student_model, dev, config.task, engine.micro_batch, engine.device, engine.rank, engine.world
            )
            return found["accuracy"]

        every = d.watch_every or max(len(st.data.train) // d.train.batch_size, 1)  # default: each epoch
        watch = Watch(score, every, d.patience, name="dev_accuracy", keep_best=True)
    name = f"distil-{method}"
    return _train(config, name, recipe, data, d.train, st.device, recipe.student_model, watch=watch)


def evaluate(config: Config) -> dict:
    """Every model the run has made, on the test split; writes results.json, report.md and report.png."""
    from fastted.methods import recipe_class
    from fastted.models import ModelAdapter
    from fastted.train.loading import build_model
    from fastted.train.report import write_report

    st = _start(config)
    candidates = [("teacher", "finetune-teacher"), ("student alone", "finetune-student")]
    candidates += [(recipe_class(method).label, f"distil-{method}") for method in config.distil.methods]
    if config.task != "classification":
        candidates = [("teacher (pretrained)", None), ("student (initial)", None)] + candidates[2:]
    micro = max(config.distil.train.batch_size // st.world, 1)
    zeros = _partitioning(config, st, None, micro)  # each model partitioned as it was in training
    legacy = _legacy(config, zeros)
    results = {}
    pretrained = None
    for label, name in candidates:
        teacher_like = label.startswith("teacher")
        zero = zeros[0] if teacher_like else zeros[1]
        if name is None:
            if teacher_like:
                model = build_teacher(config, zero=zero)
                pretrained = model if legacy else None  # the legacy student is cut from it
            else:
                model = _student(config, legacy, zero, teacher=pretrained)
        else:
            directory = os.path.join(run_dir(config, name), "model")
            if not os.path.isdir(directory):
                continue
            model = load_model(directory, config.task) if legacy else build_model(directory, config.task, zero=zero)
        live = _run_partitioned(model, config, micro)
        place(model, st.device)
        model.eval()
        with torch.no_grad():
            results[label] = {
                "job": name,
                **evaluate_model(
                    ModelAdapter(model, config.task),
                    st.data,
                    config.task,
                    micro,
                    st.device,
                    st.rank,
                    st.world,
                    per_example=True,
                ),
            }
        del model, live
    if st.rank == 0:
        write_report(config, results)
    return results


def tokenize(config: Config, out: Optional[str] = None) -> dict:
    """The corpus tokenized once into token shards: the run's train and test splits under its cache (what every
    job of an mlm or clm run maps; they do this first themselves), or with ``out`` the whole source, unsplit,
    into ``out`` (a corpus to name as ``data.source`` in other runs). Rank 0 tokenizes with ``data.num_proc``
    workers while the other ranks wait. Returns the folders and their token and document counts."""
    from fastted.train import shards
    from fastted.train.data import (
        is_tokenized,
        load_source,
        separator_id,
        tokenize_corpus,
        tokenizer_key,
        tokenizing_workers,
    )

    if not packs_blocks(config):
        raise ConfigError(
            f"task: fastted tokenize makes the token shards of packed pre-training (task mlm or clm "
            f"with data.pack true); this run is {run_kind(config)}, whose examples are tokenized (and "
            f"cached) by each job"
        )
    if is_tokenized(config.data.source):
        raise ConfigError(f"data.source: {config.data.source!r} is tokenized already; name it as data.source")
    device = resolve_device(config.engine)
    rank, _ = init_distributed(device)
    path, gguf = model_source(config.teacher, "teacher")
    tokenizer = load_tokenizer(path, gguf)
    d = config.data
    if out is None:
        directory = tokenize_corpus(config, tokenizer, rank)
        folders = {name: os.path.join(directory, name) for name in ("train", "test")}
    else:
        folders = {"corpus": os.path.abspath(os.path.expanduser(out))}
        shards.made_once(
            folders["corpus"],
            lambda: shards.write_corpus(
                load_source(d.source, name="data.source", sample_by=d.sample_by),
                tokenizer,
                folders["corpus"],
                text_field=d.text_field,
                separator_id=separator_id(tokenizer),
                num_proc=tokenizing_workers(config),
                identity={"source": str(d.source), "split": "all", "tokenizer": tokenizer_key(tokenizer)},
            ),
            rank=rank,
            rebuild=f"delete {folders['corpus']} and run again",
        )
    result = {}
    for name, folder in folders.items():
        corpus = shards.TokenCorpus(folder)
        result[name] = {"path": folder, "tokens": corpus.n_tokens, "documents": corpus.n_documents}
    if rank == 0:
        for name, r in result.items():
            print(f"tokenize: {name}: {r['tokens']} tokens, {r['documents']} documents in {r['path']}", flush=True)
    return result


def pipeline(config: Config) -> dict:
    """Every job of ``config.jobs`` in order (with ``seeds``: :func:`pipeline_seeds`)."""
    if config.seeds is not None:
        return pipeline_seeds(config)
    out = {}
    for name in config.jobs:
        if name.startswith("finetune-"):
            out[name] = finetune(config, name.split("-", 1)[1])
        elif name.startswith("filters-"):
            out[name] = learn_filters(config, name.split("-", 1)[1])
        elif name == "cache-teacher":
            for method in config.distil.methods:
                out[f"cache-teacher-{method}"] = cache_teacher(config, method)
        elif name == "distil":
            for method in config.distil.methods:
                out[f"distil-{method}"] = distil(config, method)
        else:
            out["evaluate"] = evaluate(config)
    return out


# --------------------------------------------------------------------------- several seeds

TEACHER_JOBS = ("finetune-teacher", "filters-teacher", "cache-teacher")


def seed_config(config: Config, seed: int) -> Config:
    """The run of one of ``config.seeds``: its own seed and folder (``output_dir/seed-<s>``), the one test split
    of the base ``seed`` (or ``data.split_seed``)."""
    import copy

    one = copy.deepcopy(config)
    one.seeds, one.seed = None, seed
    one.output_dir = os.path.join(config.output_dir, f"seed-{seed}")
    if one.data.split_seed is None:
        one.data.split_seed = config.seed
    return one


def pipeline_seeds(config: Config) -> dict:
    """``config.jobs`` once per seed of ``config.seeds``, each in its own folder, resumable as one seed is; the
    teacher's jobs once, with the first seed, shared by the others through links (unless ``seed_teacher``);
    then ``evaluate`` over all of them (:func:`evaluate_seeds`)."""
    out = {}
    first = seed_config(config, config.seeds[0]).output_dir
    for i, seed in enumerate(config.seeds):
        one = seed_config(config, seed)
        one.jobs = [j for j in config.jobs if j != "evaluate"]
        if i and not config.seed_teacher:
            os.makedirs(one.output_dir, exist_ok=True)
            for name in os.listdir(first):  # the teacher's folders of the first seed: linked, not trained again
                link = os.path.join(one.output_dir, name)
                if name.startswith(TEACHER_JOBS) and not os.path.lexists(link):
                    os.symlink(os.path.abspath(os.path.join(first, name)), link)
            one.jobs = [j for j in one.jobs if j not in TEACHER_JOBS]
        out[f"seed-{seed}"] = pipeline(one)
    if "evaluate" in config.jobs:
        out["evaluate"] = evaluate_seeds(config)
    return out


def evaluate_seeds(config: Config) -> dict:
    """Every seed's models on the one test split (each seed's folder gets its own results), then over the seeds:
    per model the mean, standard deviation and 95 % interval, and each method's paired difference against the
    student alone and against KD (a bootstrap over the test examples, the seeds averaged, and a paired t
    interval over the seeds; ``holds`` when both leave out 0 on one side): results.json,
    report.md and report.png of ``output_dir``."""
    from fastted.train.report import write_seeds_report

    per_seed = {seed: evaluate(seed_config(config, seed)) for seed in config.seeds}
    summary = seeds_summary(config, per_seed)
    if not (torch.distributed.is_initialized() and torch.distributed.get_rank() != 0):
        write_seeds_report(config, summary)
    return summary


def seeds_summary(config: Config, per_seed: dict) -> dict:
    """The statistics of ``per_seed`` (seed -> evaluate()'s results): see :func:`evaluate_seeds`."""
    from fastted.train.stats import mean_interval, paired_bootstrap

    key = "accuracy" if config.task == "classification" else "perplexity"
    labels = [label for label in next(iter(per_seed.values())) if all(label in r for r in per_seed.values())]
    models = {
        label: {
            **mean_interval([r[label][key] for r in per_seed.values()]),
            "per_seed": {str(s): r[label][key] for s, r in per_seed.items()},
        }
        for label in labels
    }
    differences = {}
    if config.task == "classification":
        per_seed_results = list(per_seed.values())
        correct = {label: [r[label]["correct"] for r in per_seed_results] for label in labels}
        bases = [b for b in ("student alone", "KD") if b in labels]
        methods = [label for label in labels if label not in ("teacher", "student alone")]
        for base in bases:
            for label in methods:
                if label != base:
                    d = paired_bootstrap(correct[label], correct[base], seed=config.seed)
                    # The same difference seed by seed, with a paired Student-t interval over the seeds: the
                    # bootstrap holds the seeds fixed, this holds the test split fixed; a difference holds when
                    # both intervals leave out 0 on the same side.
                    by_seed = [r[label][key] - r[base][key] for r in per_seed_results]
                    d["seeds"] = {**mean_interval(by_seed), "per_seed": by_seed}
                    d["holds"] = bool(
                        (d["low"] > 0 and d["seeds"]["low"] > 0) or (d["high"] < 0 and d["seeds"]["high"] < 0)
                    )
                    differences[f"{label} - {base}"] = d
    return {
        "metric": key,
        "seeds": list(config.seeds),
        "models": models,
        "differences": differences,
        "test_examples": next(iter(per_seed.values()))[labels[0]].get("examples"),
    }
