"""Recipes distilling from a teacher cache: the same step as the live teacher (KL exact for what is stored, the MSE
within int8's error), on encoders and decoders, fused LM head included; caches built on several ranks; every
mismatch between a cache and a recipe refused by name."""

import copy

import pytest
import torch

from fastted import DWT, KD, LWD, RAILKD, TED, CoDIR, RandomLayerMap, TaskFilters, explicit_map
from fastted.train.cache import TeacherCache, build_teacher_cache, finish_teacher_cache
from fastted.train.data import ClassificationCollator, CLMCollator
from tests.tiny_models import LABELS, VOCAB, bert, gpt2


def _examples(n, seed, task):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 12, (n,), generator=g)
    out = [
        {"input_ids": torch.randint(5, VOCAB, (int(lengths[i]),), generator=g).tolist(), "index": i} for i in range(n)
    ]
    if task == "classification":
        for ex in out:
            ex["label"] = int(torch.randint(0, LABELS, (1,), generator=g))
    return out


def _models(task):
    if task == "classification":
        return bert(2, 32, seed=1), bert(4, 48, seed=2)
    return gpt2(2, 32, seed=1), gpt2(4, 48, seed=2)


RECIPES = {
    "kd": lambda s, t, fused: KD(s, t, fused_lm_head=fused),
    "lwd": lambda s, t, fused: LWD(s, t, explicit_map([(0, 1), (1, 3)], 2, 4), mse_alpha=2.0, fused_lm_head=fused),
    "ted": lambda s, t, fused: TED(
        s, t, TaskFilters([0, 1], 32, 24, nonlinear=True), TaskFilters([1, 3], 48, 24), fused_lm_head=fused
    ),
}


def _cache(recipe, examples, collator, directory, k, quantization, **kw):
    expect = recipe.teacher_cache_expect()
    build_teacher_cache(
        recipe.teacher_model,
        examples,
        collator,
        str(directory),
        layers=expect["layers"],
        k=k,
        temperature=expect["temperature"],
        quantization=quantization,
        transform=recipe.cache_transform(),
        identity=expect,
        batch_size=3,
        **kw,
    )
    return TeacherCache(str(directory))


def _step(recipe, batch, step=0):
    out = recipe(batch, step=step)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in recipe.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("quantization", ["int8", "bf16"])
@pytest.mark.parametrize(
    "task, method, fused",
    [
        ("classification", "kd", False),
        ("classification", "lwd", False),
        ("classification", "ted", False),
        ("clm", "kd", True),
        ("clm", "lwd", False),
        ("clm", "ted", True),
    ],
)
def test_a_cached_teacher_gives_the_live_step(tmp_path, task, method, fused, quantization):
    """Every term and gradient of one step from the cache against the live teacher's: the KL exact (the whole
    vocabulary cached), the MSE and the gradients within the quantization's error (1 % for int8)."""
    student, teacher = _models(task)
    torch.manual_seed(3)
    live = RECIPES[method](student, teacher, fused)
    cached = copy.deepcopy(live)
    examples = _examples(10, seed=5, task=task)
    collator = ClassificationCollator(0) if task == "classification" else CLMCollator(0)
    cached.use_teacher_cache(_cache(live, examples, collator, tmp_path, VOCAB, quantization))
    assert cached.teacher is None and live.teacher is not None
    assert all(m is not live.teacher_model.model for m in cached.frozen_modules())

    batch = collator([examples[i] for i in (7, 2, 9, 4)])
    out_live, grads_live = _step(live, batch)
    out_cached, grads_cached = _step(cached, batch)
    assert out_live.terms.keys() == out_cached.terms.keys()
    tolerance = 1e-2 if quantization == "int8" else 5e-3
    for name, value in out_live.terms.items():
        rtol = 1e-5 if name == "task" else tolerance  # the top-k values are stored in bf16
        torch.testing.assert_close(out_cached.terms[name], value, rtol=rtol, atol=1e-7, msg=name)
    assert grads_cached.keys() == grads_live.keys()
    total = torch.cat([g.flatten() for g in grads_live.values()]).norm()
    for name, g in grads_live.items():  # relative to the parameter's gradient, or 1e-3 of the whole (a key bias: 0)
        err = (grads_cached[name] - g).norm() / torch.maximum(g.norm(), 1e-3 * total)
        assert err < 2 * tolerance, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("task", ["classification", "clm"])
@pytest.mark.parametrize("method", ["codir", "railkd"])
def test_pooled_vectors_from_the_cache(tmp_path, task, method):
    """CoDIR and RAIL-KD read the teacher's pooled vectors (one int8 row per example and layer; RAIL-KD's of every
    layer its draws may pick): the same contrastive / distance term and gradients as the live teacher, over steps
    that fill CoDIR's bank and draw RAIL-KD's layers."""
    student, teacher = _models(task)
    torch.manual_seed(3)
    if method == "codir":
        live = CoDIR(student, teacher, explicit_map([(0, 1), (1, 3)], 2, 4), proj_dim=8, bank_size=16)
    else:
        live = RAILKD(student, teacher, RandomLayerMap(2, 4, per="step", seed=2), proj_dim=8)
    cached = copy.deepcopy(live)
    examples = _examples(12, seed=6, task=task)
    collator = ClassificationCollator(0) if task == "classification" else CLMCollator(0)
    cache = _cache(live, examples, collator, tmp_path, VOCAB, "int8")
    assert cache.manifest["targets_per"] == "example"
    assert cache.manifest["layers"] == ([1, 3] if method == "codir" else [0, 1, 2, 3])
    cached.use_teacher_cache(cache)
    term = "crd" if method == "codir" else "rail"
    for step, rows in enumerate(((0, 3, 5, 7), (1, 2, 9, 11), (4, 6, 8, 10))):
        batch = collator([examples[i] for i in rows])
        out_live, grads_live = _step(live, batch, step)
        out_cached, grads_cached = _step(cached, batch, step)
        for recipe in (live, cached):
            recipe.zero_grad()
        if method == "codir" and step == 0:
            assert out_cached.terms[term] == 0  # the bank fills on the first step
            continue
        torch.testing.assert_close(out_cached.terms[term], out_live.terms[term], rtol=1e-2, atol=1e-6)
        total = torch.cat([g.flatten() for g in grads_live.values()]).norm()
        for name, g in grads_live.items():
            err = (grads_cached[name] - g).norm() / torch.maximum(g.norm(), 1e-3 * total)
            assert err < 2e-2, f"step {step} {name}: relative error {err:.2e}"


@pytest.mark.parametrize("quantization", ["int8", "fp8"])
@pytest.mark.parametrize("method", ["lwd", "ted"])
def test_normalize_mse_from_quantized_cached_targets(tmp_path, method, quantization):
    """normalize_mse on a cache's int8 / fp8 targets: each layer's scale is the mean square of the dequantized
    targets (values x row scales, in float64 here) over the first batch's tokens, the term the mean of the raw
    layer MSEs over those scales; and both land within the quantization's error of the live teacher's."""
    student, teacher = _models("classification")
    torch.manual_seed(4)
    if method == "lwd":
        live = LWD(
            student, teacher, explicit_map([(0, 1), (1, 3)], 2, 4), kl_alpha=0.0, mse_alpha=2.0, normalize_mse=True
        )
    else:
        live = TED(
            student, teacher, TaskFilters([0, 1], 32, 24), TaskFilters([1, 3], 48, 24), kl_alpha=0.0, normalize_mse=True
        )
    cached = copy.deepcopy(live)
    examples = _examples(10, seed=6, task="classification")
    collator = ClassificationCollator(0)
    cached.use_teacher_cache(_cache(live, examples, collator, tmp_path, 0, quantization))
    batch = collator([examples[i] for i in (1, 8, 3, 5, 0)])
    t_out = cached._teacher_forward(batch, None, cached.layer_map.teacher)
    assert t_out.target_scales is not None and t_out.hidden_states[0].dtype != torch.float32
    out_cached, out_live = cached(batch), live(batch)
    out_cached.loss.backward()
    mask = batch["attention_mask"].double()
    for l, (values, scales) in enumerate(zip(t_out.hidden_states, t_out.target_scales)):
        target = values.double() * scales.double()[..., None]  # (B, S, D): the dequantized cached targets
        power = ((target**2).mean(-1) * mask).sum() / mask.sum()
        torch.testing.assert_close(cached.mse_scales[l].double(), power, rtol=1e-5, atol=0, msg=f"scale {l}")
    rtol = 2e-2 if quantization == "int8" else 8e-2  # fp8 e4m3 keeps 3 mantissa bits
    torch.testing.assert_close(cached.mse_scales, live.mse_scales, rtol=rtol, atol=0)
    raw = torch.stack([x.double() for x in out_cached.layer_losses])
    torch.testing.assert_close(
        out_cached.terms["mse"].double(), (raw / cached.mse_scales.double()).mean(), rtol=1e-5, atol=0
    )
    torch.testing.assert_close(out_cached.terms["mse"], out_live.terms["mse"], rtol=2 * rtol, atol=0)
    assert torch.isfinite(out_cached.loss) and float(out_cached.terms["mse"].detach()) > 0


def test_a_top_k_cache_gives_the_bucketed_kl(tmp_path):
    """With k below the vocabulary the cached KL is the bucketed one of the live logits (its spec), a lower
    bound of the live KL."""
    from fastted.ops.packed_topk import pack_topk, unpack_topk
    from fastted.reference import sparse_logit_kd_reference, topk_targets_reference

    student, teacher = _models("clm")
    live = KD(student, teacher)
    cached = copy.deepcopy(live)
    examples = _examples(6, seed=8, task="clm")
    cached.use_teacher_cache(_cache(live, examples, CLMCollator(0), tmp_path, 8, "int8"))
    batch = CLMCollator(0)(examples[:4])
    with torch.no_grad():
        s_logits = live.student_model(batch).logits
        t_logits = live.teacher_model(batch).logits
        values, ids, tail = topk_targets_reference(t_logits, 8, 2.0)
        stored = unpack_topk(pack_topk(values, ids, tail, t_logits.shape[-1]))  # the packed form read back
        assert torch.equal(stored[1], ids)
        want = sparse_logit_kd_reference(s_logits, *stored, temperature=2.0, mask=batch["attention_mask"])
        got = cached(batch, step=0).terms["kd"]
        assert got < live(batch, step=0).terms["kd"]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def test_a_cache_built_on_ranks_is_the_cache_of_one(tmp_path):
    """Two ranks each store every other example and merge their part manifests: the same outputs as one rank's
    cache; a rank that did not finish is named."""
    teacher = gpt2(3, 32, seed=2)
    recipe = LWD(gpt2(2, 32, seed=1), teacher, explicit_map([(0, 0), (1, 2)], 2, 3))
    examples = _examples(9, seed=11, task="clm")
    one = _cache(recipe, examples, CLMCollator(0), tmp_path / "one", 16, "int8")
    for rank in (0, 1):
        expect = recipe.teacher_cache_expect()
        build_teacher_cache(
            recipe.teacher_model,
            examples,
            CLMCollator(0),
            str(tmp_path / "two"),
            layers=expect["layers"],
            k=16,
            temperature=2.0,
            identity=expect,
            batch_size=2,
            rank=rank,
            world=2,
        )
    assert not (tmp_path / "two" / "manifest.json").exists()  # not a cache before the merge
    manifest = finish_teacher_cache(str(tmp_path / "two"), 2)
    assert manifest["examples"] == 9 and manifest["tokens"] == one.manifest["tokens"]
    two = TeacherCache(str(tmp_path / "two"))
    for i in range(9):
        a, b = one.example(i), two.example(i)
        assert torch.equal(a["topk_ids"], b["topk_ids"]), i
        # Other batches, other matmul shapes: a logit's last bit may differ and move a uint8 level by one.
        step = float(a["topk_values"].max() - a["topk_values"].min()) / 255
        torch.testing.assert_close(a["topk_values"], b["topk_values"], rtol=0, atol=step * 1.01)
        torch.testing.assert_close(a["tail_lse"], b["tail_lse"], rtol=1e-6, atol=1e-6)
        # The ranks batch other examples together (other padding, other matmul shapes), so a float's last bit may
        # differ and flip an int8 rounding: the stored values agree to one step, their row scales to rounding.
        qa, qb = one.example(i, dequantize=False), two.example(i, dequantize=False)
        for x, y, sx, sy in zip(qa["targets"], qb["targets"], qa["scales"], qb["scales"]):
            assert (x.int() - y.int()).abs().max() <= 1, i
            torch.testing.assert_close(sx, sy, rtol=1e-5, atol=0)
    expect = recipe.teacher_cache_expect()
    build_teacher_cache(
        recipe.teacher_model,
        examples,
        CLMCollator(0),
        str(tmp_path / "three"),
        layers=expect["layers"],
        k=16,
        temperature=2.0,
        rank=0,
        world=3,
    )
    with pytest.raises(ValueError, match="rank 1 wrote no part manifest"):
        finish_teacher_cache(str(tmp_path / "three"), 3)


@pytest.mark.bad_input
def test_a_cache_that_does_not_fit_the_recipe_is_refused(tmp_path):
    student, teacher = _models("classification")
    examples = _examples(4, seed=2, task="classification")
    collator = ClassificationCollator(0)
    lwd = RECIPES["lwd"](student, teacher, False)
    cache = _cache(lwd, examples, collator, tmp_path / "lwd", 4, "int8")

    other = LWD(student, teacher, explicit_map([(0, 0), (1, 2)], 2, 4))
    with pytest.raises(
        ValueError,
        match=r"does not hold what this LWD needs \(layers: cache \[1, 3\], recipe "
        r"\[0, 2\]\)",
    ):
        other.use_teacher_cache(cache)
    with pytest.raises(ValueError, match=r"temperature: cache 2.0, recipe 1.0"):
        LWD(student, teacher, explicit_map([(0, 1), (1, 3)], 2, 4), temperature=1.0).use_teacher_cache(cache)
    ted = RECIPES["ted"](student, teacher, False)
    with pytest.raises(ValueError, match=r"targets: cache 'raw', recipe 'filters:"):
        ted.use_teacher_cache(cache)
    with pytest.raises(ValueError, match="DWT reads no teacher cache: it needs the live teacher"):
        DWT(student, teacher, total_steps=10).use_teacher_cache(cache)
    with pytest.raises(ValueError, match=r"targets: cache 'raw', recipe 'pooled-mean'"):
        CoDIR(student, teacher, explicit_map([(0, 1), (1, 3)], 2, 4), proj_dim=8, bank_size=8).use_teacher_cache(cache)
    layers_only = _cache(lwd, examples, collator, tmp_path / "layers", 0, "int8")
    assert layers_only.manifest["logits"] is None
    with pytest.raises(ValueError, match=r"logits: the cache holds none \(k = 0\), the KL term needs them"):
        RECIPES["lwd"](student, teacher, False).use_teacher_cache(layers_only)
    no_kl = LWD(student, teacher, explicit_map([(0, 1), (1, 3)], 2, 4), kl_alpha=0.0)
    no_kl.use_teacher_cache(layers_only)  # a cache of the layer targets alone serves a recipe without the KL
    no_kl(collator(examples[:2]), step=0)

    lwd.use_teacher_cache(cache)
    batch = collator(examples[:2])
    del batch["index"]
    with pytest.raises(ValueError, match=r"a cached teacher needs batch\['index'\]"):
        lwd(batch, step=0)


@pytest.mark.parametrize("method", ["lwd", "ted"])
def test_a_cache_that_keeps_a_share_of_the_tokens_gives_the_mse_over_those(tmp_path, method):
    """A cache with a layer budget: the MSE term (and its gradients) is the one over the kept tokens of the whole
    cache's targets, the other terms unchanged."""
    student, teacher = _models("clm")
    recipe = RECIPES[method](student, teacher, False)
    examples = _examples(6, seed=12, task="clm")
    whole, share = copy.deepcopy(recipe), copy.deepcopy(recipe)
    whole.use_teacher_cache(_cache(recipe, examples, CLMCollator(0), tmp_path / "whole", 8, "int8"))
    kept = _cache(recipe, examples, CLMCollator(0), tmp_path / "kept", 8, "int8", layer_bytes=12, seed=5)
    assert 0 < kept.manifest["layer_fraction"] < 1
    share.use_teacher_cache(kept)
    batch = {**CLMCollator(0)(examples[:4]), "index": torch.arange(4)}
    target_mask = kept.batch(batch["index"], batch["attention_mask"])["target_mask"]
    assert 0 < int(target_mask.sum()) < int(batch["attention_mask"].sum())
    read = whole.teacher_cache.batch

    def with_share(*args, **kwargs):  # the whole cache's targets, with the kept cache's token mask
        return {**read(*args, **kwargs), "target_mask": target_mask}

    whole.teacher_cache.batch = with_share
    a, grads_a = _step(whole, batch)
    b, grads_b = _step(share, batch)
    for term in a.terms:
        torch.testing.assert_close(b.terms[term], a.terms[term], rtol=1e-6, atol=1e-7)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7)
    whole.teacher_cache.batch = read
    assert not torch.allclose(whole(batch, step=0).terms["mse"], a.terms["mse"])  # the share is not the whole
