"""The teacher cache's format: quantized rows within their bound, a causal LM's and a classifier's outputs stored
and read back against the live teacher, the run's identity checked, damaged shards refused."""
import json
import os

import pytest
import torch

from fastted.cache import TeacherCache, build_teacher_cache, dequantize_rows, quantize_rows, weights_hash
from fastted.data import ClassificationCollator, CLMCollator
from fastted.models import ModelAdapter
from fastted.reference import sparse_logit_kd_reference, topk_targets_reference
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
    manifest = build_teacher_cache(teacher, examples, collator, str(tmp_path), layers=[0, 2], k=8, temperature=2.0,
                                   identity=identity, batch_size=4, shard_examples=5)
    assert len(manifest["shards"]) == 3 and manifest["examples"] == 11
    cache = TeacherCache(str(tmp_path), expect={**identity, "layers": [0, 2], "k": 8, "temperature": 2.0})
    assert len(cache) == 11
    for i in (0, 6, 10):
        live = teacher(collator([examples[i]], None), [0, 2])
        got = cache.example(i)
        logits = live.logits[0].float()
        values, ids, tail = topk_targets_reference(logits, 8, 2.0)
        assert torch.equal(got["topk_ids"], ids)
        torch.testing.assert_close(got["topk_values"], values.bfloat16().float())
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
    from_cache = sparse_logit_kd_reference(s_logits, cat["topk_values"], cat["topk_ids"], cat["tail_lse"],
                                           temperature=2.0)
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

    shard = load_file(os.path.join(tmp_path, "shard-000-00000.safetensors"))
    tokens = sum(len(ex["input_ids"]) for ex in examples)
    assert shard["layer0"].dtype == torch.int8 and shard["layer0_scale"].dtype == torch.float32
    per_token = (shard["layer0"].numel() + 4 * shard["layer0_scale"].numel()) / tokens
    assert per_token == 32 + 4  # int8 entries and one fp32 scale per row: k = 64 and three layers of 384 would be
    # 64 * (2 + 2) + 4 + 3 * (384 + 4) = 1,424 bytes per token, under the 1.5 KB


@pytest.mark.bad_input
def test_a_cache_of_another_run_or_damaged_is_refused(tmp_path):
    teacher = ModelAdapter(gpt2(2, 32, seed=2))
    build_teacher_cache(teacher, _examples(4, seed=7), CLMCollator(0), str(tmp_path), layers=[1], k=4,
                        identity={"teacher": "abc", "tokenizer": "t1"})
    with pytest.raises(ValueError, match=r"was made for another run \(teacher: cache 'abc', run 'xyz'; k: cache 4, "
                                         r"run 8\)"):
        TeacherCache(str(tmp_path), expect={"teacher": "xyz", "k": 8, "tokenizer": "t1"})
    with pytest.raises(ValueError, match="holds no example 9"):
        TeacherCache(str(tmp_path)).example(9)
    shard = tmp_path / "shard-000-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="shard-000-00000.safetensors differs from its manifest's SHA-256"):
        TeacherCache(str(tmp_path))
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(ValueError, match="no manifest.json"):
        TeacherCache(str(tmp_path))
    with pytest.raises(ValueError, match="quantization must be one of int8, fp8, bf16, got 'int4'"):
        build_teacher_cache(teacher, _examples(2, seed=7), CLMCollator(0), str(tmp_path), quantization="int4")
    for option, value, fragment in (("k", -1, "k must be an int >= 0"),
                                    ("batch_size", 0, "batch_size must be a positive int"),
                                    ("shard_examples", -1, "shard_examples must be a positive int"),
                                    ("temperature", float("inf"), "temperature must be a finite number"),
                                    ("temperature", -1.0, "temperature must lie in (0.0, inf), got -1.0")):
        with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            build_teacher_cache(teacher, _examples(2, seed=7), CLMCollator(0), str(tmp_path), **{option: value})


def test_weights_hash_is_the_teachers_identity():
    a, b = gpt2(2, 32, seed=2), gpt2(2, 32, seed=2)
    assert weights_hash(a) == weights_hash(b)
    with torch.no_grad():
        next(b.parameters())[0, 0] += 1e-3
    assert weights_hash(a) != weights_hash(b)
    assert json.dumps(weights_hash(a))  # a plain string, for the manifest
