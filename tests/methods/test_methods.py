"""Every recipe against a hand-written float64 reference of its formula, on tiny BERT-like and GPT-2-like models.

Each case runs the recipe forward and backward in float32 (through the fused
kernels under Triton's interpreter on a CPU) and compares its loss, and for
TED the student's gradients, with the formula written out on float64 copies
of the same models, whose hidden states come from ``output_hidden_states``.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

import fastted
from fastted import (
    DWT,
    KD,
    LWD,
    RAILKD,
    TED,
    CoDIR,
    MemoryBank,
    RandomLayerMap,
    Schedule,
    TaskFilters,
    TEDStage1,
    explicit_map,
)
from tests.tables import DTYPES, assert_close_to_spec
from tests.tiny_models import (
    assert_close,
    batch,
    bert,
    double,
    gpt2,
    hidden64,
    ref_kl,
    ref_mse,
    ref_pool,
    ref_task,
)

TASKS = ["classification", "mlm", "clm"]


def _models(task, seed=0):
    """(student, teacher): 2 or 3 layers of 32 against 4 of 48; GPT-2's last block is never mapped in the
    references (its output_hidden_states entry is after the final norm)."""
    if task == "clm":
        return gpt2(3, 32, seed=seed), gpt2(4, 48, seed=seed + 1)
    return bert(2, 32, task, seed=seed), bert(4, 48, task, seed=seed + 1)


def _maps(task):
    """(student layers, teacher layers) of the filters."""
    return ([0, 1], [1, 2]) if task == "clm" else ([0, 1], [1, 3])


def _kd_mask(task, b):
    return None if task == "classification" else b["attention_mask"]


def _filters(layers, width, d_f, nonlinear, seed):
    torch.manual_seed(seed)
    filters = TaskFilters(layers, width, d_f, nonlinear=nonlinear)
    with torch.no_grad():  # larger than nn.Linear's init, so the MSE term is not negligible
        for p in filters.parameters():
            p.mul_(3)
    return filters


# --------------------------------------------------------------------------- TED stage II


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("nonlinear", [False, True])
@pytest.mark.parametrize("mask_padding", [True, False])
def test_ted_matches_formula_and_gradients(task, nonlinear, mask_padding):
    student, teacher = _models(task)
    s_layers, t_layers = _maps(task)
    sf = _filters(s_layers, 32, 48, nonlinear, 1)
    tf_ = _filters(t_layers, 48, 48, nonlinear, 2)
    recipe = TED(student, teacher, sf, tf_, task_alpha=0.7, kl_alpha=1.3, mse_alpha=2.1, mask_padding=mask_padding)
    b = batch(task, seed=11)
    out = recipe(b)
    out.loss.backward()

    s64, t64, sf64, tf64 = double(student), double(teacher), double(sf), double(tf_)
    s_logits, s_states = hidden64(s64, b, s_layers, grad=True)
    t_logits, t_states = hidden64(t64, b, t_layers)
    mask = b["attention_mask"] if mask_padding else None
    mse = torch.stack(
        [ref_mse(f(h), g(y), mask) for f, g, h, y in zip(sf64.filters, tf64.filters, s_states, t_states)]
    ).mean()
    task_loss = ref_task(s_logits, b["labels"], task)
    kl = ref_kl(s_logits, t_logits, 2.0, _kd_mask(task, b))
    ref = 0.7 * task_loss + 1.3 * kl + 2.1 * mse
    ref.backward()
    assert_close("loss", out.loss, ref)
    assert_close("mse", out.terms["mse"], mse)
    assert_close("kd", out.terms["kd"], kl)
    assert out.weights == {"task": 0.7, "kd": 1.3, "mse": 2.1}
    assert out.layer_losses.shape == (2,)
    for name, got, want in [
        ("student filter 0", sf.filters[0].proj.weight.grad, sf64.filters[0].proj.weight.grad),
        ("student filter 1 bias", sf.filters[1].proj.bias.grad, sf64.filters[1].proj.bias.grad),
        ("student embeddings", student.get_input_embeddings().weight.grad, s64.get_input_embeddings().weight.grad),
    ]:
        err = (got.double() - want).abs().max().item()
        assert err <= 1e-4 * want.abs().max().item() + 1e-7, f"{name}: gradient error {err:.3e}"
    assert all(p.grad is None for p in teacher.parameters()) and all(p.grad is None for p in tf_.parameters())


def test_ted_checks_its_filters():
    student, teacher = _models("classification")
    with pytest.raises(ValueError, match="filter_dim"):
        TED(student, teacher, TaskFilters([0, 1], 32, 40), TaskFilters([1, 3], 48, 48))
    with pytest.raises(ValueError, match="hidden_size 32"):
        TED(student, teacher, TaskFilters([0, 1], 48, 48), TaskFilters([1, 3], 48, 48))
    with pytest.raises(ValueError, match="layers 0..1"):
        TED(student, teacher, TaskFilters([0, 2], 32, 48), TaskFilters([1, 3], 48, 48))
    with pytest.raises(ValueError, match="kl_alpha"):
        TED(student, teacher, TaskFilters([0, 1], 32, 48), TaskFilters([1, 3], 48, 48), kl_alpha=-1)


def test_ted_needs_one_vocabulary_for_its_kl_term():
    student, teacher = bert(2, 32, "mlm"), bert(4, 48, "mlm", vocab_size=120)
    filters = (TaskFilters([0, 1], 32, 48), TaskFilters([1, 3], 48, 48))
    with pytest.raises(ValueError, match="vocab_size is 97 and the teacher's 120"):
        TED(student, teacher, *filters)
    TED(student, teacher, *filters, kl_alpha=0.0)  # the MSE alone compares hidden states, not vocabularies


# --------------------------------------------------------------------------- TED stage I


@pytest.mark.parametrize(
    "task,filter_dim", [("classification", None), ("classification", 24), ("mlm", None), ("clm", None), ("clm", 20)]
)
def test_stage1_matches_formula(task, filter_dim):
    _, model = _models(task)
    layers = [0, 2] if task == "clm" else [1, 3]
    filters = _filters(layers, 48, filter_dim, False, 3)
    recipe = TEDStage1(model, filters, dropout=0.0)
    b = batch(task, seed=12)
    out = recipe(b)
    out.loss.backward()

    m64, f64 = double(model), double(filters)
    _, states = hidden64(m64, b, layers)
    if task == "classification":
        heads = double(recipe.heads)
        logits = [h.classifier(F.gelu(h.dense(f(x)[:, 0]))) for h, f, x in zip(heads, f64.filters, states)]
    elif filter_dim is None:  # the model's own LM head on the filter output
        head = (lambda x: m64.lm_head(m64.transformer.ln_f(x))) if task == "clm" else m64.cls
        logits = [head(f(x)) for f, x in zip(f64.filters, states)]
    else:
        heads = double(recipe.heads)
        logits = [h(f(x)) for h, f, x in zip(heads, f64.filters, states)]
    per_filter = torch.stack([ref_task(x, b["labels"], task) for x in logits])
    assert_close("loss", out.loss, per_filter.mean())
    for i in range(2):
        assert_close(f"filter {i}", out.layer_losses[i], per_filter[i])
    assert all(p.grad is not None for p in recipe.filters.parameters())


@pytest.mark.parametrize("task", TASKS)
def test_stage1_trains_only_filters_and_heads(task):
    _, model = _models(task)
    recipe = TEDStage1(model, interval=2, filter_dim=24 if task == "clm" else None)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model_params = {id(p) for p in model.parameters()}
    trained = list(recipe.parameters())
    assert trained and not any(id(p) in model_params for p in trained)
    assert not any(k.startswith(("student.", "model.")) for k in recipe.state_dict())
    filters_before = [p.detach().clone() for p in recipe.filters.parameters()]
    opt = torch.optim.AdamW(trained, lr=1e-2)
    recipe.train()
    recipe(batch(task, seed=13)).loss.backward()
    opt.step()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), f"stage I changed the model's {name}"
        assert p.grad is None
    assert not model.training, "the frozen model must stay in eval mode"
    assert all(not torch.equal(a, b) for a, b in zip(filters_before, recipe.filters.parameters()))
    if recipe.heads is not None:
        assert all(p.grad is not None for p in recipe.heads.parameters())


def test_stage1_model_dropout_follows_the_recipes_mode_and_its_weights_stay_frozen():
    """model_dropout=True (the TED authors' stage I): the frozen model trains with its dropout on, is evaluated
    with it off, and its weights never change; the default keeps it in eval mode."""
    _, model = _models("classification")
    recipe = TEDStage1(model, interval=2, model_dropout=True)
    recipe.train()
    assert model.training and not any(p.requires_grad for p in model.parameters())
    b = batch("classification", seed=15)
    first, second = recipe(b).layer_losses, recipe(b).layer_losses
    assert not torch.equal(first, second), "dropout on: two forwards of one batch differ"
    recipe.eval()
    assert not model.training
    assert torch.equal(recipe(b).layer_losses, recipe(b).layer_losses)
    assert not TEDStage1(_models("classification")[1], interval=2).train().student.training
    with pytest.raises(ValueError, match="model_dropout must be a bool, got 1"):
        TEDStage1(model, interval=2, model_dropout=1)


def test_stage1_probe_counts_each_filters_right_answers():
    """probe_correct: each filter's head, as a probe, against the labels (its argmax from float64 logits)."""
    _, model = _models("classification")
    layers = [1, 3]
    recipe = TEDStage1(model, _filters(layers, 48, None, False, 3), dropout=0.0).eval()
    b = batch("classification", seed=16)
    m64, f64, heads = double(model), double(recipe.filters), double(recipe.heads)
    _, states = hidden64(m64, b, layers)
    expected = [
        int((h.classifier(F.gelu(h.dense(f(x)[:, 0]))).argmax(-1) == b["labels"]).sum())
        for h, f, x in zip(heads, f64.filters, states)
    ]
    assert recipe.probe_correct(b).tolist() == expected
    with pytest.raises(ValueError, match="probe_correct reads classification heads"):
        TEDStage1(_models("mlm")[1], interval=2).probe_correct(batch("mlm", seed=1))


def test_stage1_checkpoint_is_what_stage2_starts_from(tmp_path):
    import transformers as tf

    student, teacher = _models("classification")
    b = batch("classification", seed=14)
    runs = {}
    for name, model, layers in (("teacher", teacher, [1, 3]), ("student", student, [0, 1])):
        stage1 = TEDStage1(model, _filters(layers, model.config.hidden_size, 48, True, 4))
        stage1.save_pretrained(tmp_path / name)
        runs[name] = stage1
    loaded_s, sf = fastted.load_stage1(tmp_path / "student", tf.AutoModelForSequenceClassification)
    loaded_t, tf_ = fastted.load_stage1(tmp_path / "teacher", tf.AutoModelForSequenceClassification)
    assert sf.config == runs["student"].filters.config and sf.layers == [0, 1]
    for a, c in zip(sf.parameters(), runs["student"].filters.parameters()):
        assert torch.equal(a, c)
    fresh = TED(student, teacher, runs["student"].filters, runs["teacher"].filters)(b)
    loaded = TED(loaded_s, loaded_t, sf, tf_)(b)
    assert torch.equal(fresh.loss, loaded.loss)
    with pytest.raises(FileNotFoundError, match="filters.json"):
        fastted.TaskFilters.from_pretrained(tmp_path)


# --------------------------------------------------------------------------- LWD and KD


@pytest.mark.parametrize("task", TASKS)
def test_lwd_matches_formula(task):
    student, teacher = _models(task)
    s_layers, t_layers = _maps(task)
    recipe = LWD(
        student,
        teacher,
        explicit_map(list(zip(s_layers, t_layers)), 3, 4),
        task_alpha=0.5,
        kl_alpha=0.25,
        mse_alpha=3.0,
    )
    b = batch(task, seed=15)
    out = recipe(b)
    out.loss.backward()
    s64, t64, proj64 = double(student), double(teacher), double(recipe.projections)
    s_logits, s_states = hidden64(s64, b, s_layers)
    t_logits, t_states = hidden64(t64, b, t_layers)
    mse = torch.stack([ref_mse(p(h), y, b["attention_mask"]) for p, h, y in zip(proj64, s_states, t_states)]).mean()
    ref = (
        0.5 * ref_task(s_logits, b["labels"], task)
        + 0.25 * ref_kl(s_logits, t_logits, 2.0, _kd_mask(task, b))
        + 3.0 * mse
    )
    assert_close("loss", out.loss, ref)
    assert recipe.projections[0].weight.grad is not None


def test_lwd_default_map_and_equal_widths():
    student, teacher = bert(2, 48), bert(4, 48, seed=1)
    recipe = LWD(student, teacher, mse_alpha=1.0, kl_alpha=0.0, task_alpha=0.0)
    assert recipe.layer_map.pairs == [(0, 1), (1, 3)] and recipe.projections is None
    b = batch("classification", seed=16)
    out = recipe(b)
    _, s_states = hidden64(double(student), b, [0, 1])
    _, t_states = hidden64(double(teacher), b, [1, 3])
    ref = torch.stack([ref_mse(h, y, b["attention_mask"]) for h, y in zip(s_states, t_states)]).mean()
    assert_close("loss", out.loss, ref)
    fixed = LWD(bert(2, 32), teacher, train_projection=False)
    assert not any(p.requires_grad for p in fixed.projections.parameters())


def test_lwd_projects_at_equal_width_when_asked():
    """project_equal_width=True (the TED authors' LWD): a trained Linear(48, 48) per mapped layer even though the
    widths agree; the MSE compares the projected states (float64 reference) and the projections get gradients."""
    student, teacher = bert(2, 48), bert(4, 48, seed=1)
    recipe = LWD(student, teacher, mse_alpha=1.0, kl_alpha=0.0, task_alpha=0.0, project_equal_width=True)
    assert [tuple(p.weight.shape) for p in recipe.projections] == [(48, 48), (48, 48)]
    b = batch("classification", seed=17)
    out = recipe(b)
    out.loss.backward()
    proj64 = double(recipe.projections)
    _, s_states = hidden64(double(student), b, [0, 1])
    _, t_states = hidden64(double(teacher), b, [1, 3])
    ref = torch.stack([ref_mse(p(h), y, b["attention_mask"]) for p, h, y in zip(proj64, s_states, t_states)]).mean()
    assert_close("loss", out.loss, ref)
    assert all(p.weight.grad is not None and p.weight.grad.abs().sum() > 0 for p in recipe.projections)
    with pytest.raises(ValueError, match="project_equal_width must be a bool, got 'yes'"):
        LWD(student, teacher, project_equal_width="yes")


def _power(y, mask):
    """Mean square per element of targets y (B, T, d) over the mask's tokens (float64)."""
    m = mask.double()
    return ((y.double() ** 2).mean(-1) * m).sum() / m.sum()


@pytest.mark.parametrize("task", ["classification", "clm"])
def test_normalize_mse_divides_each_layer_by_its_first_batch_targets(task):
    """TED and LWD with normalize_mse: mean_l MSE_l / P_l, P_l the targets' mean square on the first batch (of
    the teacher filters' outputs for TED), then held fixed (a later batch reuses it) and saved with the recipe."""
    student, teacher = _models(task)
    s_layers, t_layers = _maps(task)
    sf, tf_ = _filters(s_layers, 32, 48, False, 1), _filters(t_layers, 48, 48, False, 2)
    ted = TED(student, teacher, sf, tf_, task_alpha=0.0, kl_alpha=0.0, mse_alpha=1.5, normalize_mse=True)
    lwd = LWD(
        copy.deepcopy(student),
        teacher,
        explicit_map(list(zip(s_layers, t_layers)), 3, 4),
        task_alpha=0.0,
        kl_alpha=0.0,
        mse_alpha=1.5,
        normalize_mse=True,
    )
    first, later = batch(task, seed=21), batch(task, seed=22)
    s64, t64, sf64, tf64 = double(student), double(teacher), double(sf), double(tf_)
    proj64 = double(lwd.projections)
    _, t_first = hidden64(t64, first, t_layers)
    ted_p = torch.stack([_power(g(y), first["attention_mask"]) for g, y in zip(tf64.filters, t_first)])
    lwd_p = torch.stack([_power(y, first["attention_mask"]) for y in t_first])
    for b in (first, later):
        out_ted, out_lwd = ted(b), lwd(b)
        out_ted.loss.backward()
        _, s_states = hidden64(s64, b, s_layers)
        _, t_states = hidden64(t64, b, t_layers)
        mask = b["attention_mask"]
        ted_mse = torch.stack(
            [ref_mse(f(h), g(y), mask) for f, g, h, y in zip(sf64.filters, tf64.filters, s_states, t_states)]
        )
        lwd_mse = torch.stack([ref_mse(p(h), y, mask) for p, h, y in zip(proj64, s_states, t_states)])
        assert_close("TED normalized mse", out_ted.terms["mse"], (ted_mse / ted_p).mean())
        assert_close("TED loss", out_ted.loss, 1.5 * (ted_mse / ted_p).mean())
        assert_close("LWD normalized mse", out_lwd.terms["mse"], (lwd_mse / lwd_p).mean())
        for l in range(len(ted_mse)):
            assert_close(f"TED raw layer loss {l}", out_ted.layer_losses[l], ted_mse[l])
    assert sf.filters[0].proj.weight.grad is not None
    for l in range(len(ted_p)):
        assert_close(f"saved scale {l}", ted.state_dict()["mse_scales"][l], ted_p[l])
    restored = TED(
        copy.deepcopy(student),
        teacher,
        copy.deepcopy(sf),
        tf_,
        task_alpha=0.0,
        kl_alpha=0.0,
        mse_alpha=1.5,
        normalize_mse=True,
    )
    restored.load_state_dict(ted.state_dict())
    assert_close("restored, on the later batch", restored(later).terms["mse"], ted(later).terms["mse"])
    plain = TED(student, teacher, sf, tf_, task_alpha=0.0, kl_alpha=0.0, mse_alpha=1.5)
    assert "mse_scales" not in plain.state_dict()  # checkpoints without the option keep their keys


@pytest.mark.bad_input
def test_normalize_mse_refuses_zero_targets():
    student, teacher = _models("classification")
    recipe = LWD(student, teacher, explicit_map([(0, 1), (1, 3)], 2, 4), normalize_mse=True)
    with torch.no_grad():
        for p in teacher.parameters():
            p.zero_()
    with pytest.raises(ValueError, match="normalize_mse: the teacher's targets have mean squares"):
        recipe(batch("classification", seed=23))


@pytest.mark.parametrize("task", TASKS)
def test_kd_matches_formula(task):
    student, teacher = _models(task)
    recipe = KD(student, teacher, task_alpha=0.3, kl_alpha=2.0, temperature=3.0)
    b = batch(task, seed=17)
    out = recipe(b)
    out.loss.backward()
    s_logits, _ = hidden64(double(student), b, [])
    t_logits, _ = hidden64(double(teacher), b, [])
    ref = 0.3 * ref_task(s_logits, b["labels"], task) + 2.0 * ref_kl(s_logits, t_logits, 3.0, _kd_mask(task, b))
    assert_close("loss", out.loss, ref)
    assert set(out.terms) == {"task", "kd"} and out.layer_losses is None


# --------------------------------------------------------------------------- CoDIR


def _info_nce(s, t, negatives, temperature, keep):
    """-log softmax of the positive among the positive and the kept negatives, mean over anchors."""
    s, t, negatives = F.normalize(s, dim=-1), F.normalize(t, dim=-1), F.normalize(negatives, dim=-1)
    pos = (s * t).sum(-1) / temperature
    neg = (s @ negatives.T / temperature).masked_fill(~keep, float("-inf"))
    return (torch.logsumexp(torch.cat([pos[:, None], neg], 1), 1) - pos).mean()


@pytest.mark.parametrize("task", ["classification", "mlm"])
@pytest.mark.parametrize("mode", ["queue", "momentum"])
def test_codir_matches_formula_and_fills_its_bank(task, mode):
    student, teacher = _models(task)
    bank = MemoryBank(64 if mode == "momentum" else 12, 16, mode=mode)
    recipe = CoDIR(
        student,
        teacher,
        explicit_map([(0, 1), (1, 3)], 2, 4),
        proj_dim=16,
        bank=bank,
        task_alpha=0.4,
        kd_alpha=0.6,
        crd_alpha=1.7,
        temperature=0.1,
    )
    recipe.train()
    first = recipe(batch(task, seed=18), step=0)
    assert float(first.terms["crd"]) == 0.0  # the bank was empty: the first step fills it
    first.loss.backward()
    b = batch(task, seed=25)  # the first batch's example ids again: an MLM anchor skips its own entry
    negatives = bank.negatives()
    vectors, neg_labels, neg_ids = (x.clone() for x in negatives)
    out = recipe(b, step=1)
    out.loss.backward()

    s64, t64 = double(student), double(teacher)
    s_logits, s_states = hidden64(s64, b, [0, 1])
    t_logits, t_states = hidden64(t64, b, [1, 3])
    m = b["attention_mask"]
    sv = double(recipe.student_head)(torch.cat([ref_pool(h, m) for h in s_states], 1))
    tv = double(recipe.teacher_head)(torch.cat([ref_pool(h, m) for h in t_states], 1))
    if task == "classification":  # different-label negatives
        keep = b["labels"][:, None] != neg_labels[None, :]
    else:  # example ids: leave out the anchor's own entry
        keep = b["index"][:, None] != neg_ids[None, :]
    crd = _info_nce(sv, tv, vectors.double(), 0.1, keep)
    ref = (
        0.4 * ref_task(s_logits, b["labels"], task)
        + 0.6 * ref_kl(s_logits, t_logits, 2.0, _kd_mask(task, b))
        + 1.7 * crd
    )
    assert_close("crd", out.terms["crd"], crd, rtol=1e-4)
    assert_close("loss", out.loss, ref, rtol=1e-4)
    assert recipe.teacher_head.weight.grad is not None and recipe.student_head.weight.grad is not None
    # The batch's normalized teacher vectors are now in the bank.
    stored = bank.vectors[bank.ids == b["index"][0]]
    if mode == "queue":
        assert torch.allclose(stored[-1].double(), F.normalize(tv[0], dim=-1), atol=1e-5)
    recipe.eval()
    pushed = bank.pushed.clone()
    recipe(b)
    assert torch.equal(bank.pushed, pushed), "an evaluation forward must not change the bank"


@pytest.mark.parametrize("task", ["classification", "mlm"])
def test_codir_draws_k_negatives_per_anchor_from_a_momentum_bank(task):
    """The authors' setting (codir-paper): first-token pooling, a momentum bank of one entry per example, K
    negatives drawn per anchor. The loss is the InfoNCE over each anchor's own draws, in float64; while the bank
    holds fewer than K entries every anchor draws as many as it holds; an anchor whose draws are all forbidden (a
    classification bank holding its label alone) has no negative."""
    student, teacher = _models(task)
    bank = MemoryBank(40, 16, mode="momentum", seed=5)
    recipe = CoDIR(
        student,
        teacher,
        explicit_map([(0, 1), (1, 3)], 2, 4),
        proj_dim=16,
        bank=bank,
        negatives=6,
        pooling="first",
        task_alpha=0.4,
        kd_alpha=0.6,
        crd_alpha=1.7,
        temperature=0.1,
    )
    recipe.train()
    b0 = batch(task, seed=18)
    if task == "classification":
        b0["labels"] = torch.zeros_like(b0["labels"])  # one label in the bank: an anchor of label 0 has no negative
        b0["index"] = torch.arange(len(b0["labels"])) + 20
    recipe(b0, step=0).loss.backward()
    b = batch(task, seed=25)
    if task == "classification":
        b["index"] = torch.arange(len(b["labels"]))
    filled = len(bank)
    twin = MemoryBank(40, 16, mode="momentum")
    twin.load_state_dict(bank.state_dict())  # the same entries and sampler state: the draws the recipe will make
    kind = "labels" if task == "classification" else "index"
    neg = twin.sample(min(6, filled), **{kind: b[kind]}, strict=False)
    out = recipe(b, step=1)
    out.loss.backward()

    s64, t64 = double(student), double(teacher)
    s_logits, s_states = hidden64(s64, b, [0, 1])
    t_logits, t_states = hidden64(t64, b, [1, 3])
    sv = double(recipe.student_head)(torch.cat([h[:, 0] for h in s_states], 1))
    tv = double(recipe.teacher_head)(torch.cat([h[:, 0] for h in t_states], 1))
    keep = (neg.labels if kind == "labels" else neg.index) != b[kind][:, None]
    sn, tn, nn_ = F.normalize(sv, dim=-1), F.normalize(tv, dim=-1), F.normalize(neg.vectors.double(), dim=-1)
    pos = (sn * tn).sum(-1) / 0.1
    scores = torch.einsum("bkd,bd->bk", nn_, sn).div(0.1).masked_fill(~keep, float("-inf"))
    crd = (torch.logsumexp(torch.cat([pos[:, None], scores], 1), 1) - pos).mean()
    if task == "classification":
        assert not keep[b["labels"] == 0].any() and keep[b["labels"] != 0].all()
    ref = (
        0.4 * ref_task(s_logits, b["labels"], task)
        + 0.6 * ref_kl(s_logits, t_logits, 2.0, _kd_mask(task, b))
        + 1.7 * crd
    )
    assert_close("crd", out.terms["crd"], crd, rtol=1e-4)
    assert_close("loss", out.loss, ref, rtol=1e-4)
    assert float(crd.detach()) > 0 and recipe.student_head.weight.grad is not None


def test_codir_draws_as_many_negatives_as_a_small_full_bank_holds():
    """negatives=K over a bank of fewer than K entries: once full, each anchor draws as many as the bank holds
    (training went on past the step that filled it), the loss the InfoNCE over those draws."""
    student, teacher = _models("classification")
    bank = MemoryBank(8, 8, seed=2)
    recipe = CoDIR(student, teacher, proj_dim=8, bank=bank, negatives=20, label_negatives=False).train()
    for step in range(3):
        b = batch("classification", seed=40 + step)
        twin = MemoryBank(8, 8)
        twin.load_state_dict(bank.state_dict())
        out = recipe(b, step=step)
        out.loss.backward()
        if step == 2:
            assert twin.full
            neg = twin.sample(8, n_anchors=len(b["labels"]))
            sv, tv = (
                F.normalize(v.detach().double(), dim=-1)
                for v in recipe.vectors(
                    recipe.student_model(b, recipe.layer_map.student), recipe.teacher_model(b, recipe.layer_map.teacher)
                )
            )
            pos = (sv * tv).sum(-1) / 0.07
            scores = torch.einsum("bkd,bd->bk", F.normalize(neg.vectors.double(), dim=-1), sv) / 0.07
            ref = (torch.logsumexp(torch.cat([pos[:, None], scores], 1), 1) - pos).mean()
            assert_close("crd", out.terms["crd"], ref, rtol=1e-4)


# --------------------------------------------------------------------------- RAIL-KD


@pytest.mark.parametrize("concat", [False, True])
@pytest.mark.parametrize("task", ["classification", "clm"])
def test_railkd_matches_formula(concat, task):
    student, teacher = _models(task)
    n_s = student.config.num_hidden_layers
    layer_map = RandomLayerMap(n_s, 4, student_layers=[0, 1], teacher_layers=[0, 1, 2], per="step", seed=5)
    recipe = RAILKD(
        student, teacher, layer_map, proj_dim=8, concat=concat, task_alpha=0.2, kd_alpha=0.9, rail_alpha=4.0
    )
    b = batch(task, seed=20)
    out = recipe(b, step=7)
    out.loss.backward()
    pairs = layer_map.draw(step=7)
    s64, t64, dist64 = double(student), double(teacher), double(recipe.distance)
    s_logits, s_states = hidden64(s64, b, list(pairs.student))
    t_logits, t_states = hidden64(t64, b, list(pairs.teacher))
    m = b["attention_mask"]
    ps, pt = [ref_pool(h, m) for h in s_states], [ref_pool(h, m) for h in t_states]
    if concat:
        ps, pt = [torch.cat(ps, 1)], [torch.cat(pt, 1)]
    dist = sum(
        ((F.normalize(a(x), dim=-1) - F.normalize(c(y), dim=-1)) ** 2).sum(-1).mean()
        for a, c, x, y in zip(dist64.student_proj, dist64.teacher_proj, ps, pt)
    )
    ref = (
        0.2 * ref_task(s_logits, b["labels"], task)
        + 0.9 * ref_kl(s_logits, t_logits, 2.0, _kd_mask(task, b))
        + 4.0 * dist
    )
    assert_close("loss", out.loss, ref, rtol=1e-4)
    assert out.layer_losses.shape == ((1,) if concat else (2,))


def test_railkd_draws_follow_the_step_and_resume():
    def build():
        return RAILKD(bert(2, 32), bert(4, 48, seed=1), RandomLayerMap(2, 4, per="step", seed=3), proj_dim=8)

    recipe = build()
    recipe.train()
    b = batch("classification", seed=21)
    losses = [recipe(b).loss.item() for _ in range(3)]
    assert recipe.forward_count == 3
    draws = [recipe.layer_map.draw(step=s).teacher for s in range(3)]
    assert len(set(draws)) > 1, "the draws should change from step to step"
    assert losses == [pytest.approx(build()(b, step=s).loss.item(), rel=1e-6) for s in range(3)]
    # Resume from the state dict: the counter (and so the next draw) continues where it stopped.
    state = recipe.state_dict()
    resumed = build()
    resumed.load_state_dict(state)
    resumed.train()
    assert resumed.forward_count == 3
    assert resumed(b).loss.item() == pytest.approx(recipe(b).loss.item(), rel=1e-6)
    assert resumed.forward_count == recipe.forward_count == 4


@pytest.mark.parametrize("concat", [False, True], ids=["layerwise", "concat"])
def test_railkd_steps_the_student_projection_not_the_teachers(concat):
    """A plain trainer's step (AdamW with weight decay over ``recipe.parameters()``) moves the student's projection
    and leaves the teacher's fixed one as built; ``train_teacher_projection=True`` moves both, and a state dict of
    that old form loads into the default recipe, its teacher projection still fixed."""

    def build(**kwargs):
        torch.manual_seed(4)
        layer_map = RandomLayerMap(2, 4, per="step", seed=3)
        return RAILKD(bert(2, 32), bert(4, 48, seed=1), layer_map, proj_dim=8, concat=concat, **kwargs)

    def step(recipe):
        before = {k: v.clone() for k, v in recipe.distance.state_dict().items()}
        opt = torch.optim.AdamW(recipe.parameters(), lr=1e-2, weight_decay=0.1)
        recipe(batch("classification", seed=22), step=0).loss.backward()
        opt.step()
        return {k for k, v in recipe.distance.state_dict().items() if not torch.equal(v, before[k])}

    fixed, old = build(), build(train_teacher_projection=True)
    keys = set(fixed.distance.state_dict())
    assert step(fixed) == {k for k in keys if k.startswith("student_proj.")}
    assert step(old) == keys
    fixed.load_state_dict(old.state_dict())
    for a, b in zip(fixed.distance.teacher_proj.parameters(), old.distance.teacher_proj.parameters()):
        assert torch.equal(a, b) and not a.requires_grad


# --------------------------------------------------------------------------- DWT


@pytest.mark.parametrize("task", TASKS)
def test_dwt_matches_formula_with_its_schedule(task):
    # DWT: the student is the larger model.
    teacher, student = _models(task)
    schedule = Schedule("cosine", start=4.0, end=1.0, steps=10)
    recipe = DWT(student, teacher, alpha_h=0.8, alpha_s=schedule, temperature=1.5)
    b = batch(task, seed=22)
    s_logits, _ = hidden64(double(student), b, [])
    t_logits, _ = hidden64(double(teacher), b, [])
    task_loss = ref_task(s_logits, b["labels"], task)
    kl = ref_kl(s_logits, t_logits, 1.5, _kd_mask(task, b))
    for step, alpha in ((0, 4.0), (5, 2.5), (10, 1.0), (25, 1.0)):
        out = recipe(b, step=step)
        assert out.weights == {"task": 0.8, "kd": pytest.approx(alpha)}
        assert_close(f"loss at step {step}", out.loss, 0.8 * task_loss + alpha * kl)
    out.loss.backward()
    assert all(p.grad is None for p in teacher.parameters())


# --------------------------------------------------------------------------- the teacher stays as it was


def recipes_of(task):
    student, teacher = _models(task)
    s_layers, t_layers = _maps(task)
    yield "TED", TED(student, teacher, TaskFilters(s_layers, 32, 48), TaskFilters(t_layers, 48, 48))
    student, teacher = _models(task, seed=2)
    yield "LWD", LWD(student, teacher)
    yield "KD", KD(*_models(task, seed=4))
    yield "CoDIR", CoDIR(*_models(task, seed=6), bank_size=8, proj_dim=8)
    yield "RAILKD", RAILKD(*_models(task, seed=8), proj_dim=8)
    teacher, student = _models(task, seed=10)
    yield "DWT", DWT(student, teacher, alpha_s=Schedule("linear", 4.0, 1.0, 100))


@pytest.mark.parametrize("task", TASKS)
def test_stage2_steps_leave_the_teacher_bit_identical(task):
    for name, recipe in recipes_of(task):
        frozen = [recipe.teacher] + ([recipe.teacher_filters] if name == "TED" else [])
        before = [[p.detach().clone() for p in m.parameters()] for m in frozen]
        student_before = [p.detach().clone() for p in recipe.student.parameters()]
        opt = torch.optim.AdamW(recipe.parameters(), lr=1e-2)
        recipe.train()
        for step in range(2):
            opt.zero_grad(set_to_none=True)
            out = recipe(batch(task, seed=30 + step))
            assert torch.isfinite(out.loss)
            out.loss.backward()
            opt.step()
        for module, params in zip(frozen, before):
            assert not module.training, f"{name}: the teacher left eval mode"
            for p, q in zip(module.parameters(), params):
                assert torch.equal(p, q) and p.grad is None, f"{name}: the teacher changed"
        changed = sum(not torch.equal(p, q) for p, q in zip(recipe.student.parameters(), student_before))
        assert changed > 0, f"{name}: the student did not train"
        teacher_ids = {id(p) for p in recipe.teacher.parameters()}
        assert not any(id(p) in teacher_ids for p in recipe.parameters()), f"{name}: teacher in parameters()"
        assert not any(k.startswith("teacher.") for k in recipe.state_dict()), f"{name}: teacher in the state dict"


def test_recipe_to_moves_the_frozen_teacher():
    student, teacher = _models("classification")
    KD(student, teacher).to(torch.float64)
    assert teacher.get_input_embeddings().weight.dtype == torch.float64
    assert student.get_input_embeddings().weight.dtype == torch.float64


# --------------------------------------------------------------------------- low precision (the GPU check runs it too)


def _set_impl(recipe, impl):
    for module in recipe.modules():
        if hasattr(module, "impl"):
            module.impl = impl
    return recipe


def check_recipe_lowp(recipe, task, dtype, device, impl):
    """The recipe in ``dtype`` on ``device`` through ``impl``, against itself in float64 on the CPU: the loss and
    the student's embedding gradient within twice the error of the same recipe on PyTorch's own path in ``dtype``."""
    if isinstance(recipe, CoDIR):  # a filled bank, so the contrastive term runs
        recipe.bank.update(
            torch.randn(recipe.bank.size, recipe.bank.dim, generator=torch.Generator().manual_seed(1)),
            labels=torch.arange(recipe.bank.size) % 3,
        )
    b = batch(task, seed=60)
    results = {}
    for name, copy_dtype, copy_device, copy_impl in (
        ("ref64", torch.float64, "cpu", "reference"),
        ("torch", dtype, device, "reference"),
        ("fastted", dtype, device, impl),
    ):
        run = _set_impl(copy.deepcopy(recipe), copy_impl).to(device=copy_device, dtype=copy_dtype).eval()
        out = run({k: v.to(copy_device) for k, v in b.items()}, step=3)
        out.loss.backward()
        results[name] = (out.loss.detach(), run.student.get_input_embeddings().weight.grad)
    for i, what in enumerate(("loss", "student embedding gradient")):
        assert_close_to_spec(
            f"{type(recipe).__name__} {task} {what}",
            results["fastted"][i],
            results["ref64"][i],
            results["torch"][i],
            DTYPES[dtype],
        )


@pytest.mark.parametrize("task", TASKS)
def test_recipes_in_bfloat16(task):
    device = "cuda" if torch.cuda.is_available() else "cpu"  # on a CPU: the kernels under the interpreter
    for _, recipe in recipes_of(task):
        check_recipe_lowp(recipe, task, torch.bfloat16, device, "auto")
