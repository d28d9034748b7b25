"""The teacher cache at scale (its issue's targets), measured on real caches built from a stub teacher:

1. size: a logits-only cache at k = 64 and Llama 3's 128,256 entries takes at most 256 bytes a token
   (``manifest["bytes_per_token"]``, by part);
2. accuracy of the packed top-k: the sparse KL (:func:`fastted.reference.sparse_logit_kd_reference`, T = 1 and 2)
   of a student against the packed top-64 read back is within 1 % of the KL against the top-64 stored as bf16
   values, on LLM-like synthetic rows at 128,256 entries and on SmolLM2-135M's real logits (49,152 entries; the
   GGUF model the project ships, skipped where it does not load), the student the teacher plus noise at two
   scales (KL about 0.1 and about 1);
3. the layer-target budget: a 4096-wide teacher, 4 mapped layers, int8, ``layer_bytes=2048`` (each token's
   targets kept with probability f): the MSE term over the kept tokens against the MSE over every token's full
   int8 targets (the same cache built without a budget), per batch of 4096 tokens;
4. peak RSS while building (4,096-token blocks of that teacher with k = 64 at 128,256 entries, default
   ``shard_bytes``), in a fresh process per size, at two sizes an order of magnitude apart: under 1 GB and
   about the same (glibc's mmap threshold as the builder fixes it);
5. opening a cache of 1,000 shards (4 ranks' shards merged by :func:`fastted.train.cache.finish_teacher_cache`) in a
   fresh process takes under 1 s and hashes no shard byte (``fastted.files.bytes_hashed``).

::

    python benchmarks/cache_scale.py [--dir /tmp/...] [--json benchmarks/results/<date>-cpu-2core-cache-scale.json]
    python benchmarks/cache_scale.py --quick   # every part at tiny sizes, a few seconds; no result file

The caches are written under ``--dir`` (a fresh temporary folder by default) and removed at the end. About 18
minutes on 2 CPU cores (part 4's two larger builds: 6 and 8 of them); 1.3 GB of disk at most.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Sequence
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks import result_file  # noqa: E402

VOCAB, K, HEAD_WIDTH = 128_256, 64, 64
BYTES_PER_TOKEN, KL_RELATIVE_ERROR, PEAK_BYTES, OPEN_SECONDS = 256, 0.01, 1e9, 1.0
KL_TARGETS = (0.1, 1.0)  # the student's KL against the teacher (exact top-k), at each temperature
TEMPERATURES = (1.0, 2.0)
OUTLIER_DIMS, SINK_DIMS = 6, 2  # LLM-like hidden states: outlier channels in every token, a sink at position 0

# Every part at its full size and at --quick's.
# --quick's layers are 16 times narrower, and so is their budget (the same f).
FULL = dict(
    size_examples=16,
    size_length=256,
    kl_batches=8,
    kl_rows=256,
    real_batches=8,
    layer_width=4096,
    layer_bytes=2048,
    layer_batches=16,
    layer_length=4096,
    rss_blocks=(8, 80),
    rss_length=4096,
    open_examples=1000,
    open_repeats=5,
)
QUICK = dict(
    size_examples=4,
    size_length=64,
    kl_batches=2,
    kl_rows=64,
    real_batches=0,
    layer_width=256,
    layer_bytes=128,
    layer_batches=4,
    layer_length=256,
    rss_blocks=(2, 4),
    rss_length=256,
    open_examples=1000,
    open_repeats=1,
)


# --------------------------------------------------------------------------- the stub teacher


class StubTeacher:
    """A causal LM as :func:`fastted.train.cache.build_teacher_cache` calls it (:class:`fastted.models.ModelAdapter`'s
    interface): each row's head input and layer states are drawn from a generator seeded by the row's tokens and
    the layer, so a row gets the same outputs in any batch and at every call (a student made later sees the
    states the cache was built from).

    Hidden states are LLM-like: N(0, 1) entries times a log-normal scale per token, plus ``OUTLIER_DIMS``
    channels of magnitude 10 to 60 in every token and, at each row's first position, an attention sink of
    magnitude 400 in ``SINK_DIMS`` channels."""

    task = "clm"

    def __init__(
        self, vocab: int, head_width: int = HEAD_WIDTH, layer_width: int = 0, dtype=torch.float32, seed: int = 0
    ):
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(vocab, head_width, generator=g)  # (V, H)
        self.layer_width, self.dtype, self.seed = layer_width, dtype, seed
        if layer_width:
            dims = torch.randperm(layer_width, generator=g)
            self.outliers, self.sinks = dims[:OUTLIER_DIMS], dims[OUTLIER_DIMS : OUTLIER_DIMS + SINK_DIMS]
            sign = torch.randint(0, 2, (OUTLIER_DIMS,), generator=g) * 2 - 1
            self.outlier_values = sign * (10 + 50 * torch.rand(OUTLIER_DIMS, generator=g))  # (OUTLIER_DIMS,)

    def lm_head_parts(self):
        return self.weight, None

    def _generator(self, ids: torch.Tensor, layer: int) -> torch.Generator:
        row = zlib.crc32(ids.to(torch.int64).numpy().tobytes())
        return torch.Generator().manual_seed((row * 1_000_003 + (layer + 1) * 7_919 + self.seed) % 2**62)

    def states(self, ids: torch.Tensor, layer: int) -> torch.Tensor:
        """(T, d) states of layer ``layer`` for a row of token ``ids`` (T,)."""
        g = self._generator(ids, layer)
        t = ids.shape[0]
        scale = torch.exp(0.3 * torch.randn(t, 1, generator=g))  # (T, 1)
        x = torch.randn(t, self.layer_width, generator=g, dtype=self.dtype).mul_(scale.to(self.dtype))
        x[:, self.outliers] += (self.outlier_values * (1 + 0.1 * torch.randn(t, OUTLIER_DIMS, generator=g))).to(
            self.dtype
        )
        x[0, self.sinks] += 400.0
        return x

    def __call__(self, batch: dict, layers: Sequence[int] = (), head: bool = False):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        rows = [ids[b][mask[b].bool()] for b in range(ids.shape[0])]
        head_input = torch.zeros(*ids.shape, self.weight.shape[1])  # (B, T, H)
        states = [torch.zeros(*ids.shape, self.layer_width, dtype=self.dtype) for _ in layers]  # (B, T, d) each
        for b, row in enumerate(rows):
            n = row.shape[0]
            head_input[b, :n] = torch.randn(n, self.weight.shape[1], generator=self._generator(row, -1))
            for state, layer in zip(states, layers):
                state[b, :n] = self.states(row, layer)
        return SimpleNamespace(hidden_states=states, mask=mask, head_input=head_input, logits=None)


def token_examples(n: int, length: int, seed: int, vocab: int = VOCAB) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, vocab, (length,), generator=g).tolist()} for _ in range(n)]


def _collator():
    from fastted.train.data import CLMCollator

    return CLMCollator(0)


# --------------------------------------------------------------------------- 1. size


def cache_size(directory: str, examples: int, length: int, vocab: int = VOCAB, k: int = K) -> dict:
    """Bytes a token of a logits-only cache of ``examples`` x ``length`` tokens at ``k`` and ``vocab``."""
    from fastted.train.cache import build_teacher_cache

    shutil.rmtree(directory, ignore_errors=True)
    began = time.perf_counter()
    manifest = build_teacher_cache(
        StubTeacher(vocab), token_examples(examples, length, seed=1), _collator(), directory, k=k, batch_size=4
    )
    record = {
        "vocab": vocab,
        "k": k,
        "tokens": manifest["tokens"],
        "shards": len(manifest["shards"]),
        "id_bits": manifest["id_bits"],
        "bytes_per_token": manifest["bytes_per_token"],
        "seconds": round(time.perf_counter() - began, 2),
    }
    record["within_target"] = manifest["bytes_per_token"]["total"] <= BYTES_PER_TOKEN
    shutil.rmtree(directory, ignore_errors=True)
    return record


# --------------------------------------------------------------------------- 2. KL of the packed top-k


def llm_logits(rows: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """(rows, vocab) LLM-like logits: N(0, 4) entries plus, per row, 0 to 8 ids boosted by 5 to 15 (a flat row
    without them, one dominated by a single id with a boost of 15: the mix of a language model's rows)."""
    logits = torch.randn(rows, vocab, generator=generator) * 2
    for r in range(rows):
        n = int(torch.randint(0, 9, (), generator=generator))
        ids = torch.randint(0, vocab, (n,), generator=generator)
        logits[r, ids] += 5 + 10 * torch.rand(n, generator=generator)
    return logits


def _kl_variants(student: torch.Tensor, teacher: torch.Tensor, temperature: float, k: int) -> dict:
    """The sparse KL of ``student`` against ``teacher``'s top-k stored three ways: fp32, bf16 values, packed."""
    from fastted.ops.packed_topk import pack_topk, unpack_topk
    from fastted.reference import sparse_logit_kd_reference, topk_targets_reference

    values, ids, tail = topk_targets_reference(teacher, k, temperature)
    stored = {
        "fp32": (values, ids, tail),
        "bf16": (values.bfloat16().float(), ids, tail),
        "packed": unpack_topk(pack_topk(values, ids, tail, teacher.shape[-1])),
    }
    return {
        name: float(sparse_logit_kd_reference(student, *form, temperature=temperature)) for name, form in stored.items()
    }


def noise_for_kl(
    teacher: torch.Tensor, noise: torch.Tensor, temperature: float, target: float, k: int = K, steps: int = 8
) -> float:
    """The scale s at which ``teacher + s * noise`` has a KL (exact top-k) of about ``target``: bisection on
    log s (the KL grows with s)."""
    from fastted.reference import sparse_logit_kd_reference, topk_targets_reference

    values, ids, tail = topk_targets_reference(teacher, k, temperature)
    low, high = -6.0, 4.0
    for _ in range(steps):
        mid = (low + high) / 2
        kl = float(
            sparse_logit_kd_reference(
                teacher + torch.exp(torch.tensor(mid)) * noise, values, ids, tail, temperature=temperature
            )
        )
        low, high = (mid, high) if kl < target else (low, mid)
    return float(torch.exp(torch.tensor((low + high) / 2)))


def kl_errors(source: str, batches: Sequence[torch.Tensor], k: int = K, seed: int = 0) -> list[dict]:
    """One row per (temperature, KL scale): the KL against the bf16 and the packed top-k of each (N, V) teacher
    batch of ``batches``, the student the teacher plus Gaussian noise whose scale (calibrated on the first 64
    rows of the first batch) gives the row's KL, and |packed - bf16| / bf16 per batch."""
    out = []
    for temperature in TEMPERATURES:
        for target in KL_TARGETS:
            first = batches[0][:64]
            noise = torch.randn(first.shape, generator=torch.Generator().manual_seed(seed))
            scale = noise_for_kl(first, noise, temperature, target, k)
            per_batch = []
            for i, teacher in enumerate(batches):
                g = torch.Generator().manual_seed(seed + 1 + i)
                student = teacher + scale * torch.randn(teacher.shape, generator=g)
                per_batch.append(_kl_variants(student, teacher, temperature, k))
            rel = [abs(b["packed"] - b["bf16"]) / b["bf16"] for b in per_batch]
            rel_fp32 = {name: [abs(b[name] - b["fp32"]) / b["fp32"] for b in per_batch] for name in ("bf16", "packed")}
            out.append(
                {
                    "source": source,
                    "vocab": batches[0].shape[-1],
                    "k": k,
                    "temperature": temperature,
                    "noise_scale": round(scale, 4),
                    "batches": len(batches),
                    "rows": batches[0].shape[0],
                    "kl_bf16_mean": statistics.mean(b["bf16"] for b in per_batch),
                    "kl_packed_mean": statistics.mean(b["packed"] for b in per_batch),
                    "rel_err_mean": statistics.mean(rel),
                    "rel_err_max": max(rel),
                    "vs_fp32_rel_err_max": {name: max(v) for name, v in rel_fp32.items()},
                    "within_target": max(rel) <= KL_RELATIVE_ERROR,
                }
            )
    return out


def synthetic_logit_batches(batches: int, rows: int, vocab: int = VOCAB, seed: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [llm_logits(rows, vocab, g) for _ in range(batches)]


def smollm2(directory: str, batches: int, rows: int, k: int = K) -> dict:
    """SmolLM2-135M's real logits over the BBC News text (``batches`` sequences of ``rows`` tokens): the KL rows
    of :func:`kl_errors` and the size of a logits-only cache of them built through
    :class:`fastted.models.ModelAdapter`; ``{"skipped": why}`` where the model or the text does not load."""
    from fastted.models import ModelAdapter
    from fastted.train.cache import build_teacher_cache
    from fastted.train.config import ModelConfig
    from fastted.train.data import load_bbc_news
    from fastted.train.sources import load_model, load_tokenizer, model_source

    began = time.perf_counter()
    try:
        folder, gguf = model_source(ModelConfig(path="smollm2"), "teacher")
        model = load_model(folder, "clm", gguf).eval()
        tokenizer = load_tokenizer(folder, gguf)
        texts = load_bbc_news()["text"]
    except Exception as error:  # noqa: BLE001 -- reported in the result file, not fatal to the other parts
        return {"skipped": f"{type(error).__name__}: {error}"}
    loaded = time.perf_counter() - began
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text)["input_ids"]
        if len(ids) >= batches * rows:
            break
    examples = [{"input_ids": ids[i * rows : (i + 1) * rows]} for i in range(batches)]
    with torch.no_grad():
        logits = [model(input_ids=torch.tensor([e["input_ids"]])).logits[0].float() for e in examples]  # (T, V)
    record = {
        "model": f"SmolLM2-135M-Instruct ({gguf})",
        "load_seconds": round(loaded, 1),
        "kl": kl_errors("SmolLM2-135M on BBC News", logits, k),
    }
    shutil.rmtree(directory, ignore_errors=True)
    manifest = build_teacher_cache(ModelAdapter(model), examples, _collator(), directory, k=k, batch_size=2)
    record["cache"] = {
        "vocab": manifest["vocab"],
        "k": k,
        "tokens": manifest["tokens"],
        "id_bits": manifest["id_bits"],
        "bytes_per_token": manifest["bytes_per_token"],
    }
    shutil.rmtree(directory, ignore_errors=True)
    return record


# --------------------------------------------------------------------------- 3. the layer-target budget


def layer_budget(
    directory: str, width: int, batches: int, length: int, layers: int = 4, layer_bytes: int = 2048, seed: int = 3
) -> dict:
    """The MSE term over the kept tokens of a cache with ``layer_bytes`` against the MSE over every token of the
    same cache without a budget, per batch of one ``length``-token row, the student the live teacher's states
    times (1 + 0.05 z1) plus 0.3 z2 (z Gaussian: an error that grows with the state, outliers and sink
    included)."""
    from fastted.reference import filtered_mse_reference
    from fastted.train.cache import TeacherCache, build_teacher_cache

    teacher = StubTeacher(VOCAB, layer_width=width)
    examples = token_examples(batches, length, seed=seed)
    mapped = list(range(layers))
    full, kept = os.path.join(directory, "full"), os.path.join(directory, "budget")
    for path in (full, kept):
        shutil.rmtree(path, ignore_errors=True)
    began = time.perf_counter()
    build_teacher_cache(teacher, examples, _collator(), full, layers=mapped, k=0, batch_size=1)
    manifest = build_teacher_cache(
        teacher, examples, _collator(), kept, layers=mapped, k=0, batch_size=1, layer_bytes=layer_bytes, seed=seed
    )
    built = time.perf_counter() - began
    full_cache, kept_cache = TeacherCache(full), TeacherCache(kept)
    mask = torch.ones(1, length, dtype=torch.bool)
    rows = []
    for i, example in enumerate(examples):
        ids = torch.tensor(example["input_ids"])
        live = [teacher.states(ids, layer)[None] for layer in mapped]  # (1, T, d) each
        g = torch.Generator().manual_seed(seed * 1000 + i)
        student = [
            t * (1 + 0.05 * torch.randn(t.shape, generator=g)) + 0.3 * torch.randn(t.shape, generator=g) for t in live
        ]
        index = torch.tensor([i])
        every = full_cache.batch(index, mask, dequantize=True)
        share = kept_cache.batch(index, mask, dequantize=True)
        none = [None] * layers
        mse_full = float(filtered_mse_reference(student, none, every["targets"], mask=mask)[0])
        mse_kept = float(filtered_mse_reference(student, none, share["targets"], mask=share["target_mask"])[0])
        mse_live = float(filtered_mse_reference(student, none, live, mask=mask)[0])
        rows.append(
            {
                "kept_tokens": int(share["target_mask"].sum()),
                "sink_kept": bool(share["target_mask"][0, 0]),
                "mse_full_int8": mse_full,
                "mse_kept": mse_kept,
                "rel_err": (mse_kept - mse_full) / mse_full,
                "int8_vs_live_rel_err": (mse_full - mse_live) / mse_live,
            }
        )
    rel = [r["rel_err"] for r in rows]
    record = {
        "width": width,
        "layers": layers,
        "quantization": "int8",
        "layer_bytes": layer_bytes,
        "fraction_f": manifest["layer_fraction"],
        "batches": batches,
        "tokens_per_batch": length,
        "bytes_per_token": manifest["bytes_per_token"],
        "full_bytes_per_token": full_cache.manifest["bytes_per_token"],
        "rel_err": {
            "mean_abs": statistics.mean(abs(r) for r in rel),
            "mean": statistics.mean(rel),
            "std": statistics.pstdev(rel),
            "min": min(rel),
            "max": max(rel),
        },
        "kept_tokens_mean": statistics.mean(r["kept_tokens"] for r in rows),
        "rel_err_mean_by_sink": {  # the batches whose first token (the sink) has kept targets, the others
            name: statistics.mean(errs) if errs else None
            for name, errs in (
                ("kept", [r["rel_err"] for r in rows if r["sink_kept"]]),
                ("dropped", [r["rel_err"] for r in rows if not r["sink_kept"]]),
            )
        },
        "build_seconds_both": round(built, 1),
        "per_batch": rows,
    }
    for path in (full, kept):
        shutil.rmtree(path, ignore_errors=True)
    return record


# --------------------------------------------------------------------------- 4. peak RSS while building


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


MALLOC = ("builder",)  # glibc's mmap threshold as build_teacher_cache itself fixes it (return_freed_host_memory)


def build_for_rss(directory: str, blocks: int, length: int, width: int, layer_bytes: int, malloc: str) -> dict:
    """Build ``blocks`` rows of ``length`` tokens (4 layers of ``width``, bf16 states, k = 64 at 128,256
    entries, ``layer_bytes``, batch size 1, default shard_bytes) in this process; its VmHWM at the end (run in a
    fresh process: the peak is the build's). Nothing is set here: ``build_teacher_cache`` fixes glibc's mmap
    threshold at 1 MiB itself (:func:`fastted.train.engine.return_freed_host_memory`; glibc's own rises to 32 MiB as
    large blocks are freed, and a build from a plain script then kept 630 MB more at 80 blocks)."""
    from fastted.train.cache import LOGIT_ELEMENTS, SHARD_BYTES, build_teacher_cache

    if malloc not in MALLOC:
        raise ValueError(f"malloc must be one of {MALLOC}, got {malloc!r}")
    teacher = StubTeacher(VOCAB, layer_width=width, dtype=torch.bfloat16)
    examples = token_examples(blocks, length, seed=4)
    before = {"VmHWM_bytes": _status_kib("VmHWM") * 1024, "VmRSS_bytes": _status_kib("VmRSS") * 1024}
    began = time.perf_counter()
    manifest = build_teacher_cache(
        teacher, examples, _collator(), directory, layers=[0, 1, 2, 3], k=K, batch_size=1, layer_bytes=layer_bytes
    )
    return {
        "malloc": malloc,
        "blocks": blocks,
        "tokens": manifest["tokens"],
        "seconds": round(time.perf_counter() - began, 1),
        "shards": len(manifest["shards"]),
        "bytes_per_token": manifest["bytes_per_token"],
        "fraction_f": manifest["layer_fraction"],
        "before_build": before,
        "rss_at_end_bytes": _status_kib("VmRSS") * 1024,
        "peak_rss_bytes": _status_kib("VmHWM") * 1024,
        # What the peak is made of, besides the process before the build: the shard buffer (up to
        # shard_bytes and one example), a batch's teacher states (bf16), a block of logits (fp32).
        "sizes_bytes": {
            "shard_bytes": SHARD_BYTES,
            "batch_states": 4 * length * width * 2,
            "logit_block": LOGIT_ELEMENTS * 4,
        },
    }


def peak_rss(directory: str, blocks: int, length: int, width: int, layer_bytes: int, malloc: str) -> dict:
    """:func:`build_for_rss` in a fresh Python process; the cache is removed afterwards."""
    shutil.rmtree(directory, ignore_errors=True)
    record = _child(
        "build",
        {
            "directory": directory,
            "blocks": blocks,
            "length": length,
            "width": width,
            "layer_bytes": layer_bytes,
            "malloc": malloc,
        },
    )
    shutil.rmtree(directory, ignore_errors=True)
    return record


# --------------------------------------------------------------------------- 5. opening 1,000 shards


def many_shards(directory: str, examples: int, world: int = 4) -> dict:
    """A tiny cache (k = 64 of 4,096 entries, one 64-wide layer, 4 tokens an example) of one shard per example
    (``shard_bytes=1``), written by ``world`` simulated ranks and merged. (Opening reads the manifest and the
    shards' sizes: what the shards hold does not matter.)"""
    from fastted.train.cache import build_teacher_cache, finish_teacher_cache

    shutil.rmtree(directory, ignore_errors=True)
    teacher = StubTeacher(4096, layer_width=64)
    data = token_examples(examples, 4, seed=5, vocab=4096)
    began = time.perf_counter()
    for rank in range(world):
        build_teacher_cache(
            teacher, data, _collator(), directory, layers=[0], k=K, batch_size=16, shard_bytes=1, rank=rank, world=world
        )
    manifest = finish_teacher_cache(directory, world)
    return {
        "shards": len(manifest["shards"]),
        "examples": manifest["examples"],
        "world": world,
        "manifest_bytes": os.path.getsize(os.path.join(directory, "manifest.json")),
        "build_seconds": round(time.perf_counter() - began, 1),
    }


def open_cache(directory: str) -> dict:
    """Seconds of ``TeacherCache(directory)`` in this process and the bytes hashed by it, then by a first read."""
    from fastted import files
    from fastted.train.cache import TeacherCache

    before = files.bytes_hashed
    began = time.perf_counter()
    cache = TeacherCache(directory)
    seconds = time.perf_counter() - began
    opened = files.bytes_hashed - before
    cache.example(len(cache) - 1)
    return {
        "seconds": seconds,
        "bytes_hashed_after_open": opened,
        "bytes_hashed_after_first_read": files.bytes_hashed - before,
        "shards": len(cache.manifest["shards"]),
    }


def open_many(directory: str, examples: int, repeats: int) -> dict:
    """:func:`many_shards`, then :func:`open_cache` in ``repeats`` fresh processes: the median seconds."""
    record = many_shards(directory, examples)
    opens = [_child("open", {"directory": directory}) for _ in range(repeats)]
    seconds = [o["seconds"] for o in opens]
    record.update(
        open_seconds_median=statistics.median(seconds),
        open_seconds=seconds,
        bytes_hashed_after_open=max(o["bytes_hashed_after_open"] for o in opens),
        bytes_hashed_after_first_read=opens[0]["bytes_hashed_after_first_read"],
        largest_shard_bytes=max(
            os.path.getsize(os.path.join(directory, name))
            for name in os.listdir(directory)
            if name.startswith("shard-")
        ),
    )
    record["within_target"] = record["open_seconds_median"] < OPEN_SECONDS and record["bytes_hashed_after_open"] == 0
    shutil.rmtree(directory, ignore_errors=True)
    return record


# --------------------------------------------------------------------------- fresh processes

_CHILDREN = {"build": build_for_rss, "open": open_cache}


def _child(name: str, kwargs: dict) -> dict:
    """``_CHILDREN[name](**kwargs)`` in a fresh Python process; its JSON result."""
    done = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", name, json.dumps(kwargs)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the {name} process failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- the whole


def run(directory: str, sizes: dict, real: bool = True, log=print) -> dict:
    """Every part at ``sizes`` (FULL or QUICK), its caches under ``directory``."""
    out = {}
    log("1. size (logits only)")
    out["size"] = cache_size(os.path.join(directory, "size"), sizes["size_examples"], sizes["size_length"])
    log("2. KL of the packed top-k (synthetic)")
    kl = kl_errors("synthetic LLM-like", synthetic_logit_batches(sizes["kl_batches"], sizes["kl_rows"]))
    out["smollm2"] = {"skipped": "--quick"}
    if real and sizes["real_batches"]:
        log("2. KL of the packed top-k (SmolLM2-135M)")
        out["smollm2"] = smollm2(os.path.join(directory, "smollm2"), sizes["real_batches"], sizes["kl_rows"])
        kl += out["smollm2"].get("kl", [])
    out["kl"] = kl
    log("3. layer-target budget")
    out["layer_budget"] = layer_budget(
        os.path.join(directory, "layers"),
        sizes["layer_width"],
        sizes["layer_batches"],
        sizes["layer_length"],
        layer_bytes=sizes["layer_bytes"],
    )
    log("4. peak RSS while building")
    out["peak_rss"] = [
        peak_rss(
            os.path.join(directory, f"rss-{n}"),
            n,
            sizes["rss_length"],
            sizes["layer_width"],
            sizes["layer_bytes"],
            malloc,
        )
        for malloc in MALLOC
        for n in sizes["rss_blocks"]
    ]
    log("5. opening a cache of 1,000 shards")
    out["open"] = open_many(os.path.join(directory, "open"), sizes["open_examples"], sizes["open_repeats"])
    return out


def table(out: dict) -> str:
    size, layers, opened = out["size"], out["layer_budget"], out["open"]
    lines = [
        f"1. bytes/token, k={size['k']}, V={size['vocab']:,}: {size['bytes_per_token']} (target <= {BYTES_PER_TOKEN})"
    ]
    if "cache" in out["smollm2"]:
        c = out["smollm2"]["cache"]
        lines.append(f"   SmolLM2, V={c['vocab']:,}: {c['bytes_per_token']}")
    lines.append("2. | source | V | T | KL (bf16) | KL (packed) | rel err mean | rel err max |")
    for r in out["kl"]:
        lines.append(
            f"   | {r['source']} | {r['vocab']:,} | {r['temperature']:g} | {r['kl_bf16_mean']:.4f} | "
            f"{r['kl_packed_mean']:.4f} | {r['rel_err_mean']:.2e} | {r['rel_err_max']:.2e} |"
        )
    if "skipped" in out["smollm2"]:
        lines.append(f"   SmolLM2 skipped: {out['smollm2']['skipped']}")
    e = layers["rel_err"]
    lines.append(
        f"3. f={layers['fraction_f']:.4f}, bytes/token {layers['bytes_per_token']} (full: "
        f"{layers['full_bytes_per_token']['total']}); MSE kept vs all, rel err: mean |.| "
        f"{e['mean_abs']:.2e}, mean {e['mean']:.2e}, std {e['std']:.2e}, min {e['min']:.2e}, "
        f"max {e['max']:.2e}"
    )
    for r in out["peak_rss"]:
        mib = r["peak_rss_bytes"] / 2**20, r["before_build"]["VmHWM_bytes"] / 2**20
        lines.append(
            f"4. malloc {r['malloc']}, {r['blocks']} blocks ({r['tokens']:,} tokens): peak RSS {mib[0]:.0f} "
            f"MiB ({mib[1]:.0f} before the build), {r['shards']} shards, {r['seconds']} s"
        )
    lines.append(
        f"5. {opened['shards']} shards: open median {opened['open_seconds_median'] * 1e3:.1f} ms, bytes "
        f"hashed after open {opened['bytes_hashed_after_open']}"
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="every part at tiny sizes; no result file")
    parser.add_argument("--dir", default=None, help="where the caches are built (default: a temporary folder)")
    parser.add_argument(
        "--json",
        default=os.path.join(
            ROOT, "benchmarks", "results", f"{datetime.date.today().isoformat()}-cpu-2core-cache-scale.json"
        ),
    )
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        name, kwargs = args.child
        print(json.dumps(_CHILDREN[name](**json.loads(kwargs))))
        return 0
    directory = args.dir or tempfile.mkdtemp(prefix="fastted-cache-scale-")
    began = time.perf_counter()
    try:
        out = run(directory, QUICK if args.quick else FULL)
    finally:
        if args.dir is None:
            shutil.rmtree(directory, ignore_errors=True)
    print(table(out))
    within = {
        "bytes_per_token": out["size"]["within_target"],
        "kl_rel_err": all(r["within_target"] for r in out["kl"]),
        **{
            f"peak_rss_malloc_{malloc}": max(r["peak_rss_bytes"] for r in out["peak_rss"] if r["malloc"] == malloc)
            < PEAK_BYTES
            for malloc in MALLOC
        },
        "open_1000_shards": out["open"]["within_target"],
    }
    if args.quick:
        return 0 if all(within.values()) else 1
    result = {
        "what": "the teacher cache at scale: bytes a token, the packed top-k's KL error, the layer-target "
        "budget's MSE error, peak RSS while building, opening 1,000 shards",
        "command": " ".join(["python benchmarks/cache_scale.py", *(argv if argv is not None else sys.argv[1:])]),
        "device": f"CPU, {os.cpu_count()} cores",
        "date": datetime.date.today().isoformat(),
        "versions": result_file.versions("torch", "numpy", "transformers"),
        "seconds_total": round(time.perf_counter() - began, 1),
        "targets": {
            "bytes_per_token": BYTES_PER_TOKEN,
            "kl_rel_err_vs_bf16": KL_RELATIVE_ERROR,
            "peak_rss_bytes": PEAK_BYTES,
            "open_seconds": OPEN_SECONDS,
        },
        "within_target": within,
        **out,
    }
    result_file.write(args.json, result)
    print(f"written {args.json}")
    return 0 if all(within.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
