"""The thin loop: one recipe, one dataset, optimizer steps, metrics, evaluation, checkpoints.

The data order is a pure function of (seed, epoch) and the MLM masks of
(seed, step, micro batch, rank) (:func:`fastted.data.data_order`,
:func:`fastted.data.batch_generator`), so the data position is the optimizer
step alone and a resumed run sees exactly the batches it would have seen. A
checkpoint is a folder ``checkpoints/step-NNNNNNN`` written under a temporary
name and renamed when every rank has finished writing; ``checkpoints/latest``
names the newest (replaced atomically). A kill during a save leaves the
previous checkpoint and ``latest`` as they were.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from fastted.config import TrainConfig
from fastted.data import Data, batch_generator, data_order
from fastted.engine import Engine, barrier, mean_over_ranks

CHECKPOINTS = "checkpoints"


@dataclass
class Stage:
    """One training run of a recipe."""

    name: str                      # e.g. "distil-ted": the progress bar's label and the metrics' "stage"
    directory: str                 # metrics.jsonl and checkpoints/ go here
    recipe: torch.nn.Module
    dataset: object                # a tokenized datasets.Dataset (or any sequence of example dicts)
    collator: Callable             # (examples, generator) -> batch of tensors
    train: TrainConfig
    evaluate: Optional[Callable[[Engine], dict]] = None  # -> {"metric name": value}, run on every rank
    config_text: str = ""          # the resolved config (YAML), saved in every checkpoint
    seed: int = 0
    progress: bool = True
    resume: bool = True


def steps_per_epoch(n: int, batch_size: int) -> int:
    return n // batch_size


def total_steps(n: int, config: TrainConfig) -> int:
    per_epoch = steps_per_epoch(n, config.batch_size)
    if config.max_steps is not None:
        return config.max_steps
    if per_epoch == 0:
        raise ValueError(f"batch_size {config.batch_size} is larger than the {n} training examples")
    return max(1, math.ceil(config.epochs * per_epoch))


def micro_batches(stage: Stage, step: int, engine: Engine):
    """This rank's micro batches of optimizer step ``step``: the step's global batch cut into
    accumulation x ranks pieces; micro batch a of rank r is piece a * ranks + r."""
    n, size = len(stage.dataset), stage.train.batch_size
    per_epoch = steps_per_epoch(n, size)
    epoch, position = divmod(step, per_epoch)
    indices = data_order(n, stage.seed, epoch)[position * size:(position + 1) * size]
    micro = engine.micro_batch
    for a in range(engine.accumulation):
        piece = a * engine.world + engine.rank
        chosen = indices[piece * micro:(piece + 1) * micro]
        examples = [stage.dataset[int(i)] for i in chosen]
        yield epoch, stage.collator(examples, batch_generator(stage.seed, step, a, engine.rank))


# --------------------------------------------------------------------------- checkpoints


def checkpoint_dir(directory: str) -> str:
    return os.path.join(directory, CHECKPOINTS)


def latest_checkpoint(directory: str) -> Optional[str]:
    """The newest complete checkpoint of a stage directory, or None."""
    root = checkpoint_dir(directory)
    pointer = os.path.join(root, "latest")
    if os.path.isfile(pointer):
        with open(pointer, encoding="utf-8") as f:
            path = os.path.join(root, f.read().strip())
        if os.path.isdir(path):
            return path
    return None


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(engine: Engine, stage: Stage, step: int) -> str:
    """Write ``checkpoints/step-{step}`` atomically and keep the last ``keep_last``. Every rank calls it."""
    root = checkpoint_dir(stage.directory)
    name = f"step-{step:07d}"
    final, tmp = os.path.join(root, name), os.path.join(root, name + ".tmp")
    if engine.is_main:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    engine.save(tmp)
    barrier()
    if engine.is_main:
        _write_atomic(os.path.join(tmp, "config.yaml"), stage.config_text)
        _write_atomic(os.path.join(tmp, "trainer.json"), json.dumps({"step": step, "stage": stage.name}))
        if os.path.isdir(final):  # the same step saved again (end of a resumed run): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _write_atomic(os.path.join(root, "latest"), name)
        kept = sorted(d for d in os.listdir(root) if d.startswith("step-") and not d.endswith(".tmp"))
        for old in kept[:-stage.train.keep_last]:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    barrier()
    return final


def load_checkpoint(engine: Engine, path: str) -> int:
    """Restore a checkpoint into the engine; returns the optimizer step to continue from."""
    with open(os.path.join(path, "trainer.json"), encoding="utf-8") as f:
        step = int(json.load(f)["step"])
    engine.load(path)
    return step


def _run_settings(config_text: str) -> dict:
    import yaml

    values = yaml.safe_load(config_text) or {}
    for key in ("progress", "resume"):  # how a run is shown or started, not what it computes
        values.pop(key, None)
    return values


def _check_same_run(stage: Stage, path: str) -> None:
    saved = os.path.join(path, "config.yaml")
    if not stage.config_text or not os.path.exists(saved):
        return
    with open(saved, encoding="utf-8") as f:
        before = _run_settings(f.read())
    now = _run_settings(stage.config_text)
    if before != now:
        changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        raise ValueError(f"{stage.directory} holds a checkpoint of a run with other settings (differing: "
                         f"{', '.join(changed)}): use another output_dir, or resume=false to start over")


# --------------------------------------------------------------------------- metrics


class Metrics:
    """Rank 0 appends one JSON object per line to ``metrics.jsonl``, and to TensorBoard when it is installed."""

    def __init__(self, directory: str, enabled: bool, start_step: int):
        self.path = os.path.join(directory, "metrics.jsonl")
        self.enabled, self.writer = enabled, None
        if not enabled:
            return
        os.makedirs(directory, exist_ok=True)
        if os.path.exists(self.path):  # a resumed run: drop what came after its checkpoint
            with open(self.path, encoding="utf-8") as f:
                lines = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= start_step]
            _write_atomic(self.path, "".join(lines))
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
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------- the loop


def _progress(enabled: bool, total: int, initial: int, name: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=name, unit="step", dynamic_ncols=True)


def run(stage: Stage, engine: Engine) -> dict:
    """Train ``stage.recipe`` under ``engine`` for its steps; returns the last metrics and evaluation."""
    total = engine.total_steps
    start = 0
    if stage.resume:
        path = latest_checkpoint(stage.directory)
        if path is not None:
            _check_same_run(stage, path)
            start = load_checkpoint(engine, path)
    metrics = Metrics(stage.directory, engine.is_main, start)
    bar = _progress(stage.progress and engine.is_main, total, start, stage.name)
    train, last, evaluation = stage.train, {}, {}
    engine.train(True)
    t0, tokens = time.perf_counter(), 0
    for step in range(start, total):
        sums: dict[str, torch.Tensor] = {}  # on the device: no host sync until the step is logged
        layer_sums = None
        for epoch, batch in micro_batches(stage, step, engine):
            out = engine.forward(batch, step=step, epoch=epoch)
            engine.backward(out.loss)
            lr = engine.lr
            engine.step()  # after every micro batch: DeepSpeed steps the optimizer at the accumulation boundary
            tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
            for name, value in {"loss": out.loss.detach(), **out.terms}.items():
                sums[name] = sums.get(name, 0.0) + value.double()
            if out.layer_losses is not None:
                layer = out.layer_losses.detach().double()
                layer_sums = layer if layer_sums is None else layer_sums + layer
        done = step + 1
        if done % max(train.log_every, 1) == 0 or done == total:
            names = list(sums)
            flat = torch.stack([sums[n] for n in names] + ([] if layer_sums is None else list(layer_sums)))
            flat = mean_over_ranks(flat / engine.accumulation).tolist()
            values = dict(zip(names, flat))
            elapsed = time.perf_counter() - t0
            record = {"step": done, "epoch": epoch, "stage": stage.name, "loss": values.pop("loss"), "lr": lr,
                      "tokens_per_s": tokens * engine.world / max(elapsed, 1e-9),
                      "layer_losses": flat[len(names):], "terms": values, "weights": dict(out.weights)}
            metrics.log(record)
            last = record
            if bar is not None:
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
        if bar is not None:
            bar.update(1)
        if stage.evaluate is not None and train.eval_every and done % train.eval_every == 0 and done != total:
            evaluation = _evaluate(stage, engine, done, metrics)
        if (train.save_every and done % train.save_every == 0) or done == total:
            save_checkpoint(engine, stage, done)
    if bar is not None:
        bar.close()
    if stage.evaluate is not None:
        evaluation = _evaluate(stage, engine, total, metrics)
    metrics.close()
    return {"train": last, "eval": evaluation, "steps": total, "resumed_from": start}


def _evaluate(stage: Stage, engine: Engine, step: int, metrics: Metrics) -> dict:
    engine.train(False)
    with torch.no_grad():
        result = stage.evaluate(engine)
    engine.train(True)
    metrics.log({"step": step, "stage": stage.name, "eval": result})
    return result


# --------------------------------------------------------------------------- evaluation of a trained model


def evaluate_model(adapter, data: Data, task: str, micro: int, device, rank: int = 0, world: int = 1) -> dict:
    """Accuracy (classification) or mean LM loss and perplexity over the test split, the examples shared out
    between the ``world`` ranks (this one is ``rank``) and the counts summed."""
    import torch.distributed as dist

    sums = torch.zeros(2, dtype=torch.float64)
    n = len(data.test)
    for start in range(rank * micro, n, micro * world):
        examples = [data.test[i] for i in range(start, min(start + micro, n))]
        batch = data.collator(examples, batch_generator(0, start))
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
