"""Bytes that checkpoint checks hash, over the checkpoint's size (issue 29's budget: at most 1.05x, summed over the
ranks, on save and on resume), for BERT MLM students of three sizes at ZeRO-2 after one Adam step:

- save: the manifest of a checkpoint (every file hashed once);
- resume on another number of ranks, the first: the checkpoint checked, then converted into its universal form,
  whose files are hashed as they are written;
- resume on another number of ranks, a later one: the checkpoint's own files checked (its DeepSpeed state by size
  only) and the universal form it reads hashed.

One process saves; the checkpoint's layout is then marked as saved by 2 ranks, so that a one-process resume is a
resume on another number of ranks. (How the hashing is shared out between ranks is tested on 2 gloo ranks in
tests/train/test_reshard.py.) Bytes, not time, are measured::

    python benchmarks/checkpoint_hashing.py [--dir runs/checkpoint-hashing]
        [--json benchmarks/results/<date>-cpu-checkpoint-hashing.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import result_file  # noqa: E402

SIZES = {"tiny": (2, 32), "small": (2, 256), "medium": (4, 1024)}  # (blocks, width); the FFN is twice the width
BUDGET = 1.05


def hashed(action) -> int:
    """The bytes ``action()`` read to hash them (fastted.files.bytes_hashed)."""
    from fastted import files

    before = files.bytes_hashed
    action()
    return files.bytes_hashed - before


def manifest_bytes(folder: str, prefix: str = "") -> int:
    with open(os.path.join(folder, "manifest.json")) as f:
        return sum(r["bytes"] for rel, r in json.load(f)["files"].items() if rel.startswith(prefix))


def measure(folder: str, blocks: int, width: int) -> dict:
    import torch

    from fastted.methods import FineTune
    from fastted.train.checkpoints import universal_checkpoint, verify_checkpoint, write_manifest
    from fastted.train.config import EngineConfig, TrainConfig
    from fastted.train.data import MLMCollator, batch_generator
    from fastted.train.engine import Engine
    from tests.tiny_models import bert
    from tests.train.reshard_worker import Tokenizer, dataset

    recipe = FineTune(bert(blocks, width, head="mlm", seed=3), task="mlm", impl="reference")
    engine = Engine(
        recipe,
        TrainConfig(batch_size=4, max_steps=1, warmup_ratio=0.0),
        EngineConfig(zero_stage=2, impl="reference"),
        1,
        torch.device("cpu"),
    )
    out = engine.forward(MLMCollator(Tokenizer(), probability=0.3)(dataset()[:4], batch_generator(0, 0, 0, 0)), step=0)
    engine.backward(out.loss)
    engine.step()
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    engine.save(folder)
    with open(os.path.join(folder, "engine.json"), "w") as f:  # as if saved by 2 ranks
        json.dump({"world": 2, "zero_stage": 2}, f)
    with open(os.path.join(folder, "trainer.json"), "w") as f:
        json.dump({"step": 1}, f)
    save = hashed(lambda: write_manifest(folder))
    checkpoint = manifest_bytes(folder)

    def resume():  # what fastted.train.trainer does on a resume on another number of ranks
        assert verify_checkpoint(folder, 0, 1) is None
        universal_checkpoint(folder, 0, 1)

    first_resume = hashed(resume)  # converts
    later_resume = hashed(resume)  # reuses the universal form
    universal = manifest_bytes(os.path.join(folder, "universal"))
    return {
        "blocks": blocks,
        "width": width,
        "parameters": sum(p.numel() for p in recipe.parameters()),
        "checkpoint_bytes": checkpoint,
        "state_bytes": manifest_bytes(folder, "state" + os.sep),
        "universal_bytes": universal,
        "hashed": {"save": save, "first_resume_other_world": first_resume, "later_resume_other_world": later_resume},
        "ratio": {
            "save": round(save / checkpoint, 4),
            "first_resume_other_world": round(first_resume / checkpoint, 4),
            "later_resume_other_world": round(later_resume / checkpoint, 4),
        },
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=os.path.join("runs", "checkpoint-hashing"), help="the checkpoints")
    parser.add_argument(
        "--json",
        default=os.path.join(
            ROOT, "benchmarks", "results", f"{datetime.date.today().isoformat()}-cpu-checkpoint-hashing.json"
        ),
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    began = time.perf_counter()
    rows = {}
    for name, (blocks, width) in SIZES.items():
        rows[name] = measure(os.path.join(args.dir, name), blocks, width)
        print(
            f"{name}: {rows[name]['parameters']:,} parameters, checkpoint {rows[name]['checkpoint_bytes']:,} B: "
            + ", ".join(f"{k} {v}x" for k, v in rows[name]["ratio"].items()),
            flush=True,
        )
    result = {
        "command": " ".join(["python", *sys.argv]),
        "device": "CPU",
        "date": datetime.date.today().isoformat(),
        "versions": result_file.versions("torch", "deepspeed"),
        "budget": f"bytes hashed at most {BUDGET}x the checkpoint's bytes",
        "sizes": rows,
        "within_budget": {name: all(v <= BUDGET for v in row["ratio"].values()) for name, row in rows.items()},
        "seconds": round(time.perf_counter() - began, 1),
    }
    result_file.write(args.json, result)
    print(f"{args.json}: within budget: {result['within_budget']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
