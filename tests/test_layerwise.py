"""LayerwiseMSELoss: the layer-wise loss that owns its projections, on the hidden-state tuples Hugging Face models
return, against a float64 formula written out here; TED's filters; save and load; bad input."""

import pytest
import torch

from fastted import LayerwiseMSELoss, TaskFilters
from tests.tiny_models import batch, bert, gpt2

PAIRS = [(0, 1), (1, 3)]


def _outputs(student, teacher, b):
    inputs = {k: b[k] for k in ("input_ids", "attention_mask")}
    s = student(**inputs, output_hidden_states=True)
    with torch.no_grad():
        t = teacher(**inputs, output_hidden_states=True)
    return s, t


def _formula(s_states, t_states, mask, student_filters, teacher_filters=None, layer_weights=None):
    """float64: sum_l w_l * sum_i m_i ||f_s(S_l,i) - f_t(T_l,i)||^2 / (d_f * sum_i m_i) / sum_l w_l."""
    m = mask.double().reshape(-1)
    losses = []
    for l, (s, t) in enumerate(zip(s_states, t_states)):
        fs = student_filters.filters[l].double()(s.double()).reshape(-1, student_filters.filter_dim)
        ft = t.double() if teacher_filters is None else teacher_filters.filters[l].double()(t.double())
        ft = ft.reshape(fs.shape)
        losses.append((((fs - ft) ** 2).sum(-1) * m).sum() / (fs.shape[-1] * m.sum()))
    w = torch.ones(len(losses), dtype=torch.float64) if layer_weights is None else torch.tensor(layer_weights).double()
    return (torch.stack(losses) * w).sum() / w.sum()


@pytest.mark.parametrize("with_teacher_filters", [False, True])
def test_matches_the_formula_on_model_outputs(with_teacher_filters):
    student, teacher = bert(2, 32, seed=1), bert(4, 48, seed=2)
    teacher_filters = TaskFilters([1, 3], 48, 40, nonlinear=True) if with_teacher_filters else None
    torch.manual_seed(3)
    loss_fn = LayerwiseMSELoss(
        PAIRS, 32, 48, teacher_filters=teacher_filters, layer_weights=[1.0, 3.0], impl="reference"
    )
    b = batch("classification", seed=60)
    s, t = _outputs(student, teacher, b)
    loss = loss_fn(s, t.hidden_states, mask=b["attention_mask"])  # a model output, or its tuple
    loss.backward()

    s_states = [s.hidden_states[1].detach().double().requires_grad_(), s.hidden_states[2].detach().double()]
    want = _formula(
        s_states,
        [t.hidden_states[2], t.hidden_states[4]],
        b["attention_mask"],
        loss_fn.student_filters,
        teacher_filters,
        [1.0, 3.0],
    )
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-7)
    want.backward()
    for f in loss_fn.student_filters.filters:
        assert f.proj.weight.grad is not None and f.proj.weight.grad.abs().sum() > 0
    assert loss_fn.layer_losses.shape == (2,)
    if with_teacher_filters:
        assert all(not p.requires_grad and p.grad is None for p in loss_fn.teacher_filters.parameters())
    trainable = [n for n, p in loss_fn.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("student_filters.") for n in trainable)


def test_gradient_reaches_the_student_like_the_formulas():
    student, teacher = bert(2, 32, seed=1), bert(4, 48, seed=2)
    loss_fn = LayerwiseMSELoss(PAIRS, 32, 48)
    b = batch("classification", seed=61)
    s, t = _outputs(student, teacher, b)
    states = [h.detach().requires_grad_() for h in s.hidden_states]
    loss_fn(states, t.hidden_states, mask=b["attention_mask"]).backward()
    ref = [h.detach().double().requires_grad_() for h in s.hidden_states]
    _formula(
        [ref[1], ref[2]], [t.hidden_states[2], t.hidden_states[4]], b["attention_mask"], loss_fn.student_filters
    ).backward()
    for i in (1, 2):
        torch.testing.assert_close(states[i].grad.double(), ref[i].grad, rtol=1e-5, atol=1e-8)
    assert states[0].grad is None  # the embeddings: not mapped


def test_raw_states_of_a_decoder_without_projection():
    """GPT-2 to GPT-2 of one width: projection=False matches raw states; element l + 1 is block l."""
    student, teacher = gpt2(2, 32, seed=1), gpt2(3, 32, seed=2)
    loss_fn = LayerwiseMSELoss([(0, 0), (1, 1)], 32, 32, projection=False)
    assert list(loss_fn.parameters()) == []
    b = batch("clm", seed=62)
    s, t = _outputs(student, teacher, b)
    got = loss_fn(s.hidden_states, t.hidden_states, mask=b["attention_mask"])
    m = b["attention_mask"].double()
    want = (
        sum(
            (((s.hidden_states[i].double() - t.hidden_states[i].double()) ** 2).sum(-1) * m).sum() / (32 * m.sum())
            for i in (1, 2)
        )
        / 2
    )
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)


def test_save_and_load(tmp_path):
    teacher_filters = TaskFilters([1, 3], 48, 40)
    loss_fn = LayerwiseMSELoss(PAIRS, 32, 48, teacher_filters=teacher_filters, layer_weights=[2.0, 1.0])
    with torch.no_grad():
        for p in loss_fn.student_filters.parameters():
            p.add_(0.1)  # as after training
    loss_fn.save_pretrained(tmp_path)
    again = LayerwiseMSELoss.from_pretrained(tmp_path)
    for (name, p), q in zip(loss_fn.state_dict().items(), again.state_dict().values()):
        assert torch.equal(p, q), name
    assert again.config == loss_fn.config
    student, teacher = bert(2, 32, seed=1), bert(4, 48, seed=2)
    b = batch("classification", seed=63)
    s, t = _outputs(student, teacher, b)
    assert torch.equal(loss_fn(s, t, mask=b["attention_mask"]), again(s, t, mask=b["attention_mask"]))


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "build, fragment",
    [
        (lambda: LayerwiseMSELoss([], 32, 48), "layer_map must be a non-empty list of (student_layer, teacher_layer)"),
        (lambda: LayerwiseMSELoss([(0, 1, 2)], 32, 48), "pairs"),
        (lambda: LayerwiseMSELoss(7, 32, 48), "layer_map must be a LayerMap or a list"),
        (lambda: LayerwiseMSELoss([(-1, 1)], 32, 48), "student layers must be ints >= 0"),
        (lambda: LayerwiseMSELoss(PAIRS, 0, 48), "student_width must be a positive int"),
        (lambda: LayerwiseMSELoss(PAIRS, 32, 48, filter_dim=16), "filter_dim: got 16, needs 48"),
        (lambda: LayerwiseMSELoss(PAIRS, 32, 48, projection=False), "projection=False compares the student's raw"),
        (
            lambda: LayerwiseMSELoss(PAIRS, 32, 48, teacher_filters=TaskFilters([0, 3], 48, 40)),
            "teacher_filters filter layers [0, 3] of width 48, but the map's layers are [1, 3]",
        ),
        (
            lambda: LayerwiseMSELoss(PAIRS, 32, 48, student_filters=TaskFilters([0, 1], 32, 40)),
            "student_filters map to width 40, but filter_dim is 48",
        ),
        (
            lambda: LayerwiseMSELoss(PAIRS, 32, 48, teacher_filters=torch.nn.Linear(2, 2)),
            "teacher_filters must be a fastted TaskFilters",
        ),
    ],
)
def test_bad_arguments(build, fragment):
    with pytest.raises(ValueError) as info:
        build()
    assert fragment in str(info.value), str(info.value)


@pytest.mark.bad_input
def test_bad_hidden_states():
    loss_fn = LayerwiseMSELoss(PAIRS, 32, 48)
    states = [torch.randn(2, 5, 32) for _ in range(3)]
    teacher = [torch.randn(2, 5, 48) for _ in range(5)]
    with pytest.raises(ValueError, match="student_hidden_states is None: call the model with output_hidden_states"):
        loss_fn(None, teacher)
    with pytest.raises(ValueError, match="teacher_hidden_states must be the tuple of output_hidden_states=True"):
        loss_fn(states, torch.randn(2, 5, 48))
    with pytest.raises(
        ValueError,
        match=r"teacher_hidden_states holds 3 states \(embeddings \+ 2 blocks\), but the "
        r"map needs block 3",
    ):
        loss_fn(states, teacher[:3])
    with pytest.raises(ValueError, match="mask"):
        loss_fn(states, teacher, mask=torch.ones(3, 5))
