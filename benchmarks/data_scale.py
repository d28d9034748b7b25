"""A pre-training run's start on a large pre-tokenized corpus (issue 30's target: from 1B tokens of memory-mapped
uint32 shards, 4 GB, 2 gloo ranks reach their first optimizer step in under 60 s, with peak RSS under 1.5 GB a
rank).

Writes a synthetic corpus (``tests/corpus.py``: random ids below Llama 3's 128,256, documents of about 1,000
tokens, 4 uint32 shards; never committed) and a tiny random GPT-2 of that vocabulary (2 blocks of 64, the word
tokenizer of the tests), then launches on 2 ranks::

    python -m torch.distributed.run --nproc_per_node 2 benchmarks/rank_memory.py <out> -m fastted distil \\
        --preset clm --method kd data.source=<corpus> distil.train.max_steps=1 ...

and records the seconds from the launch to the first optimizer step's line in ``metrics.jsonl`` (polled), that
line's ``peak_memory`` (the largest VmHWM of the ranks at that step) and each rank's VmHWM over the whole command
(which adds the evaluation on the held-out documents, whose 128,256-wide logits are not fused)::

    python benchmarks/data_scale.py [--tokens 1000000000] [--baseline-tokens 10000000] [--dir runs/data-scale]
        [--json <file>]

The same launch on a 10M-token corpus first gives the peak's growth with the corpus, set beside the growth of
the epoch's permutation of the blocks (8 bytes a block), the one thing per rank that grows with it.

About a minute on 2 CPU cores once the corpus exists (writing it: about 20 s); 4 GB of disk at 1B tokens.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
WRAPPER = os.path.join(ROOT, "benchmarks", "rank_memory.py")

from benchmarks import result_file  # noqa: E402

VOCAB = 128_256
FIRST_STEP_SECONDS, PEAK_BYTES = 60.0, 1.5e9


def build(directory: str, tokens: int) -> tuple[str, str]:
    """(corpus folder, model folder) under ``directory``, each made once."""
    import transformers as tf

    from tests.corpus import synthetic_corpus
    from tests.tiny_models import word_tokenizer

    corpus, model = os.path.join(directory, f"corpus-{tokens}"), os.path.join(directory, "model")
    if not os.path.isfile(os.path.join(corpus, "meta.json")):
        synthetic_corpus(corpus + ".tmp", tokens, vocab=VOCAB)
        shutil.rmtree(corpus, ignore_errors=True)
        os.rename(corpus + ".tmp", corpus)
    if not os.path.isfile(os.path.join(model, "config.json")):
        config = tf.GPT2Config(
            vocab_size=VOCAB,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=256,
            bos_token_id=2,
            eos_token_id=3,
            pad_token_id=0,
        )
        tf.GPT2LMHeadModel(config).save_pretrained(model)
        word_tokenizer(model, causal=True)
    return corpus, model


def measure(directory: str, tokens: int, timeout: int = 600) -> dict:
    """Launch the first step on 2 ranks over a corpus of ``tokens`` tokens; the record of it."""
    from tests.launch import rank_env, torchrun

    corpus, model = build(directory, tokens)
    run_dir, memory = os.path.join(directory, "run"), os.path.join(directory, "memory")
    for path in (run_dir, memory):
        shutil.rmtree(path, ignore_errors=True)
    argv = [
        "distil",
        "--preset",
        "clm",
        "--method",
        "kd",
        f"teacher.path={model}",
        f"data.source={corpus}",
        f"output_dir={run_dir}",
        "data.max_length=128",
        "distil.train.batch_size=8",
        "distil.train.max_steps=1",
        "data.test_documents=16",
        "data.max_test_examples=4",
        "student.layers=null",
        "student.num_layers=1",
        "engine.threads=1",
        "progress=false",
    ]
    metrics = os.path.join(run_dir, "distil-kd", "metrics.jsonl")
    env = rank_env(PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), TRITON_INTERPRET="0")
    began = time.perf_counter()
    process = subprocess.Popen(
        torchrun(2, WRAPPER, memory, "-m", "fastted", *argv),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    first = None
    while process.poll() is None and time.perf_counter() - began < timeout:
        if first is None and os.path.exists(metrics) and os.path.getsize(metrics):
            first = time.perf_counter() - began
        time.sleep(0.05)
    if process.poll() is None:
        process.kill()
    output = process.communicate()[0]
    ranks = []
    for rank in (0, 1):
        path = os.path.join(memory, f"rank-{rank}.json")
        if os.path.exists(path):
            with open(path) as f:
                ranks.append(json.load(f))
    record = {
        "exit_code": process.returncode,
        "seconds_total": round(time.perf_counter() - began, 1),
        "seconds_to_first_step": None if first is None else round(first, 1),
        "ranks": [],
    }
    if process.returncode != 0 or first is None:
        record["output_tail"] = output[-4000:]
        return record
    with open(metrics) as f:
        step = json.loads(f.readline())
    with open(os.path.join(corpus, "meta.json")) as f:
        meta = json.load(f)
    record.update(
        corpus={
            "tokens": meta["tokens"],
            "documents": meta["documents"],
            "shards": len(meta["shards"]),
            "dtype": meta["shards"][0]["dtype"],
            "bytes": sum(os.path.getsize(os.path.join(corpus, s["tokens"])) for s in meta["shards"]),
        },
        first_step={
            "peak_memory_bytes": step["peak_memory"],
            "peak_memory_kind": step["peak_memory_kind"],
            "tokens": step["tokens"],
        },
        ranks=[{"rank": r["rank"], "VmHWM_bytes_whole_command": r["peak_kib"]["VmHWM"] * 1024} for r in ranks],
    )
    record["within_target"] = bool(first < FIRST_STEP_SECONDS and step["peak_memory"] < PEAK_BYTES)
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1_000_000_000)
    parser.add_argument("--dir", default=os.path.join("runs", "data-scale"))
    parser.add_argument(
        "--json",
        default=os.path.join(
            ROOT, "benchmarks", "results", f"{datetime.date.today().isoformat()}-cpu-2core-data-scale.json"
        ),
    )
    parser.add_argument(
        "--baseline-tokens",
        type=int,
        default=10_000_000,
        help="a small corpus, run first: the peak's growth to --tokens is what grows with the corpus",
    )
    args = parser.parse_args(argv)
    baseline = measure(args.dir, args.baseline_tokens)
    record = measure(args.dir, args.tokens)
    if record.get("first_step") and baseline.get("first_step"):
        blocks = record["corpus"]["tokens"] // 128 - baseline["corpus"]["tokens"] // 128
        record["growth_from_baseline"] = {
            "baseline_tokens": args.baseline_tokens,
            "baseline_peak_memory_bytes": baseline["first_step"]["peak_memory_bytes"],
            "peak_memory_growth_bytes": record["first_step"]["peak_memory_bytes"]
            - baseline["first_step"]["peak_memory_bytes"],
            "permutation_growth_bytes": 8 * blocks,  # the epoch's order of the blocks, int64
        }
    result = {
        "what": "2 gloo ranks from launch to the first optimizer step of a clm run over a pre-tokenized "
        "corpus of memory-mapped uint32 shards, and their peak RSS",
        "command": "python benchmarks/data_scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": f"CPU, {os.cpu_count()} cores",
        "date": datetime.date.today().isoformat(),
        "versions": result_file.versions("torch", "deepspeed", "transformers", "numpy"),
        "targets": {"seconds_to_first_step": FIRST_STEP_SECONDS, "peak_memory_bytes": PEAK_BYTES},
        **record,
    }
    result_file.write(args.json, result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("versions", "output_tail")}, indent=1))
    return 0 if record.get("within_target") else 1


if __name__ == "__main__":
    sys.exit(main())
