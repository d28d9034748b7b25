"""A teacher's identity, read from what describes it and from none of its weights.

A teacher cache (:mod:`fastted.train.cache`) records the identity of the teacher it was made from; a run that distils
from the cache checks its own teacher's against it, and so never needs the teacher itself.
:func:`teacher_identity` reads:

- the teacher's config: the canonical JSON of its ``config.json`` (keys sorted), or the metadata of its GGUF file;
- each weight file (those of the folder's index, or its single file: :func:`fastted.train.loading.weight_files`): its
  name and size; for safetensors the SHA-256 of its header, which lists every tensor's name, dtype, shape and
  offsets and holds none of their values; for GGUF the SHA-256 of its tensor table (names, shapes, types,
  offsets); and where the file is a link into a Hugging Face hub cache's ``blobs/`` folder the blob's name, which
  is the SHA-256 of the file's content, else its modification time (nanoseconds);
- for a fresh teacher (``teacher.random_init``, nothing read) its source's config, the shape settings
  (``teacher.num_layers``, ``hidden_size``, ``intermediate_size``), the seed that draws it and the versions of
  torch and transformers that draw it.

Only the headers are read, each with exact reads (no buffer reads ahead into the values). The tokenizer is not
part of it: the cache's identity holds its own ``tokenizer`` key.

Limits: what is compared is the description of the weights, not the weights. A checkpoint rewritten in place
with the same tensors, shapes and size is told apart by its modification time (or, in a hub cache, its blob id):
a copy that does not keep modification times (``cp`` without ``-p``) no longer matches, and a rewrite that
restores the old time matches. A fresh teacher's values also depend on the device that draws them (a teacher
built partitioned on an accelerator draws from that device's generator), which the record does not hold.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Optional

# GGUF metadata value types (the format's numbering): the bytes of each fixed-size one; strings and arrays apart
_GGUF_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def teacher_identity(config, folder: Optional[str] = None) -> dict:
    """The identity of the run's teacher as :func:`fastted.train.loading.build_teacher` builds it from ``folder`` (a
    job's model folder), or from the teacher source when ``folder`` is None, without reading any weight (see the
    module docstring): ``{"config": <SHA-256>, "weights": <SHA-256>}``, or for a fresh teacher ``{"config":
    <SHA-256>, "fresh": {seed, shape settings, versions}}``. JSON-able; equal for the same teacher."""
    from fastted.train.sources import model_source

    gguf = None
    if folder is None:
        folder, gguf = model_source(config.teacher, "teacher")
        if config.teacher.random_init:
            return {"config": _config_digest(folder, gguf), "fresh": _fresh(config)}
    if gguf:
        path = os.path.join(folder, gguf)
        metadata, tensors = gguf_header(path)
        return {"config": metadata, "weights": _digest([_file_record(path, folder, tensors)])}
    from fastted.train.loading import weight_files

    records = []
    for path in weight_files(folder):
        header = _sha256(safetensors_header(path)) if path.endswith(".safetensors") else None
        records.append(_file_record(path, folder, header))
    return {"config": _config_digest(folder, None), "weights": _digest(records)}


def safetensors_header(path: str) -> bytes:
    """The JSON header of the safetensors file ``path`` (its tensors' names, dtypes, shapes and offsets), read
    alone: the 8 bytes of its length, then the header."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        length = int.from_bytes(_read_exactly(f, 8, path), "little")
        if length > size - 8:
            raise ValueError(f"{path}: a safetensors header of {length} bytes in a file of {size} (damaged)")
        return _read_exactly(f, length, path)


def gguf_header(path: str) -> tuple[str, str]:
    """(SHA-256 of the metadata, SHA-256 of the tensor table) of the GGUF file ``path``: the bytes from its start
    to the end of its key-value metadata (version and counts included), and those of its tensor table (each
    tensor's name, shape, type and offset). Nothing after the table is read."""
    with open(path, "rb", buffering=0) as f:
        read = _HashedReader(f, path)
        if read.take(4) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (no GGUF magic)")
        version = read.u32()
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version}; fastted reads versions 2 and 3 (little-endian)")
        n_tensors, n_values = read.u64(), read.u64()
        for _ in range(n_values):
            read.take(read.u64())  # the key
            read.skip_value(read.u32())
        metadata, read.digest = read.digest.hexdigest(), hashlib.sha256()
        for _ in range(n_tensors):
            read.take(read.u64())  # the name
            read.take(8 * read.u32())  # the dimensions
            read.take(4 + 8)  # the type and the offset
        return metadata, read.digest.hexdigest()


class _HashedReader:
    """Exact reads from an unbuffered file, each added to ``digest``."""

    def __init__(self, file, path: str):
        self.file, self.path, self.digest = file, path, hashlib.sha256()

    def take(self, n: int) -> bytes:
        data = _read_exactly(self.file, n, self.path)
        self.digest.update(data)
        return data

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]

    def skip_value(self, kind: int) -> None:
        if kind in _GGUF_FIXED:
            self.take(_GGUF_FIXED[kind])
        elif kind == _GGUF_STRING:
            self.take(self.u64())
        elif kind == _GGUF_ARRAY:
            inner, count = self.u32(), self.u64()
            if inner in _GGUF_FIXED:
                self.take(_GGUF_FIXED[inner] * count)
            else:
                for _ in range(count):
                    self.skip_value(inner)
        else:
            raise ValueError(f"{self.path}: unknown GGUF value type {kind} (damaged?)")


def _read_exactly(file, n: int, path: str) -> bytes:
    parts, left = [], n
    while left:
        chunk = file.read(left)
        if not chunk:
            raise ValueError(f"{path}: ends inside its header (damaged)")
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def _file_record(path: str, folder: str, header: Optional[str]) -> dict:
    """A weight file's name, size, header digest (None: a format without one) and content id: its hub blob's
    name, else its modification time."""
    stat = os.stat(path)
    record = {"file": os.path.relpath(path, folder), "bytes": stat.st_size}
    if header is not None:
        record["header"] = header
    target = os.path.realpath(path)
    if os.path.islink(path) and os.path.basename(os.path.dirname(target)) == "blobs":
        record["blob"] = os.path.basename(target)
    else:
        record["mtime_ns"] = stat.st_mtime_ns
    return record


def _config_digest(folder: str, gguf: Optional[str]) -> str:
    """SHA-256 of the canonical JSON of ``folder``'s config.json, or of the metadata of its GGUF file."""
    from fastted.train.config import ConfigError

    if gguf:
        return gguf_header(os.path.join(folder, gguf))[0]
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{folder}: no config.json (not a Hugging Face model folder)")
    with open(path, encoding="utf-8") as f:
        return _digest(json.load(f))


def _fresh(config) -> dict:
    """What draws a fresh teacher besides its source's config."""
    from importlib.metadata import version

    t = config.teacher
    return {
        "seed": config.seed,
        "num_layers": t.num_layers,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "torch": version("torch"),
        "transformers": version("transformers"),
    }


def _digest(value) -> str:
    return _sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode())


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
