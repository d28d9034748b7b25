"""An offline teacher: its top-k logits and its mapped layers' targets, computed once and stored.

Per example (a dataset row) the cache holds, for each of its real tokens (the attention mask's; one row per
example for a classification teacher's logits):

- the teacher's k largest logits (bf16) and their vocabulary ids (uint16 below 65,536 entries, else int32),
  and the log-sum-exp of all its other logits at the cache's temperature (fp32): what the KL against a top-k
  teacher needs (:func:`fastted.reference.sparse_logit_kd_reference`), exact for what is stored;
- each mapped layer's target (the raw hidden state for LWD, the frozen TED filter's output, by ``transform``)
  as int8 with one fp32 scale per row (``quantization="int8"``: the error of an entry is at most half its
  row's scale, max |row| / 254), fp8 (e4m3, per-row scale) or bf16.

Storage: safetensors shards (memory-mapped when read) and ``manifest.json``, which records what the cache was
made from (the teacher's weights hash, the tokenizer, the data fingerprint, the layers, k, the temperature, the
quantization) and each shard's size and SHA-256. :class:`TeacherCache` refuses a cache that does not match the
run it is opened for, naming each difference, and a shard that does not match its manifest.

What is built here is the cache's format, its writer and its reader. Owed (the rest of the offline-teacher
issue): the ``fastted cache-teacher`` step over a run's data on many ranks, the recipes reading it, the sparse
top-k KL as a fused op, and the filtered-MSE kernel dequantizing int8 / fp8 targets.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from fastted.files import sha256_file, write_atomic
from fastted.ops.checks import check_positive_int, check_temperature

MANIFEST = "manifest.json"
QUANTIZATIONS = ("int8", "fp8", "bf16")
_FORMAT = 1


# --------------------------------------------------------------------------- quantization of the layer targets


def quantize_rows(x: Tensor, kind: str) -> tuple[Tensor, Optional[Tensor]]:
    """(values, per-row scale) of (rows, d) ``x``: int8 or fp8 e4m3 with an fp32 scale per row, or bf16 (no
    scale). int8: round(x / s) with s = max|row| / 127, so an entry's error is at most s / 2."""
    if kind not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {kind!r}")
    x = x.detach().float()
    if kind == "bf16":
        return x.bfloat16(), None
    top = 127.0 if kind == "int8" else 448.0  # e4m3's largest finite value
    scale = (x.abs().amax(dim=-1) / top).clamp_min(torch.finfo(torch.float32).tiny)
    scaled = x / scale.float()[:, None]
    if kind == "int8":
        return scaled.round().clamp(-127, 127).to(torch.int8), scale
    return scaled.to(torch.float8_e4m3fn), scale


def dequantize_rows(values: Tensor, scale: Optional[Tensor]) -> Tensor:
    """The fp32 rows :func:`quantize_rows` stored."""
    return values.float() if scale is None else values.float() * scale.float()[:, None]


# --------------------------------------------------------------------------- identity


def weights_hash(model: torch.nn.Module) -> str:
    """SHA-256 of a model's state: every entry's name, dtype, shape and bytes (the teacher's identity)."""
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        if torch.is_tensor(value):
            digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
            digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------- writing


def _rows_of(example_mask: Tensor) -> Tensor:
    return example_mask.nonzero().squeeze(-1)


def build_teacher_cache(teacher, examples: Sequence[dict], collator: Callable, directory: str, *,
                        layers: Sequence[int] = (), k: int = 64, temperature: float = 1.0,
                        quantization: str = "int8", transform: Optional[Callable] = None,
                        identity: Optional[dict] = None, batch_size: int = 16, shard_examples: int = 4096) -> dict:
    """Run ``teacher`` (a :class:`~fastted.models.ModelAdapter`) once over ``examples`` (in order; batches made
    by ``collator(examples, None)``) and store its top-k logits and ``layers``' targets in ``directory``.

    Args:
        transform: maps the list of captured layer states to the stored targets (TED: the frozen teacher
            filters); default the raw states (LWD).
        identity: what the run will check the cache against (``teacher``: :func:`weights_hash` of the teacher,
            ``tokenizer``, ``data`` fingerprint ...), recorded in the manifest with layers, k, temperature and
            the quantization.
    Returns the manifest.
    """
    from safetensors.torch import save_file

    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
    check_positive_int("k", k)
    check_positive_int("batch_size", batch_size)
    check_positive_int("shard_examples", shard_examples)
    temperature = check_temperature("temperature", temperature)
    os.makedirs(directory, exist_ok=True)
    layers = list(layers)
    shards, buffer, shard_ids = {}, [], []

    def flush():
        if not buffer:
            return
        name = f"shard-{len(shards):05d}.safetensors"
        tensors = {"example_ids": torch.tensor(shard_ids, dtype=torch.int64)}
        for key in buffer[0]:
            parts = [entry[key] for entry in buffer]
            if key.endswith("_rows"):
                tensors[key.replace("_rows", "_offsets")] = torch.tensor([0] + [int(p) for p in parts]).cumsum(0)
            else:
                tensors[key] = torch.cat(parts)
        path = os.path.join(directory, name)
        write_atomic(path, lambda tmp: save_file({key: t.contiguous() for key, t in tensors.items()}, tmp))
        shards[name] = {"bytes": os.path.getsize(path), "sha256": sha256_file(path), "examples": len(shard_ids)}
        buffer.clear()
        shard_ids.clear()

    vocab = None
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            chunk = [examples[i] for i in range(start, min(start + batch_size, len(examples)))]
            batch = collator(chunk, None)
            out = teacher(batch, layers)
            targets = out.hidden_states if transform is None else transform(out.hidden_states)
            logits = out.logits.float()
            vocab = logits.shape[-1]
            kk = min(k, vocab)
            values, ids = logits.topk(kk, dim=-1)
            tail = torch.logsumexp(logits.scatter(-1, ids, float("-inf")) / temperature, dim=-1)
            mask = batch.get("attention_mask")
            for b in range(len(chunk)):
                token_rows = _rows_of(mask[b]) if mask is not None else torch.arange(batch["input_ids"].shape[1])
                logit_rows = token_rows if logits.dim() == 3 else torch.zeros(1, dtype=torch.long)
                pick = (lambda x: x[b][logit_rows]) if logits.dim() == 3 else (lambda x: x[b][None])
                entry = {"logit_rows": len(logit_rows), "topk_values": pick(values).bfloat16(),
                         "topk_ids": pick(ids).to(torch.uint16 if vocab <= 65536 else torch.int32),
                         "tail_lse": pick(tail).float(), "token_rows": len(token_rows)}
                for i, state in enumerate(targets):
                    q, scale = quantize_rows(state[b][token_rows], quantization)
                    entry[f"layer{i}"] = q
                    if scale is not None:
                        entry[f"layer{i}_scale"] = scale
                buffer.append(entry)
                shard_ids.append(start + b)
                if len(shard_ids) == shard_examples:
                    flush()
    flush()
    manifest = {"format": _FORMAT, **(identity or {}), "layers": layers, "k": k, "temperature": float(temperature),
                "quantization": quantization, "examples": len(examples), "vocab": vocab, "shards": shards}
    write_atomic(os.path.join(directory, MANIFEST), json.dumps(manifest, indent=1))
    return manifest


# --------------------------------------------------------------------------- reading


class TeacherCache:
    """A teacher cache opened for a run: ``expect`` holds what the run needs (any manifest key: ``teacher``,
    ``tokenizer``, ``data``, ``layers``, ``k``, ``temperature``, ``quantization``); a difference is a ValueError
    naming each key with the cache's and the run's values. ``verify`` checks every shard against its SHA-256."""

    def __init__(self, directory: str, expect: Optional[dict] = None, verify: bool = True):
        from safetensors import safe_open

        path = os.path.join(directory, MANIFEST)
        if not os.path.isfile(path):
            raise ValueError(f"teacher cache {directory}: no {MANIFEST} (not a cache, or its build did not finish)")
        with open(path, encoding="utf-8") as f:
            self.manifest = json.load(f)
        differ = [f"{key}: cache {self.manifest.get(key)!r}, run {want!r}" for key, want in (expect or {}).items()
                  if self.manifest.get(key) != want]
        if differ:
            raise ValueError(f"teacher cache {directory} was made for another run ({'; '.join(differ)}): build it "
                             f"again for this one")
        self.directory, self._where = directory, {}
        self._shards = []
        for name, record in self.manifest["shards"].items():
            shard = os.path.join(directory, name)
            if not os.path.isfile(shard) or os.path.getsize(shard) != record["bytes"]:
                raise ValueError(f"teacher cache {directory}: {name} is missing or has another size than its "
                                 f"manifest's (damaged): build the cache again")
            if verify and sha256_file(shard) != record["sha256"]:
                raise ValueError(f"teacher cache {directory}: {name} differs from its manifest's SHA-256 "
                                 f"(damaged): build the cache again")
            handle = safe_open(shard, framework="pt")
            self._shards.append(handle)
            for row, example in enumerate(handle.get_tensor("example_ids").tolist()):
                self._where[example] = (len(self._shards) - 1, row)

    def __len__(self) -> int:
        return len(self._where)

    def example(self, index: int) -> dict:
        """The stored teacher outputs of dataset row ``index``: ``topk_values`` (rows, k) fp32, ``topk_ids``
        (rows, k) int64, ``tail_lse`` (rows,), ``targets``: per mapped layer (tokens, d) fp32 (dequantized)."""
        if index not in self._where:
            raise ValueError(f"teacher cache {self.directory} holds no example {index} (it has {len(self)})")
        shard, row = self._where[index]
        handle = self._shards[shard]

        def rows(key, offsets):
            o = handle.get_slice(offsets)[row:row + 2].tolist()
            return handle.get_slice(key)[o[0]:o[1]]

        out = {"topk_values": rows("topk_values", "logit_offsets").float(),
               "topk_ids": rows("topk_ids", "logit_offsets").to(torch.int64),
               "tail_lse": rows("tail_lse", "logit_offsets").float(), "targets": []}
        keys = set(handle.keys())
        for i in range(len(self.manifest["layers"])):
            scale = rows(f"layer{i}_scale", "token_offsets") if f"layer{i}_scale" in keys else None
            out["targets"].append(dequantize_rows(rows(f"layer{i}", "token_offsets"), scale))
        return out
