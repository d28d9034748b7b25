"""GGUF sources as plain Hugging Face folders, converted once, tensor by tensor.

Loading a GGUF file with transformers (``from_pretrained(path, gguf_file=...)``) de-quantizes the whole model
into one state dict in memory, on every rank that loads it. :func:`hf_folder` instead converts the file once
into a model folder that every later load reads like any other (memory-mapped safetensors, partitioned under
ZeRO-3 by :mod:`fastted.models`):

- ``config.json``: the transformers config read from the GGUF's metadata;
- ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``: the weights in float32 (what
  transformers' own GGUF load gives), in shards of at most ``max_shard_bytes`` (a tensor larger than that has a
  shard of its own);
- the tokenizer read from the GGUF, saved with ``save_pretrained``;
- ``fastted-gguf.json``: a manifest of the source file and of every file above with its size, written last.

The conversion reads the file through the gguf package's memory-mapped ``GGUFReader`` and holds one tensor at a
time (a shard is written as its tensors come, and the file's pages are dropped from the process every 64 MiB
read): each tensor is de-quantized, renamed and processed by transformers' own GGUF functions
(``modeling_gguf_pytorch_utils``: the GGUF-to-HF name map of a model built on the meta device, and the
architecture's tensor processor, which e.g. reverses llama.cpp's q/k permutation), added to the current shard
and freed with it. GGUF tensors that the model has no parameter for are skipped, as transformers skips them.

The folder sits in ``cache_root`` under ``<gguf stem>-<16 hex digits>``: the digits hash the file's real path,
size and modification time (nanoseconds) and the versions of the converter, transformers and gguf, so a changed
file (or converter) converts again and an unchanged one is found without reading it. It is written into a
temporary folder unique to the host and process, beside it, and renamed into place: the rename is the commit.
Global rank 0 converts first; with a ``cache_root`` shared between nodes that is the only conversion, and on
node-local storage each other node's local rank 0 then converts its own copy (should two processes convert one
folder, the first rename wins and the other discards its copy). A folder whose manifest is missing or whose files
differ from it in
size is never used: it is converted again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import mmap
import os
import re
import shutil
import socket
import struct
from collections.abc import Callable
from contextlib import contextmanager
from typing import NamedTuple, Optional

# Raised when the written layout or the processing changes, so that older folders convert again.
CONVERTER_VERSION = 1
MANIFEST = "fastted-gguf.json"
INDEX = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 1 << 30
UNMAP_BYTES = 64 << 20  # bytes of the GGUF read between drops of its pages from the process


def cache_key(path: str) -> str:
    """The name of ``path``'s converted folder: ``<stem>-<16 hex digits>`` (see the module docstring)."""
    stat = os.stat(path)
    identity = json.dumps(
        [os.path.realpath(path), stat.st_size, stat.st_mtime_ns, CONVERTER_VERSION, *_versions().values()]
    )
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.splitext(os.path.basename(path))[0])
    return f"{stem}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}"


def _versions() -> dict:
    from importlib.metadata import version

    return {"transformers": version("transformers"), "gguf": version("gguf")}


def is_complete(folder: str) -> bool:
    """True when ``folder`` holds a manifest and every file it lists, at its size."""
    try:
        with open(os.path.join(folder, MANIFEST), encoding="utf-8") as f:
            files = json.load(f)["files"]
        return all(os.path.getsize(os.path.join(folder, name)) == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def hf_folder(folder: str, gguf_file: str, cache_root: str, *, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> str:
    """The Hugging Face model folder converted from ``folder``/``gguf_file``, in ``cache_root``.

    Collective: every rank calls it. Global rank 0 converts the file first when its folder is missing or
    incomplete, while the others wait; then, when ``cache_root`` is node-local storage (the folder is still
    missing on a node), local rank 0 of that node converts its own copy (env ``LOCAL_RANK``, 0 without a
    launcher). With a shared ``cache_root`` the file is therefore converted once, not once per node. Raises a
    ValueError naming ``gguf_file`` when there is no such file, a RuntimeError when called under a launcher
    (``WORLD_SIZE`` > 1) before torch.distributed is initialized, and on every rank when a conversion failed (the
    rank that converted raises its own error).
    """
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        raise RuntimeError(
            "hf_folder is collective: call it on every rank once torch.distributed is initialized "
            "(fastted.train.engine.init_distributed), or the ranks that wait would not wait"
        )
    path = os.path.join(folder, gguf_file)
    if not os.path.isfile(path):
        raise ValueError(f"gguf_file: no file {gguf_file!r} in {folder!r} (needs a .gguf file)")
    target = os.path.join(cache_root, cache_key(path))
    rank = dist.get_rank() if dist.is_initialized() else 0
    _convert_where(rank == 0, path, target, max_shard_bytes)  # shared storage: once for the whole job
    _convert_where(int(os.environ.get("LOCAL_RANK", "0")) == 0, path, target, max_shard_bytes)  # node-local
    if not is_complete(target):
        raise RuntimeError(
            f"the GGUF {path} was not converted into {target}: {cache_root!r} is not the same "
            f"folder on this rank as on the rank that converted it"
        )
    return target


def _convert_where(converts: bool, path: str, target: str, max_shard_bytes: int) -> None:
    """Convert on the ranks where ``converts`` holds and the folder is missing, then agree over all ranks
    whether any conversion failed (a failure on one rank is an error on all, never a rank left waiting)."""
    import torch
    import torch.distributed as dist

    error = None
    if converts and not is_complete(target):
        try:
            convert(path, target, max_shard_bytes=max_shard_bytes)
        except BaseException as e:  # the others must not wait for it forever
            error = e
    failed = int(error is not None)
    if dist.is_initialized() and dist.get_world_size() > 1:
        on_gpu = dist.get_backend() == "nccl"
        flag = torch.tensor([failed], device=torch.device("cuda", torch.cuda.current_device()) if on_gpu else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        failed = int(flag.item())
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"the conversion of the GGUF {path} into {target} failed on another rank (see its error)")


def convert(path: str, target: str, *, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """Convert the GGUF ``path`` into the model folder ``target`` (see the module docstring); a complete
    ``target`` written meanwhile by another process is kept, an incomplete one replaced."""
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    _remove_dead_temporaries(target)
    tmp = f"{target}.tmp-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        _write_folder(path, tmp, max_shard_bytes)
        _commit(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _commit(tmp: str, target: str) -> None:
    """Rename ``tmp`` to ``target``; a complete ``target`` (another node's) wins, an incomplete one is moved
    aside and removed first."""
    if os.path.exists(target) and not is_complete(target):
        aside = f"{tmp}.damaged"
        try:
            os.rename(target, aside)
        except OSError:  # another process moved it first
            pass
        shutil.rmtree(aside, ignore_errors=True)
    try:
        os.rename(tmp, target)
    except OSError:
        if not is_complete(target):
            raise


def _remove_dead_temporaries(target: str) -> None:
    """Remove the temporary folders of ``target`` that this host's conversions left when they were killed."""
    parent, name = os.path.split(os.path.abspath(target))
    pattern = re.compile(re.escape(f"{name}.tmp-{socket.gethostname()}-") + r"(\d+)(\.damaged)?$")
    for entry in os.listdir(parent):
        match = pattern.match(entry)
        if match and not _alive(int(match.group(1))):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_folder(path: str, out: str, max_shard_bytes: int) -> None:
    """Write config, tokenizer, weight shards, index and (last) manifest of the GGUF ``path`` into ``out``."""
    import torch
    import transformers as tf

    folder, name = os.path.split(os.path.abspath(path))
    tensors, architecture, unmap = _tensor_table(path)
    config_dict, _ = tf.PretrainedConfig.get_config_dict(folder, gguf_file=name)
    config = _config(config_dict, architecture, path)
    config.dtype = torch.float32
    config.save_pretrained(out)
    tokenizer = tf.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tokenizer.save_pretrained(out)
    del tokenizer
    _release_freed_memory()  # the metadata parsed three times (vocabulary included): gone before the tensors
    weight_map, skipped, total = _write_weights(tensors, architecture, config_dict, config, out, max_shard_bytes, unmap)
    with open(os.path.join(out, INDEX), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    for entry in os.listdir(out):  # config and tokenizer files, on disk before the manifest says they are
        _fsync(os.path.join(out, entry))
    stat = os.stat(path)
    files = {entry: os.path.getsize(os.path.join(out, entry)) for entry in sorted(os.listdir(out))}
    manifest = {
        "source": os.path.realpath(path),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "converter_version": CONVERTER_VERSION,
        **_versions(),
        "dtype": "float32",
        "parameter_bytes": total,
        "skipped_gguf_tensors": skipped,
        "files": files,
    }
    with open(os.path.join(out, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _config(config_dict: dict, architecture: str, path: str):
    """The transformers config of a GGUF's parsed metadata (as ``AutoConfig.from_pretrained`` builds it)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        from transformers.integrations.gguf import GGUF_CONFIG_ARCHS
    except ImportError:  # transformers before its packed GGUF path
        GGUF_CONFIG_ARCHS = {}

    if architecture in GGUF_CONFIG_ARCHS:  # read by transformers' packed-weights path, not the legacy one
        raise ValueError(
            f"gguf_file: {path} is a {architecture!r} model, which transformers loads through its "
            f"packed GGUF path; converting it tensor by tensor is not supported (convert it with "
            f"transformers' from_pretrained(..., gguf_file=...) and save_pretrained instead)"
        )
    return CONFIG_MAPPING[config_dict["model_type"]].from_dict(dict(config_dict))


class _Tensor(NamedTuple):
    """One tensor of a GGUF file: its name, ggml type and values as ``GGUFReader`` gives them (a view of a
    read-only memory map of the file)."""

    name: str
    tensor_type: object  # gguf.GGMLQuantizationType
    data: object  # numpy array


def _tensor_table(path: str) -> tuple[list[_Tensor], str, Callable[[], None]]:
    """(the tensors of the GGUF ``path``, its ``general.architecture``, a function that drops the file's pages
    read so far from this process: they stay in the page cache, and a later read maps them again).

    ``GGUFReader`` parses every metadata value into numpy views (for a 49152-token vocabulary about 150 MB);
    its tensors keep views into the same arenas, so kept alive they would pin most of that. Only the tensors'
    places are kept, as plain values, and their views rebuilt on a memory map of the file of their own."""
    import gguf
    import numpy as np
    from transformers.modeling_gguf_pytorch_utils import read_field

    reader = gguf.GGUFReader(path)
    architecture = read_field(reader, "general.architecture")[0]
    places = [
        (t.name, int(t.tensor_type), int(t.data_offset), tuple(int(d) for d in t.data.shape), t.data.dtype.str)
        for t in reader.tensors
    ]
    del reader
    _release_freed_memory()
    blob = np.memmap(path, mode="r", dtype=np.uint8)
    tensors = []
    for name, tensor_type, offset, shape, dtype in places:
        dtype = np.dtype(dtype)
        count = math.prod(shape)
        data = blob[offset : offset + count * dtype.itemsize].view(dtype).reshape(shape)
        tensors.append(_Tensor(name, gguf.GGMLQuantizationType(tensor_type), data))

    def unmap() -> None:
        raw = getattr(blob, "_mmap", None)
        if raw is not None and hasattr(mmap, "MADV_DONTNEED"):
            raw.madvise(mmap.MADV_DONTNEED)

    return tensors, architecture, unmap


def _release_freed_memory() -> None:
    """Collect garbage and hand the C heap's free pages back to the system (glibc ``malloc_trim``)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _dequantized(info, chunk_elements: int = 1 << 22):
    """The float32 values of one GGUF tensor (:class:`_Tensor`), in a fresh writable array, de-quantized a slab
    of rows at a time so that the de-quantizer's temporaries stay small."""
    import numpy as np
    from gguf import dequantize

    data = info.data
    if data.ndim < 2:
        return np.array(dequantize(data, info.tensor_type), dtype=np.float32)
    row = dequantize(data[:1], info.tensor_type)
    out = np.empty((data.shape[0], *row.shape[1:]), dtype=np.float32)
    step = max(1, chunk_elements // max(1, row.size))
    for start in range(0, data.shape[0], step):
        out[start : start + step] = dequantize(data[start : start + step], info.tensor_type)
    return out


@contextmanager
def _name_maps_cached():
    """``gguf.get_tensor_name_map`` memoized for the block: transformers' ``get_gguf_hf_weights_map`` asks it
    for the same architecture's map once per module of the model (seconds for a few hundred modules)."""
    import gguf

    original = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original


class _StreamedShard:
    """A safetensors file of float32 tensors written one tensor at a time, so a shard is never held in memory:
    each tensor's bytes are appended to a data file beside it as it comes, and :meth:`close` writes the header
    (known only then) and copies the data after it."""

    def __init__(self, path: str):
        self.path, self.bytes = path, 0
        self._entries: list[tuple[str, list]] = []
        self._data = open(path + ".data", "wb")

    def add(self, name: str, tensor) -> None:
        import torch

        if tensor.dtype != torch.float32:
            raise TypeError(f"{name}: a converted tensor is float32, got {tensor.dtype}")
        values = tensor.detach().contiguous().numpy()
        self._entries.append((name, list(values.shape), self.bytes, self.bytes + values.nbytes))
        self._data.write(memoryview(values.reshape(-1)).cast("B"))
        self.bytes += values.nbytes

    def close(self) -> list[str]:
        """Write the file (fsynced); the names of its tensors."""
        self._data.close()
        header = {"__metadata__": {"format": "pt"}}
        header.update(
            {
                name: {"dtype": "F32", "shape": shape, "data_offsets": [start, end]}
                for name, shape, start, end in self._entries
            }
        )
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned (safetensors allows trailing spaces)
        with open(self.path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            with open(self.path + ".data", "rb") as data:
                shutil.copyfileobj(data, f, 16 << 20)
            f.flush()
            os.fsync(f.fileno())
        os.remove(self.path + ".data")
        return sorted(name for name, *_ in self._entries)


def _write_weights(
    tensors,
    architecture: str,
    config_dict: dict,
    config,
    out: str,
    max_shard_bytes: int,
    unmap: Callable[[], None] = lambda: None,
) -> tuple[dict, list, int]:
    """Write the GGUF's ``tensors`` (see :func:`_tensor_table`) into shards in ``out`` (:class:`_StreamedShard`),
    calling ``unmap`` every :data:`UNMAP_BYTES` of the GGUF read (the pages leave the process); return (weight
    map, skipped GGUF names, total bytes)."""
    import numpy as np
    import torch
    import transformers as tf
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    try:
        with torch.device("meta"):
            model = tf.AutoModelForCausalLM.from_config(config)
    except ValueError:
        raise ValueError(
            f"gguf_file: the GGUF's model type {config.model_type!r} has no causal LM class in "
            f"transformers (AutoModelForCausalLM): only causal LMs are converted"
        ) from None
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config_dict)
    with _name_maps_cached():
        names = get_gguf_hf_weights_map(model, processor)
    del model

    shards: list[list[str]] = []
    shard: Optional[_StreamedShard] = None
    written: set[str] = set()
    total = 0
    skipped = []
    pending: dict[str, torch.Tensor] = {}  # tensors a processor assembles from several GGUF tensors (MoE experts)
    block = None

    def flush_shard():
        nonlocal shard
        if shard is not None:
            shards.append(shard.close())
            shard = None

    def add(hf_name: str, tensor: torch.Tensor):
        nonlocal shard, total
        if hf_name in written:
            raise ValueError(
                f"gguf_file: two GGUF tensors give the parameter {hf_name!r} (tensors not grouped by "
                f"block?): cannot convert it tensor by tensor"
            )
        nbytes = tensor.numel() * tensor.element_size()
        if shard is not None and shard.bytes and shard.bytes + nbytes > max_shard_bytes:
            flush_shard()
        if shard is None:
            shard = _StreamedShard(os.path.join(out, f".shard-{len(shards)}"))
        shard.add(hf_name, tensor)
        written.add(hf_name)
        total += nbytes

    def flush_pending():
        for hf_name in list(pending):
            add(hf_name, pending.pop(hf_name).to(torch.float32))

    read = 0
    for info in tensors:
        this_block = info.name.split(".")[1] if info.name.startswith("blk.") else None
        if this_block != block:
            flush_pending()
            block = this_block
        read += info.data.nbytes
        if read >= UNMAP_BYTES:  # the pages read before this tensor leave the process
            unmap()
            read = info.data.nbytes
        weights = _dequantized(info)
        result = processor.process(
            weights=weights, name=info.name, tensor_key_mapping=names, parsed_parameters={"tensors": pending}
        )
        del weights
        if result.name is None:  # the processor put it into `pending` itself
            continue
        if result.name not in names:
            skipped.append(info.name)
            continue
        add(names[result.name], torch.from_numpy(np.ascontiguousarray(result.weights, dtype=np.float32)))
        del result
    flush_pending()
    flush_shard()

    weight_map = {}
    for k, tensor_names in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        os.rename(os.path.join(out, f".shard-{k}"), os.path.join(out, file))
        weight_map.update({n: file for n in tensor_names})
    return weight_map, skipped, total
