"""Token shards: written once by workers, read back as the packed blocks of a reference concatenation, with the
document starts of each block; opened by size, not by reading; a folder of token arrays as a corpus."""

import json
import os
import random

import datasets
import numpy as np
import pytest

from fastted.train import shards
from tests import tiny_models as tm


@pytest.fixture(scope="module")
def words(tmp_path_factory):
    """The tiny models' word tokenizer without special tokens: "w<k>" is id k + 5."""
    return tm.word_tokenizer(str(tmp_path_factory.mktemp("tok")), causal=True)


def _random_docs(seed, n=60, longest=25):
    rng = random.Random(seed)
    return [[rng.randrange(5, tm.VOCAB) for _ in range(rng.randrange(0, longest))] for _ in range(n)]


def _texts(docs):
    return datasets.Dataset.from_dict({"text": [" ".join(f"w{i - 5}" for i in doc) for doc in docs]})


def _reference_stream(docs, separator_id):
    """(tokens, document starts) of the documents joined, each followed by the separator."""
    flat, starts = [], []
    for doc in docs:
        starts.append(len(flat))
        flat.extend(doc)
        if separator_id is not None:
            flat.append(separator_id)
    return flat, starts


def _check_blocks(blocks, docs, block_size, separator_id, lo=0):
    flat, starts = _reference_stream(docs, separator_id)
    flat = flat[lo:]
    starts = [s - lo for s in starts if s > lo]
    n = len(flat) // block_size
    assert len(blocks) == n
    for i in range(n):
        block = blocks[i]
        assert block["input_ids"].tolist() == flat[i * block_size : (i + 1) * block_size]
        inside = [s - i * block_size for s in starts if i * block_size < s < (i + 1) * block_size]
        assert block["doc_starts"].tolist() == inside, i
        assert block["index"] == i


@pytest.mark.parametrize("block_size, num_proc", [(7, 1), (7, 3), (5, 2), (13, 4), (1, 3)])
def test_blocks_are_the_reference_concatenation(words, tmp_path, block_size, num_proc):
    docs = _random_docs(block_size + num_proc)
    meta = shards.write_corpus(_texts(docs), words, str(tmp_path / "c"), separator_id=3, num_proc=num_proc)
    assert len(meta["shards"]) == num_proc  # one shard per worker, so blocks cross shard edges
    assert meta["tokens"] == sum(map(len, docs)) + len(docs) and meta["documents"] == len(docs)
    corpus = shards.TokenCorpus(str(tmp_path / "c"))
    assert corpus.n_tokens == meta["tokens"] and corpus.shards[0]["dtype"] == "uint16"
    _check_blocks(shards.PackedBlocks(corpus, block_size), docs, block_size, 3)
    # a token range: the blocks of the documents from the 10th on
    lo = corpus.document_end(9)
    _check_blocks(shards.PackedBlocks(corpus, block_size, lo), docs, block_size, 3, lo=lo)


def test_the_stream_does_not_depend_on_num_proc(words, tmp_path):
    docs = _random_docs(5, n=101)
    streams = []
    for workers in (1, 2, 5):
        shards.write_corpus(_texts(docs), words, str(tmp_path / str(workers)), separator_id=3, num_proc=workers)
        corpus = shards.TokenCorpus(str(tmp_path / str(workers)))
        streams.append(corpus.tokens(0, corpus.n_tokens).tolist())
        assert [corpus.document_end(d) for d in range(len(docs))] == list(np.cumsum([len(x) + 1 for x in docs]))
    assert streams[0] == streams[1] == streams[2]


def test_wide_vocabularies_take_uint32(words, tmp_path, monkeypatch):
    assert shards.token_dtype(65536) == np.uint16 and shards.token_dtype(65537) == np.uint32
    docs = _random_docs(1, n=9)
    monkeypatch.setattr(type(words), "__len__", lambda self: 128_256)
    shards.write_corpus(_texts(docs), words, str(tmp_path / "c"), separator_id=3, num_proc=1)
    corpus = shards.TokenCorpus(str(tmp_path / "c"))
    assert corpus.shards[0]["dtype"] == "uint32"
    assert os.path.getsize(tmp_path / "c" / "tokens-00000.bin") == 4 * corpus.n_tokens
    _check_blocks(shards.PackedBlocks(corpus, 4), docs, 4, 3)


def test_a_folder_of_token_arrays_is_a_corpus(tmp_path):
    docs = _random_docs(3, n=50)
    flat, _ = _reference_stream(docs, 3)
    folder = tmp_path / "arrays"
    folder.mkdir()
    cut = len(flat) // 3  # two arrays; the first ends inside a document (its tail is a document too)
    np.save(folder / "a.npy", np.array(flat[:cut], np.int32))
    np.save(folder / "b.npy", np.array(flat[cut:], np.uint16))
    assert shards.token_arrays(str(folder)) == [str(folder / "a.npy"), str(folder / "b.npy")]
    assert not shards.is_corpus(str(folder))
    shards.index_token_arrays(shards.token_arrays(str(folder)), str(tmp_path / "index"), separator_id=3)
    corpus = shards.TokenCorpus(str(tmp_path / "index"))
    assert corpus.tokens(0, corpus.n_tokens).tolist() == flat
    ends = sorted({e for e in np.cumsum([len(x) + 1 for x in docs])} | {cut})
    assert [corpus.document_end(d) for d in range(corpus.n_documents)] == ends
    blocks = shards.PackedBlocks(corpus, 6)
    for i in range(len(blocks)):
        assert blocks[i]["input_ids"].tolist() == flat[6 * i : 6 * i + 6]
        assert blocks[i]["doc_starts"].tolist() == [e - 6 * i for e in ends if 6 * i < e < 6 * i + 6]


@pytest.mark.bad_input
def test_a_damaged_corpus_is_named(words, tmp_path):
    directory = str(tmp_path / "c")
    shards.write_corpus(_texts(_random_docs(2)), words, directory, separator_id=3, num_proc=2)
    with open(os.path.join(directory, "tokens-00001.bin"), "r+b") as f:
        f.truncate(3)
    with pytest.raises(
        shards.CorpusError,
        match=r"tokens-00001.bin holds 3 bytes, its meta says \d+: it was cut "
        r"short or changed; run X",
    ):
        shards.TokenCorpus(directory, rebuild="run X")
    os.remove(os.path.join(directory, "docs-00000.npy"))
    with pytest.raises(shards.CorpusError, match="docs-00000.npy is missing"):
        shards.TokenCorpus(directory)
    with open(os.path.join(directory, shards.META), "w") as f:
        json.dump({"format": "other"}, f)
    with pytest.raises(shards.CorpusError, match="format 'other'"):
        shards.TokenCorpus(directory)
    with pytest.raises(ValueError, match="data.text_field = 'body'"):
        shards.write_corpus(_texts([[5]]), words, str(tmp_path / "d"), text_field="body", separator_id=3)
    with pytest.raises(IndexError, match="block 4 of 4"):
        shards.PackedBlocks(shards.TokenCorpus(_fresh(words, tmp_path)), 1)[4]


def _fresh(words, tmp_path):
    directory = str(tmp_path / "fresh")
    shards.write_corpus(_texts([[5, 6, 7]]), words, directory, separator_id=3)
    return directory


def test_made_once_runs_on_rank_0_and_the_others_wait(tmp_path, monkeypatch):
    directory = str(tmp_path / "c")
    calls = []

    def make():
        calls.append(1)
        os.makedirs(directory)
        with open(os.path.join(directory, shards.META), "w") as f:
            f.write("{}")

    shards.made_once(directory, make, rank=0, rebuild="")
    shards.made_once(directory, make, rank=0, rebuild="")  # there already: not made again
    shards.made_once(directory, make, rank=1, rebuild="")  # another rank: finds it
    assert calls == [1]

    monkeypatch.setattr(shards, "WAIT_POLL", 0.01)
    with pytest.raises(shards.CorpusError, match="no meta.json after 0 s of waiting for rank 0; do Y"):
        shards.made_once(str(tmp_path / "never"), make, rank=1, rebuild="do Y", timeout=0.05)

    def fail():
        raise RuntimeError("the disk is full")

    with pytest.raises(RuntimeError):
        shards.made_once(str(tmp_path / "bad"), fail, rank=0, rebuild="")
    with pytest.raises(
        shards.CorpusError,
        match=r"rank 0 failed to make it \(RuntimeError: the disk is full\); "
        r"do Z",
    ):
        shards.made_once(str(tmp_path / "bad"), fail, rank=1, rebuild="do Z", timeout=5)


# ----------------------------------------------------------------------------------------------- a run on shards


def _shard_run(directory, blocks, crash_after=None, steps=7):
    """KD on GPT-2s over packed blocks for ``steps`` steps (checkpoints every 2), resuming when ``directory``
    holds a checkpoint; returns the batches the collator made (step order) and the logged losses. ``crash_after``
    micro batches: the collator raises."""
    import torch

    from fastted import KD
    from fastted.train.config import EngineConfig, TrainConfig
    from fastted.train.data import CLMCollator
    from fastted.train.engine import Engine
    from fastted.train.trainer import Training, read_metrics, run

    recipe = KD(tm.gpt2(2, 32, seed=1), tm.gpt2(3, 48, seed=2), impl="reference")
    train = TrainConfig(batch_size=4, max_steps=steps, lr=5e-3, warmup_ratio=0.0, save_every=2, log_every=1)
    engine = Engine(recipe, train, EngineConfig(impl="reference"), steps, torch.device("cpu"))
    collate, seen = CLMCollator(0, document_mask=True), []

    def collator(examples, generator=None):
        if crash_after is not None and len(seen) >= crash_after:
            raise KeyboardInterrupt
        seen.append([int(e["index"]) for e in examples])
        return collate(examples, generator)

    training = Training(
        name="kd",
        directory=str(directory),
        recipe=recipe,
        dataset=blocks,
        collator=collator,
        train=train,
        progress=False,
        config_text="kind: kd\n",
    )
    try:
        run(training, engine)
    except KeyboardInterrupt:
        pass
    return seen, [r["loss"] for r in read_metrics(str(directory)) if "loss" in r]


def test_a_resume_mid_epoch_reads_the_uninterrupted_runs_batches(words, tmp_path):
    shards.write_corpus(_texts(_random_docs(9, n=40)), words, str(tmp_path / "c"), separator_id=3, num_proc=2)
    blocks = shards.PackedBlocks(shards.TokenCorpus(str(tmp_path / "c")), 16, 0, 13 * 16)
    assert len(blocks) // 4 == 3  # an epoch is 3 steps: step 4 is the middle of the second
    whole, losses = _shard_run(tmp_path / "whole", blocks)
    cut, _ = _shard_run(tmp_path / "cut", blocks, crash_after=5)  # dies in step 6, after the step-4 checkpoint
    assert len(cut) == 5
    again, resumed = _shard_run(tmp_path / "cut", blocks)
    assert cut[:4] + again == whole  # steps 5..7 read after the resume are those of the uninterrupted run
    first_epoch = sum(whole[:3], [])
    assert len(whole) == 7 and len(set(first_epoch)) == 12 and set(first_epoch) <= set(range(13))  # each once
    assert resumed == pytest.approx(losses, rel=1e-6)


# ----------------------------------------------------------------------------------------------- once per run


def _text_corpus(path, n=300, seed=0):
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            f.write(" ".join(f"w{rng.randrange(90)}" for _ in range(rng.randrange(1, 30))) + "\n")


@pytest.mark.slow
def test_a_raw_corpus_is_tokenized_once_whatever_the_ranks(tmp_path):
    """Two launches of two ranks, each rank preparing the data as a job does: one tokenization in all (rank
    0's, of train and test), the same blocks on every rank and in the second launch."""
    from tests.launch import run_ranks, torchrun

    tm.word_tokenizer(str(tmp_path / "model"), causal=True)
    _text_corpus(tmp_path / "corpus.txt")
    count = tmp_path / "count.txt"
    worker = os.path.join(os.path.dirname(__file__), "data_worker.py")
    args = [
        f"teacher.path={tmp_path / 'model'}",
        f"data.source={tmp_path / 'corpus.txt'}",
        "data.max_length=16",
        f"output_dir={tmp_path / 'run'}",
        "data.num_proc=2",
        "data.test_documents=20",
    ]
    results = []
    for launch in range(2):
        run_ranks(torchrun(2, worker, str(count), str(tmp_path / f"out{launch}"), *args), timeout=300)
        results += [json.loads((tmp_path / f"out{launch}-{r}.json").read_text()) for r in range(2)]
    assert count.read_text().splitlines() == ["rank 0", "rank 0"]  # train, then test, by rank 0, once
    assert all(r == results[0] for r in results)
    assert results[0]["keys"] == ["attention_mask", "index", "input_ids", "labels", "position_ids"]  # documents kept
    folders = [p for p in (tmp_path / "run" / "cache").iterdir() if p.name.startswith("tokens-")]
    assert len(folders) == 1 and len(list((folders[0] / "train").glob("tokens-*.bin"))) == 2  # 2 workers
    assert shards.TokenCorpus(str(folders[0] / "test")).n_documents == 20


@pytest.mark.bad_input
def test_a_pretokenized_source_holds_out_its_last_documents(words, tmp_path):
    from fastted.train.config import ConfigError, load_config
    from fastted.train.data import prepare_data, tokenizer_key

    docs = _random_docs(4, n=80)
    corpus_dir = str(tmp_path / "corpus")
    shards.write_corpus(
        _texts(docs), words, corpus_dir, separator_id=3, num_proc=2, identity={"tokenizer": tokenizer_key(words)}
    )
    base = (
        "task=clm",
        "jobs=[distil]",
        f"data.source={corpus_dir}",
        "data.max_length=8",
        f"output_dir={tmp_path / 'run'}",
    )
    data = prepare_data(
        load_config(
            overrides=base + ("data.test_documents=10", "data.max_test_examples=4", "data.max_train_examples=50")
        ),
        words,
    )
    flat, starts = _reference_stream(docs, 3)
    assert (data.train.lo, data.train.hi) == (0, starts[50])  # the first 50 documents
    assert (data.test.lo, data.test.hi) == (starts[70], starts[74])  # the first 4 of the last 10
    assert data.train[0]["input_ids"].tolist() == flat[:8]
    assert data.test[0]["input_ids"].tolist() == flat[starts[70] : starts[70] + 8]
    assert "position_ids" in data.collator([data.train[0]])  # clm: document masks on by default
    mlm = prepare_data(load_config(overrides=base + ("task=mlm",)), _with_mask(words))
    assert "position_ids" not in mlm.collator([mlm.train[0]], None)  # mlm: off by default
    assert len(data.test) == (starts[74] - starts[70]) // 8

    # the default: test_fraction of the documents, at most TEST_DOCUMENTS
    default = prepare_data(load_config(overrides=base), words)
    assert default.test.lo == starts[80 - 16]  # 20 % of 80

    prepare_data(load_config(overrides=base), tm.word_tokenizer(str(tmp_path / "same")))  # the same vocabulary
    other = tm.word_tokenizer(str(tmp_path / "other"), causal=True)
    other.add_tokens(["w-new"])  # another vocabulary: refused
    with pytest.raises(
        ConfigError,
        match=f"data.source: {corpus_dir} was tokenized by .*tok.*, whose vocabulary "
        f"differs from this run's tokenizer's .*other.*, 98 tokens",
    ):
        prepare_data(load_config(overrides=base), other)


def _with_mask(tokenizer):
    tokenizer.mask_token = "[MASK]"
    return tokenizer
