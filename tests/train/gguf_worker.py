"""One rank of tests/train/test_gguf.py's conversion: ``fastted.train.gguf.hf_folder`` called by every rank of a gloo
group (torchrun), with the peak private memory (RssAnon) of the call sampled by a thread. Writes
``<out>/rank-<RANK>.json``: ``{"folder", "start_kib", "peak_kib", "seconds"}``."""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

# Imported before the measurement: what the conversion imports is not its memory.
import numpy  # noqa: E402,F401
import safetensors.torch  # noqa: E402,F401
import torch.distributed as dist  # noqa: E402
import transformers  # noqa: E402
from transformers.models.llama import modeling_llama  # noqa: E402,F401

from benchmarks.rank_memory import PeakSampler  # noqa: E402
from fastted.train.gguf import hf_folder  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("--folder", "--file", "--cache", "--out"):
        parser.add_argument(name, required=True)
    parser.add_argument("--shard-bytes", type=int, required=True)
    args = parser.parse_args()
    transformers.AutoTokenizer, transformers.AutoModelForCausalLM  # noqa: B018 (resolve the lazy imports)
    dist.init_process_group("gloo")
    began = time.perf_counter()
    with PeakSampler(fields=("RssAnon",)) as sampler:
        folder = hf_folder(args.folder, args.file, args.cache, max_shard_bytes=args.shard_bytes)
    record = {
        "folder": folder,
        "start_kib": sampler.start["RssAnon"],
        "peak_kib": sampler.peak["RssAnon"],
        "seconds": time.perf_counter() - began,
    }
    with open(os.path.join(args.out, f"rank-{dist.get_rank()}.json"), "w") as f:
        json.dump(record, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
