"""The trainer's read-ahead (:class:`fastted.train.trainer.Prefetcher`, ``train.prefetch_steps``): the steps' micro
batches
exactly as the loop makes them, in run order from any resumed start; the cache's reads in that order, by the
thread; a failure in the thread raised in the loop; the thread gone after every way out of the loop; and a cached
distillation run (checkpoints, evaluations and a resume included) that computes the same with and without it."""

import threading
import traceback
from types import SimpleNamespace

import pytest
import torch

from fastted import LWD, explicit_map
from fastted.methods.base import PREFETCHED
from fastted.train.cache import TeacherCache, build_teacher_cache
from fastted.train.config import ConfigError, EngineConfig, TrainConfig, load_config
from fastted.train.data import CLMCollator
from fastted.train.engine import Engine
from fastted.train.trainer import Prefetcher, Training, latest_checkpoint, lm_loss_sum, read_metrics, run
from tests.tiny_models import VOCAB, gpt2

STEPS = 5
THREAD = "fastted-prefetch"
# Rank 1 of 2, two micro batches of 3 a step: pieces 1 and 3 of each global batch of 12.
ENGINE = SimpleNamespace(micro_batch=3, accumulation=2, world=2, rank=1, device=torch.device("cpu"))


def _examples(n, seed=7):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 12, (n,), generator=g)
    return [
        {"input_ids": torch.randint(5, VOCAB, (int(lengths[i]),), generator=g).tolist(), "index": i} for i in range(n)
    ]


def _noisy(examples, generator=None):
    """CLM batches plus a draw from the step's generator (as the MLM masks draw theirs)."""
    batch = CLMCollator(0)(examples, generator)
    batch["noise"] = torch.rand(batch["input_ids"].shape, generator=generator)  # (B, T)
    return batch


class _Reader:
    """A recipe's prefetch hook that records the rows it reads and the thread reading them."""

    def __init__(self):
        self.reads = []

    def prefetch(self, batch, pin=False):
        self.reads.append((threading.current_thread().name, batch["index"].tolist()))
        return {**batch, PREFETCHED: {"rows": batch["index"] * 10}}


class _Recorded:
    """A teacher cache whose reads are recorded: the rows asked for and the thread that asked."""

    def __init__(self, cache):
        self.cache, self.reads = cache, []

    def __getattr__(self, name):
        return getattr(self.cache, name)

    def batch(self, index, mask, **kwargs):
        self.reads.append((threading.current_thread().name, index.tolist()))
        return self.cache.batch(index, mask, **kwargs)


def _stage(recipe=None, collator=_noisy, n=36):
    """Steps of 12 examples over ``n`` (36: the run's 5 steps cross into a second epoch)."""
    return Training(
        name="prefetch",
        directory="",
        recipe=recipe,
        dataset=_examples(n),
        collator=collator,
        train=TrainConfig(batch_size=12, max_steps=STEPS),
        progress=False,
        seed=3,
    )


def _steps(training, start, depth, engine=ENGINE):
    """What the loop gets: [(step, [(epoch, batch), ...]), ...]."""
    with Prefetcher(training, engine, start, STEPS, depth) as steps:
        return [(step, list(micro)) for step, micro in steps]


def _threads():
    return [t for t in threading.enumerate() if t.name == THREAD]


def _check_same(got, want, skip=()):
    assert [step for step, _ in got] == [step for step, _ in want]
    for (step, micro), (_, expected) in zip(got, want):
        assert len(micro) == len(expected) == ENGINE.accumulation
        for (epoch, batch), (epoch_want, batch_want) in zip(micro, expected):
            assert epoch == epoch_want
            assert batch.keys() - set(skip) == batch_want.keys()
            for key, value in batch_want.items():
                assert torch.equal(batch[key], value), f"step {step}: {key}"


@pytest.mark.parametrize("depth", [1, 2, 4])
@pytest.mark.parametrize("start", [0, 3])
def test_the_prefetched_steps_are_the_loops_own(start, depth):
    """From a fresh or a resumed start, the thread hands the loop what micro_batches makes in the loop (data
    order, epochs, padding, the generator's draws), step by step, and the recipe's hook reads their rows in run
    order."""
    reader = _Reader()
    inline = _steps(_stage(reader), start, 0)
    assert [step for step, _ in inline] == list(range(start, STEPS)) and not reader.reads
    ahead = _steps(_stage(reader), start, depth)
    _check_same(ahead, inline, skip=(PREFETCHED,))
    rows = [batch["index"].tolist() for _, micro in inline for _, batch in micro]
    assert reader.reads == [(THREAD, r) for r in rows]
    for _, micro in ahead:
        for _, batch in micro:
            assert torch.equal(batch[PREFETCHED]["rows"], batch["index"] * 10)
    if start:  # the resumed run's rows are the whole run's from its start
        whole = _steps(_stage(), 0, 0)
        _check_same(inline, whole[start:])


def test_a_recipe_without_a_hook_gets_the_batches_as_collated():
    plain = torch.nn.Linear(2, 2)  # any module: no prefetch method
    _check_same(_steps(_stage(plain), 1, 2), _steps(_stage(plain), 1, 0))


def test_an_error_in_the_thread_is_raised_in_the_loop_at_its_step():
    """The collator's own exception, type and message, at the step whose batches it stopped (the steps before it
    run), its traceback running into the thread's frames; the thread is gone afterwards."""

    def collate(examples, generator=None):
        if any(ex["index"] == bad for ex in examples):
            raise ValueError(f"example {bad} is damaged")
        return _noisy(examples, generator)

    bad = int(_steps(_stage(n=60), 0, 0)[3][1][1][1]["index"][0])  # in step 3's second micro batch (one epoch)
    seen = []
    with pytest.raises(ValueError, match=f"example {bad} is damaged") as info:
        with Prefetcher(_stage(collator=collate, n=60), ENGINE, 0, STEPS, 2) as steps:
            for step, _micro in steps:
                seen.append(step)
    assert seen == [0, 1, 2]
    frames = [frame.name for frame in traceback.extract_tb(info.value.__traceback__)]
    assert frames.index("__iter__") < frames.index("_work") < frames.index("collate")
    assert not _threads()


class _Stop(Exception):
    pass


@pytest.mark.parametrize("how", ["end", "error", "interrupt", "break"])
def test_the_thread_ends_with_the_loop(how):
    """A daemon thread while the loop runs; none after it, however it ends: its last step, an exception or a
    KeyboardInterrupt in the loop, or a loop left early while the thread waits on a full queue."""
    raised = {"error": _Stop, "interrupt": KeyboardInterrupt}.get(how)
    try:
        with Prefetcher(_stage(), ENGINE, 0, STEPS, 1) as steps:
            for step, _micro in steps:
                if step == 0:  # steps 2 on are not yet queued: the thread waits to queue them
                    assert [t.daemon for t in _threads()] == [True]
                if step == 1 and raised is not None:
                    raise raised()
                if step == 1 and how == "break":
                    break
    except (_Stop, KeyboardInterrupt):
        assert raised is not None
    assert not _threads()


def test_no_thread_without_prefetch_steps():
    with Prefetcher(_stage(), ENGINE, 0, STEPS, 0) as steps:
        for _ in steps:
            assert not _threads()


@pytest.mark.bad_input
def test_a_negative_prefetch_steps_is_refused_by_name():
    with pytest.raises(ConfigError, match="distil.train.prefetch_steps: got -1, needs a number >= 0"):
        load_config(overrides=("distil.train.prefetch_steps=-1",))
    assert load_config(overrides=("distil.train.prefetch_steps=0",)).distil.train.prefetch_steps == 0


# --------------------------------------------------------------------------- a cached distillation run


def _recipe():
    student, teacher = gpt2(2, 32, seed=1), gpt2(4, 48, seed=2)
    torch.manual_seed(3)
    return LWD(student, teacher, explicit_map([(0, 1), (1, 3)], 2, 4), mse_alpha=2.0, impl="reference")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A cache of the tiny teacher over the run's examples: top-16 logits and int8 targets of layers 1 and 3."""
    directory = tmp_path_factory.mktemp("cache")
    recipe = _recipe()
    expect = recipe.teacher_cache_expect()
    build_teacher_cache(
        recipe.teacher_model,
        _examples(24),
        CLMCollator(0),
        str(directory),
        layers=expect["layers"],
        k=16,
        temperature=expect["temperature"],
        quantization="int8",
        transform=recipe.cache_transform(),
        identity=expect,
        batch_size=5,
    )
    return str(directory)


class _Crash(Exception):
    pass


def _cached_run(cache_dir, directory, depth, crash_at=None):
    """STEPS steps of LWD from the cache (micro batches of 2, two a step) with prefetch_steps ``depth``, resuming
    from ``directory``'s checkpoint, saving and evaluating (with the collator the thread uses) every 2 steps;
    ``crash_at``: the collator fails after that many calls. Returns (summary, the cache's recorded reads)."""
    recipe = _recipe()
    cache = _Recorded(TeacherCache(cache_dir))
    recipe.use_teacher_cache(cache)
    train = TrainConfig(
        batch_size=4,
        micro_batch_size=2,
        max_steps=STEPS,
        lr=5e-3,
        warmup_ratio=0.2,
        save_every=2,
        eval_every=2,
        prefetch_steps=depth,
    )
    engine = Engine(recipe, train, EngineConfig(impl="reference"), STEPS, torch.device("cpu"))
    calls = {"n": 0}

    def collator(examples, generator=None):
        calls["n"] += 1
        if crash_at is not None and calls["n"] > crash_at:
            raise _Crash()
        return CLMCollator(0)(examples, generator)

    def evaluate(engine):  # between steps, while the thread reads ahead
        loss, tokens = lm_loss_sum(recipe.student_model, CLMCollator(0)(_examples(24)[:3]))
        return {"lm_loss": loss / tokens}

    text = f"distil:\n  train:\n    prefetch_steps: {depth}\n"  # another value resumes the same run
    training = Training(
        name="lwd",
        directory=str(directory),
        recipe=recipe,
        dataset=_examples(24),
        collator=collator,
        train=train,
        progress=False,
        config_text=text,
        evaluate=evaluate,
    )
    try:
        return run(training, engine), cache.reads
    finally:
        assert not _threads()


def _tensors(value) -> list:
    """The tensors in ``value`` (nested dicts, lists and tuples, a PackedTopK), in order."""
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    return [t for v in value for t in _tensors(v)] if isinstance(value, (list, tuple)) else []


def _check_same_outputs(got, want):
    for name in ("topk", "hidden_states", "target_scales", "target_mask"):
        a, b = _tensors(getattr(got, name)), _tensors(getattr(want, name))
        assert len(a) == len(b) and all(x.device == y.device and torch.equal(x, y) for x, y in zip(a, b)), name


def _losses(directory):
    """Each logged step's (step, loss, terms) and each evaluation's (step, result)."""
    records = read_metrics(str(directory))
    return (
        [(r["step"], r["loss"], r["terms"]) for r in records if "loss" in r],
        [(r["step"], r["eval"]) for r in records if "eval" in r],
    )


def test_a_cached_run_computes_the_same_with_and_without_prefetch(cache_dir, tmp_path):
    """The same losses and terms, exactly, with the cache read in the loop (by the main thread) and ahead of it
    (by the thread, in the same order); and a run that fails in the thread's reads resumes, with another
    prefetch_steps, from its checkpoint into the same losses, reading the same rows from its step on."""
    _, inline = _cached_run(cache_dir, tmp_path / "inline", 0)
    _, ahead = _cached_run(cache_dir, tmp_path / "ahead", 2)
    want = _losses(tmp_path / "inline")
    assert [step for step, _, _ in want[0]] == list(range(1, STEPS + 1))
    assert [step for step, _ in want[1]] == [2, 4, STEPS]
    assert _losses(tmp_path / "ahead") == want
    assert {name for name, _ in inline} == {"MainThread"} and {name for name, _ in ahead} == {THREAD}
    assert [rows for _, rows in ahead] == [rows for _, rows in inline]
    assert len(inline) == 2 * STEPS

    with pytest.raises(_Crash):  # in step 3's second micro batch: after the step-2 checkpoint
        _cached_run(cache_dir, tmp_path / "cut", 2, crash_at=5)
    assert latest_checkpoint(str(tmp_path / "cut")).endswith("step-0000002")
    summary, resumed = _cached_run(cache_dir, tmp_path / "cut", 1)
    assert summary["resumed_from"] == 2
    assert [rows for _, rows in resumed] == [rows for _, rows in inline[2 * 2 :]]
    assert _losses(tmp_path / "cut") == want


def test_prefetch_reads_what_the_forward_would(cache_dir):
    """Recipe.prefetch puts the cache's read under its key; the teacher's outputs from it are the forward's own
    read, tensor for tensor. Without a cache, or without batch["index"], the batch itself."""
    recipe = _recipe()
    batch = CLMCollator(0)([_examples(24)[i] for i in (3, 17, 8)])
    assert recipe.prefetch(batch) is batch  # no cache
    recipe.use_teacher_cache(TeacherCache(cache_dir))
    without_index = {k: v for k, v in batch.items() if k != "index"}
    assert recipe.prefetch(without_index) is without_index
    ahead = recipe.prefetch(batch)
    assert ahead.keys() == batch.keys() | {PREFETCHED} and PREFETCHED not in batch
    layers = recipe.layer_map.teacher
    got, want = recipe._teacher_forward(ahead, None, layers), recipe._teacher_forward(batch, None, layers)
    assert len(got.hidden_states) == 2 and len(_tensors(got.topk)) >= 3
    _check_same_outputs(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_a_cuda_runs_reads_are_pinned_and_reach_the_device(cache_dir):
    recipe = _recipe()
    recipe.use_teacher_cache(TeacherCache(cache_dir))
    batch = CLMCollator(0)([_examples(24)[i] for i in (3, 17, 8)])
    ahead = recipe.prefetch(batch, pin=True)
    assert all(t.is_pinned() for t in _tensors(ahead[PREFETCHED]))
    on_device = {k: v.cuda() if torch.is_tensor(v) else v for k, v in ahead.items()}  # as the engine moves it
    layers = recipe.layer_map.teacher
    got = recipe._teacher_forward(on_device, None, layers)
    want = recipe._teacher_forward({k: v.cuda() for k, v in batch.items()}, None, layers)
    assert got.hidden_states[0].device.type == "cuda"
    _check_same_outputs(got, want)
