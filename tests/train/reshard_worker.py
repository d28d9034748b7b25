"""Saved on 2 ranks, resumed on 1 or 4: one launch per world size runs ZeRO 0, 1, 2 and 3 one after another (one
process group, a folder per stage).

The run: LWD with normalized MSE on tiny BERT MLM models (no dropout), fastted's MLM collator drawing real random
masks, a global batch of 8 in micro batches of 2 (accumulation 4, 2 or 1 on 1, 2 or 4 ranks), 4 steps,
checkpoints at steps 2 and 4, a large weight decay (so that a parameter group resumed with another group's
settings shows). The MSE scales (a buffer) are set to fresh random values before the first run, so a
resume that does not restore them computes others from its first batch.

``--phase save`` (2 ranks): the uninterrupted run of every stage; then, on ZeRO-2's folder, the bytes each rank
hashed while saving and while verifying (a resume's check), and a rank-1 file of step 4 damaged: what every rank
then resumes from, and its warnings. ``--phase resume`` (any world): every stage resumed from a copy of the
step-2 checkpoint; under ZeRO-2, the step-2 checkpoint's universal form checked again (reused, not made anew),
and the engine asked to load the checkpoint natively (a CheckpointError).
Writes a JSON file from rank 0.
"""

import argparse
import json
import os
import shutil
import sys
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from fastted import (
    LWD,  # noqa: E402
    files,  # noqa: E402
)
from fastted.train.checkpoints import latest_checkpoint, universal_checkpoint, verify_checkpoint  # noqa: E402
from fastted.train.config import EngineConfig, TrainConfig  # noqa: E402
from fastted.train.data import MLMCollator  # noqa: E402
from fastted.train.engine import CheckpointError, Engine, gather_over_ranks, init_distributed  # noqa: E402
from fastted.train.trainer import Training, read_metrics, run  # noqa: E402
from tests.launch import finish  # noqa: E402
from tests.tiny_models import VOCAB, bert  # noqa: E402
from tests.train.engine_worker import dataset  # noqa: E402

STEPS, STAGES = 4, (0, 1, 2, 3)


class Tokenizer:
    """What MLMCollator reads of a tokenizer: [PAD] 0, [MASK] 4, special ids 0-4, the tiny models' vocabulary."""

    pad_token_id, mask_token_id, all_special_ids = 0, 4, [0, 1, 2, 3, 4]

    def __len__(self):
        return VOCAB


def build(zero_stage, directory, scales=None):
    student, teacher = bert(2, 32, head="mlm", seed=1), bert(4, 48, head="mlm", seed=2)
    recipe = LWD(student, teacher, normalize_mse=True, impl="reference")
    if scales is not None:
        recipe.mse_scales.copy_(scales)
    train = TrainConfig(
        batch_size=8,
        micro_batch_size=2,
        max_steps=STEPS,
        lr=3e-3,
        weight_decay=0.5,
        warmup_ratio=0.0,
        decay="linear",
        clip=1.0,
        save_every=2,
        keep_last=3,
    )
    engine_config = EngineConfig(zero_stage=zero_stage, teacher_zero3=zero_stage == 3, impl="reference")
    engine = Engine(recipe, train, engine_config, STEPS, torch.device("cpu"))
    training = Training(
        name=f"zero{zero_stage}",
        directory=directory,
        recipe=recipe,
        dataset=dataset(),
        collator=MLMCollator(Tokenizer(), probability=0.3),
        train=train,
        progress=False,
        config_text=f"zero_stage: {zero_stage}\n",
    )
    return engine, training


def losses(directory):
    return {r["step"]: r["loss"] for r in read_metrics(directory) if "loss" in r}


def hashed_over_ranks(since):
    return sum(gather_over_ranks(files.bytes_hashed - since))


def checkpoint_bytes(folder):
    with open(os.path.join(folder, "manifest.json")) as f:
        return sum(r["bytes"] for r in json.load(f)["files"].values())


def save_phase(root, rank, world):
    result = {"losses": {}}
    scales = torch.rand(2, generator=torch.Generator().manual_seed(7)) + 0.5  # a buffer a resume must restore
    for zero_stage in STAGES:
        directory = os.path.join(root, f"zero{zero_stage}")
        engine, training = build(zero_stage, directory, scales)
        before = files.bytes_hashed
        run(training, engine)
        result["losses"][zero_stage] = losses(directory)
        if zero_stage == 2:
            checkpoints = os.path.join(directory, "checkpoints")
            step2, step4 = os.path.join(checkpoints, "step-0000002"), os.path.join(checkpoints, "step-0000004")
            result["saved_hashed"] = hashed_over_ranks(before)
            result["saved_bytes"] = checkpoint_bytes(step2) + checkpoint_bytes(step4)
            before = files.bytes_hashed
            assert latest_checkpoint(directory, rank, world) == step4
            result["verify_hashed_by_rank"] = gather_over_ranks(files.bytes_hashed - before)
            result["verify_bytes"] = checkpoint_bytes(step4)
            damaged = os.path.join(step4, "state", "zero_pp_rank_1_mp_rank_00_optim_states.pt")
            if rank == 0:
                data = bytearray(open(damaged, "rb").read())
                data[len(data) // 2] ^= 1
                open(damaged, "wb").write(bytes(data))
            torch.distributed.barrier()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                picked = latest_checkpoint(directory, rank, world)
            result["damaged"] = gather_over_ranks(
                {"picked": os.path.basename(picked), "warnings": [str(w.message) for w in caught]}
            )
    return result


def resume_phase(root, saved, rank, world):
    result = {"losses": {}}
    for zero_stage in STAGES:
        directory = os.path.join(root, f"zero{zero_stage}")
        if rank == 0:
            shutil.copytree(
                os.path.join(saved, f"zero{zero_stage}", "checkpoints", "step-0000002"),
                os.path.join(directory, "checkpoints", "step-0000002"),
            )
            with open(os.path.join(directory, "checkpoints", "latest"), "w") as f:
                f.write("step-0000002")
        torch.distributed.barrier()
        engine, training = build(zero_stage, directory)
        before = files.bytes_hashed
        summary = run(training, engine)
        run_hashed = hashed_over_ranks(before)
        assert summary["resumed_from"] == 2
        result["losses"][zero_stage] = losses(directory)
        step2 = os.path.join(directory, "checkpoints", "step-0000002")
        universal = os.path.join(step2, "universal")
        result.setdefault("universal", {})[zero_stage] = os.path.isdir(universal)
        if zero_stage == 2:  # a second resume on this world reuses the universal form, checked, not made anew
            result["run_hashed"] = run_hashed  # step 2 checked and converted, step 4 saved
            result["run_bytes"] = checkpoint_bytes(step2) + checkpoint_bytes(
                os.path.join(directory, "checkpoints", "step-0000004")
            )
            result["checkpoint_bytes"] = checkpoint_bytes(step2)
            with open(os.path.join(step2, "manifest.json")) as f:
                result["state_bytes"] = sum(
                    r["bytes"] for rel, r in json.load(f)["files"].items() if rel.startswith("state" + os.sep)
                )
            made = os.path.getmtime(os.path.join(universal, "manifest.json"))
            before = files.bytes_hashed
            assert verify_checkpoint(step2, rank, world) is None
            result["reuse_verify_hashed"] = hashed_over_ranks(before)
            before = files.bytes_hashed
            assert universal_checkpoint(step2, rank, world) == universal
            result["reuse_hashed"] = hashed_over_ranks(before)
            result["universal_bytes"] = checkpoint_bytes(universal)
            result["reused"] = os.path.getmtime(os.path.join(universal, "manifest.json")) == made
            try:  # the engine alone refuses it, by name
                engine.load(os.path.dirname(universal))
            except CheckpointError as error:
                result["unconverted"] = str(error)
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase", choices=("save", "resume"), required=True)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--saved", help="the save phase's --dir (resume phase)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rank, world = init_distributed(torch.device("cpu"))
    if args.phase == "save":
        result = save_phase(args.dir, rank, world)
    else:
        result = resume_phase(args.dir, args.saved, rank, world)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"world": world, **result}, f)
    finish()  # the group ended, then os._exit: no interpreter teardown (tests/launch.py)


if __name__ == "__main__":
    main()
