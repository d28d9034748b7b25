"""The thin loop: one recipe, one dataset, optimizer steps, metrics, evaluation, checkpoints.

The data order is a pure function of (seed, epoch) and the MLM masks of
(seed, step, piece of the global batch) (:func:`fastted.train.data.data_order`,
:func:`fastted.train.data.batch_generator`), so the data position is the optimizer
step alone and a resumed run sees exactly the batches it would have seen, on
any number of ranks. A background thread makes each step's batches (and
reads a teacher cache's outputs for them) a few steps ahead of the loop, in
the same order (``train.prefetch_steps``, :class:`Prefetcher`).

A checkpoint is a folder ``checkpoints/step-NNNNNNN`` written under a
temporary name, closed by a ``manifest.json`` of every file's size and
SHA-256 (each rank hashing its own files), and renamed when every rank has
finished writing; ``checkpoints/latest`` names the newest (replaced
atomically). A kill during a save leaves the previous checkpoint and
``latest`` as they were. On resume the manifest is verified, each rank
hashing its share: a damaged or incomplete newest checkpoint is passed over,
with a warning naming it and the one resumed from, for the newest intact one;
none intact is an error (nothing is deleted). A checkpoint saved on another
number of ranks resumes through its universal form
(:mod:`fastted.train.checkpoints`).

Non-finite values stop the run: the loss, each term and the gradient norm
are checked on the device every step, and read on the step's host sync
(a logged step, a checkpoint, an evaluation, the end), so a NaN costs no
extra sync; the run ends with :class:`NonFiniteError` naming the first bad
step, the terms and the last good checkpoint, before anything non-finite is
saved.
"""

from __future__ import annotations

import json
import math
import os
import queue
import shutil
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch

from fastted.files import write_atomic
from fastted.train.checkpoints import (
    CheckpointWarning,
    checkpoint_dir,
    checkpoint_step,
    latest_checkpoint,
    universal_checkpoint,
    verify_checkpoint,
    write_manifest,
)
from fastted.train.config import TrainConfig, job_settings
from fastted.train.data import Data, batch_generator, data_order
from fastted.train.engine import CheckpointError, Engine, NonFiniteError, barrier, mean_over_ranks, reduce_over_ranks
from fastted.train.throughput import Meter


@dataclass
class Training:
    """One training run of a recipe."""

    name: str  # e.g. "distil-ted": the progress bar's label and the metrics' "training"
    directory: str  # metrics.jsonl and checkpoints/ go here
    recipe: torch.nn.Module
    dataset: object  # a tokenized datasets.Dataset (or any sequence of example dicts)
    collator: Callable  # (examples, generator) -> batch of tensors
    train: TrainConfig
    evaluate: Optional[Callable[[Engine], dict]] = None  # -> {"metric name": value}, run on every rank
    config_text: str = ""  # the resolved config (YAML), saved in every checkpoint
    seed: int = 0
    progress: bool = True
    resume: bool = True
    watch: Optional[Watch] = None  # stop early when a held-out score stops improving


@dataclass
class Watch:
    """Training that ends when a held-out score stops improving: every ``every`` optimizer steps ``score(engine)``
    (run on every rank, the recipe in eval mode; higher is better) is taken and logged as ``name``; after
    ``patience`` takes in a row without a gain over the best, training ends at that step, in a checkpoint marked
    stopped, so a resumed run trains no further. The best score and the takes since it go into every checkpoint,
    so a run resumed before the end counts on where it was. With ``keep_best`` each best take is a checkpoint,
    kept whatever ``keep_last`` says, and the run ends restored to it."""

    score: Callable[[Engine], float]
    every: int
    patience: Optional[int]  # None: never stop early
    name: str = "holdout"
    keep_best: bool = False  # the run ends on the weights of its best take (its checkpoint kept for it), the
    # dev-set selection of the papers' scripts; the final take is at the last step


def steps_per_epoch(n: int, batch_size: int) -> int:
    return n // batch_size


def total_steps(n: int, config: TrainConfig, key: str = "train", tokens_per_step: Optional[int] = None) -> int:
    """Optimizer steps of a run over ``n`` examples (``key``: the config section, for the error message):
    ``max_steps``, else ``max_tokens`` over ``tokens_per_step`` (packed blocks: batch_size x block tokens),
    rounded up, else ``epochs``."""
    per_epoch = steps_per_epoch(n, config.batch_size)
    if per_epoch == 0:
        raise ValueError(f"{key}.batch_size: got {config.batch_size}, needs at most the {n} training examples")
    if config.max_steps is not None:
        return config.max_steps
    if config.max_tokens is not None:
        if not tokens_per_step:
            raise ValueError(
                f"{key}.max_tokens: needs packed blocks (task mlm or clm with data.pack), whose steps "
                f"hold a fixed number of tokens; set {key}.max_steps or epochs"
            )
        return max(1, math.ceil(config.max_tokens / tokens_per_step))
    return max(1, math.ceil(config.epochs * per_epoch))


def micro_batches(training: Training, step: int, engine: Engine):
    """This rank's micro batches of optimizer step ``step``: the step's global batch cut into
    accumulation x ranks pieces; micro batch a of rank r is piece a * ranks + r. A piece's random parts (the
    MLM masks) are keyed by (seed, step, piece), not by rank: with the same micro batch size, a run on any
    number of ranks draws the same masks."""
    n, size = len(training.dataset), training.train.batch_size
    per_epoch = steps_per_epoch(n, size)
    epoch, position = divmod(step, per_epoch)
    indices = data_order(n, training.seed, epoch)[position * size : (position + 1) * size]
    micro = engine.micro_batch
    for a in range(engine.accumulation):
        piece = a * engine.world + engine.rank
        chosen = indices[piece * micro : (piece + 1) * micro]
        examples = [training.dataset[int(i)] for i in chosen]
        yield epoch, training.collator(examples, batch_generator(training.seed, step, piece, 0))  # (.., a, 0) on 1 rank


class Prefetcher:
    """The steps ``start``..``total - 1`` in run order, each as ``(step, micro)``: ``micro`` holds exactly what
    :func:`micro_batches` yields for it, each batch passed through the recipe's
    :meth:`~fastted.methods.base.Recipe.prefetch` (a teacher cache's read of its rows, pinned on a CUDA run).

    With ``depth`` > 0, inside a ``with`` block, a daemon thread makes them ahead of the loop: at most ``depth``
    steps wait in its queue while it makes the next. The batches are pure functions of the step (the data order
    and the MLM masks' generators are keyed by it), so a resumed run reads the same rows, and evaluations and
    checkpoint saves between steps share nothing mutable with the thread (the collator and the cache are only
    read). An exception in the thread is raised in the loop, itself (its traceback running into the thread), at
    the step whose batches it stopped. Leaving the block (the end, an exception, a KeyboardInterrupt) stops the
    thread and waits for it. ``depth`` 0, or outside a block: each step's batches made lazily in the loop, as
    :func:`micro_batches` makes them."""

    def __init__(self, training: Training, engine: Engine, start: int, total: int, depth: int):
        self.training, self.engine, self.steps, self.depth = training, engine, range(start, total), depth
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))  # a step's micro batches, or the exception
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> Prefetcher:
        if self.depth and len(self.steps):
            self._thread = threading.Thread(target=self._work, name="fastted-prefetch", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the thread and wait for it (it finishes the micro batch it is making)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __iter__(self):
        for step in self.steps:
            if self._thread is None:
                yield step, micro_batches(self.training, step, self.engine)
                continue
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            yield step, item

    def _work(self) -> None:
        device = self.engine.device
        pin = device.type == "cuda"  # the copies to the device then leave the host free
        if pin:
            torch.cuda.set_device(device)  # pinned memory and CUDA state of this rank's device, not device 0
        torch.set_num_threads(1)  # this thread's own (OpenMP's is per thread): the step keeps the cores
        prefetch = getattr(self.training.recipe, "prefetch", None)  # a recipe that is not a fastted Recipe has none
        try:
            for step in self.steps:
                micro = []
                for epoch, batch in micro_batches(self.training, step, self.engine):
                    if self._stop.is_set():
                        return
                    micro.append((epoch, batch if prefetch is None else prefetch(batch, pin=pin)))
                if not self._put(micro):
                    return
        except BaseException as error:  # raised in the loop, in the place of the step it stopped
            self._put(error)

    def _put(self, item) -> bool:
        """Queue ``item``, waiting while the queue is full; False when the loop stopped the thread first."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(
    engine: Engine, training: Training, step: int, tokens: Optional[int] = None, watched: Optional[dict] = None
) -> str:
    """Write ``checkpoints/step-{step}`` atomically, closed by its manifest (each rank hashing its own files), and
    keep the last ``keep_last``; ``tokens``, the run's tokens so far over all ranks, goes into its trainer.json
    (what a resumed run counts on from), and so does ``watched``, a :class:`Watch`'s state. Every rank calls it."""
    root = checkpoint_dir(training.directory)
    name = f"step-{step:07d}"
    final, tmp = os.path.join(root, name), os.path.join(root, name + ".tmp")
    if engine.is_main:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    engine.save(tmp)
    if engine.is_main:
        write_atomic(os.path.join(tmp, "config.yaml"), training.config_text)
        state = {"step": step, "training": training.name, "world": engine.world}
        state.update(
            {} if tokens is None else {"tokens": int(tokens)}, **({} if watched is None else {"watch": watched})
        )
        write_atomic(os.path.join(tmp, "trainer.json"), json.dumps(state))
    barrier()
    write_manifest(tmp, engine.rank, engine.world)
    if engine.is_main:
        if os.path.isdir(final):  # the same step saved again (end of a resumed run): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        write_atomic(os.path.join(root, "latest"), name)
        kept = sorted((d for d in os.listdir(root) if checkpoint_step(d) is not None), key=checkpoint_step)
        best = (watched or {}).get("best_checkpoint")  # a watch's best take, kept for the end
        for old in [d for d in kept[: -training.train.keep_last] if d != best]:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    barrier()
    return final


def load_checkpoint(engine: Engine, path: str) -> int:
    """Restore a (verified) checkpoint into the engine, through its universal form when it was saved on another
    number of ranks (:func:`fastted.train.checkpoints.universal_checkpoint`); returns the optimizer step to continue
    from. Every rank calls it."""
    with open(os.path.join(path, "trainer.json"), encoding="utf-8") as f:
        step = int(json.load(f)["step"])
    universal = universal_checkpoint(path, engine.rank, engine.world) if engine.needs_universal(path) else None
    engine.load(path, universal)
    return step


def _saved_watch(path: Optional[str]) -> dict:
    """A :class:`Watch`'s state at the checkpoint ``path`` resumed from: the best score, the takes since it, and
    whether training stopped there (a new run, or a checkpoint of a run without a watch: a fresh state)."""
    fresh = {"best": None, "since": 0, "stopped": False, "best_checkpoint": None}
    if path is None:
        return fresh
    with open(os.path.join(path, "trainer.json"), encoding="utf-8") as f:
        return {**fresh, **json.load(f).get("watch", {})}


def _saved_tokens(path: Optional[str], metrics: Metrics) -> int:
    """The run's tokens at the checkpoint ``path`` resumed from (None: a new run, 0): its trainer.json's, else (a
    checkpoint written before they were saved) the last kept metrics record's, else 0."""
    if path is None:
        return 0
    with open(os.path.join(path, "trainer.json"), encoding="utf-8") as f:
        saved = json.load(f)
    return int(saved["tokens"]) if "tokens" in saved else metrics.tokens


def _run_settings(config_text: str) -> dict:
    import yaml

    values = yaml.safe_load(config_text) or {}
    # How a run is shown or started, not what it computes; and the name of the paper's values that `published`
    # set, which the saved config holds themselves (a job another entry never touched resumes without it).
    for key in ("progress", "resume", "published"):
        values.pop(key, None)
    values = job_settings(values)  # its own method's settings alone, an older checkpoint's old keys moved
    # How the global batch is cut (set anew for another world size) and how far its reads run ahead.
    return _without(values, ("micro_batch_size", "prefetch_steps"))


def _without(values, keys: tuple):
    if isinstance(values, dict):
        return {k: _without(v, keys) for k, v in values.items() if k not in keys}
    return values


def _check_same_run(training: Training, path: str) -> None:
    saved = os.path.join(path, "config.yaml")
    if not training.config_text or not os.path.exists(saved):
        return
    with open(saved, encoding="utf-8") as f:
        before = _run_settings(f.read())
    now = _run_settings(training.config_text)
    if before != now:
        changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        raise ValueError(
            f"{training.directory} holds a checkpoint of a run with other settings (differing: "
            f"{', '.join(changed)}): use another output_dir, or resume=false to start over"
        )


# --------------------------------------------------------------------------- metrics


def _read_records(path: str) -> list[dict]:
    """The JSON lines of a metrics file. A torn last line (a kill during its write) is dropped with a
    :class:`CheckpointWarning`; a bad line before it is an error naming the file and line."""
    with open(path, encoding="utf-8") as f:
        lines = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
    records = []
    for k, (i, line) in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError:
            if k < len(lines) - 1:
                raise CheckpointError(
                    f"{path}, line {i}: not a JSON record (the file was edited or damaged): repair or delete that line"
                ) from None
            warnings.warn(
                f"{path}, line {i}: a torn last line (a write cut short) is dropped", CheckpointWarning, stacklevel=3
            )
    return records


class Metrics:
    """Rank 0 appends one JSON object per line to ``metrics.jsonl``, and to TensorBoard when it is installed.

    A resumed run starts from the records up to its checkpoint's step (``start_step``); a run resumed at its
    last step (``final``) evaluates again, so its old final evaluation is dropped too: no line is doubled.
    :attr:`tokens`: the last kept record's tokens (0 without one)."""

    def __init__(self, directory: str, enabled: bool, start_step: int, final: bool = False):
        self.path = os.path.join(directory, "metrics.jsonl")
        self.enabled, self.writer, self.tokens = enabled, None, 0
        if not enabled:
            return
        os.makedirs(directory, exist_ok=True)
        if os.path.exists(self.path):  # a resumed run: drop what came after its checkpoint
            kept = [
                r
                for r in _read_records(self.path)
                if r.get("step", 0) < start_step or (r.get("step", 0) == start_step and not (final and "eval" in r))
            ]
            write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
            self.tokens = next((int(r["tokens"]) for r in reversed(kept) if "tokens" in r), 0)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(directory, "tensorboard"))
        except ImportError:  # TensorBoard is optional
            self.writer = None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in _scalars(record):
                self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _scalars(record: dict, prefix: str = ""):
    for key, value in record.items():
        if key == "step":
            continue
        if isinstance(value, dict):
            yield from _scalars(value, f"{prefix}{key}/")
        elif isinstance(value, list):
            for i, v in enumerate(value):
                yield f"{prefix}{key}/{i}", v
        elif isinstance(value, (int, float)):
            yield prefix + key, value


def read_metrics(directory: str) -> list[dict]:
    path = os.path.join(directory, "metrics.jsonl")
    return _read_records(path) if os.path.exists(path) else []


# --------------------------------------------------------------------------- the loop


def _progress(enabled: bool, total: int, initial: int, name: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=name, unit="step", dynamic_ncols=True)


class _FiniteWatch:
    """The first optimizer step at which the loss, a term or the gradient norm is not finite, tracked on the
    device (no host sync) and read by :meth:`check` on a step that syncs anyway."""

    def __init__(self, device: torch.device):
        self.first = torch.full((), -1, dtype=torch.long, device=device)  # -1: none yet
        self.flags: dict[str, torch.Tensor] = {}  # per value: not finite at that first step

    def update(self, step: int, values: dict) -> None:
        finite = {
            name: torch.isfinite(torch.as_tensor(v, device=self.first.device)).all() for name, v in values.items()
        }
        new = (self.first < 0) & ~torch.stack(list(finite.values())).all()
        self.first = torch.where(new, torch.full_like(self.first, step), self.first)
        for name, ok in finite.items():
            self.flags[name] = torch.where(new, ~ok, self.flags.get(name, torch.zeros_like(ok)))

    def check(self, training: Training, engine: Engine, last_good: Optional[str]) -> None:
        """Raise :class:`NonFiniteError` (on every rank alike) if a step so far was not finite."""
        first = torch.where(self.first < 0, torch.full_like(self.first, 2**62), self.first)
        first = int(reduce_over_ranks(first, "min"))
        if first == 2**62:
            return
        flags = reduce_over_ranks(torch.stack(list(self.flags.values())).long(), "max").tolist()
        bad = [name for name, flag in zip(self.flags, flags) if flag] or ["loss"]
        raise NonFiniteError(
            f"{training.name}: non-finite {', '.join(bad)} at step {first + 1} of {engine.total_steps}; stopped before "
            f"saving it. Last good checkpoint: {last_good or 'none'} (lower the learning rate, or check the data "
            f"of that step; a rerun resumes from the checkpoint)"
        )


def run(training: Training, engine: Engine) -> dict:
    """Train ``training.recipe`` under ``engine`` for its steps; returns the last metrics and evaluation.

    Each logged record holds the loss, its terms and the throughput of its logging window
    (:class:`fastted.train.throughput.Meter`: tokens, tokens/s, step time, peak memory, FLOPs, MFU, the teacher's
    share),
    evaluations and checkpoint saves left out of the window's time.

    Raises :class:`NonFiniteError` when a loss, term or gradient norm is not finite (checked on the steps that
    sync: logged, evaluated, saved, the last), after which nothing more is saved."""
    total = engine.total_steps
    start, last_good = 0, None
    if training.resume:
        path = latest_checkpoint(training.directory, engine.rank, engine.world)
        if path is not None:
            _check_same_run(training, path)
            start, last_good = load_checkpoint(engine, path), path
    watched = _saved_watch(last_good)
    end = start if watched["stopped"] else total  # a run its watch stopped trains no further
    metrics = Metrics(training.directory, engine.is_main, start, final=start == end)
    config = getattr(engine, "engine_config", None)  # engine.peak_tflops: the device's peak, for MFU
    meter = Meter(
        training.recipe,
        engine.device,
        engine.world,
        engine.precision,
        getattr(config, "peak_tflops", None),
        tokens=_saved_tokens(last_good, metrics),
    )
    try:
        last, evaluation, done = _train(training, engine, start, end, last_good, metrics, meter, watched)
    finally:
        meter.close()  # the teacher's timing hooks
    metrics.close()
    result = {"train": last, "eval": evaluation, "steps": total, "resumed_from": start}
    if training.watch is not None:
        result["watch"] = {"best": watched["best"], "stopped_at": done if watched["stopped"] else None}
        if training.watch.keep_best:
            result["watch"]["best_step"] = checkpoint_step(watched["best_checkpoint"] or "")
    return result


def _train(
    training: Training,
    engine: Engine,
    start: int,
    end: int,
    last_good: Optional[str],
    metrics: Metrics,
    meter: Meter,
    watched: dict,
) -> tuple[dict, dict, int]:
    """The steps from ``start`` up to ``end`` (or where the watch stops them; ``watched``, its state, is updated)
    and the final evaluation: (the last logged record, the last evaluation, the steps done). The steps' batches
    are read ahead by a :class:`Prefetcher` (``train.prefetch_steps``), which ends with the loop."""
    total = engine.total_steps  # the schedule's length, which a watch may cut short
    done = start
    bar = _progress(training.progress and engine.is_main, total, start, training.name)
    train, last, evaluation = training.train, {}, {}
    watch = _FiniteWatch(engine.device)
    engine.train(True)
    with Prefetcher(training, engine, start, end, train.prefetch_steps) as steps:
        for step, micro in steps:
            sums: dict[str, torch.Tensor] = {}  # on the device: no host sync until the step is logged
            layer_sums, grad_norm = None, None
            for epoch, batch in micro:
                meter.batch(batch)  # as the collator returned it, on the host: no sync
                out = engine.forward(batch, step=step, epoch=epoch)
                engine.backward(out.loss)
                lr = engine.lr
                norm = engine.step()  # after every micro batch: DeepSpeed steps the optimizer at the boundary
                grad_norm = norm if norm is not None else grad_norm
                for name, value in {"loss": out.loss.detach(), **out.terms}.items():
                    sums[name] = sums.get(name, 0.0) + value.double()
                if out.layer_losses is not None:
                    layer = out.layer_losses.detach().double()
                    layer_sums = layer if layer_sums is None else layer_sums + layer
            meter.step()
            watch.update(step, sums if grad_norm is None else {**sums, "gradient norm": grad_norm})
            done = step + 1
            logged = done % max(train.log_every, 1) == 0 or done == total
            evaluated = training.evaluate is not None and train.eval_every and done % train.eval_every == 0
            saved = (train.save_every and done % train.save_every == 0) or done == total
            if logged:
                names = list(sums)
                flat = torch.stack([sums[n] for n in names] + ([] if layer_sums is None else list(layer_sums)))
                flat = mean_over_ranks(flat / engine.accumulation).tolist()  # the step's sync
                values = dict(zip(names, flat))
                record = {
                    "step": done,
                    "epoch": epoch,
                    "training": training.name,
                    "loss": values.pop("loss"),
                    "lr": lr,
                    **meter.fields(),
                    "layer_losses": flat[len(names) :],
                    "terms": values,
                    "weights": dict(out.weights),
                }
                metrics.log(record)
                last = record
                if bar is not None:
                    shown = {"mfu": f"{record['mfu']:.1%}"} if "mfu" in record else {}
                    bar.set_postfix(
                        loss=f"{record['loss']:.4f}",
                        tok_s=f"{record['tokens_per_s']:.0f}",
                        mem=f"{record['peak_memory'] / 2**30:.1f}G",
                        **shown,
                        refresh=False,
                    )
                elif engine.is_main:  # progress=false: one line per logged step, for logs and batch jobs
                    terms = " ".join(f"{k} {v:.4f}" for k, v in values.items())
                    print(
                        f"{training.name} step {done}/{total}: loss {record['loss']:.4f} {terms} lr {lr:.3g} "
                        f"{_throughput_text(record)}",
                        flush=True,
                    )
            if bar is not None:
                bar.update(1)
            if logged or evaluated or saved:
                watch.check(training, engine, last_good)  # a sync: what the device queued is done before the timing
            if evaluated and done != total:
                with meter.excluded():
                    evaluation = _evaluate(training, engine, done, metrics)
            watched_now = training.watch is not None and (
                done % training.watch.every == 0 or (training.watch.keep_best and done == total)
            )
            if watched_now and (done != total or training.watch.keep_best):
                with meter.excluded():
                    gained = _take(training, engine, done, metrics, watched)
                kept_best = training.watch.keep_best and gained
                if kept_best:
                    watched["best_checkpoint"] = f"step-{done:07d}"
                saved = saved or watched["stopped"] or kept_best
            if saved:
                with meter.excluded():
                    engine.check_finite_parameters(f"{training.name}: after step {done} of {total}", last_good)
                    watch_state = None if training.watch is None else watched
                    last_good = save_checkpoint(engine, training, done, meter.total_tokens(), watch_state)
            if watched["stopped"]:
                break
    if bar is not None:
        bar.close()
    best = watched["best_checkpoint"]
    if training.watch is not None and training.watch.keep_best and best and best != f"step-{done:07d}":
        path = os.path.join(checkpoint_dir(training.directory), best)
        damaged = verify_checkpoint(path, engine.rank, engine.world)
        if damaged is not None:
            raise CheckpointError(
                f"{training.name}: the best {training.watch.name} checkpoint {path} is damaged ({damaged}): "
                f"set resume=false to train again"
            )
        with meter.excluded():  # the run ends on its best take's weights
            load_checkpoint(engine, path)
        if engine.is_main:
            print(f"{training.name}: restored {best}, the best {training.watch.name} ({watched['best']:.4f})")
    if training.evaluate is not None:
        evaluation = _evaluate(training, engine, done, metrics)
    return last, evaluation, done


def _take(training: Training, engine: Engine, step: int, metrics: Metrics, watched: dict) -> bool:
    """One take of the watch's score (logged); ``watched`` counts the takes since the best and is marked stopped
    after ``patience`` of them. Whether the take is a new best."""
    watch = training.watch
    engine.train(False)
    with torch.no_grad():
        score = float(watch.score(engine))
    engine.train(True)
    if not math.isfinite(score):
        raise NonFiniteError(f"{training.name}: the watch's {watch.name} score is {score} at step {step}")
    gained = watched["best"] is None or score > watched["best"]
    if gained:
        watched["best"], watched["since"] = score, 0
    else:
        watched["since"] += 1
    watched["stopped"] = watch.patience is not None and watched["since"] >= watch.patience
    metrics.log({"step": step, "training": training.name, watch.name: score, "best": watched["best"]})
    if engine.is_main and watched["stopped"]:
        print(
            f"{training.name}: {watch.name} {score:.4f}, no gain over {watched['best']:.4f} in {watch.patience} "
            f"takes: stopped at step {step} of {engine.total_steps}",
            flush=True,
        )
    return gained


def _throughput_text(record: dict) -> str:
    """The throughput of a logged record, as the progress=false line shows it."""
    text = (
        f"{record['tokens_per_s']:.0f} tok/s {record['step_time']:.3f} s/step tokens {record['tokens']} "
        f"mem {record['peak_memory'] / 2**30:.2f} GiB ({record['peak_memory_kind']})"
    )
    if "flops_per_s" in record:
        text += f" {record['flops_per_s'] / 1e12:.3g} TFLOP/s"
    if "mfu" in record:
        text += f" mfu {record['mfu']:.1%}"
    if "teacher_share" in record:
        text += f" teacher {record['teacher_share']:.0%}"
    return text


def _evaluate(training: Training, engine: Engine, step: int, metrics: Metrics) -> dict:
    engine.train(False)
    with torch.no_grad():
        result = training.evaluate(engine)
    engine.train(True)
    metrics.log({"step": step, "training": training.name, "eval": result})
    return result


# --------------------------------------------------------------------------- evaluation of a trained model


EVAL_ROWS = 1024  # token rows whose logits exist at once in a language model's evaluation


def lm_loss_sum(adapter, batch: dict) -> tuple[float, int]:
    """(summed cross-entropy, tokens) of a language model's batch over its labels that are not -100 (shifted by
    one for clm, as HF shifts them). The logits are made :data:`EVAL_ROWS` token rows at a time from the LM
    head's input and weights, so an evaluation at a vocabulary of 128k never holds a (B, T, V) tensor (a model
    whose head cannot be cut there gives its logits whole)."""
    from fastted.models import gathered

    labels = batch["labels"]
    try:
        weight, bias = adapter.lm_head_parts()
        states = adapter(batch, head=False).head_input  # (B, T, H)
    except ValueError:
        weight, bias, states = None, None, adapter(batch).logits  # (B, T, V)
    if adapter.task == "clm":
        states, labels = states[:, :-1], labels[:, 1:]
    keep = labels.reshape(-1) != -100
    rows, targets = states.reshape(-1, states.shape[-1])[keep], labels.reshape(-1)[keep]  # (N, H or V), (N,)
    total = torch.zeros((), dtype=torch.float64, device=rows.device)
    with gathered((weight, bias)):
        for lo in range(0, rows.shape[0], EVAL_ROWS):
            chunk = rows[lo : lo + EVAL_ROWS]
            logits = chunk if weight is None else torch.nn.functional.linear(chunk, weight, bias)
            total += torch.nn.functional.cross_entropy(logits.float(), targets[lo : lo + EVAL_ROWS], reduction="sum")
    return float(total.detach()), int(targets.numel())


def test_batches(data: Data, micro: int, device, rank: int = 0, world: int = 1):
    """This rank's share of the test split, as (real, chosen example indices, batch on ``device``): micro batches
    of ``micro`` examples dealt out to the ``world`` ranks in turn. Every rank gets as many batches as rank 0 (the
    most any rank has): a rank whose share has run out gets stand-ins (real False, the first test examples), whose
    forwards keep the ranks' ZeRO-3 gathers in step and whose results are discarded."""
    n = len(data.test)
    for turn in range(len(range(0, n, micro * world))):
        start = (turn * world + rank) * micro
        real = start < n
        chosen = range(start, min(start + micro, n)) if real else range(min(micro, n))
        batch = data.collator([data.test[i] for i in chosen], batch_generator(0, chosen.start))
        yield real, chosen, {k: v.to(device) for k, v in batch.items()}


def _summed(sums: torch.Tensor, device, world: int) -> torch.Tensor:
    """``sums`` added over the ranks (itself on one rank), on the CPU."""
    import torch.distributed as dist

    if dist.is_initialized() and world > 1:
        sums = sums.to(device)
        dist.all_reduce(sums)
    return sums.cpu()


def evaluate_probes(recipe, data: Data, micro: int, device, rank: int = 0, world: int = 1) -> dict:
    """TED's stage I, classification: each filter's accuracy as a probe (its head on its filtered layer) on the
    test split, with the layer it reads: ``{"probe_layers": [...], "probe_accuracy": [...], "examples": n}``."""
    counts = torch.zeros(len(recipe.filters) + 1, dtype=torch.float64)
    for real, chosen, batch in test_batches(data, micro, device, rank, world):
        right = recipe.probe_correct(batch)
        if real:
            counts[:-1] += right.cpu().double()
            counts[-1] += len(chosen)
    counts = _summed(counts, device, world)
    examples = max(float(counts[-1]), 1.0)
    return {
        "probe_layers": list(recipe.filters.layers),
        "probe_accuracy": [float(c) / examples for c in counts[:-1]],
        "examples": int(counts[-1]),
    }


def evaluate_model(
    adapter, data: Data, task: str, micro: int, device, rank: int = 0, world: int = 1, per_example: bool = False
) -> dict:
    """Accuracy (classification) or mean LM loss and perplexity over the test split, the examples shared out
    between the ``world`` ranks (this one is ``rank``) and the counts summed. ``per_example``: a classifier's
    result also holds ``correct``, 1 or 0 for each test example in order (what paired comparisons of models
    resample, :func:`fastted.train.stats.paired_bootstrap`).

    Every rank runs the same number of forwards, so a model partitioned under ZeRO-3 (whose every forward
    gathers its parameters from all ranks) never leaves one rank waiting: the micro batches of ``micro``
    examples are dealt out in turn, and a rank whose share has run out runs a stand-in batch (the first test
    examples) whose result it discards."""
    import torch.distributed as dist

    sums = torch.zeros(2, dtype=torch.float64)
    n = len(data.test)
    correct = {}
    for real, chosen, batch in test_batches(data, micro, device, rank, world):
        out = adapter(batch) if task == "classification" else lm_loss_sum(adapter, batch)
        if not real:  # a stand-in: only its forward counts, for the other ranks' gathers
            continue
        if task == "classification":
            right = (out.logits.argmax(-1) == batch["labels"]).cpu()
            sums[0] += float(right.sum())
            sums[1] += len(chosen)
            if per_example:
                correct.update(zip(chosen, right.int().tolist()))
        else:
            sums += torch.tensor(out, dtype=torch.float64)
    sums = _summed(sums, device, world)
    if dist.is_initialized() and world > 1:
        if per_example and task == "classification":
            parts = [None] * world
            dist.all_gather_object(parts, correct)
            correct = {i: v for part in parts for i, v in part.items()}
    if task == "classification":
        result = {"accuracy": float(sums[0] / max(sums[1], 1)), "examples": int(sums[1])}
        if per_example:
            result["correct"] = [correct[i] for i in range(n)]
        return result
    loss = float(sums[0] / max(sums[1], 1))
    return {"lm_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(sums[1])}
