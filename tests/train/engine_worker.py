"""A few steps of a recipe on tiny models through fastted's engine and trainer, then a resume: TED's stage II
(classification), LWD with the fused LM head (GPT-2 causal LM, BERT MLM), LWD without the KL on a teacher cut
after its last mapped layer, or TED from a teacher cache that every rank builds its share of.

Run by tests/train/test_engine.py as one process (a world of one), under
``torchrun --nproc_per_node 2`` or under ``deepspeed --num_gpus 2`` (gloo). Writes, from rank 0, a JSON file with
the per-step losses of the run, those of a second run resumed from its
step-2 checkpoint, and how the teacher and student parameters were laid out.
"""

import argparse
import json
import os
import shutil
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from fastted import LWD, TED, TaskFilters, explicit_map  # noqa: E402
from fastted.models import is_partitioned  # noqa: E402
from fastted.train.cache import TeacherCache, build_teacher_cache, finish_teacher_cache  # noqa: E402
from fastted.train.config import EngineConfig, TrainConfig  # noqa: E402
from fastted.train.data import ClassificationCollator, CLMCollator  # noqa: E402
from fastted.train.engine import Engine, init_distributed  # noqa: E402
from fastted.train.trainer import Training, read_metrics, run  # noqa: E402
from tests.launch import finish  # noqa: E402
from tests.tiny_models import bert, gpt2  # noqa: E402

STEPS = 4


def dataset(n=48, tokens=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (n, tokens), generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    return [{"input_ids": ids[i].tolist(), "label": int(labels[i]), "index": i} for i in range(n)]


class MLMCollator:
    """Fixed masks (every third token), so that one process and two ranks see the same labels."""

    def __call__(self, examples, generator=None):
        batch = ClassificationCollator(0)([{**e, "label": 0} for e in examples])
        picked = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
        picked[:, 1::3] = True
        batch["labels"] = batch["input_ids"].masked_fill(~picked, -100)
        batch["input_ids"] = batch["input_ids"].masked_fill(picked, 4)
        return batch


def build(args):
    torch.manual_seed(3)
    if args.recipe in ("ted", "ted-cached"):
        student, teacher = bert(2, 32, seed=1), bert(4, 48, seed=2)
        torch.manual_seed(3)
        s_filters, t_filters = TaskFilters([0, 1], 32, 24), TaskFilters([1, 3], 48, 24)
        recipe = TED(student, teacher, s_filters, t_filters, impl="reference")
        collator = ClassificationCollator(0)
        if args.recipe == "ted-cached":
            recipe.use_teacher_cache(cached(recipe, collator, os.path.join(args.dir + "-cache")))
    elif args.recipe == "lwd-cut":  # no KL: the teacher cut after layer 1 of 4, under ZeRO-3 only its 2 blocks
        student, teacher = bert(2, 32, seed=1), bert(4, 48, seed=2)
        recipe = LWD(student, teacher, explicit_map([(0, 0), (1, 1)], 2, 4), kl_alpha=0.0, impl="reference")
        assert recipe.truncate_teacher() == 2
        collator = ClassificationCollator(0)
    elif args.recipe == "lwd-clm":  # the fused LM head: GPT-2's tied output embeddings read outside forward
        student, teacher = gpt2(2, 32, seed=1), gpt2(4, 48, seed=2)
        recipe = LWD(student, teacher, fused_lm_head=True, impl="reference")
        collator = CLMCollator(0)
    else:  # lwd-mlm: BERT's MLM head (transform, then the tied decoder and its bias)
        student, teacher = bert(2, 32, head="mlm", seed=1), bert(4, 48, head="mlm", seed=2)
        recipe = LWD(student, teacher, fused_lm_head=True, impl="reference")
        collator = MLMCollator()
    lr = 1e-2 if args.recipe == "ted" else 3e-3
    train = TrainConfig(
        batch_size=8, max_steps=STEPS, lr=lr, warmup_ratio=0.0, decay="linear", clip=1.0, save_every=2, keep_last=3
    )
    engine_config = EngineConfig(zero_stage=args.zero_stage, teacher_zero3=args.zero_stage == 3, impl="reference")
    engine = Engine(recipe, train, engine_config, STEPS, torch.device("cpu"))
    training = Training(
        name=args.recipe,
        directory=args.dir,
        recipe=recipe,
        dataset=dataset(),
        collator=collator,
        train=train,
        progress=False,
        config_text=f"zero_stage: {args.zero_stage}\n",
    )
    return recipe, engine, training


def cached(recipe, collator, directory):
    """The recipe's teacher cache of the dataset, each rank writing every world-th example (made once)."""
    rank, world = init_distributed(torch.device("cpu"))  # before the engine: the cache precedes it
    if not os.path.isfile(os.path.join(directory, "manifest.json")):
        expect = recipe.teacher_cache_expect()
        build_teacher_cache(
            recipe.teacher_model,
            dataset(),
            collator,
            directory,
            layers=expect["layers"],
            k=3,
            temperature=expect["temperature"],
            transform=recipe.cache_transform(),
            identity=expect,
            batch_size=5,
            rank=rank,
            world=world,
        )
        torch.distributed.barrier()
        if world > 1 and rank == 0:
            finish_teacher_cache(directory, world)
    torch.distributed.barrier()
    return TeacherCache(directory)


def layout(recipe):
    if recipe.teacher is None:  # a cached teacher: no teacher module at all
        return {
            "teacher_partitioned": None,
            "teacher_local_fraction": None,
            "teacher_blocks": 0,
            "student_partitioned": all(is_partitioned(p) for p in recipe.parameters()),
        }
    teacher = list(recipe.teacher.parameters())
    local = sum(p.ds_tensor.numel() if is_partitioned(p) else p.numel() for p in teacher)
    full = sum(p.ds_numel if is_partitioned(p) else p.numel() for p in teacher)
    return {
        "teacher_partitioned": all(is_partitioned(p) and p.numel() == 0 for p in teacher),
        "teacher_local_fraction": local / full,
        "teacher_blocks": recipe.teacher.config.num_hidden_layers,
        "student_partitioned": all(is_partitioned(p) for p in recipe.parameters()),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--zero-stage", type=int, default=0)
    parser.add_argument("--recipe", default="ted", choices=("ted", "lwd-clm", "lwd-mlm", "lwd-cut", "ted-cached"))
    parser.add_argument("--local_rank", type=int)  # from the deepspeed launcher
    parser.add_argument("--dir", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.autograd.set_detect_anomaly(os.environ.get("ANOMALY") == "1")
    recipe, engine, training = build(args)
    run(training, engine)
    result = {"world": engine.world, **layout(recipe)}
    losses = [r["loss"] for r in read_metrics(args.dir) if "loss" in r]
    # A second run that resumes from the step-2 checkpoint (as after a kill during step 3).
    if engine.is_main:
        root = os.path.join(args.dir, "checkpoints")
        shutil.rmtree(os.path.join(root, "step-0000004"))
        with open(os.path.join(root, "latest"), "w") as f:
            f.write("step-0000002")
    torch.distributed.barrier()
    recipe, engine, training = build(args)
    summary = run(training, engine)
    resumed = [r["loss"] for r in read_metrics(args.dir) if "loss" in r]
    if engine.is_main:
        with open(args.out, "w") as f:
            json.dump({**result, "losses": losses, "resumed": resumed, "resumed_from": summary["resumed_from"]}, f)
    finish()  # the group ended, then os._exit: no interpreter teardown (tests/launch.py)


if __name__ == "__main__":
    main()
