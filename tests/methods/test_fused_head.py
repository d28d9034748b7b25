"""The fused LM head: adapters cut before the vocabulary projection, and recipes with ``fused_lm_head=True``.

The recipes' fused path (one ``fused_linear_kd`` call on the inputs of both
LM heads) must give the unfused recipe's loss, terms and student gradients,
and the hand-written float64 formula of tests/tiny_models.py, on tiny BERT-MLM and
GPT-2 models, through the chunked PyTorch path and the Triton kernel (under
Triton's interpreter on a CPU), without ever calling an output embedding.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers as tf

from fastted import DWT, KD, LWD, TED, ModelAdapter, Schedule, TaskFilters, explicit_map
from tests.tiny_models import VOCAB, assert_close, batch, bert, double, gpt2, hidden64, ref_kl, ref_mse, ref_task

IMPLS = ["reference", "triton"]
RECIPES = ["TED", "LWD", "KD", "DWT"]


# --------------------------------------------------------------------------- models


def roberta(layers, hidden):
    torch.manual_seed(0)
    return tf.RobertaForMaskedLM(
        tf.RobertaConfig(
            vocab_size=VOCAB,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            intermediate_size=2 * hidden,
            max_position_embeddings=70,
        )
    )


def llama(layers, hidden, **kw):
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(
        tf.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=2 * hidden,
            max_position_embeddings=64,
            **kw,
        )
    )


def deberta_mlm(legacy):
    torch.manual_seed(0)
    return tf.DebertaV2ForMaskedLM(
        tf.DebertaV2Config(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
            legacy=legacy,
        )
    )


LANGUAGE_MODELS = {
    "bert-mlm": (lambda: bert(2, 32, "mlm"), "mlm"),
    "roberta-mlm": (lambda: roberta(2, 32), "mlm"),
    "deberta-v2-mlm-legacy": (lambda: deberta_mlm(True), "mlm"),
    "gpt2": (lambda: gpt2(2, 32), "clm"),
    "llama": (lambda: llama(2, 32), "clm"),
    "llama-tied": (lambda: llama(2, 32, tie_word_embeddings=True), "clm"),
}


@pytest.mark.parametrize("name", sorted(LANGUAGE_MODELS))
def test_adapter_without_head_gives_the_projection_input_of_the_logits(name):
    build, task = LANGUAGE_MODELS[name]
    model = build().eval()
    adapter = ModelAdapter(model)
    b = batch(task, seed=70)
    handle = model.get_output_embeddings().register_forward_hook(_never_called)
    out = adapter(b, [1, 0], head=False)  # head=False must not run the vocabulary projection
    handle.remove()
    full = adapter(b, [1, 0])
    weight, bias = adapter.lm_head_parts()
    assert weight.shape == (VOCAB, 32) and out.head_input.shape == (5, 11, 32) and out.logits is None
    assert weight is model.get_output_embeddings().weight
    if model.config.tie_word_embeddings:
        assert weight is model.get_input_embeddings().weight
    with torch.no_grad():
        ref = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert torch.equal(F.linear(out.head_input, weight, bias), ref), "h @ W^T + b must be the model's logits"
    assert torch.equal(full.logits, ref)
    for got, want in zip(out.hidden_states, full.hidden_states):
        assert torch.equal(got, want)
    assert out.mask is b["attention_mask"]


def test_adapter_head_split_errors():
    with pytest.raises(ValueError, match="classification model.*fused_lm_head"):
        ModelAdapter(bert(2, 32)).lm_head_parts()
    with pytest.raises(ValueError, match="not the nn.Linear"):  # its head multiplies by the input embeddings itself
        ModelAdapter(deberta_mlm(False)).lm_head_parts()
    torch.manual_seed(0)
    distil = tf.DistilBertForMaskedLM(
        tf.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64)
    )
    with pytest.raises(ValueError, match="top-level 'activation' beside its base model 'distilbert'"):
        ModelAdapter(distil)(batch("mlm", 71), head=False)
    torch.manual_seed(0)
    gemma2 = tf.Gemma2ForCausalLM(
        tf.Gemma2Config(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    )
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        ModelAdapter(gemma2).lm_head_parts()


# --------------------------------------------------------------------------- recipes: fused against unfused


def _models(task, seed=0):
    """(student, teacher): 2 or 3 layers of 32 against 4 of 48 (one vocabulary, different widths)."""
    if task == "clm":
        return gpt2(3, 32, seed=seed), gpt2(4, 48, seed=seed + 1)
    return bert(2, 32, "mlm", seed=seed), bert(4, 48, "mlm", seed=seed + 1)


def _maps(task):
    return ([0, 1], [1, 2]) if task == "clm" else ([0, 1], [1, 3])


def _filters(layers, width, seed):
    torch.manual_seed(seed)
    filters = TaskFilters(layers, width, 48, nonlinear=True)
    with torch.no_grad():  # larger than nn.Linear's init, so the MSE term is not negligible
        for p in filters.parameters():
            p.mul_(3)
    return filters


DWT_SCHEDULE = dict(kind="cosine", start=4.0, end=1.0, steps=10)
STEP = 5  # DWT's alpha_s(5) = 2.5


def _recipe(name, task, student, teacher, filters, **kw):
    if name == "TED":
        return TED(student, teacher, *filters, task_alpha=0.7, kl_alpha=1.3, mse_alpha=2.1, **kw)
    if name == "LWD":
        s_layers, t_layers = _maps(task)
        s_n, t_n = student.config.num_hidden_layers, teacher.config.num_hidden_layers
        return LWD(
            student,
            teacher,
            explicit_map(list(zip(s_layers, t_layers)), s_n, t_n),
            task_alpha=0.5,
            kl_alpha=0.25,
            mse_alpha=3.0,
            **kw,
        )
    if name == "KD":
        return KD(student, teacher, task_alpha=0.3, kl_alpha=2.0, temperature=3.0, **kw)
    return DWT(student, teacher, alpha_h=0.8, alpha_s=Schedule(**DWT_SCHEDULE), temperature=1.5, **kw)


def _pair(name, task, impl, **kw):
    """(unfused, fused) recipes on identical copies of the models (and filters); the fused copies' output
    embeddings fail the test when called."""
    student, teacher = _models(task)
    if name == "DWT":  # DWT's student is the larger model
        student, teacher = teacher, student
    s_layers, t_layers = _maps(task)
    filters = (_filters(s_layers, 32, 1), _filters(t_layers, 48, 2))
    built = []
    for fused in (False, True):
        s, t, f = copy.deepcopy((student, teacher, filters))
        if fused:
            for model in (s, t):
                model.get_output_embeddings().register_forward_hook(_never_called)
        built.append(_recipe(name, task, s, t, f, impl=impl, fused_lm_head=fused, **kw))
        if name == "LWD" and fused:  # the same random projections in both
            built[1].projections.load_state_dict(built[0].projections.state_dict())
    return built


def _never_called(module, args, output):
    """The output embedding may be entered (BERT's head passes through it as an identity, so that hooks around
    it see a whole forward), but must never project: its output is its input, never (.., vocab) logits."""
    if output is not args[0] or output.shape[-1] == module.out_features:
        raise AssertionError(f"the fused path ran the output embedding {module}: it computed the full logits")


def _formula(name, task, recipe, b):
    """The recipe's loss and terms written out in float64 on copies of the unfused recipe's models."""
    s64, t64 = double(recipe.student), double(recipe.teacher)
    s_layers, t_layers = _maps(task) if name in ("TED", "LWD") else ([], [])
    s_logits, s_states = hidden64(s64, b, s_layers)
    t_logits, t_states = hidden64(t64, b, t_layers)
    mask = b["attention_mask"]
    if name == "DWT":
        weights, temperature = {"task": 0.8, "kd": 2.5}, 1.5
    elif name == "KD":
        weights, temperature = {"task": 0.3, "kd": 2.0}, 3.0
    else:
        weights, temperature = (
            ({"task": 0.7, "kd": 1.3, "mse": 2.1} if name == "TED" else {"task": 0.5, "kd": 0.25, "mse": 3.0}),
            2.0,
        )
    terms = {"task": ref_task(s_logits, b["labels"], task), "kd": ref_kl(s_logits, t_logits, temperature, mask)}
    if name == "TED":
        sf, tf_ = double(recipe.student_filters), double(recipe.teacher_filters)
        terms["mse"] = torch.stack(
            [ref_mse(f(h), g(y), mask) for f, g, h, y in zip(sf.filters, tf_.filters, s_states, t_states)]
        ).mean()
    elif name == "LWD":
        proj = double(recipe.projections)
        terms["mse"] = torch.stack([ref_mse(p(h), y, mask) for p, h, y in zip(proj, s_states, t_states)]).mean()
    return sum(weights[k] * v for k, v in terms.items()), terms, weights


def _assert_same_grads(unfused, fused, rtol=1e-5):
    got = dict(fused.named_parameters())
    checked = 0
    for pname, p in unfused.named_parameters():
        q = got[pname]
        assert (p.grad is None) == (q.grad is None), f"{pname}: a gradient on one path only"
        if p.grad is None:
            continue
        err = (q.grad - p.grad).abs().max().item()
        assert err <= rtol * p.grad.abs().max().item() + 1e-8, f"{pname}: gradient error {err:.3e}"
        checked += 1
    return checked


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", RECIPES)
@pytest.mark.parametrize("task", ["mlm", "clm"])
def test_fused_recipe_matches_unfused_and_formula(task, name, impl):
    # The kernel on a GPU, or under Triton's interpreter on a CPU (tests/conftest.py).
    device = "cuda" if impl == "triton" and torch.cuda.is_available() else "cpu"
    unfused, fused = _pair(name, task, impl)
    b = batch(task, seed=72)
    ref_loss, ref_terms, weights = _formula(name, task, unfused, b)
    outs = []
    for recipe in (unfused, fused):
        out = recipe.to(device)({k: v.to(device) for k, v in b.items()}, step=STEP)
        out.loss.backward()
        outs.append(out)
    u, f = outs
    assert f.logits is None and u.logits is not None
    assert f.weights == u.weights == pytest.approx(weights)
    assert set(f.terms) == set(u.terms) == set(ref_terms)
    assert_close("loss (fused / unfused)", f.loss, u.loss, rtol=1e-5)
    assert_close("loss (fused / float64)", f.loss, ref_loss)
    for term in ref_terms:
        assert not f.terms[term].requires_grad
        assert_close(f"{term} (fused / unfused)", f.terms[term], u.terms[term], rtol=1e-5)
        assert_close(f"{term} (fused / float64)", f.terms[term], ref_terms[term])
    if name in ("TED", "LWD"):
        assert torch.allclose(f.layer_losses, u.layer_losses, rtol=1e-5)
    checked = _assert_same_grads(unfused, fused)
    assert checked >= 10
    head_w, head_b = fused.student_model.lm_head_parts()
    assert head_w.grad is not None and (head_b is None or head_b.grad is not None)
    if task == "clm":  # GPT-2 ties its output to its input embedding: both uses reach one gradient
        assert head_w is fused.student.get_input_embeddings().weight
    assert all(p.grad is None for p in fused.teacher.parameters())


@pytest.mark.parametrize("task", ["mlm", "clm"])
def test_fused_recipe_with_a_zero_weight(task):
    b = batch(task, seed=73)
    cases = [
        ("KD", dict(task_alpha=0.0, kl_alpha=1.5), {"kd"}),
        ("KD", dict(task_alpha=0.6, kl_alpha=0.0), {"task"}),
        ("LWD", dict(task_alpha=0.0, kl_alpha=0.0, mse_alpha=1.0), {"mse"}),
    ]
    for name, kw, keys in cases:
        outs, recipes = [], []
        for fused in (False, True):
            s, t = _models(task, seed=3)
            cls = KD if name == "KD" else LWD
            recipe = cls(s, t, fused_lm_head=fused, impl="reference", **kw)
            if recipes and name == "LWD":
                recipe.projections.load_state_dict(recipes[0].projections.state_dict())
            out = recipe(b)
            out.loss.backward()
            outs.append(out)
            recipes.append(recipe)
        assert set(outs[1].terms) == set(outs[0].terms) == keys, (name, kw)
        assert_close(f"{name} {kw}", outs[1].loss, outs[0].loss, rtol=1e-5)
        _assert_same_grads(*recipes)
    # DWT's schedule reaching 0: the task term alone; both weights 0 is an error, as unfused.
    teacher, student = _models(task, seed=5)
    recipe = DWT(student, teacher, alpha_s=Schedule("linear", 1.0, 0.0, 4), fused_lm_head=True)
    assert set(recipe(b, step=4).terms) == {"task"}
    zero = DWT(student, teacher, alpha_h=0.0, alpha_s=Schedule("linear", 1.0, 0.0, 4), fused_lm_head=True)
    with pytest.raises(ValueError, match="nothing to train"):
        zero(b, step=4)


def test_fused_kd_without_kl_accepts_another_vocabulary():
    """Without the KL term the teacher's head is not used: its vocabulary may differ, as unfused."""
    student, teacher = bert(2, 32, "mlm"), bert(4, 48, "mlm", vocab_size=120, seed=1)
    b = batch("mlm", seed=74)
    losses = [KD(copy.deepcopy(student), teacher, kl_alpha=0.0, fused_lm_head=fused)(b).loss for fused in (False, True)]
    assert_close("loss", losses[1], losses[0], rtol=1e-5)
    with pytest.raises(ValueError, match="vocab_size is 97 and the teacher's 120"):
        KD(student, teacher, fused_lm_head=True)


def test_fused_lm_head_errors():
    student, teacher = bert(2, 32), bert(4, 48, seed=1)  # classification
    filters = (TaskFilters([0, 1], 32, 48), TaskFilters([1, 3], 48, 48))
    builders = [
        lambda **kw: TED(student, teacher, *filters, **kw),
        lambda **kw: LWD(student, teacher, **kw),
        lambda **kw: KD(student, teacher, **kw),
        lambda **kw: DWT(teacher, student, total_steps=10, **kw),
    ]
    for build in builders:
        with pytest.raises(ValueError, match="fused_lm_head=True .*'mlm' or 'clm'.*'classification'"):
            build(fused_lm_head=True)
        build(fused_lm_head=False)
    with pytest.raises(ValueError, match="fused_lm_head must be a bool"):
        KD(*_models("mlm"), fused_lm_head="yes")
    torch.manual_seed(0)
    distil = tf.DistilBertForMaskedLM(
        tf.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64)
    )
    with pytest.raises(ValueError, match="fused_lm_head=True: the DistilBertForMaskedLM has a top-level"):
        KD(distil, bert(2, 48, "mlm"), fused_lm_head=True)
    KD(distil, bert(2, 48, "mlm"))  # unfused, it is fine
    recipe = KD(*_models("mlm"), fused_lm_head=True)
    b = batch("mlm", seed=75)
    del b["labels"]
    with pytest.raises(ValueError, match="needs batch\\['labels'\\]"):
        recipe(b)
