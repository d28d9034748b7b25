"""An offline teacher: its top-k logits and its mapped layers' targets, computed once and stored.

Per example (a dataset row) the cache holds, for each of its real tokens (the attention mask's; one row per
example for a classification teacher's logits):

- the teacher's k largest logits, packed (:mod:`fastted.ops.packed_topk`): their ids at the bits the
  vocabulary needs, the values as uint8 steps below the row's largest, and the log-sum-exp of all its other
  logits at the cache's temperature; 212 bytes a token at k = 64 and Llama 3's 128,256 entries. The sparse KL
  reads that form as it is. A causal LM's logits are made from its head's input a block of rows at a time, so
  nothing of (batch, tokens, vocabulary) is ever held;
- each mapped layer's target (the raw hidden state for LWD, the frozen TED filter's output, by ``transform``;
  for CoDIR and RAIL-KD one pooled vector per example) as int8 with one fp32 scale per row
  (``quantization="int8"``: the error of an entry is at most half its row's scale, max |row| / 254), fp8
  (e4m3, per-row scale) or bf16. With a budget of ``layer_bytes`` a token, each token's targets are kept with
  the same probability f (the budget over what every token's targets take), drawn once at build time from
  the seed and the example: each sequence keeps about f of its tokens, and a sum over the kept tokens divided
  by f is an unbiased estimate of the sum over all of them.

Storage: shards in the safetensors format, written as a stream (nothing of a shard is concatenated; each is
flushed when it holds ``shard_bytes``) and read as memory maps, and ``manifest.json``, which records what the
cache was made from (the teacher's identity, the tokenizer, the data fingerprint, the layers, k, the
temperature, the quantization, the layer budget), the bytes a token of each part, and each shard's size,
SHA-256 and examples. :class:`TeacherCache` opens a cache from its manifest and the shards' sizes alone (a
cache of 1,000 shards in milliseconds), refuses one that does not match the run it is opened for, naming each
difference, and checks a shard's SHA-256 when this process first reads it.

Each rank of a run writes the shards of its share of the examples (every world-th one) and a part manifest;
:func:`finish_teacher_cache` merges the parts into ``manifest.json``, written last: a cache without it is an
unfinished one, which no reader opens. :meth:`TeacherCache.batch` gathers a batch's stored outputs, padded to
the batch's tokens, for the recipes (:meth:`fastted.methods.Recipe.use_teacher_cache`); the pipeline's
``cache-teacher`` job builds a run's cache (:func:`fastted.train.pipeline.cache_teacher`).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import threading
from collections.abc import Callable, Sequence
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from fastted.files import HashingWriter, sha256_file, write_atomic
from fastted.ops.checks import check_positive_int, check_temperature
from fastted.ops.packed_topk import PackedTopK, id_bits, pack_topk, padding_row, unpack_topk
from fastted.ops.quantize import QUANTIZATIONS, dequantize_rows, quantize_rows

MANIFEST = "manifest.json"
SHARD_BYTES = 128 << 20  # a shard is flushed when it holds this much: a rank's buffer while building
LOGIT_ELEMENTS = 1 << 24  # logits made at a time from a head's input while building (64 MB in fp32)
_FORMAT = 2
# --------------------------------------------------------------------------- identity


def data_fingerprint(dataset) -> str:
    """SHA-256 of a tokenized dataset's ``input_ids``, row by row (the run's data, packing and order of rows);
    packed blocks of token shards (:class:`fastted.train.shards.PackedBlocks`) give their own fingerprint, made of the
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


# --------------------------------------------------------------------------- shard files

# safetensors' dtype names of what a shard holds; bf16 and fp8 travel through numpy as their bits.
_TAGS = {
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
}
_BITS = {torch.bfloat16: torch.int16, torch.float8_e4m3fn: torch.uint8}
_NUMPY = {
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "U8": np.uint8,
    "I8": np.int8,
    "F32": np.float32,
    "BF16": np.int16,
    "F8_E4M3": np.uint8,
}
_TORCH = {tag: dtype for dtype, tag in _TAGS.items()}
_PARTS = {"topk": "logits", "layer": "layers", "target_positions": "layers"}  # by key prefix; else "index"


def _part(key: str) -> str:
    return next((part for prefix, part in _PARTS.items() if key.startswith(prefix)), "index")


class _ShardWriter:
    """A rank's examples on their way to shards: each example's arrays kept as they came, written one after
    another into a safetensors file (no concatenation) when ``limit`` bytes are held, hashed as written."""

    def __init__(self, directory: str, rank: int, limit: int):
        self.directory, self.rank, self.limit = directory, rank, limit
        self.shards: dict[str, dict] = {}
        self.part_bytes = {"logits": 0, "layers": 0, "index": 0, "header": 0}
        self._first = 0  # this rank's ordinal of the next shard's first example
        self._reset()

    def _reset(self) -> None:
        self._arrays: dict[str, list[np.ndarray]] = {}
        self._tags: dict[str, str] = {}
        self._rows: dict[str, list[int]] = {"logit": [], "target": []}
        self._examples: list[int] = []
        self.held = 0

    def add(self, example: int, arrays: dict[str, Tensor], rows: dict[str, int]) -> None:
        """Example ``example``'s ``arrays`` (rows first) and its ``rows`` per group ("logit", "target")."""
        for key, value in arrays.items():
            value = value.detach().cpu().contiguous()
            self._tags[key] = _TAGS[value.dtype]
            array = value.view(_BITS.get(value.dtype, value.dtype)).numpy()
            self._arrays.setdefault(key, []).append(array)
            self.held += array.nbytes
        for group, n in rows.items():
            self._rows[group].append(n)
        self._examples.append(example)
        if self.held >= self.limit:
            self.flush()

    def flush(self) -> None:
        if not self._examples:
            return
        entries = [("example_ids", "I64", [np.asarray(self._examples, dtype=np.int64)])]
        for group, counts in self._rows.items():
            if counts:
                entries.append((f"{group}_offsets", "I64", [np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)]))
        entries += [(key, self._tags[key], parts) for key, parts in self._arrays.items()]
        entries.sort(key=lambda e: -np.dtype(_NUMPY[e[1]]).itemsize)  # every entry starts aligned to its type
        header, start = {}, 0
        for key, tag, parts in entries:
            size = sum(p.nbytes for p in parts)
            rows = sum(p.shape[0] for p in parts)
            header[key] = {"dtype": tag, "shape": [rows, *parts[0].shape[1:]], "data_offsets": [start, start + size]}
            self.part_bytes[_part(key)] += size
            start += size
        header["__metadata__"] = {"format": f"fastted-teacher-cache-{_FORMAT}"}
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
        self.part_bytes["header"] += 8 + len(text)
        name = f"shard-{self.rank:03d}-{len(self.shards):05d}.safetensors"
        record = {}

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                out = HashingWriter(f)
                out.write(len(text).to_bytes(8, "little"))
                out.write(text)
                for _, _, parts in entries:
                    for p in parts:
                        out.write(np.ascontiguousarray(p).reshape(-1).view(np.uint8))
                record.update(out.record())

        write_atomic(os.path.join(self.directory, name), write)
        self.shards[name] = {**record, "rank": self.rank, "first": self._first, "examples": len(self._examples)}
        self._first += len(self._examples)
        self._reset()


class _Shard:
    """A shard opened on its first read: checked against its manifest's SHA-256 (once), its arrays memory maps."""

    def __init__(self, path: str, record: dict):
        self.path, self.record = path, record
        self._opened: Optional[tuple[dict, dict]] = None
        self._lock = threading.Lock()

    def arrays(self, verify: bool, damaged: Callable[[str], Exception]) -> tuple[dict, dict]:
        """(arrays, their safetensors dtype names), by key."""
        if self._opened is None:
            with self._lock:
                if self._opened is None:
                    from fastted.train.identity import safetensors_header

                    if verify and sha256_file(self.path) != self.record["sha256"]:
                        raise damaged("differs from its manifest's SHA-256")
                    text = safetensors_header(self.path)
                    header = json.loads(text)
                    header.pop("__metadata__", None)
                    base = 8 + len(text)
                    mapped = np.memmap(self.path, dtype=np.uint8, mode="r")
                    arrays = {
                        key: mapped[base + e["data_offsets"][0] : base + e["data_offsets"][1]]
                        .view(_NUMPY[e["dtype"]])
                        .reshape(e["shape"])
                        for key, e in header.items()
                    }
                    self._opened = arrays, {key: e["dtype"] for key, e in header.items()}
        return self._opened


def _tensor(array: np.ndarray, tag: str) -> Tensor:
    """A stored array as a torch tensor of its dtype (a copy: the memory map stays read-only)."""
    out = torch.from_numpy(np.array(array))
    return out.view(_TORCH[tag]) if tag in ("BF16", "F8_E4M3") else out


# --------------------------------------------------------------------------- writing


def _topk_rows(x: Tensor, weight: Tensor, bias: Optional[Tensor], k: int, temperature: float):
    """(values, ids, tail) of the logits ``x @ weight.T + bias`` of (N, H) rows, made LOGIT_ELEMENTS at a time."""
    rows = max(1, LOGIT_ELEMENTS // weight.shape[0])
    out = []
    for start in range(0, x.shape[0], rows):
        logits = (x[start : start + rows].to(weight.dtype) @ weight.T).float()
        if bias is not None:
            logits += bias.float()
        out.append(_topk_of(logits, k, temperature))
    return tuple(torch.cat(parts) for parts in zip(*out))


def _topk_of(logits: Tensor, k: int, temperature: float):
    values, ids = logits.topk(min(k, logits.shape[-1]), dim=-1)
    tail = torch.logsumexp(logits.scatter_(-1, ids, float("-inf")) / temperature, dim=-1)
    return values, ids, tail


def build_teacher_cache(
    teacher,
    examples: Sequence[dict],
    collator: Callable,
    directory: str,
    *,
    layers: Sequence[int] = (),
    k: int = 64,
    temperature: float = 1.0,
    quantization: str = "int8",
    transform: Optional[Callable] = None,
    identity: Optional[dict] = None,
    batch_size: int = 16,
    shard_bytes: int = SHARD_BYTES,
    layer_bytes: int = 0,
    seed: int = 0,
    rank: int = 0,
    world: int = 1,
    device=None,
    progress: Optional[Callable] = None,
) -> dict:
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
        identity: what the run will check the cache against (``teacher``, ``tokenizer``, ``data`` fingerprint
            ...), recorded in the manifest with layers, k, temperature, the quantization and the layer budget.
        shard_bytes: a shard is written when this rank holds this many bytes of it: the bound of what building
            buffers.
        layer_bytes: the budget of a token's layer targets in bytes (per-token targets only); 0 keeps every
            token's. Below what a token's targets take, each token is kept with probability f = budget / that
            (see the module), drawn from ``seed`` and the example.
    Returns the manifest.
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be an int >= 0 (top-k logits a token; 0 stores the layer targets alone), got {k!r}")
    check_positive_int("batch_size", batch_size)
    check_positive_int("shard_bytes", shard_bytes)
    if isinstance(layer_bytes, bool) or not isinstance(layer_bytes, int) or layer_bytes < 0:
        raise ValueError(
            f"layer_bytes must be an int >= 0 (a token's layer targets in bytes; 0: every token's), got {layer_bytes!r}"
        )
    temperature = check_temperature("temperature", temperature)
    from fastted.train.engine import return_freed_host_memory

    return_freed_host_memory()  # what each batch frees goes back to the system, not into the heap
    os.makedirs(directory, exist_ok=True)
    layers = list(layers)
    writer = _ShardWriter(directory, rank, shard_bytes)
    mine = range(rank, len(examples), world)
    tokens = 0
    vocab = bits = logit_kind = None
    targets_per, fraction = "token", 1.0
    # As many batches as rank 0 has (the most); a rank with a batch fewer runs the first rows as a stand-in.
    rounds = -(-len(range(0, len(examples), world)) // batch_size)
    with torch.no_grad():
        for start in range(0, rounds * batch_size, batch_size):
            real = start < len(mine)
            chosen = mine[start : start + batch_size] if real else range(min(batch_size, len(examples)))
            chunk = [examples[i] for i in chosen]
            batch = collator(chunk, None)
            if device is not None:
                batch = {key: value.to(device) for key, value in batch.items()}
            mask = batch.get("attention_mask")
            if mask is None:
                mask = torch.ones(batch["input_ids"].shape, dtype=torch.long, device=batch["input_ids"].device)
            # A language model's logits are made from its head's input a block of rows at a time.
            lm_logits = bool(k) and teacher.task != "classification"
            out = teacher(batch, layers, head=teacher.task == "classification")
            targets = out.hidden_states if transform is None else transform(out.hidden_states, out.mask)
            topk = None
            if k and lm_logits:
                weight, bias = teacher.lm_head_parts()
                from fastted.models import gathered

                with gathered((weight, bias)):  # a ZeRO-3 teacher's head is partitioned outside its forward
                    topk = _topk_rows(out.head_input[mask.bool()], weight, bias, k, temperature)
                    vocab, logit_kind = weight.shape[0], "token"  # whole only while gathered
            elif k:
                topk = _topk_of(out.logits.float(), k, temperature)
                vocab, logit_kind = out.logits.shape[-1], "example"
            if not real:
                continue
            for layer, state in zip(layers or range(len(targets)), targets):
                if not bool(torch.isfinite(state).all()):
                    raise ValueError(
                        f"the teacher's target of layer {layer} is not finite in the batch of examples "
                        f"{list(chosen)[:4]}...: nothing non-finite is cached"
                    )
            if topk is not None:
                bits = id_bits(vocab)
                packed = pack_topk(*topk, vocab)
            targets_per = "example" if targets and targets[0].dim() == 2 else "token"
            if layer_bytes and targets_per == "token" and fraction == 1.0 and targets:
                fraction = _kept_fraction([t.shape[-1] for t in targets], quantization, layer_bytes)
            counts = mask.sum(-1).tolist()
            at = 0  # the batch's real tokens before example b (the rows of the packed logits)
            for b, n in enumerate(counts):
                arrays, rows = {}, {}
                if topk is not None:
                    r = slice(at, at + n) if logit_kind == "token" else slice(b, b + 1)
                    arrays.update(
                        topk_words=packed.words[r],
                        topk_levels=packed.levels[r],
                        topk_top=packed.top[r],
                        topk_step=packed.step[r],
                        topk_tail=packed.tail[r],
                    )
                    rows["logit"] = r.stop - r.start
                at += n
                if targets:
                    if targets_per == "token":
                        positions = mask[b].nonzero().squeeze(-1)
                        kept = _kept_positions(n, fraction, seed, chosen[b]) if fraction < 1 else None
                        where = positions if kept is None else positions[kept.to(positions.device)]
                        if kept is not None:
                            arrays["target_positions"] = kept.to(torch.int32)
                        rows["target"] = len(where)
                    else:
                        where = None
                        rows["target"] = 1
                    for i, state in enumerate(targets):
                        q, scale = quantize_rows(state[b][None] if where is None else state[b][where], quantization)
                        arrays[f"layer{i}"] = q
                        if scale is not None:
                            arrays[f"layer{i}_scale"] = scale
                tokens += n
                writer.add(chosen[b], arrays, rows)
            del out, targets, topk, batch, mask  # not alive through the next batch's forward
            packed = None
            if progress is not None:
                progress(len(chunk))
    writer.flush()
    manifest = {
        "format": _FORMAT,
        **(identity or {}),
        "layers": layers,
        "k": k,
        "temperature": float(temperature),
        "quantization": quantization,
        "layer_bytes": layer_bytes,
        "layer_fraction": fraction,
        "examples": len(examples),
        "world": world,
        "tokens": tokens,
        "vocab": vocab,
        "id_bits": bits,
        "logits": logit_kind,
        "targets_per": targets_per,
        "part_bytes": writer.part_bytes,
        "shards": writer.shards,
    }
    _add_bytes_per_token(manifest)
    name = MANIFEST if world == 1 else f"manifest.part-{rank:03d}.json"
    write_atomic(os.path.join(directory, name), json.dumps(manifest, indent=1))
    return manifest


def _kept_fraction(widths: list[int], quantization: str, budget: int) -> float:
    """The share of tokens whose targets fit ``budget`` bytes a token: a kept token takes its layers' rows,
    their scales and its position."""
    per_entry = 2 if quantization == "bf16" else 1
    scale = 0 if quantization == "bf16" else 4
    full = sum(width * per_entry + scale for width in widths)
    return 1.0 if budget >= full else budget / (full + 4)


def _kept_positions(n: int, fraction: float, seed: int, example: int) -> Tensor:
    """The sorted positions (among an example's n tokens) whose targets are kept: m of them, uniformly without
    replacement, where m is f n rounded up or down at random so that its mean is f n: every token is kept with
    probability f exactly. Drawn from (seed, example): the same at every build."""
    rng = np.random.default_rng([seed, int(example)])
    m = int(np.floor(fraction * n + rng.random()))
    return torch.from_numpy(np.sort(rng.choice(n, size=min(m, n), replace=False))).long()


def _add_bytes_per_token(manifest: dict) -> None:
    tokens = max(manifest["tokens"], 1)
    parts = manifest["part_bytes"]
    manifest["bytes_per_token"] = {
        **{part: round(b / tokens, 1) for part, b in parts.items()},
        "total": round(sum(parts.values()) / tokens, 1),
    }


def finish_teacher_cache(directory: str, world: int) -> dict:
    """Merge the part manifests of ``world`` ranks' :func:`build_teacher_cache` into ``manifest.json`` (each
    part present, every example of the data stored once) and remove the parts. Returns the manifest."""
    parts = []
    for rank in range(world):
        path = os.path.join(directory, f"manifest.part-{rank:03d}.json")
        if not os.path.isfile(path):
            raise ValueError(
                f"teacher cache {directory}: rank {rank} wrote no part manifest (its build did not "
                f"finish): build the cache again"
            )
        with open(path, encoding="utf-8") as f:
            parts.append(json.load(f))
    manifest = dict(parts[0], shards={}, tokens=0, part_bytes=dict.fromkeys(parts[0]["part_bytes"], 0))
    for part in parts:
        manifest["tokens"] += part["tokens"]
        for key in ("vocab", "id_bits", "logits"):
            manifest[key] = manifest[key] or part[key]
        for name, b in part["part_bytes"].items():
            manifest["part_bytes"][name] += b
        manifest["shards"].update(part["shards"])
    stored = sum(record["examples"] for record in manifest["shards"].values())
    if stored != manifest["examples"]:
        raise ValueError(f"teacher cache {directory}: the ranks stored {stored} examples of {manifest['examples']}")
    _add_bytes_per_token(manifest)
    write_atomic(os.path.join(directory, MANIFEST), json.dumps(manifest, indent=1))
    for rank in range(world):
        os.remove(os.path.join(directory, f"manifest.part-{rank:03d}.json"))
    return manifest


# --------------------------------------------------------------------------- reading


class TeacherCache:
    """A teacher cache opened for a run: ``expect`` holds what the run needs (any manifest key: ``teacher``,
    ``tokenizer``, ``data``, ``layers``, ``k``, ``temperature``, ``quantization``); a difference is a ValueError
    naming each key with the cache's and the run's values, ending with ``rebuild`` (the command that rebuilds
    it). Opening reads the manifest and the shards' sizes alone; with ``verify`` a shard is checked against its
    SHA-256 when this process first reads it. Reads may come from several threads."""

    def __init__(
        self, directory: str, expect: Optional[dict] = None, verify: bool = True, rebuild: str = "build the cache again"
    ):
        path = os.path.join(directory, MANIFEST)
        if not os.path.isfile(path):
            raise ValueError(f"teacher cache {directory}: no {MANIFEST} (not a cache, or its build did not finish)")
        with open(path, encoding="utf-8") as f:
            self.manifest = json.load(f)
        if self.manifest.get("format") != _FORMAT:
            raise ValueError(
                f"teacher cache {directory} has format {self.manifest.get('format')!r}, this fastted "
                f"reads format {_FORMAT}: {rebuild}"
            )
        differ = [
            f"{key}: cache {self.manifest.get(key)!r}, run {want!r}"
            for key, want in (expect or {}).items()
            if self.manifest.get(key) != want
        ]
        if differ:
            raise ValueError(f"teacher cache {directory} was made for another run ({'; '.join(differ)}): {rebuild}")
        self.directory, self.verify, self.rebuild = directory, verify, rebuild
        self._shards: list[_Shard] = []
        by_rank: dict[int, list] = {}
        for name, record in self.manifest["shards"].items():
            shard = os.path.join(directory, name)
            try:
                size = os.stat(shard).st_size
            except FileNotFoundError:
                size = None
            if size != record["bytes"]:
                raise ValueError(
                    f"teacher cache {directory}: {name} is missing or has another size than its "
                    f"manifest's (damaged): {rebuild}"
                )
            by_rank.setdefault(record["rank"], []).append((record["first"], len(self._shards)))
            self._shards.append(_Shard(shard, record))
        self._world = self.manifest["world"]
        self._firsts = {r: [first for first, _ in sorted(entries)] for r, entries in by_rank.items()}
        self._which = {r: [i for _, i in sorted(entries)] for r, entries in by_rank.items()}
        if self.manifest["logits"] is not None:  # what a padding token's logits hold
            self._pad = padding_row(min(self.manifest["k"], self.manifest["vocab"]), self.manifest["id_bits"])

    def __len__(self) -> int:
        return self.manifest["examples"]

    def _rows(self, example: int) -> tuple[dict, dict, list]:
        """(arrays, tags, [logit rows slice, target rows slice]) of dataset row ``example``."""
        if not 0 <= example < len(self):
            raise ValueError(f"teacher cache {self.directory} holds no example {example} (it has {len(self)})")
        rank, ordinal = example % self._world, example // self._world
        firsts = self._firsts[rank]
        at = bisect.bisect_right(firsts, ordinal) - 1
        shard = self._shards[self._which[rank][at]]
        row = ordinal - firsts[at]

        def damaged(what: str) -> Exception:
            return ValueError(
                f"teacher cache {self.directory}: {os.path.basename(shard.path)} {what} (damaged): {self.rebuild}"
            )

        arrays, tags = shard.arrays(self.verify, damaged)
        if int(arrays["example_ids"][row]) != example:
            raise damaged(f"holds example {int(arrays['example_ids'][row])} where its manifest puts {example}")
        spans = {}
        for group in ("logit", "target"):
            if f"{group}_offsets" in arrays:
                lo, hi = arrays[f"{group}_offsets"][row : row + 2].tolist()
                spans[group] = slice(lo, hi)
        return arrays, tags, spans

    def example(self, index: int, dequantize: bool = True) -> dict:
        """The stored teacher outputs of dataset row ``index``: ``topk_values`` (rows, k) fp32 (as the packed
        form gives them back), ``topk_ids`` (rows, k) int64, ``tail_lse`` (rows,), ``targets``: per mapped layer
        (rows, d) fp32 (dequantized), or with ``dequantize=False`` as stored, with ``scales``: per layer (rows,)
        fp32 (None for bf16); ``positions``: the indices, among the example's tokens, of the target rows (None:
        every token's)."""
        arrays, tags, spans = self._rows(int(index))
        out = {"targets": [], "scales": [], "positions": None}
        if "logit" in spans:
            r = spans["logit"]
            packed = PackedTopK(
                *(
                    _tensor(arrays[f"topk_{key}"][r], tags[f"topk_{key}"])
                    for key in ("words", "levels", "top", "step", "tail")
                ),
                self.manifest["id_bits"],
            )
            out["topk_values"], out["topk_ids"], out["tail_lse"] = unpack_topk(packed)
        r = spans.get("target")
        if "target_positions" in arrays:
            out["positions"] = _tensor(arrays["target_positions"][r], "I32").long()
        for i in range(len(self.manifest["layers"])):
            scale = _tensor(arrays[f"layer{i}_scale"][r], "F32") if f"layer{i}_scale" in arrays else None
            values = _tensor(arrays[f"layer{i}"][r], tags[f"layer{i}"])
            out["targets"].append(dequantize_rows(values, scale) if dequantize else values)
            out["scales"].append(None if dequantize else scale)
        return out

    def batch(self, index: Tensor, mask: Optional[Tensor], device=None, dequantize: bool = True) -> dict:
        """The stored outputs of a batch of dataset rows ``index`` (B,), placed at the tokens of its attention
        ``mask`` (B, T) (the positions the cache stored): ``topk``, a :class:`~fastted.ops.packed_topk.PackedTopK`
        of leading shape (B, T) per token (a classification teacher's: (B,)), None in a cache without logits,
        whose padding rows hold ids 0..k-1 (distinct, as the losses need) and are left out by the mask;
        ``targets``: per cached layer (B, T, d) fp32, zero where nothing is stored; ``target_mask``: (B, T) bool,
        the tokens that have targets when the cache keeps a share of them (None: every token of the mask).

        ``dequantize=False``: the targets as stored (int8, fp8 or bf16) with ``scales``, per layer (B, T) fp32
        row scales (None for bf16), for :func:`~fastted.ops.filtered_mse.filtered_mse`'s ``teacher_scales``,
        which dequantizes them inside its kernel; else ``scales`` is None."""
        index = [int(i) for i in index.tolist()]
        n = len(index)
        rows = [self._rows(i) for i in index]
        if mask is None:  # every stored token, from the first position on
            mask = self._stored_mask(rows)
        mask = mask.detach().cpu().bool()
        lengths, t = [int(mask[b].sum()) for b in range(n)], mask.shape[1]
        prefix = [bool(mask[b, : lengths[b]].all()) for b in range(n)]  # right padding: a slice
        scaled = self.manifest["quantization"] != "bf16"
        out = {"topk": None, "targets": [], "scales": [] if scaled and not dequantize else None, "target_mask": None}

        def place(dst: np.ndarray, b: int, src: np.ndarray, positions=None) -> None:
            """Example b's stored rows ``src`` into its tokens of ``dst`` (B, T, ...) (at ``positions`` among
            them when a share is kept)."""
            if positions is None and prefix[b]:
                dst[b, : len(src)] = src
            else:
                tokens = mask[b].nonzero().squeeze(-1).numpy()
                dst[b, tokens if positions is None else tokens[positions]] = src

        if self.manifest["logits"] is not None:
            token_logits = self.manifest["logits"] == "token"
            lead = (n, t) if token_logits else (n,)
            fields = [value.expand(*lead, *value.shape).clone() for value in self._pad[:5]]
            views = [f.numpy() for f in fields]
            for b, (arrays, _, spans) in enumerate(rows):
                r = spans["logit"]
                if token_logits:
                    self._check_rows(index[b], r.stop - r.start, lengths[b])
                for view, key in zip(views, ("words", "levels", "top", "step", "tail")):
                    src = arrays[f"topk_{key}"][r]
                    if token_logits:
                        place(view, b, src)
                    else:
                        view[b] = src[0]
            out["topk"] = PackedTopK(*fields, self.manifest["id_bits"])
            if device is not None:
                out["topk"] = out["topk"].to(device)
        per_token = self.manifest["targets_per"] == "token"
        keep_share = "target_positions" in rows[0][0] if rows else False
        if keep_share and per_token:
            target_mask = torch.zeros(n, t, dtype=torch.bool)
        for i in range(len(self.manifest["layers"])):
            tag = rows[0][1][f"layer{i}"]
            width = rows[0][0][f"layer{i}"].shape[-1]
            lead = (n, t) if per_token else (n,)
            dtype = _TORCH[tag]
            layer = torch.zeros(*lead, width, dtype=_BITS.get(dtype, dtype))  # bf16 and fp8 written as their bits
            scales = torch.zeros(lead) if scaled else None
            lv, sv = layer.numpy(), None if scales is None else scales.numpy()
            for b, (arrays, _, spans) in enumerate(rows):
                r = spans["target"]
                positions = arrays["target_positions"][r] if keep_share else None
                if per_token:
                    if positions is None:
                        self._check_rows(index[b], r.stop - r.start, lengths[b])
                    place(lv, b, arrays[f"layer{i}"][r], positions)
                    if scaled:
                        place(sv, b, arrays[f"layer{i}_scale"][r], positions)
                    if i == 0 and keep_share:
                        place(target_mask.numpy(), b, np.ones(r.stop - r.start, dtype=bool), positions)
                else:
                    lv[b] = arrays[f"layer{i}"][r][0]
                    if scaled:
                        sv[b] = arrays[f"layer{i}_scale"][r][0]
            layer = layer.view(dtype)
            if dequantize:
                layer = layer.float() if scales is None else layer.float() * scales[..., None]
                scales = None
            out["targets"].append(layer if device is None else layer.to(device))
            if out["scales"] is not None:
                out["scales"].append(scales if device is None else scales.to(device))
        if keep_share and per_token:
            out["target_mask"] = target_mask if device is None else target_mask.to(device)
        return out

    def _stored_mask(self, rows: list) -> Tensor:
        """The attention mask of a batch whose examples fill their first positions: from the stored rows."""
        if self.manifest["logits"] != "token" and not (
            self.manifest["layers"] and self.manifest["targets_per"] == "token"
        ):
            return torch.ones(len(rows), 1, dtype=torch.bool)  # nothing is placed at tokens
        if self.manifest["logits"] == "token":
            group = "logit"
        elif self.manifest["targets_per"] == "token" and "target_positions" not in rows[0][0]:
            group = "target"
        else:
            raise ValueError(
                f"teacher cache {self.directory}: reading it needs the batch's attention mask (its "
                f"examples' token counts are not stored)"
            )
        counts = [spans[group].stop - spans[group].start for _, _, spans in rows]
        return torch.arange(max(counts, default=1))[None, :] < torch.tensor(counts)[:, None]

    def _check_rows(self, example, stored: int, tokens: int) -> None:
        if stored != tokens:
            raise ValueError(
                f"teacher cache {self.directory}: example {int(example)} has {stored} stored tokens but "
                f"{tokens} in this batch's attention mask: the data differs from the cache's"
            )
