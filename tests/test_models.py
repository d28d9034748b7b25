"""Model adapters, task losses, filters, DWT's schedules and parameter remapping."""

import pytest
import torch
import transformers as tf

from fastted import ModelAdapter, Schedule, TaskFilters, check_same_vocab, remap_parameters, task_loss
from fastted.filters import ClassificationHead
from fastted.models import adapt
from tests.tiny_models import LABELS, VOCAB, batch, bert, gpt2


def llama(layers, hidden, **kw):
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(
        tf.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=kw.pop("intermediate_size", 2 * hidden),
            max_position_embeddings=64,
            **kw,
        )
    )


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


def deberta(layers, hidden):
    torch.manual_seed(0)
    return tf.DebertaV2ForSequenceClassification(
        tf.DebertaV2Config(
            vocab_size=VOCAB,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            intermediate_size=2 * hidden,
            num_labels=LABELS,
            max_position_embeddings=64,
        )
    )


MODELS = {
    "bert": (lambda: bert(3, 32), "classification", "bert.encoder.layer"),
    "bert-mlm": (lambda: bert(3, 32, "mlm"), "mlm", "bert.encoder.layer"),
    "roberta": (lambda: roberta(3, 32), "mlm", "roberta.encoder.layer"),
    "deberta-v2": (lambda: deberta(3, 32), "classification", "deberta.encoder.layer"),
    "gpt2": (lambda: gpt2(3, 32), "clm", "transformer.h"),
    "llama": (lambda: llama(3, 32), "clm", "model.layers"),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_adapter_finds_blocks_and_captures_them_like_output_hidden_states(name):
    build, task, path = MODELS[name]
    model = build().eval()
    adapter = ModelAdapter(model)
    assert (adapter.task, adapter.layers_path, adapter.num_layers, adapter.hidden_size) == (task, path, 3, 32)
    b = batch(task, seed=40)
    out = adapter(b, [2, 0, 1])
    with torch.no_grad():
        ref = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
    assert torch.equal(out.logits, ref.logits) and out.mask is b["attention_mask"]
    decoder = task == "clm"
    for got, layer in zip(out.hidden_states, [2, 0, 1]):
        if decoder and layer == 2:  # a decoder's last entry is after its final norm; the adapter's before it
            continue
        assert torch.equal(got, ref.hidden_states[layer + 1]), f"layer {layer}"
    if task != "classification":  # the LM head as a function of the last block's output gives the logits
        with torch.no_grad():
            assert torch.allclose(adapter.output_head()(out.hidden_states[0]), ref.logits, atol=1e-5)


@pytest.mark.bad_input
def test_adapter_errors():
    model = bert(3, 32)
    adapter = ModelAdapter(model)
    with pytest.raises(ValueError, match="layers 0..2"):
        adapter(batch("classification", 41), [3])
    with pytest.raises(ValueError, match="needs 'input_ids'"):
        adapter({"attention_mask": torch.ones(2, 3)}, [0])
    with pytest.raises(ValueError, match="task must be one of"):
        ModelAdapter(model, task="seq2seq")
    with pytest.raises(ValueError, match="cannot tell the task of a BertModel"):
        ModelAdapter(model.bert)
    with pytest.raises(ValueError, match="is a BertEncoder, but needs the nn.ModuleList"):
        ModelAdapter(model, layers="bert.encoder")
    assert ModelAdapter(model.bert, task="classification", layers="encoder.layer").layers_path == "encoder.layer"
    with pytest.raises(ValueError, match="must be a Hugging Face model"):
        ModelAdapter(torch.nn.Linear(2, 2))
    assert adapt(adapter) is adapter


@pytest.mark.parametrize("name", ["bert", "bert-mlm", "gpt2", "llama"])
def test_task_loss_is_hugging_faces_loss(name):
    build, task, _ = MODELS[name]
    model = build().eval()
    b = batch(task, seed=42)
    with torch.no_grad():
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
    assert torch.allclose(task_loss(out.logits, b["labels"], task), out.loss, rtol=1e-6, atol=1e-6)


@pytest.mark.bad_input
def test_task_loss_regression_and_errors():
    logits = torch.randn(6, 1)
    labels = torch.randn(6)
    assert torch.allclose(task_loss(logits, labels, "classification"), ((logits[:, 0] - labels) ** 2).mean())
    with pytest.raises(ValueError, match="needs batch\\['labels'\\]"):
        task_loss(logits, None, "classification")


@pytest.mark.bad_input
def test_check_same_vocab():
    check_same_vocab(adapt(bert(2, 32, "mlm")), adapt(bert(4, 48, "mlm")))
    with pytest.raises(ValueError, match="num_labels=3 and the teacher 5"):
        check_same_vocab(adapt(bert(2, 32)), adapt(bert(4, 48, num_labels=5)))
    with pytest.raises(ValueError, match="task is 'mlm' and the teacher's 'classification'"):
        check_same_vocab(adapt(bert(2, 32, "mlm")), adapt(bert(2, 32)))

    class Tok:
        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return self.vocab

    with pytest.raises(ValueError, match="tokenizers have different vocabularies"):
        check_same_vocab(adapt(gpt2(2, 32)), adapt(gpt2(3, 32)), (Tok({"a": 0}), Tok({"b": 0})))


# --------------------------------------------------------------------------- filters


@pytest.mark.parametrize("nonlinear", [False, True])
def test_filters_split_is_the_filter(nonlinear):
    filters = TaskFilters([0, 2], 24, 40, nonlinear=nonlinear, activation="relu")
    states = [torch.randn(3, 5, 24) for _ in range(2)]
    xs, ws, bs = filters.split(states)
    for x, w, b, y in zip(xs, ws, bs, filters(states)):
        assert torch.allclose(x @ w.T + b, y, atol=1e-6)
    with pytest.raises(ValueError, match="got 1 hidden states, but these filters are for 2 layers"):
        filters(states[:1])


def test_filters_save_and_load(tmp_path):
    filters = TaskFilters([1, 3], 24, 16, nonlinear=True, activation="tanh")
    filters.save_pretrained(tmp_path)
    loaded = TaskFilters.from_pretrained(tmp_path)
    assert loaded.config == filters.config
    for (n, p), (m, q) in zip(filters.state_dict().items(), loaded.state_dict().items()):
        assert n == m and torch.equal(p, q)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["filters.json", "filters.safetensors"]  # no temp files


@pytest.mark.bad_input
def test_filter_and_head_errors():
    with pytest.raises(ValueError, match="activation must be one of"):
        TaskFilters([0], 8, activation="swish")
    with pytest.raises(ValueError, match="filter_dim must be a positive int"):
        TaskFilters([0], 8, 0)
    with pytest.raises(ValueError, match="layers must be a non-empty list"):
        TaskFilters([], 8)
    with pytest.raises(ValueError, match="num_labels must be a positive int"):
        ClassificationHead(8, 0)


# --------------------------------------------------------------------------- DWT: schedules and remapping


def test_schedules():
    const = Schedule("constant", 2.5)
    assert [const(s) for s in (0, 50, 10**6)] == [2.5, 2.5, 2.5]
    for kind in ("linear", "cosine"):
        s = Schedule(kind, start=4.0, end=1.0, steps=100)
        assert s(0) == pytest.approx(4.0) and s(50) == pytest.approx(2.5)
        assert s(100) == pytest.approx(1.0) and s(1000) == pytest.approx(1.0)
    assert Schedule("linear", 4.0, 1.0, 100)(25) == pytest.approx(3.25)
    assert Schedule("cosine", 4.0, 1.0, 100)(25) == pytest.approx(1.0 + 3.0 * (1 + 2**-0.5) / 2)
    with pytest.raises(ValueError, match="needs end and steps"):
        Schedule("linear", 4.0)
    with pytest.raises(ValueError, match="kind must be one of"):
        Schedule("step", 4.0)
    with pytest.raises(ValueError, match="start must be a finite number >= 0"):
        Schedule("constant", -1.0)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_remap_copies_first_layers_and_repeats_the_last(family):
    build = {
        "bert": lambda n, **kw: bert(n, 32, **kw),
        "gpt2": lambda n, **kw: gpt2(n, 32, **kw),
        "llama": lambda n, **kw: llama(n, 32, **kw),
    }[family]
    teacher, student = build(2), build(5)
    report = remap_parameters(student, teacher)
    s, t = adapt(student), adapt(teacher)
    for i in range(5):
        source = t.layers[min(i, 1)]
        for (n, p), (m, q) in zip(s.layers[i].named_parameters(), source.named_parameters()):
            assert torch.equal(p, q), f"student layer {i}.{n} is not teacher layer {min(i, 1)}.{m}"
    assert torch.equal(student.get_input_embeddings().weight, teacher.get_input_embeddings().weight)
    assert report[f"{s.layers_path}.4.{next(iter(dict(s.layers[4].named_parameters())))}"].startswith(
        f"{t.layers_path}.1."
    )


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_remap_wider_feed_forward_preserves_the_function(family):
    if family == "bert":
        teacher, student = bert(2, 32, intermediate_size=48).eval(), bert(2, 32, intermediate_size=80, seed=5).eval()
    elif family == "gpt2":
        teacher, student = gpt2(2, 32, n_inner=48).eval(), gpt2(2, 32, n_inner=80, seed=5).eval()
    else:
        teacher, student = llama(2, 32, intermediate_size=48).eval(), llama(2, 32, intermediate_size=80).eval()
    remap_parameters(student, teacher)
    b = batch("clm", seed=43)
    with torch.no_grad():
        got = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        want = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_remap_wider_hidden_copies_the_leading_block():
    teacher, student = bert(2, 32), bert(3, 48, seed=6)
    init = student.bert.embeddings.word_embeddings.weight.detach().clone()
    remap_parameters(student, teacher)
    emb = student.bert.embeddings.word_embeddings.weight
    assert torch.equal(emb[:, :32], teacher.bert.embeddings.word_embeddings.weight)
    assert torch.equal(emb[:, 32:], init[:, 32:])  # new features keep the student's init
    q = student.bert.encoder.layer[2].attention.self.query.weight
    assert torch.equal(q[:32, :32], teacher.bert.encoder.layer[1].attention.self.query.weight)
    assert torch.all(q[:, 32:] == 0)  # a Linear ignores the new input features
    narrow = bert(2, 32)
    before = [p.detach().clone() for p in narrow.parameters()]
    with pytest.raises(ValueError, match="smaller than the teacher's"):
        remap_parameters(narrow, bert(2, 48))
    assert all(torch.equal(p, q) for p, q in zip(narrow.parameters(), before)), "a failed remap wrote parameters"
