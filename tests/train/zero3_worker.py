"""Per-rank loops under ZeRO-3 on gloo ranks, for tests/train/test_zero3_ranks.py (run under ``torchrun``).

- ``eval``: a classifier and a causal LM, each the student of an :class:`~fastted.train.engine.Engine` at ZeRO-3
  (partitioned), evaluated by :func:`fastted.train.trainer.evaluate_model` on a test split that the ranks' micro
  batches do not divide evenly.
- ``cache``: a teacher cache built by every rank over an odd number of rows, the teacher partitioned as the
  engine partitions it (``deepspeed.initialize`` with :func:`fastted.train.engine.teacher_deepspeed_config`).
- ``window``: a teacher partitioned with and without its gather window (:func:`fastted.train.engine.gather_window`),
  three forwards each: the most parameters gathered at once, counted whole.
- ``levers``: LWD with the fused LM head under ZeRO-3 (student and teacher partitioned), two steps each: as it
  is, with the teacher's parameters offloaded to the CPU (``engine.teacher_offload=cpu``), and with the
  student's activation checkpointing.

Rank 0 writes what it measured to ``--out`` (JSON). The process group times out after 60 s, so a rank left
waiting for a gather fails the launch instead of hanging it.
"""

import argparse
import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from fastted import LWD  # noqa: E402
from fastted.methods import FineTune  # noqa: E402
from fastted.models import ModelAdapter, is_partitioned  # noqa: E402
from fastted.train.cache import TeacherCache, build_teacher_cache, finish_teacher_cache  # noqa: E402
from fastted.train.config import EngineConfig, TrainConfig  # noqa: E402
from fastted.train.data import ClassificationCollator, CLMCollator, Data  # noqa: E402
from fastted.train.engine import Engine, block_parameters, mean_over_ranks, teacher_deepspeed_config  # noqa: E402
from fastted.train.trainer import evaluate_model  # noqa: E402
from tests.launch import finish  # noqa: E402
from tests.tiny_models import bert, gpt2  # noqa: E402

MICRO = 2  # test examples per forward and rank


def examples(n, seed, labels=True):
    """``n`` rows of 4 to 12 random tokens (and a random label of 3)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(4, 13, (), generator=g))
        row = {"input_ids": torch.randint(3, 97, (length,), generator=g).tolist()}
        if labels:
            row["label"] = int(torch.randint(0, 3, (), generator=g))
        rows.append(row)
    return rows


def evaluation_data(task, n):
    collator = ClassificationCollator(0) if task == "classification" else CLMCollator(0)
    return Data(
        train=None,
        test=examples(n, seed=5, labels=task == "classification"),
        collator=collator,
        tokenizer=None,
        label_names=None,
    )


def evaluation_model(task):
    return bert(2, 32, seed=4) if task == "classification" else gpt2(2, 32, seed=4)


def evaluate(world, n):
    """Each model trained by nothing, partitioned by an Engine at ZeRO-3, evaluated on ``n`` test rows."""
    out = {}
    for task in ("classification", "clm"):
        recipe = FineTune(evaluation_model(task), task=task, impl="reference")
        train = TrainConfig(batch_size=MICRO * world, max_steps=1)
        engine = Engine(recipe, train, EngineConfig(zero_stage=3, impl="reference"), 1, torch.device("cpu"))
        assert all(is_partitioned(p) for p in recipe.parameters())
        engine.train(False)
        with torch.no_grad():
            out[task] = evaluate_model(
                recipe.student_model,
                evaluation_data(task, n),
                task,
                engine.micro_batch,
                engine.device,
                engine.rank,
                engine.world,
                per_example=True,
            )
    return out


def cache_rows(n):
    return examples(n, seed=9, labels=False)


def cache_teacher():
    return gpt2(3, 32, seed=2)


def build_cache(directory, rank, world, n):
    """The teacher's top-k logits and layers 0 and 2 over ``n`` rows, the teacher partitioned at ZeRO-3."""
    import deepspeed

    model = cache_teacher()
    deepspeed.initialize(model=model, config=teacher_deepspeed_config(EngineConfig(), MICRO, model))
    assert all(is_partitioned(p) for p in model.parameters())
    build_teacher_cache(
        ModelAdapter(model, "clm"),
        cache_rows(n),
        CLMCollator(0),
        directory,
        layers=[0, 2],
        k=5,
        batch_size=MICRO,
        rank=rank,
        world=world,
    )
    torch.distributed.barrier()
    if rank == 0:
        finish_teacher_cache(directory, world)
    torch.distributed.barrier()
    return len(TeacherCache(directory))


def window_teacher():
    return gpt2(6, 32, seed=3)


def most_gathered(windowed: bool) -> int:
    """The most parameters (counted whole) gathered at once over three forwards of :func:`window_teacher`
    partitioned as the teacher is: with the gather window of the model, or with DeepSpeed's defaults."""
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    model = window_teacher().eval()
    deepspeed.initialize(
        model=model, config=teacher_deepspeed_config(EngineConfig(), MICRO, model if windowed else None)
    )
    params = list(model.parameters())
    most = [0]

    def count(*_):
        most[0] = max(most[0], sum(p.ds_numel for p in params if p.ds_status != ZeroParamStatus.NOT_AVAILABLE))

    hooks = [m.register_forward_hook(count) for m in model.modules()]
    hooks += [m.register_forward_pre_hook(count) for m in model.modules()]
    collator = CLMCollator(0)
    with torch.no_grad():
        for seed in range(3):
            batch = collator(examples(MICRO, seed=20 + seed, labels=False))
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for hook in hooks:
        hook.remove()
    return most[0]


def checkpointing(model) -> bool:
    if hasattr(type(model), "is_activation_checkpointing"):  # transformers 5's name
        return bool(model.is_activation_checkpointing)
    return bool(model.is_gradient_checkpointing)


def lwd_run(world, **engine):
    """Two optimizer steps of LWD with the fused LM head at ZeRO-3: the per-step losses (mean over ranks) and the
    teacher's DeepSpeed config as DeepSpeed read it."""
    import deepspeed

    seen = []
    initialize = deepspeed.initialize

    def spy(*args, **kwargs):  # the teacher's is the first deepspeed.initialize of the engine
        result = initialize(*args, **kwargs)
        seen.append(result[0])
        return result

    deepspeed.initialize = spy
    try:
        recipe = LWD(gpt2(2, 32, seed=1), gpt2(4, 48, seed=2), fused_lm_head=True, impl="reference")
        train = TrainConfig(batch_size=4, max_steps=2, lr=3e-3, warmup_ratio=0.0)
        config = EngineConfig(zero_stage=3, teacher_zero3=True, impl="reference", **engine)
        engine = Engine(recipe, train, config, 2, torch.device("cpu"))
    finally:
        deepspeed.initialize = initialize
    teacher = seen[0]
    rows = examples(4 * 2, seed=13, labels=False)
    collator, losses = CLMCollator(0), []
    engine.train(True)
    for step in range(2):
        piece = rows[step * 4 : (step + 1) * 4][
            engine.rank * engine.micro_batch : (engine.rank + 1) * engine.micro_batch
        ]
        out = engine.forward(collator(piece), step=step)
        engine.backward(out.loss)
        engine.step()
        losses.append(float(mean_over_ranks(out.loss.detach().double())))
    offload = teacher.zero_offload_param()
    device = None if offload is None else str(getattr(offload.device, "value", offload.device))
    windows = {
        name: [
            getattr(ds._config.zero_config, key)
            for key in ("prefetch_bucket_size", "max_live_parameters", "max_reuse_distance")
        ]
        for name, ds in (("teacher", teacher), ("student", engine.ds))
    }
    return {
        "losses": losses,
        "teacher_offload": device,
        "windows": windows,
        "blocks": {"teacher": block_parameters(recipe.teacher), "student": block_parameters(recipe)},
        "checkpointing": checkpointing(recipe.student_model.model),
        "teacher_partitioned": all(is_partitioned(p) for p in recipe.teacher.parameters()),
    }


def main():
    import deepspeed

    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", default="eval")
    parser.add_argument("--test-rows", type=int, default=13)
    parser.add_argument("--cache-rows", type=int, default=9)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=60), verbose=False)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    parts = args.parts.split(",")
    result = {"world": world}
    if "eval" in parts:
        result["eval"] = evaluate(world, args.test_rows)
    if "cache" in parts:
        result["cache_examples"] = build_cache(os.path.join(args.dir, "cache"), rank, world, args.cache_rows)
    if "window" in parts:
        result["window"] = {"windowed": most_gathered(True), "defaults": most_gathered(False)}
    if "levers" in parts:
        result["levers"] = {
            "plain": lwd_run(world),
            "offload": lwd_run(world, teacher_offload="cpu"),
            "checkpointing": lwd_run(world, activation_checkpointing=True),
        }
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(result, f)
    finish()  # the group ended, then os._exit: no interpreter teardown (tests/launch.py)


if __name__ == "__main__":
    main()
