"""The teacher cache's format: quantized rows within their bound, a causal LM's and a classifier's outputs stored
and read back against the live teacher, the run's identity checked, damaged shards refused."""

import json
import os

import pytest
import torch

from fastted.models import ModelAdapter, weights_hash
from fastted.ops.quantize import dequantize_rows, quantize_rows
from fastted.reference import sparse_logit_kd_reference, topk_targets_reference
from fastted.train.cache import TeacherCache, build_teacher_cache
from fastted.train.data import ClassificationCollator, CLMCollator
from tests.tiny_models import bert, gpt2


def _examples(n, seed, label=False):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 12, (n,), generator=g)
    out = [{"input_ids": torch.randint(5, 97, (int(lengths[i]),), generator=g).tolist()} for i in range(n)]
    if label:
        for i, ex in enumerate(out):
            ex["label"] = i % 3
    return out


@pytest.mark.parametrize("kind, bound", [("int8", 0.5 / 127), ("fp8", 2.0**-3), ("bf16", 2.0**-8)])
def test_quantized_rows_within_their_bound(kind, bound):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 40, generator=g) * torch.logspace(-3, 3, 50)[:, None]
    q, scale = quantize_rows(x, kind)
    back = dequantize_rows(q, scale)
    row_max = x.abs().amax(-1, keepdim=True)
    err = (back - x).abs()
    if kind == "int8":  # half a step of the row's scale
        assert (err <= row_max * (bound * (1 + 2e-3)) + 1e-12).all()
    else:  # a relative error per entry
        assert (err <= x.abs() * bound + row_max * 1e-3).all()
    assert q.dtype == {"int8": torch.int8, "fp8": torch.float8_e4m3fn, "bf16": torch.bfloat16}[kind]


def test_a_causal_lms_outputs_read_back(tmp_path):
    teacher = ModelAdapter(gpt2(3, 32, seed=2))
    examples = _examples(11, seed=3)
    collator = CLMCollator(0)
    identity = {"teacher": weights_hash(teacher.model), "data": "toy"}
    manifest = build_teacher_cache(
        teacher,
        examples,
        collator,
        str(tmp_path),
        layers=[0, 2],
        k=8,
        temperature=2.0,
        identity=identity,
        batch_size=4,
        shard_bytes=1200,
    )
    assert 2 <= len(manifest["shards"]) < 11 and manifest["examples"] == 11  # flushed by bytes, not by examples
    cache = TeacherCache(str(tmp_path), expect={**identity, "layers": [0, 2], "k": 8, "temperature": 2.0})
    assert len(cache) == 11
    for i in (0, 6, 10):
        live = teacher(collator([examples[i]], None), [0, 2])
        got = cache.example(i)
        logits = live.logits[0].float()
        values, ids, tail = topk_targets_reference(logits, 8, 2.0)
        assert torch.equal(got["topk_ids"], ids)
        step = (values[:, :1] - values[:, -1:]) / 255  # uint8 steps below each row's largest: half a step at most
        assert ((got["topk_values"] - values).abs() <= step / 2 * (1 + 1e-4) + 1e-6).all()
        torch.testing.assert_close(got["tail_lse"], tail, rtol=1e-6, atol=1e-6)
        for state, target in zip(live.hidden_states, got["targets"]):
            state = state[0].float()
            assert target.shape == state.shape
            assert ((target - state).abs() <= state.abs().amax(-1, keepdim=True) / 254 * 1.01 + 1e-6).all()

    # The loss terms from the cache against the live teacher's: the MSE within 1 %, the KL exact up to bf16.
    batch = collator(examples[:4], None)
    live = teacher(batch, [0, 2])
    g = torch.Generator().manual_seed(4)
    student = [h + 0.3 * torch.randn(h.shape, generator=g) for h in live.hidden_states]
    mask = batch["attention_mask"].bool()
    rows = [cache.example(i) for i in range(4)]
    for layer, s in enumerate(student):
        live_mse = ((s - live.hidden_states[layer])[mask] ** 2).mean()
        cached = torch.cat([r["targets"][layer] for r in rows])
        cached_mse = ((s[mask] - cached) ** 2).mean()
        assert abs(cached_mse / live_mse - 1) < 0.01
    s_logits = live.logits[mask] + torch.randn(live.logits[mask].shape, generator=g)
    cat = {key: torch.cat([r[key] for r in rows]) for key in ("topk_values", "topk_ids", "tail_lse")}
    from_cache = sparse_logit_kd_reference(
        s_logits, cat["topk_values"], cat["topk_ids"], cat["tail_lse"], temperature=2.0
    )
    exact = sparse_logit_kd_reference(s_logits, *topk_targets_reference(live.logits[mask], 8, 2.0), temperature=2.0)
    assert abs(from_cache / exact - 1) < 0.01


def test_a_classifier_stores_one_logit_row_per_example_and_the_bytes_per_token(tmp_path):
    teacher = ModelAdapter(bert(2, 32, seed=5))
    examples = _examples(6, seed=6, label=True)
    build_teacher_cache(teacher, examples, ClassificationCollator(0), str(tmp_path), layers=[1], k=2)
    cache = TeacherCache(str(tmp_path))
    got = cache.example(4)
    assert got["topk_values"].shape == (1, 2) and got["targets"][0].shape == (len(examples[4]["input_ids"]), 32)
    from safetensors.torch import load_file

    shard = load_file(os.path.join(tmp_path, "shard-000-00000.safetensors"))  # a safetensors file as any reads it
    tokens = sum(len(ex["input_ids"]) for ex in examples)
    assert shard["layer0"].dtype == torch.int8 and shard["layer0_scale"].dtype == torch.float32
    per_token = (shard["layer0"].numel() + 4 * shard["layer0_scale"].numel()) / tokens
    assert per_token == 32 + 4  # int8 entries and one fp32 scale per row
    logits = sum(shard[key].numel() * shard[key].element_size() for key in shard if key.startswith("topk"))
    assert logits == 6 * (4 + 2 + 3 * 4)  # per example: one word of two 1-bit ids, two levels, top, step, tail
    manifest = cache.manifest
    assert manifest["part_bytes"]["layers"] == shard["layer0"].numel() + 4 * shard["layer0_scale"].numel()
    assert manifest["part_bytes"]["logits"] == logits
    assert manifest["bytes_per_token"]["total"] == round(
        os.path.getsize(os.path.join(tmp_path, "shard-000-00000.safetensors")) / tokens, 1
    )


@pytest.mark.bad_input
def test_a_cache_of_another_run_or_damaged_is_refused(tmp_path):
    teacher = ModelAdapter(gpt2(2, 32, seed=2))
    build_teacher_cache(
        teacher,
        _examples(4, seed=7),
        CLMCollator(0),
        str(tmp_path),
        layers=[1],
        k=4,
        identity={"teacher": "abc", "tokenizer": "t1"},
    )
    with pytest.raises(
        ValueError,
        match=r"was made for another run \(teacher: cache 'abc', run 'xyz'; k: cache 4, "
        r"run 8\)",
    ):
        TeacherCache(str(tmp_path), expect={"teacher": "xyz", "k": 8, "tokenizer": "t1"})
    with pytest.raises(ValueError, match="holds no example 9"):
        TeacherCache(str(tmp_path)).example(9)
    shard = tmp_path / "shard-000-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    opened = TeacherCache(str(tmp_path))  # opening reads sizes alone: the first read of the shard checks it
    with pytest.raises(
        ValueError,
        match="shard-000-00000.safetensors differs from its manifest's SHA-256 "
        r"\(damaged\): build the cache again",
    ):
        opened.example(0)
    shard.write_bytes(bytes(data[:-1]))
    with pytest.raises(ValueError, match="shard-000-00000.safetensors is missing or has another size"):
        TeacherCache(str(tmp_path))
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(ValueError, match="no manifest.json"):
        TeacherCache(str(tmp_path))
    with pytest.raises(ValueError, match="quantization must be one of int8, fp8, bf16, got 'int4'"):
        build_teacher_cache(teacher, _examples(2, seed=7), CLMCollator(0), str(tmp_path), quantization="int4")
    for option, value, fragment in (
        ("k", -1, "k must be an int >= 0"),
        ("batch_size", 0, "batch_size must be a positive int"),
        ("shard_bytes", -1, "shard_bytes must be a positive int"),
        ("layer_bytes", -1, "layer_bytes must be an int >= 0"),
        ("temperature", float("inf"), "temperature must be a finite number"),
        ("temperature", -1.0, "temperature must lie in (0.0, inf), got -1.0"),
    ):
        with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            build_teacher_cache(teacher, _examples(2, seed=7), CLMCollator(0), str(tmp_path), **{option: value})


def test_weights_hash_is_the_teachers_identity():
    a, b = gpt2(2, 32, seed=2), gpt2(2, 32, seed=2)
    assert weights_hash(a) == weights_hash(b)
    with torch.no_grad():
        next(b.parameters())[0, 0] += 1e-3
    assert weights_hash(a) != weights_hash(b)
    assert json.dumps(weights_hash(a))  # a plain string, for the manifest


def test_a_layer_budget_keeps_each_token_with_the_same_probability(tmp_path):
    """layer_bytes below what a token's targets take: each token is kept with probability f, the same draws at
    every build, and the reader puts the kept rows at their tokens with a target mask."""
    teacher = ModelAdapter(gpt2(2, 32, seed=2))
    examples = [
        {"input_ids": torch.randint(5, 97, (30,), generator=torch.Generator().manual_seed(i)).tolist()}
        for i in range(60)
    ]
    collator = CLMCollator(0)
    kw = dict(layers=[0, 1], k=0, batch_size=8, layer_bytes=20, seed=3)
    manifest = build_teacher_cache(teacher, examples, collator, str(tmp_path / "a"), **kw)
    f = 20 / (2 * (32 + 4) + 4)  # two int8 rows of 32 with their fp32 scales, and the position
    assert manifest["layer_fraction"] == pytest.approx(f)
    cache = TeacherCache(str(tmp_path / "a"))
    kept = [cache.example(i)["positions"] for i in range(60)]
    total = sum(len(p) for p in kept)
    n = 60 * 30
    assert abs(total - f * n) < 4 * (n * f * (1 - f)) ** 0.5  # a binomial count's spread, at four sigma
    assert manifest["bytes_per_token"]["layers"] == pytest.approx(f * (2 * 36 + 4), rel=0.1)
    again = build_teacher_cache(teacher, examples, collator, str(tmp_path / "b"), **kw)
    assert (
        again["shards"][next(iter(again["shards"]))]["sha256"]
        == manifest["shards"][next(iter(manifest["shards"]))]["sha256"]
    )

    batch = collator(examples[:4], None)
    live = teacher(batch, [0, 1])
    got = cache.batch(torch.arange(4), batch["attention_mask"])
    for b in range(4):
        expected = torch.zeros(30, dtype=torch.bool)
        expected[kept[b]] = True
        assert torch.equal(got["target_mask"][b], expected)
        for layer in range(2):
            rows = got["targets"][layer][b]
            assert torch.equal(rows[~expected], torch.zeros_like(rows[~expected]))
            state = live.hidden_states[layer][b][expected]
            assert ((rows[expected] - state).abs() <= state.abs().amax(-1, keepdim=True) / 254 * 1.01 + 1e-6).all()


def test_logits_made_a_block_of_rows_at_a_time_are_the_whole_batchs(tmp_path, monkeypatch):
    """The builder's top-k from the head's input in blocks of rows equals the top-k of the whole logits."""
    import fastted.train.cache as cache_module

    teacher = ModelAdapter(gpt2(2, 32, seed=2))
    examples = _examples(7, seed=5)
    build_teacher_cache(teacher, examples, CLMCollator(0), str(tmp_path / "whole"), k=6, temperature=2.0)
    monkeypatch.setattr(cache_module, "LOGIT_ELEMENTS", 97 * 3)  # three rows at a time
    build_teacher_cache(teacher, examples, CLMCollator(0), str(tmp_path / "rows"), k=6, temperature=2.0)
    whole, rows = TeacherCache(str(tmp_path / "whole")), TeacherCache(str(tmp_path / "rows"))
    for i in range(7):
        a, b = whole.example(i), rows.example(i)
        assert torch.equal(a["topk_ids"], b["topk_ids"])
        torch.testing.assert_close(a["topk_values"], b["topk_values"], rtol=0, atol=1e-5)
        torch.testing.assert_close(a["tail_lse"], b["tail_lse"], rtol=1e-6, atol=1e-6)


def test_building_holds_one_shard_at_most_and_opening_reads_no_shard(tmp_path, monkeypatch):
    import fastted.train.cache as cache_module
    from fastted import files

    held = []
    flush = cache_module._ShardWriter.flush
    monkeypatch.setattr(cache_module._ShardWriter, "flush", lambda self: (held.append(self.held), flush(self))[1])
    teacher = ModelAdapter(gpt2(2, 32, seed=2))
    examples = [{"input_ids": list(range(5, 25))} for _ in range(40)]  # 20 tokens: 20 * (2 * 36 + 4 * 16 ...)
    manifest = build_teacher_cache(
        teacher, examples, CLMCollator(0), str(tmp_path), layers=[0, 1], k=4, shard_bytes=4000
    )
    one = max(held[:-1]) - 4000  # what the example that crossed the limit added
    assert len(manifest["shards"]) == len(held) > 5
    assert all(h < 4000 + one + 1 for h in held) and one < 4000
    before = files.bytes_hashed
    cache = TeacherCache(str(tmp_path))
    assert files.bytes_hashed == before  # the manifest and the sizes: no shard read at open
    cache.example(0)
    first = os.path.join(tmp_path, "shard-000-00000.safetensors")
    assert files.bytes_hashed - before == os.path.getsize(first)  # the shard read, checked once
    cache.batch(torch.tensor([1, 0]), None)
    assert files.bytes_hashed - before == os.path.getsize(first)


@pytest.mark.bad_input
def test_a_non_finite_teacher_output_is_refused(tmp_path, monkeypatch):
    from fastted.ops.packed_topk import pack_topk

    values, ids = torch.tensor([[3.0, 1.0]]), torch.tensor([[4, 2]])
    with pytest.raises(ValueError, match="topk_values holds a non-finite logit"):
        pack_topk(torch.tensor([[float("nan"), 1.0]]), ids, torch.tensor([0.0]), 10)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"tail_lse holds NaN or \+inf"):
            pack_topk(values, ids, torch.tensor([bad]), 10)
    assert pack_topk(values, ids, torch.tensor([float("-inf")]), 10).tail.isneginf().all()  # no tail: kept

    teacher = ModelAdapter(gpt2(2, 32, seed=2))

    def transform(states, mask):
        states = [s.clone() for s in states]
        states[1][0, 0, 3] = float("nan")
        return states

    with pytest.raises(ValueError, match="the teacher's target of layer 1 is not finite"):
        build_teacher_cache(
            teacher, _examples(3, seed=7), CLMCollator(0), str(tmp_path), layers=[0, 1], k=0, transform=transform
        )
