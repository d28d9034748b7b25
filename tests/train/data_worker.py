"""Under torchrun (gloo ranks on the CPU): each rank prepares the data of a causal-LM run over a raw text corpus,
as every job of the pipeline does, counting the corpus's tokenizations in a file every rank appends to.

    python -m torch.distributed.run --nproc_per_node N tests/train/data_worker.py COUNT_FILE OUT_PREFIX key=value...

Writes OUT_PREFIX-<rank>.json: the train and test block counts, and a hash of every block's tokens, document
starts and the collated batch of the first blocks.
"""

import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import torch  # noqa: E402

from fastted.train import shards  # noqa: E402
from fastted.train.config import load_config  # noqa: E402
from fastted.train.data import prepare_data  # noqa: E402
from fastted.train.engine import init_distributed  # noqa: E402
from fastted.train.sources import load_tokenizer  # noqa: E402
from tests.launch import finish  # noqa: E402


def main() -> None:
    count_file, out, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    original = shards.write_corpus

    def counted(*args, **kwargs):
        with open(count_file, "a", encoding="utf-8") as f:
            f.write(f"rank {os.environ.get('RANK', '0')}\n")
        return original(*args, **kwargs)

    shards.write_corpus = counted
    config = load_config(None, tuple(overrides), "clm")
    rank, _ = init_distributed(torch.device("cpu"))
    data = prepare_data(config, load_tokenizer(config.teacher.path, None), rank)
    digest = hashlib.sha256()
    for split in (data.train, data.test):
        for i in range(len(split)):
            block = split[i]
            digest.update(block["input_ids"].tobytes() + block["doc_starts"].tobytes())
    batch = data.collator([data.train[i] for i in range(2)])
    for key in sorted(batch):
        digest.update(key.encode() + batch[key].numpy().tobytes())
    with open(f"{out}-{rank}.json", "w", encoding="utf-8") as f:
        json.dump(
            {"train": len(data.train), "test": len(data.test), "hash": digest.hexdigest(), "keys": sorted(batch)}, f
        )
    finish()  # the group ended, then os._exit: no interpreter teardown (tests/launch.py)


if __name__ == "__main__":
    main()
