"""A cached distillation step with the trainer's read-ahead, against the same step fed the same targets from memory
(its issue's target: with prefetching, a cached step takes at most 1.05x the step fed from memory).

A GPT-2 student of 4 blocks of 256 learns by LWD (the fused LM head's sparse KL over the teacher's top-64 logits,
the MSE of 2 mapped layers through projections) from a teacher cache that
:func:`fastted.train.cache.build_teacher_cache`
builds of a random GPT-2 teacher of 8 blocks of 384 (vocabulary 8,192, int8 layer targets) over blocks of 512
tokens. The same run (same student, batches and losses) is timed through :func:`fastted.train.trainer.run`, one micro
batch of 4 blocks a step, as:

- ``prefetched``: ``train.prefetch_steps=2``: the trainer's thread collates each step's batches and reads their
  rows from the cache (:meth:`fastted.methods.base.Recipe.prefetch`) while earlier steps compute;
- ``memory``: the cache's reads made once beforehand and held in memory, handed to the step under the same batch
  key by the collator, ``prefetch_steps=0``: the step reads nothing;
- ``inline``: ``prefetch_steps=0``: the recipe reads the cache inside its forward, as before the read-ahead.

A step's time is the trainer's own (``step_time`` of each logged record, ``log_every=1``: from one step's log to
the next, waits for the thread included); the first steps of each run are left out, the medians of the rest
compared: ``prefetched / memory`` (the target) and ``inline / memory``. Each variant runs ``--rounds`` times, in
alternating order. The runs' losses must agree exactly (the same computation), and the cache's reads are counted
(the thread's, the main thread's).

::

    python benchmarks/cache_prefetch.py [--json benchmarks/results/<date>-cpu-2core-cache-prefetch.json]
    python benchmarks/cache_prefetch.py --quick   # tiny sizes, a few seconds; no result file

About 3 minutes on 2 CPU cores. Time it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks import result_file  # noqa: E402

TARGET = 1.05  # prefetched / memory, median step
VARIANTS = ("prefetched", "memory", "inline")
FULL = dict(
    vocab=8192,
    layers=4,
    width=256,
    teacher_layers=8,
    teacher_width=384,
    heads=4,
    teacher_heads=6,
    block=512,
    micro=4,
    k=64,
    warmup=3,
    steps=20,
    rounds=2,
)
QUICK = dict(
    vocab=512,
    layers=2,
    width=64,
    teacher_layers=4,
    teacher_width=96,
    heads=4,
    teacher_heads=4,
    block=64,
    micro=4,
    k=64,
    warmup=1,
    steps=3,
    rounds=1,
)


def _gpt2(size: dict, teacher: bool, seed: int):
    import transformers as tf

    prefix = "teacher_" if teacher else ""
    torch.manual_seed(seed)
    config = tf.GPT2Config(
        vocab_size=size["vocab"],
        n_embd=size[prefix + "width"],
        n_layer=size[prefix + "layers"],
        n_head=size[prefix + "heads"],
        n_positions=size["block"],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return tf.GPT2LMHeadModel(config)


def recipe(size: dict):
    """A fresh LWD recipe of the run (the same student every time): the last block of each half mapped."""
    from fastted import LWD, explicit_map

    s, t = size["layers"], size["teacher_layers"]
    layer_map = explicit_map([(s // 2 - 1, t // 2 - 1), (s - 1, t - 1)], s, t)
    return LWD(_gpt2(size, False, seed=1), _gpt2(size, True, seed=2), layer_map, fused_lm_head=True)


def examples(size: dict) -> list[dict]:
    """Blocks of ``block`` random tokens, enough for every timed run's steps."""
    g = torch.Generator().manual_seed(0)
    n = size["micro"] * (size["warmup"] + size["steps"])
    ids = torch.randint(3, size["vocab"], (n, size["block"]), generator=g)
    return [{"input_ids": ids[i].tolist(), "index": i} for i in range(n)]


def build_cache(size: dict, directory: str) -> dict:
    """The teacher cache of the run's blocks in ``directory``: top-k logits and int8 targets of the mapped layers."""
    from fastted.train.cache import build_teacher_cache
    from fastted.train.data import CLMCollator

    r = recipe(size)
    expect = r.teacher_cache_expect()
    return build_teacher_cache(
        r.teacher_model,
        examples(size),
        CLMCollator(0),
        directory,
        layers=expect["layers"],
        k=size["k"],
        temperature=expect["temperature"],
        quantization="int8",
        transform=r.cache_transform(),
        identity=expect,
        batch_size=size["micro"],
    )


class Counted:
    """A teacher cache whose reads are counted by the thread that makes them."""

    def __init__(self, cache):
        self.cache, self.reads = cache, {}

    def __getattr__(self, name):
        return getattr(self.cache, name)

    def batch(self, index, mask, **kwargs):
        name = threading.current_thread().name
        self.reads[name] = self.reads.get(name, 0) + 1
        return self.cache.batch(index, mask, **kwargs)


def _training(size: dict, directory: str, r, collator, prefetch_steps: int):
    from fastted.train.config import TrainConfig
    from fastted.train.trainer import Training

    train = TrainConfig(
        batch_size=size["micro"],
        max_steps=size["warmup"] + size["steps"],
        lr=1e-4,
        warmup_ratio=0.0,
        log_every=1,
        prefetch_steps=prefetch_steps,
    )
    return Training(
        name="lwd",
        directory=directory,
        recipe=r,
        dataset=examples(size),
        collator=collator,
        train=train,
        progress=False,
        resume=False,
    )


def in_memory(size: dict, cache_dir: str) -> dict:
    """The cache's reads of the run's micro batches, made once: {rows: what Recipe.prefetch puts in the batch}."""
    from fastted.methods.base import PREFETCHED
    from fastted.train.cache import TeacherCache
    from fastted.train.data import CLMCollator
    from fastted.train.trainer import micro_batches

    r = recipe(size)
    r.use_teacher_cache(TeacherCache(cache_dir))
    training = _training(size, "", r, CLMCollator(0), 0)
    layout = SimpleNamespace(micro_batch=size["micro"], accumulation=1, world=1, rank=0)
    held = {}
    for step in range(training.train.max_steps):
        for _, batch in micro_batches(training, step, layout):
            held[tuple(batch["index"].tolist())] = r.prefetch(batch)[PREFETCHED]
    return held


def timed_run(size: dict, directory: str, cache_dir: str, variant: str, held: dict) -> dict:
    """One run of ``variant``: its step times after the warmup, its losses and the cache's reads."""
    from fastted.methods.base import PREFETCHED
    from fastted.train.cache import TeacherCache
    from fastted.train.config import EngineConfig
    from fastted.train.data import CLMCollator
    from fastted.train.engine import Engine
    from fastted.train.trainer import read_metrics, run

    shutil.rmtree(directory, ignore_errors=True)
    r = recipe(size)
    cache = Counted(TeacherCache(cache_dir))
    r.use_teacher_cache(cache)
    collate = CLMCollator(0)

    def fed_from_memory(examples, generator=None):
        batch = collate(examples, generator)
        return {**batch, PREFETCHED: held[tuple(batch["index"].tolist())]}

    training = _training(
        size, directory, r, fed_from_memory if variant == "memory" else collate, 2 if variant == "prefetched" else 0
    )
    engine = Engine(r, training.train, EngineConfig(), training.train.max_steps, torch.device("cpu"))
    with contextlib.redirect_stdout(io.StringIO()):  # progress=false prints a line a step
        run(training, engine)
    records = [x for x in read_metrics(directory) if "loss" in x]
    return {
        "step_times": [x["step_time"] for x in records[size["warmup"] :]],
        "losses": [(x["loss"], x["terms"]) for x in records],
        "reads": cache.reads,
    }


def collate_seconds(size: dict) -> float:
    """The median time to collate a micro batch (the memory variant's one host task in the loop)."""
    import time

    from fastted.train.data import CLMCollator

    data, collate, times = examples(size), CLMCollator(0), []
    for i in range(0, len(data) - size["micro"] + 1, size["micro"]):
        begin = time.perf_counter()
        collate(data[i : i + size["micro"]])
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def measure(directory: str, size: dict) -> dict:
    cache_dir = os.path.join(directory, "cache")
    manifest = build_cache(size, cache_dir)
    held = in_memory(size, cache_dir)
    times = {v: [] for v in VARIANTS}
    runs = []
    for round_ in range(size["rounds"]):
        for variant in VARIANTS if round_ % 2 == 0 else VARIANTS[::-1]:
            out = timed_run(size, os.path.join(directory, "run"), cache_dir, variant, held)
            times[variant] += out["step_times"]
            runs.append(
                {
                    "round": round_,
                    "variant": variant,
                    "losses": out["losses"],
                    "reads": out["reads"],
                    "median_step_s": statistics.median(out["step_times"]),
                }
            )
    median = {v: statistics.median(t) for v, t in times.items()}
    steps = size["warmup"] + size["steps"]
    return {
        "setup": {
            **{k: v for k, v in size.items() if k != "rounds"},
            "rounds": size["rounds"],
            "mapped_layers": 2,
            "quantization": "int8",
            "recipe": "LWD, fused LM head",
            "cache_bytes_per_token": manifest.get("bytes_per_token"),
        },
        "median_step_s": median,
        "step_times_s": times,
        "ratios": {
            "prefetched_over_memory": median["prefetched"] / median["memory"],
            "inline_over_memory": median["inline"] / median["memory"],
        },
        "collate_median_s": collate_seconds(size),
        "losses_identical": all(r["losses"] == runs[0]["losses"] for r in runs),
        "reads": {f"{r['variant']}-{r['round']}": r["reads"] for r in runs},
        "reads_expected": {"prefetched": {"fastted-prefetch": steps}, "memory": {}, "inline": {"MainThread": steps}},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes; no result file unless --json")
    parser.add_argument("--dir", default=None, help="where the cache and runs go (default: a temporary folder)")
    parser.add_argument("--rounds", type=int, default=None, help="runs of each variant (default: 2; --quick 1)")
    parser.add_argument(
        "--json",
        default=None,
        help="the result file (default: benchmarks/results/<date>-cpu-<cores>core-cache-prefetch.json; --quick: none)",
    )
    args = parser.parse_args(argv)
    size = dict(QUICK if args.quick else FULL)
    if args.rounds is not None:
        size["rounds"] = args.rounds
    directory = args.dir or tempfile.mkdtemp(prefix="fastted-cache-prefetch-")
    try:
        record = measure(directory, size)
    finally:
        if args.dir is None:
            shutil.rmtree(directory, ignore_errors=True)
    expected = record["reads_expected"]
    record["reads_as_expected"] = all(
        reads == expected[key.rsplit("-", 1)[0]] for key, reads in record["reads"].items()
    )
    record["within_target"] = record["ratios"]["prefetched_over_memory"] <= TARGET
    today = datetime.date.today().isoformat()
    result = {
        "what": "median step of a cached LWD distillation step with the trainer's read-ahead "
        "(prefetch_steps=2), fed from memory, and reading the cache in the forward",
        "command": "python benchmarks/cache_prefetch.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": f"CPU, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        "date": today,
        "versions": result_file.versions("torch", "deepspeed", "transformers", "numpy"),
        "target": {"prefetched_over_memory": TARGET},
        **record,
    }
    path = args.json
    if path is None and not args.quick:
        path = os.path.join(ROOT, "benchmarks", "results", f"{today}-cpu-{os.cpu_count()}core-cache-prefetch.json")
    if path is not None:
        result_file.write(path, result)
    shown = ("median_step_s", "ratios", "collate_median_s", "losses_identical", "reads_as_expected", "within_target")
    print(json.dumps({k: result[k] for k in ("command", "device", *shown)}, indent=1))
    return 0 if record["within_target"] and record["losses_identical"] and record["reads_as_expected"] else 1


if __name__ == "__main__":
    sys.exit(main())
