"""An offline teacher: its top-k logits and its mapped layers' targets, computed once and stored.

Per example (a dataset row) the cache holds, for each of its real tokens (the attention mask's; one row per
example for a classification teacher's logits):

- the teacher's k largest logits (bf16) and their vocabulary ids (uint16 below 65,536 entries, else int32),
  and the log-sum-exp of all its other logits at the cache's temperature (fp32): what the KL against a top-k
  teacher needs (:func:`fastted.reference.sparse_logit_kd_reference`), exact for what is stored;
- each mapped layer's target (the raw hidden state for LWD, the frozen TED filter's output, by ``transform``;
  for CoDIR and RAIL-KD one pooled vector per example) as int8 with one fp32 scale per row
  (``quantization="int8"``: the error of an entry is at most half its row's scale, max |row| / 254), fp8
  (e4m3, per-row scale) or bf16.

Storage: safetensors shards (memory-mapped when read) and ``manifest.json``, which records what the cache was
made from (the teacher's weights hash, the tokenizer, the data fingerprint, the layers, k, the temperature, the
quantization) and each shard's size and SHA-256. :class:`TeacherCache` refuses a cache that does not match the
run it is opened for, naming each difference, and a shard that does not match its manifest.

Each rank of a run writes the shards of its share of the examples (every world-th one) and a part manifest;
:func:`finish_teacher_cache` merges the parts into ``manifest.json``, written last: a cache without it is an
unfinished one, which no reader opens. :meth:`TeacherCache.batch` gathers a batch's stored outputs, padded to
the batch's tokens, for the recipes (:meth:`fastted.methods.Recipe.use_teacher_cache`); the pipeline's
``cache-teacher`` step builds a run's cache (:func:`fastted.pipeline.cache_teacher`).
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
    """SHA-256 of a model's state: every entry's name, dtype, shape and bytes (the teacher's identity). A ZeRO-3
    partitioned entry is gathered alone while it is read (so every rank must call it), and hashes as the whole
    tensor does."""
    from fastted.models import gathered

    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict(keep_vars=True).items()):
        if torch.is_tensor(value):
            with gathered([value]):
                digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
                digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def data_fingerprint(dataset) -> str:
    """SHA-256 of a tokenized dataset's ``input_ids``, row by row (the run's data, packing and order of rows);
    packed blocks of token shards (:class:`fastted.shards.PackedBlocks`) give their own fingerprint, made of the
    shards' meta, the token range and the block size, so nothing of the corpus is read."""
    import numpy as np

    if isinstance(getattr(dataset, "fingerprint", None), str):
        return dataset.fingerprint
    digest = hashlib.sha256()
    for batch in dataset.with_format("numpy", columns=["input_ids"]).iter(batch_size=4096):
        for row in batch["input_ids"]:
            ids = np.asarray(row, dtype=np.int64)
            digest.update(len(ids).to_bytes(8, "little"))
            digest.update(ids.tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------- writing


def _rows_of(example_mask: Tensor) -> Tensor:
    return example_mask.nonzero().squeeze(-1)


def build_teacher_cache(teacher, examples: Sequence[dict], collator: Callable, directory: str, *,
                        layers: Sequence[int] = (), k: int = 64, temperature: float = 1.0,
                        quantization: str = "int8", transform: Optional[Callable] = None,
                        identity: Optional[dict] = None, batch_size: int = 16, shard_examples: int = 4096,
                        rank: int = 0, world: int = 1, device=None, progress: Optional[Callable] = None) -> dict:
    """Run ``teacher`` (a :class:`~fastted.models.ModelAdapter`) once over ``examples`` (in order; batches made
    by ``collator(examples, None)``) and store its top-k logits and ``layers``' targets in ``directory``.

    With ``world`` > 1 this rank runs every world-th example from ``rank`` on, writes its own shards and a part
    manifest, and returns it: :func:`finish_teacher_cache` (on one rank, after all have written) merges the
    parts. Every rank runs the same number of teacher forwards (a rank with a batch fewer runs a stand-in whose
    outputs it drops), so a teacher partitioned under ZeRO-3 never leaves a rank waiting for a gather.
    ``device``: where the batches go (the teacher's device); ``progress(n)``: called after each batch with its
    number of examples.

    Args:
        transform: ``transform(states, attention_mask)`` maps the list of captured layer states to the stored
            targets, (B, T, d) per token (TED: the frozen teacher filters' outputs) or (B, d) per example
            (CoDIR's and RAIL-KD's pooled vectors); default the raw states (LWD).
        identity: what the run will check the cache against (``teacher``: :func:`weights_hash` of the teacher,
            ``tokenizer``, ``data`` fingerprint ...), recorded in the manifest with layers, k, temperature and
            the quantization.
    Returns the manifest.
    """
    from safetensors.torch import save_file

    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be an int >= 0 (top-k logits a token; 0 stores the layer targets alone), got {k!r}")
    check_positive_int("batch_size", batch_size)
    check_positive_int("shard_examples", shard_examples)
    temperature = check_temperature("temperature", temperature)
    os.makedirs(directory, exist_ok=True)
    layers = list(layers)
    shards, buffer, shard_ids = {}, [], []
    mine = range(rank, len(examples), world)
    tokens = 0

    def flush():
        if not buffer:
            return
        name = f"shard-{rank:03d}-{len(shards):05d}.safetensors"
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

    vocab = logit_kind = None
    targets_per = "token"
    # As many batches as rank 0 has (the most); a rank with a batch fewer runs the first rows as a stand-in.
    rounds = -(-len(range(0, len(examples), world)) // batch_size)
    with torch.no_grad():
        for start in range(0, rounds * batch_size, batch_size):
            real = start < len(mine)
            chosen = mine[start:start + batch_size] if real else range(min(batch_size, len(examples)))
            chunk = [examples[i] for i in chosen]
            batch = collator(chunk, None)
            if device is not None:
                batch = {key: value.to(device) for key, value in batch.items()}
            # k = 0: the layers alone (a language model stops before its vocabulary projection)
            out = teacher(batch, layers, head=k > 0 or teacher.task == "classification")
            targets = out.hidden_states if transform is None else transform(out.hidden_states, out.mask)
            if not real:
                continue
            targets_per = "example" if targets and targets[0].dim() == 2 else "token"
            if k:
                logits = out.logits.float()
                vocab = logits.shape[-1]
                logit_kind = "token" if logits.dim() == 3 else "example"
                values, ids = logits.topk(min(k, vocab), dim=-1)
                tail = torch.logsumexp(logits.scatter(-1, ids, float("-inf")) / temperature, dim=-1)
                values, ids, tail = values.cpu(), ids.cpu(), tail.cpu()
            mask = batch.get("attention_mask")
            targets = [state.cpu() for state in targets]
            mask = None if mask is None else mask.cpu()
            for b in range(len(chunk)):
                token_rows = _rows_of(mask[b]) if mask is not None else torch.arange(batch["input_ids"].shape[1])
                entry = {"target_rows": len(token_rows) if targets_per == "token" else 1}
                tokens += len(token_rows)
                if k:
                    per_token = logits.dim() == 3
                    logit_rows = token_rows if per_token else torch.zeros(1, dtype=torch.long)
                    pick = (lambda x: x[b][logit_rows]) if per_token else (lambda x: x[b][None])
                    entry.update(logit_rows=len(logit_rows), topk_values=pick(values).bfloat16(),
                                 topk_ids=pick(ids).to(torch.uint16 if vocab <= 65536 else torch.int32),
                                 tail_lse=pick(tail).float())
                for i, state in enumerate(targets):
                    q, scale = quantize_rows(state[b][token_rows] if targets_per == "token" else state[b][None],
                                             quantization)
                    entry[f"layer{i}"] = q
                    if scale is not None:
                        entry[f"layer{i}_scale"] = scale
                buffer.append(entry)
                shard_ids.append(chosen[b])
                if len(shard_ids) == shard_examples:
                    flush()
            if progress is not None:
                progress(len(chunk))
    flush()
    manifest = {"format": _FORMAT, **(identity or {}), "layers": layers, "k": k, "temperature": float(temperature),
                "quantization": quantization, "examples": len(examples), "tokens": tokens, "vocab": vocab,
                "logits": logit_kind, "targets_per": targets_per, "shards": shards}
    if world == 1:
        write_atomic(os.path.join(directory, MANIFEST), json.dumps(manifest, indent=1))
    else:
        write_atomic(os.path.join(directory, f"manifest.part-{rank:03d}.json"), json.dumps(manifest, indent=1))
    return manifest


def finish_teacher_cache(directory: str, world: int) -> dict:
    """Merge the part manifests of ``world`` ranks' :func:`build_teacher_cache` into ``manifest.json`` (each
    part present, every example of the data stored once) and remove the parts. Returns the manifest."""
    parts = []
    for rank in range(world):
        path = os.path.join(directory, f"manifest.part-{rank:03d}.json")
        if not os.path.isfile(path):
            raise ValueError(f"teacher cache {directory}: rank {rank} wrote no part manifest (its build did not "
                             f"finish): build the cache again")
        with open(path, encoding="utf-8") as f:
            parts.append(json.load(f))
    manifest = dict(parts[0], shards={}, tokens=0)
    for part in parts:
        manifest["tokens"] += part["tokens"]
        manifest["vocab"] = manifest["vocab"] or part["vocab"]
        manifest["logits"] = manifest["logits"] or part["logits"]
        manifest["shards"].update(part["shards"])
    stored = sum(record["examples"] for record in manifest["shards"].values())
    if stored != manifest["examples"]:
        raise ValueError(f"teacher cache {directory}: the ranks stored {stored} examples of {manifest['examples']}")
    write_atomic(os.path.join(directory, MANIFEST), json.dumps(manifest, indent=1))
    for rank in range(world):
        os.remove(os.path.join(directory, f"manifest.part-{rank:03d}.json"))
    return manifest


# --------------------------------------------------------------------------- reading


class TeacherCache:
    """A teacher cache opened for a run: ``expect`` holds what the run needs (any manifest key: ``teacher``,
    ``tokenizer``, ``data``, ``layers``, ``k``, ``temperature``, ``quantization``); a difference is a ValueError
    naming each key with the cache's and the run's values. ``verify`` checks every shard against its SHA-256."""

    def __init__(self, directory: str, expect: Optional[dict] = None, verify: bool = True,
                 rebuild: str = "build the cache again"):
        from safetensors import safe_open

        path = os.path.join(directory, MANIFEST)
        if not os.path.isfile(path):
            raise ValueError(f"teacher cache {directory}: no {MANIFEST} (not a cache, or its build did not finish)")
        with open(path, encoding="utf-8") as f:
            self.manifest = json.load(f)
        differ = [f"{key}: cache {self.manifest.get(key)!r}, run {want!r}" for key, want in (expect or {}).items()
                  if self.manifest.get(key) != want]
        if differ:
            raise ValueError(f"teacher cache {directory} was made for another run ({'; '.join(differ)}): {rebuild}")
        self.directory, self._where = directory, {}
        self._shards = []
        for name, record in self.manifest["shards"].items():
            shard = os.path.join(directory, name)
            if not os.path.isfile(shard) or os.path.getsize(shard) != record["bytes"]:
                raise ValueError(f"teacher cache {directory}: {name} is missing or has another size than its "
                                 f"manifest's (damaged): {rebuild}")
            if verify and sha256_file(shard) != record["sha256"]:
                raise ValueError(f"teacher cache {directory}: {name} differs from its manifest's SHA-256 "
                                 f"(damaged): {rebuild}")
            handle = safe_open(shard, framework="pt")
            self._shards.append(handle)
            for row, example in enumerate(handle.get_tensor("example_ids").tolist()):
                self._where[example] = (len(self._shards) - 1, row)

    def __len__(self) -> int:
        return len(self._where)

    def example(self, index: int, dequantize: bool = True) -> dict:
        """The stored teacher outputs of dataset row ``index``: ``topk_values`` (rows, k) fp32, ``topk_ids``
        (rows, k) int64, ``tail_lse`` (rows,), ``targets``: per mapped layer (tokens, d) fp32 (dequantized), or
        with ``dequantize=False`` as stored, with ``scales``: per layer (tokens,) fp32 (None for bf16)."""
        if index not in self._where:
            raise ValueError(f"teacher cache {self.directory} holds no example {index} (it has {len(self)})")
        shard, row = self._where[index]
        handle = self._shards[shard]

        def rows(key, offsets):
            o = handle.get_slice(offsets)[row:row + 2].tolist()
            return handle.get_slice(key)[o[0]:o[1]]

        keys = set(handle.keys())
        out = {"targets": [], "scales": []}
        if "topk_values" in keys:
            out.update(topk_values=rows("topk_values", "logit_offsets").float(),
                       topk_ids=rows("topk_ids", "logit_offsets").to(torch.int64),
                       tail_lse=rows("tail_lse", "logit_offsets").float())
        for i in range(len(self.manifest["layers"])):
            scale = rows(f"layer{i}_scale", "target_offsets") if f"layer{i}_scale" in keys else None
            values = rows(f"layer{i}", "target_offsets")
            out["targets"].append(dequantize_rows(values, scale) if dequantize else values)
            out["scales"].append(None if dequantize else scale)
        return out

    def batch(self, index: Tensor, mask: Optional[Tensor], device=None, dequantize: bool = True) -> dict:
        """The stored outputs of a batch of dataset rows ``index`` (B,), placed at the tokens of its attention
        ``mask`` (B, T) (the positions the cache stored, the collator pads on the right): ``topk`` = (values,
        ids, tail_lse) of shape (B, T, k), (B, T, k), (B, T) per token (a classification teacher's: (B, k), (B, k),
        (B,)), None in a cache without logits, and ``targets``: per cached layer (B, T, d) fp32, zero at the
        padding. Padded rows hold ids 0..k-1 (distinct, as the losses need) and are left out by the mask.

        ``dequantize=False``: the targets as stored (int8, fp8 or bf16) with ``scales``, per layer (B, T) fp32
        row scales (None for bf16), for :func:`~fastted.ops.filtered_mse.filtered_mse`'s ``teacher_scales``,
        which dequantizes them inside its kernel; else ``scales`` is None."""
        entries = [self.example(int(i), dequantize) for i in index.tolist()]
        n, t = len(entries), (mask.shape[1] if mask is not None else None)
        positions = [(_rows_of(mask[b].cpu()) if mask is not None else None) for b in range(n)]
        out = {"topk": None, "targets": []}
        if "topk_values" in entries[0]:
            k = entries[0]["topk_values"].shape[-1]
            token_logits = self.manifest["logits"] == "token"
            shape = (n, t) if token_logits else (n,)
            values = torch.zeros(*shape, k)
            ids = torch.arange(k).expand(*shape, k).clone()
            tail = torch.zeros(shape)
            for b, entry in enumerate(entries):
                where = positions[b] if token_logits else b
                if token_logits:
                    self._check_rows(index[b], entry["topk_values"].shape[0], len(where))
                    values[b, where], ids[b, where], tail[b, where] = (entry["topk_values"], entry["topk_ids"],
                                                                       entry["tail_lse"])
                else:
                    values[b], ids[b], tail[b] = entry["topk_values"][0], entry["topk_ids"][0], entry["tail_lse"][0]
            out["topk"] = tuple(x.to(device) if device is not None else x for x in (values, ids, tail))
        scaled = not dequantize and self.manifest["quantization"] != "bf16"
        per_token = self.manifest["targets_per"] == "token"
        out["scales"] = [] if scaled else None
        for i in range(len(self.manifest["layers"])):
            first = entries[0]["targets"][i]
            shape = (n, t) if per_token else (n,)
            layer = torch.zeros(*shape, first.shape[-1], dtype=first.dtype)
            scales = torch.zeros(shape) if scaled else None
            for b, entry in enumerate(entries):
                stored = entry["targets"][i].view(torch.uint8)  # fp8 tensors take no indexed writes everywhere
                if per_token:
                    self._check_rows(index[b], stored.shape[0], len(positions[b]))
                    layer.view(torch.uint8)[b, positions[b]] = stored
                    if scaled:
                        scales[b, positions[b]] = entry["scales"][i]
                else:
                    layer.view(torch.uint8)[b] = stored[0]
                    if scaled:
                        scales[b] = entry["scales"][i][0]
            out["targets"].append(layer.to(device) if device is not None else layer)
            if scaled:
                out["scales"].append(scales.to(device) if device is not None else scales)
        return out

    def _check_rows(self, example, stored: int, tokens: int) -> None:
        if stored != tokens:
            raise ValueError(f"teacher cache {self.directory}: example {int(example)} has {stored} stored tokens but "
                             f"{tokens} in this batch's attention mask: the data differs from the cache's")
