"""Synthetic pre-tokenized corpora for the data tests and benchmarks: fastted token shards (:mod:`fastted.train.shards`)
of random ids, written a window at a time, never whole in memory, and never committed."""

import json
import os

import numpy as np

from fastted.train import shards

WINDOW = 2**24  # tokens drawn and written at a time


def synthetic_corpus(
    directory: str,
    tokens: int,
    *,
    vocab: int = 128_256,
    n_shards: int = 4,
    mean_document: int = 1000,
    separator_id: int = 3,
    seed: int = 0,
    dtype=np.uint32,
) -> dict:
    """Write ``tokens`` random ids below ``vocab`` as ``n_shards`` shards of ``dtype`` into ``directory``: documents
    of geometric lengths (mean ``mean_document``), each ending with ``separator_id``. Returns the meta."""
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    per_shard = -(-tokens // n_shards)
    meta_shards = []
    for number in range(n_shards):
        count = min(per_shard, tokens - number * per_shard)
        lengths = rng.geometric(1.0 / mean_document, size=count // mean_document * 2 + 16)
        ends = np.cumsum(lengths)
        ends = np.append(ends[ends < count], count)  # the shard's last document ends with it
        name, docs = f"tokens-{number:05d}.bin", f"docs-{number:05d}.npy"
        with open(os.path.join(directory, name), "wb") as out:
            for lo in range(0, count, WINDOW):
                hi = min(lo + WINDOW, count)
                window = rng.integers(0, vocab, size=hi - lo, dtype=np.int64)
                window[window == separator_id] = separator_id + 1
                inside = ends[(ends > lo) & (ends <= hi)]
                window[inside - 1 - lo] = separator_id
                out.write(window.astype(dtype).tobytes())
        np.save(os.path.join(directory, docs), ends.astype(np.int64))
        meta_shards.append(
            {
                "tokens": name,
                "docs": docs,
                "n_tokens": int(count),
                "n_docs": int(ends.size),
                "dtype": np.dtype(dtype).name,
            }
        )
    meta = {
        "format": shards.FORMAT,
        "version": shards.VERSION,
        "shards": meta_shards,
        "tokens": int(tokens),
        "documents": sum(s["n_docs"] for s in meta_shards),
        "separator_id": separator_id,
        "vocab_size": vocab,
        "identity": {"synthetic": seed},
    }
    with open(os.path.join(directory, shards.META), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
    return meta
