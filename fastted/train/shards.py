"""A corpus tokenized once: memory-mapped token shards and the packed blocks every rank reads from them.

The format (a folder, :data:`META` last written, so a folder with it is whole)::

    meta.json          {"format": "fastted-tokens", "version": 1, "shards": [...], "tokens", "documents", ...}
    tokens-00000.bin   the token ids of a run of documents, each followed by the separator, back to back
                       (raw little-endian uint16 when the vocabulary fits, else uint32)
    docs-00000.npy     int64: where each document of that shard ends (its separator included), in tokens

It is Megatron's ``.bin`` / ``.idx`` idea, not ``datasets``' Arrow files: packing needs only the flat stream
and the document ends, a block is one slice of a memory map (no per-row list offsets, no Arrow reader at
training time, nothing read but the block's own pages), and numpy alone reads it. The corpus is the shards'
streams in order; a shard is what one tokenizing worker wrote, so the stream is the same whatever ``num_proc``.

A folder of ``.npy`` token arrays (1-D, integer) is a corpus too: each array is a stream whose documents end
at the separator. Its document ends are found once (:func:`index_token_arrays`) and kept in a meta.json of
their own that points at the arrays where they are.

:class:`PackedBlocks` cuts a token range of a corpus into blocks of ``block_size`` (the last incomplete one
dropped) and gives each block with the positions at which a document starts inside it; the collators restart
position ids there and keep attention and the loss inside each document (:mod:`fastted.train.data`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from typing import Optional

import numpy as np

from fastted.files import write_atomic

META = "meta.json"
FORMAT = "fastted-tokens"
VERSION = 1
WAIT_POLL = 1.0  # seconds between the looks of a rank waiting for another's shards
_ERROR = "error.txt"  # written by the tokenizing rank when it fails, so the waiting ranks stop too
_SCAN_TOKENS = 2**26  # tokens of a token array read at a time while its separators are found
_TEXTS = 1000  # documents a tokenizing worker encodes at a time


class CorpusError(ValueError):
    """A token corpus that cannot be read: the message names the folder, the file and the command that rebuilds
    it."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def is_corpus(path: str) -> bool:
    """Whether ``path`` is a folder of fastted token shards (it has a meta.json of this format)."""
    meta = os.path.join(os.path.expanduser(str(path)), META)
    if not os.path.isfile(meta):
        return False
    try:
        with open(meta, encoding="utf-8") as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def token_arrays(path: str) -> list[str]:
    """The ``.npy`` files of a folder that holds nothing else of data (a folder of token arrays), sorted; [] for
    anything else."""
    folder = os.path.expanduser(str(path))
    if not os.path.isdir(folder) or os.path.exists(os.path.join(folder, META)):
        return []
    names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
    arrays = [n for n in names if n.endswith(".npy")]
    return [os.path.join(folder, n) for n in arrays] if arrays and len(arrays) == len(names) else []


# ----------------------------------------------------------------------------------------------- writing


_JOBS: list = []  # write_corpus's pieces, set before the workers fork: they inherit them, nothing is pickled


def _encode_piece(number: int) -> dict:
    """One worker's part: tokenize its contiguous piece of the corpus and write its shard."""
    dataset, tokenizer, text_field, separator_id, dtype, directory = _JOBS[number]
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the workers are the parallelism: one thread each
    tokens_name, docs_name = f"tokens-{number:05d}.bin", f"docs-{number:05d}.npy"
    ends, count, top = [], 0, -1
    extra = [] if separator_id is None else [separator_id]
    with open(os.path.join(directory, tokens_name), "wb") as out:
        for batch in dataset.iter(batch_size=_TEXTS):
            texts = [t if isinstance(t, str) else "" for t in batch[text_field]]
            ids = tokenizer(
                texts, truncation=False, return_attention_mask=False, return_token_type_ids=False, verbose=False
            )["input_ids"]
            lengths = np.fromiter((len(x) + len(extra) for x in ids), np.int64, len(ids))
            flat = np.fromiter((t for x in ids for t in (*x, *extra)), np.int64, int(lengths.sum()))
            if flat.size:
                top = max(top, int(flat.max()))
            out.write(flat.astype(dtype).tobytes())
            ends.append(count + np.cumsum(lengths))
            count += int(lengths.sum())
    docs = np.concatenate(ends) if ends else np.zeros(0, np.int64)
    np.save(os.path.join(directory, docs_name), docs)
    return {"tokens": tokens_name, "docs": docs_name, "n_tokens": count, "n_docs": int(docs.size), "top": top}


def write_corpus(
    dataset,
    tokenizer,
    directory: str,
    *,
    text_field: str = "text",
    separator_id: Optional[int],
    num_proc: int = 1,
    identity: Optional[dict] = None,
) -> dict:
    """Tokenize the ``text_field`` of every row of ``dataset`` (a ``datasets.Dataset``, in row order) with the
    tokenizer's special tokens, follow each document with ``separator_id``, and write the shards into
    ``directory`` (replaced whole: written under ``directory.tmp`` and renamed). ``num_proc`` workers each take a
    contiguous piece of the rows and write one shard. Returns the meta."""
    import multiprocessing

    if text_field not in dataset.column_names:
        raise ValueError(
            f"data.text_field = {text_field!r} is not a column of the dataset; it has {dataset.column_names}"
        )
    dtype = token_dtype(len(tokenizer))
    tmp = _fresh(directory)
    rows = dataset.select_columns([text_field])
    pieces = max(1, min(int(num_proc), len(rows)))
    _JOBS[:] = [
        (rows.shard(pieces, i, contiguous=True), tokenizer, text_field, separator_id, dtype, tmp) for i in range(pieces)
    ]
    try:  # forked workers, one alone too, so the tokenizer's own threads stay as they were in this process
        with multiprocessing.get_context("fork").Pool(pieces) as pool:
            shards = pool.map(_encode_piece, range(pieces), chunksize=1)
    finally:
        _JOBS.clear()
    top = max(s.pop("top") for s in shards)
    if top >= np.iinfo(dtype).max + 1:
        raise ValueError(f"tokenizer: gave the id {top}, which {dtype} cannot hold (len(tokenizer) = {len(tokenizer)})")
    for shard in shards:
        shard["dtype"] = dtype.name
    return _publish(tmp, directory, shards, separator_id, len(tokenizer), identity)


def index_token_arrays(
    arrays: Sequence[str], directory: str, *, separator_id: Optional[int], identity: Optional[dict] = None
) -> dict:
    """A corpus over a folder's ``.npy`` token arrays, where they are: the document ends (after each
    ``separator_id``, and at each array's end) found a window at a time and written to ``directory`` with a
    meta.json that names the arrays. Returns the meta."""
    tmp = _fresh(directory)
    shards = []
    for number, path in enumerate(arrays):
        array = np.load(path, mmap_mode="r")
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
            raise CorpusError(
                f"data.source: {path} holds a {array.ndim}-D {array.dtype} array; a token array is 1-D and of integers"
            )
        ends = []
        for lo in range(0, array.size, _SCAN_TOKENS):
            window = np.asarray(array[lo : lo + _SCAN_TOKENS])
            if separator_id is not None:
                ends.append(lo + 1 + np.flatnonzero(window == separator_id))
            if window.size and int(window.min()) < 0:
                raise CorpusError(f"data.source: {path} holds the negative token id {int(window.min())}")
        docs = np.concatenate(ends) if ends else np.zeros(0, np.int64)
        if array.size and (docs.size == 0 or docs[-1] != array.size):  # the array's tail is a document too
            docs = np.append(docs, array.size)
        docs_name = f"docs-{number:05d}.npy"
        np.save(os.path.join(tmp, docs_name), docs.astype(np.int64))
        shards.append(
            {
                "tokens": os.path.abspath(path),
                "offset": int(array.offset),
                "dtype": array.dtype.str,
                "n_tokens": int(array.size),
                "n_docs": int(docs.size),
                "docs": docs_name,
            }
        )
        del array
    return _publish(tmp, directory, shards, separator_id, None, identity)


def _fresh(directory: str) -> str:
    """An empty folder beside ``directory`` to write its shards into: ``directory.tmp``."""
    tmp = directory + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def _publish(
    tmp: str,
    directory: str,
    shards: list,
    separator_id: Optional[int],
    vocab_size: Optional[int],
    identity: Optional[dict],
) -> dict:
    """Close the folder ``tmp`` (from :func:`_fresh`) with its meta.json, written last, and rename it to
    ``directory`` (replacing an older one). Returns the meta."""
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "shards": shards,
        "tokens": sum(s["n_tokens"] for s in shards),
        "documents": sum(s["n_docs"] for s in shards),
        "separator_id": separator_id,
        "vocab_size": vocab_size,
        "identity": identity or {},
    }
    write_atomic(os.path.join(tmp, META), json.dumps(meta, indent=1))
    if os.path.isdir(directory):
        shutil.rmtree(directory)
    os.rename(tmp, directory)
    return meta


# ----------------------------------------------------------------------------------------------- once per run


def made_once(directory: str, make, *, rank: int, rebuild: str, timeout: Optional[float] = None) -> None:
    """``make()`` on rank 0 when ``directory`` has no meta.json yet, while every other rank waits for it.

    The others wait by looking for the folder's meta.json, not at a collective barrier: tokenizing a large corpus
    takes hours, longer than the process group's timeout. A failure on rank 0 is written to the folder's
    ``error.txt``, which ends the others' wait with a :class:`CorpusError` (``rebuild`` names what to run)."""
    meta = os.path.join(directory, META)
    failed = directory + "." + _ERROR
    if rank == 0:
        if os.path.isfile(meta):
            return
        if os.path.exists(failed):
            os.remove(failed)
        try:
            make()
        except BaseException as error:
            write_atomic(failed, f"{type(error).__name__}: {error}")
            raise
        return
    start = time.monotonic()
    while not os.path.isfile(meta):
        if os.path.exists(failed) and os.path.getmtime(failed) >= _started_at():
            with open(failed, encoding="utf-8") as f:
                raise CorpusError(f"{directory}: rank 0 failed to make it ({f.read().strip()}); {rebuild}")
        if timeout is not None and time.monotonic() - start > timeout:
            raise CorpusError(f"{directory}: no meta.json after {timeout:.0f} s of waiting for rank 0; {rebuild}")
        time.sleep(WAIT_POLL)


def _started_at() -> float:
    """When this process started (an error file older than that is a former run's)."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat", encoding="ascii") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK") - 2.0
    except (OSError, ValueError, StopIteration, IndexError):
        return 0.0


# ----------------------------------------------------------------------------------------------- reading


class TokenCorpus:
    """A folder of token shards, opened: its meta checked and each file's size against it (no file is read
    whole); the shards are mapped on first use. ``rebuild`` is what a :class:`CorpusError` tells the user to
    run."""

    def __init__(self, directory: str, rebuild: str = "delete the folder and run again"):
        self.directory = os.path.expanduser(str(directory))
        path = os.path.join(self.directory, META)
        try:
            with open(path, encoding="utf-8") as f:
                meta = json.load(f)
        except (OSError, ValueError) as error:
            raise CorpusError(f"{path}: cannot read the corpus's meta ({error}); {rebuild}") from None
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise CorpusError(
                f"{path}: format {meta.get('format')!r} version {meta.get('version')!r}, needs "
                f"{FORMAT!r} version {VERSION}; {rebuild}"
            )
        self.meta = meta
        self.shards = meta["shards"]
        for shard in self.shards:
            tokens, docs = self._path(shard["tokens"]), self._path(shard["docs"])
            need = shard.get("offset", 0) + shard["n_tokens"] * np.dtype(shard["dtype"]).itemsize
            for file, size in ((tokens, need), (docs, None)):
                if not os.path.isfile(file):
                    raise CorpusError(f"{self.directory}: the shard file {file} is missing; {rebuild}")
                if size is not None and os.path.getsize(file) < size:
                    raise CorpusError(
                        f"{self.directory}: {file} holds {os.path.getsize(file)} bytes, its meta "
                        f"says {size}: it was cut short or changed; {rebuild}"
                    )
        counts = np.array([s["n_tokens"] for s in self.shards], np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])  # (shards + 1,) first token of each shard
        self.n_tokens = int(self.starts[-1])
        self.n_documents = int(sum(s["n_docs"] for s in self.shards))
        self.separator_id = meta.get("separator_id")
        self._tokens: dict[int, np.ndarray] = {}
        self._docs: dict[int, np.ndarray] = {}

    def _path(self, name: str) -> str:
        return name if os.path.isabs(name) else os.path.join(self.directory, name)

    def tokens_of(self, i: int) -> np.ndarray:
        if i not in self._tokens:
            shard = self.shards[i]
            self._tokens[i] = np.memmap(
                self._path(shard["tokens"]),
                dtype=np.dtype(shard["dtype"]),
                mode="r",
                offset=shard.get("offset", 0),
                shape=(shard["n_tokens"],),
            )
        return self._tokens[i]

    def docs_of(self, i: int) -> np.ndarray:
        if i not in self._docs:
            docs = np.load(self._path(self.shards[i]["docs"]), mmap_mode="r")
            if docs.shape != (self.shards[i]["n_docs"],):
                raise CorpusError(
                    f"{self.directory}: {self.shards[i]['docs']} holds {docs.shape} ends, its meta "
                    f"says {self.shards[i]['n_docs']}"
                )
            self._docs[i] = docs
        return self._docs[i]

    def tokens(self, lo: int, hi: int) -> np.ndarray:
        """The stream's tokens [lo, hi) as int64 (a copy of the pages they are on)."""
        out = np.empty(hi - lo, np.int64)
        first = int(np.searchsorted(self.starts, lo, side="right")) - 1
        at = lo
        for i in range(first, len(self.shards)):
            if at >= hi:
                break
            base = int(self.starts[i])
            take = min(hi, int(self.starts[i + 1])) - at
            if take > 0:
                out[at - lo : at - lo + take] = self.tokens_of(i)[at - base : at - base + take]
                at += take
        return out

    def document_ends(self, lo: int, hi: int) -> np.ndarray:
        """The stream positions in (lo, hi) at which a document ends (so the next one starts), sorted."""
        found = []
        first = max(int(np.searchsorted(self.starts, lo, side="right")) - 1, 0)
        for i in range(first, len(self.shards)):
            base = int(self.starts[i])
            if base >= hi:
                break
            docs = self.docs_of(i)
            a, b = np.searchsorted(docs, lo - base, side="right"), np.searchsorted(docs, hi - base, side="left")
            found.append(np.asarray(docs[a:b]) + base)
        return np.concatenate(found) if found else np.zeros(0, np.int64)

    def document_end(self, d: int) -> int:
        """Where document ``d`` (0-based over the whole corpus) ends in the stream."""
        if not 0 <= d < self.n_documents:
            raise IndexError(f"document {d} of {self.n_documents}")
        for i, shard in enumerate(self.shards):
            if d < shard["n_docs"]:
                return int(self.starts[i]) + int(self.docs_of(i)[d])
            d -= shard["n_docs"]
        raise IndexError(d)

    def fingerprint(self) -> str:
        """What identifies the corpus without reading it: its meta (shard sizes and identity)."""
        return hashlib.sha256(json.dumps(self.meta, sort_keys=True).encode()).hexdigest()


class PackedBlocks:
    """Blocks of ``block_size`` tokens cut from the tokens [lo, hi) of ``corpus`` (the last incomplete block
    dropped): a sequence of examples ``{"input_ids": (T,) int64, "doc_starts": positions in the block where a
    document starts (never 0), "index": the block's number}``. Nothing is read until a block is asked for."""

    def __init__(self, corpus: TokenCorpus, block_size: int, lo: int = 0, hi: Optional[int] = None):
        self.corpus, self.block_size = corpus, int(block_size)
        self.lo, self.hi = int(lo), corpus.n_tokens if hi is None else int(hi)
        self.n = max(self.hi - self.lo, 0) // self.block_size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not 0 <= i < self.n:
            raise IndexError(f"block {i} of {self.n}")
        lo = self.lo + i * self.block_size
        hi = lo + self.block_size
        return {
            "input_ids": self.corpus.tokens(lo, hi),
            "doc_starts": self.corpus.document_ends(lo, hi) - lo,
            "index": i,
        }

    @property
    def fingerprint(self) -> str:
        """The blocks' identity: the corpus's, the token range and the block size (nothing of the tokens read)."""
        return hashlib.sha256(f"{self.corpus.fingerprint()}:{self.lo}:{self.hi}:{self.block_size}".encode()).hexdigest()
