"""Files that a kill never leaves half-written, and their hashes: the one copy every writer of fastted uses
(checkpoints and their manifests, metrics, configs, TED's filters, the layer-wise loss, the teacher cache,
a job's result). ``bytes_hashed`` counts the bytes this process has hashed, so that a test can hold the
checkpoint checks to their budget (each rank hashes only its share)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import Union

bytes_hashed = 0  # bytes read by sha256_file in this process, ever (tests take differences)


def write_atomic(path: Union[str, os.PathLike], content: Union[str, Callable[[str], None]]) -> None:
    """Write ``path`` through a temporary file beside it, flushed to disk and renamed over it: a kill leaves the
    old file or the new one. ``content`` is UTF-8 text, or a function that writes the file at the path it is
    given (``lambda tmp: save_file(tensors, tmp)``)."""
    path = os.fspath(path)
    directory, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{name}.tmp-{os.getpid()}")
    try:
        if isinstance(content, str):
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(content)
        else:
            content(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class HashingWriter:
    """A binary file-like that hashes what it writes on its way to ``file``: the SHA-256 of a file written
    through it costs no second read (:meth:`record`; not counted in ``bytes_hashed``, which counts reads)."""

    def __init__(self, file):
        self._file, self._sha, self.bytes = file, hashlib.sha256(), 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self._sha.update(view)
        self.bytes += view.nbytes
        return self._file.write(view)

    def flush(self) -> None:
        self._file.flush()

    def record(self) -> dict:
        """``{"bytes": size, "sha256": hex}`` of what was written: a manifest's record of the file."""
        return {"bytes": self.bytes, "sha256": self._sha.hexdigest()}


def sha256_file(path: Union[str, os.PathLike]) -> str:
    """The SHA-256 of a file's bytes, in hex (added to ``bytes_hashed``)."""
    global bytes_hashed
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        bytes_hashed += f.tell()
    return digest
