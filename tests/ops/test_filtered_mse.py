"""fastted.filtered_mse against float64 references: values, every gradient, masks.

Each case runs on both paths: "reference" (the chunked PyTorch path) and
"triton" (the real kernel: on a GPU, or under TRITON_INTERPRET=1 on the CPU).
"""

import itertools

import pytest
import torch
import torch.nn.functional as F

import fastted
from fastted.reference import filtered_mse_reference
from tests.tables import DTYPES, SHAPES, assert_close_to_spec, device, seed_for

IMPLS = ["reference", "triton"]
# case -> (student filter, student bias, teacher filter, teacher bias)
CASES = {
    "filters": (True, True, True, True),  # task-aware filters on both sides
    "projection": (True, True, False, False),  # student projection, raw teacher states as targets
    "identity": (False, False, False, False),  # d_s = d_f, no filter at all
    "identity_teacher_filter": (False, True, True, False),
    "targets_no_bias": (True, False, False, False),
}
MASKS = ["none", "random", "all_zero", "all_one"]


def _make(case, lead, d_s, d_t, d_f, n_layers, dtype, mask_kind, seed, teacher_grad=True):
    """Fresh random inputs of a case: a dict of per-layer lists plus the mask."""
    g = torch.Generator().manual_seed(seed)
    has_w, has_b, has_v, has_c = CASES[case]
    if not has_w:
        d_s = d_f
    if not has_v:
        d_t = d_f
    dev = device()

    def rand(*shape, scale=1.0, grad=True):
        x = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dev, dtype)
        return x.requires_grad_(grad)

    inputs = {
        "student_states": [rand(*lead, d_s) for _ in range(n_layers)],
        "student_weights": [rand(d_f, d_s, scale=d_s**-0.5) if has_w else None for _ in range(n_layers)],
        "teacher_states": [rand(*lead, d_t, grad=teacher_grad) for _ in range(n_layers)],
    }
    if has_b:
        inputs["student_biases"] = [rand(d_f, scale=0.5) for _ in range(n_layers)]
    if has_v:
        inputs["teacher_weights"] = [rand(d_f, d_t, scale=d_t**-0.5, grad=teacher_grad) for _ in range(n_layers)]
    if has_c:
        inputs["teacher_biases"] = [rand(d_f, scale=0.5, grad=teacher_grad) for _ in range(n_layers)]
    mask = None
    if mask_kind == "random":
        mask = torch.rand(lead, generator=g) > 0.4
    elif mask_kind == "all_zero":
        mask = torch.zeros(lead, dtype=torch.bool)
    elif mask_kind == "all_one":
        mask = torch.ones(lead, dtype=torch.bool)
    inputs["mask"] = None if mask is None else mask.to(dev)
    return inputs


def _clone(inputs, dtype=None):
    """Detached leaf copies (optionally cast) that keep requires_grad."""
    out = {}
    for key, value in inputs.items():
        if isinstance(value, list):
            out[key] = [
                None if x is None else x.detach().to(dtype or x.dtype).requires_grad_(x.requires_grad) for x in value
            ]
        else:
            out[key] = value
    return out


def _leaves(inputs):
    return [
        x
        for key, value in inputs.items()
        if isinstance(value, list)
        for x in value
        if x is not None and x.requires_grad
    ]


def _run(fn, inputs, grad_out, **kwargs):
    loss, layer_losses = fn(**{k: v for k, v in inputs.items()}, **kwargs)
    (loss * grad_out).backward()
    return loss.detach(), layer_losses.detach(), [x.grad for x in _leaves(inputs)]


def _spec(**kwargs):
    return filtered_mse_reference(**kwargs)


def check_filtered_mse(case, shape, dtype, mask_kind, n_layers, impl, grad_out=1.0, layer_weights=None):
    lead, d_s, d_t, d_f = shape
    inputs = _make(
        case, lead, d_s, d_t, d_f, n_layers, dtype, mask_kind, seed_for(case, shape, dtype, mask_kind, n_layers, impl)
    )
    ref_in, lowp_in = _clone(inputs, torch.float64), _clone(inputs)
    got = _run(fastted.filtered_mse, inputs, grad_out, impl=impl, return_layer_losses=True, layer_weights=layer_weights)
    ref = _run(_spec, ref_in, grad_out, layer_weights=layer_weights)
    lowp = _run(_spec, lowp_in, grad_out, layer_weights=layer_weights)

    assert got[0].dtype == torch.float32 and got[0].dim() == 0
    slack = DTYPES[dtype]
    assert_close_to_spec("loss", got[0], ref[0], lowp[0], slack)
    assert_close_to_spec("layer_losses", got[1], ref[1], lowp[1], slack)
    names = [
        f"{k}[{i}]"
        for k, v in inputs.items()
        if isinstance(v, list)
        for i, x in enumerate(v)
        if x is not None and x.requires_grad
    ]
    for name, x, g, r, lp in zip(names, _leaves(inputs), got[2], ref[2], lowp[2]):
        assert g.dtype == x.dtype and g.shape == x.shape, f"{name}: gradient {g.dtype} {tuple(g.shape)}"
        assert_close_to_spec(f"grad {name}", g, r, lp, slack)
    if mask_kind == "all_zero":
        assert got[0].item() == 0.0
        assert all((g == 0).all() for g in got[2])


def _check_fp32_against_spec(inputs, impl):
    """fp32 inputs: loss, per-layer losses and every gradient close to the float64 spec."""
    got = _run(fastted.filtered_mse, inputs, 1.0, impl=impl, return_layer_losses=True)
    ref = _run(_spec, _clone(inputs, torch.float64), 1.0)
    for g, r in zip([got[0], got[1], *got[2]], [ref[0], ref[1], *ref[2]]):
        torch.testing.assert_close(g.double().cpu(), r.cpu(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_cases_shapes_dtypes(case, shape, dtype, impl):
    check_filtered_mse(case, shape, dtype, "random", 2, impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("case", ["filters", "projection"])
def test_masks(case, mask_kind, impl):
    check_filtered_mse(case, SHAPES[1], torch.float32, mask_kind, 3, impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n_layers", [1, 2, 5, 12])
def test_layer_counts(n_layers, impl):
    check_filtered_mse("filters", SHAPES[0], torch.float32, "random", n_layers, impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("grad_out", [0.37, -2.5])
def test_incoming_gradient(grad_out, impl):
    check_filtered_mse("filters", SHAPES[1], torch.float32, "random", 3, impl, grad_out=grad_out)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layer_weights", [[1.0, 2.0, 0.5], [0.0, 1.0, 3.0]], ids=str)
def test_layer_weights(layer_weights, impl):
    check_filtered_mse("filters", SHAPES[0], torch.float32, "random", 3, impl, layer_weights=layer_weights)


@pytest.mark.parametrize("impl", IMPLS)
def test_unmasked_is_ted_reference_exactly(impl):
    """mask=None is the mean of F.mse_loss over layers, as TED's public code computes it."""
    inputs = _make("filters", (4, 9), 12, 20, 16, 3, torch.float32, "none", seed_for("ted-exact", impl))
    loss = fastted.filtered_mse(**inputs, impl=impl)
    with torch.no_grad():
        per_layer = [
            F.mse_loss(F.linear(s.double(), w.double(), b.double()), F.linear(h.double(), v.double(), c.double()))
            for s, w, b, h, v, c in zip(
                *(
                    inputs[k]
                    for k in (
                        "student_states",
                        "student_weights",
                        "student_biases",
                        "teacher_states",
                        "teacher_weights",
                        "teacher_biases",
                    )
                )
            )
        ]
    ted = torch.stack(per_layer).mean()
    assert abs(loss.item() - ted.item()) <= 1e-6 * ted.item()


@pytest.mark.parametrize("impl", IMPLS)
def test_mixed_identity_and_filtered_layers(impl):
    """None entries in student_weights next to real ones (two kernel launches)."""
    a = _make("projection", (23,), 16, 16, 16, 2, torch.float32, "random", 1)
    b = _make("identity", (23,), 16, 16, 16, 2, torch.float32, "random", 2)
    inputs = {
        "student_states": a["student_states"] + b["student_states"],
        "student_weights": a["student_weights"] + [None, None],
        "teacher_states": a["teacher_states"] + b["teacher_states"],
        "mask": a["mask"],
    }
    _check_fp32_against_spec(inputs, impl)


def _noncontiguous(x):
    """The same values as x, held in a strided view of a larger buffer at an odd offset."""
    *lead, d = x.shape
    big = torch.randn(*lead, d + 5, dtype=x.dtype, device=x.device)
    flat = torch.randn(big.numel() + 1, dtype=x.dtype, device=x.device)
    view = flat[1:].view_as(big)[..., 2 : 2 + d]  # row stride d + 5, misaligned start
    with torch.no_grad():
        view.copy_(x)
    return view.requires_grad_(x.requires_grad)


@pytest.mark.parametrize("impl", IMPLS)
def test_noncontiguous_inputs(impl):
    inputs = _make("filters", (3, 11), 20, 28, 12, 2, torch.float32, "random", seed_for("strided", impl))
    strided = dict(inputs)
    for key in ("student_states", "teacher_states"):
        strided[key] = [_noncontiguous(x.detach()).detach().requires_grad_() for x in inputs[key]]
    # Transposed weights: (d_f, d_s) views of (d_s, d_f) storage.
    strided["student_weights"] = [w.detach().t().contiguous().t().requires_grad_() for w in inputs["student_weights"]]
    _check_fp32_against_spec(strided, impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_frozen_teacher_gets_no_gradient(impl):
    inputs = _make("filters", (17,), 8, 12, 10, 2, torch.float32, "random", 5, teacher_grad=False)
    loss = fastted.filtered_mse(**inputs, impl=impl)
    loss.backward()
    assert all(x.grad is not None for x in inputs["student_states"] + inputs["student_weights"])
    assert all(x.grad is None for x in inputs["teacher_states"] + inputs["teacher_weights"])


def test_chunked_path_splits_rows(monkeypatch):
    """The CPU path gives the same loss and gradients when it works in many row blocks."""
    import fastted.ops.filtered_mse as op

    inputs = _make("filters", (5, 13), 12, 20, 16, 2, torch.float64, "random", 11)
    whole = _run(fastted.filtered_mse, _clone(inputs), 1.0, impl="reference", return_layer_losses=True)
    monkeypatch.setattr(op, "CHUNK_ELEMENTS", 7 * 20)  # 7 rows per block
    split = _run(fastted.filtered_mse, _clone(inputs), 1.0, impl="reference", return_layer_losses=True)
    torch.testing.assert_close(split[0], whole[0], rtol=1e-12, atol=1e-14)
    for a, b in zip(split[2], whole[2]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_grad_forward(impl):
    inputs = _make("projection", (19,), 8, 12, 10, 2, torch.float32, "random", 6)
    with torch.no_grad():
        loss = fastted.filtered_mse(**inputs, impl=impl)
    ref, _ = _spec(**_clone(inputs, torch.float64))
    assert not loss.requires_grad
    assert abs(loss.item() - ref.item()) <= 1e-5 * ref.item()


def test_module_keeps_layer_losses():
    inputs = _make("filters", (2, 7), 8, 12, 10, 3, torch.float32, "random", 7)
    module = fastted.FilteredMSELoss(layer_weights=[1.0, 1.0, 2.0])
    loss = module(**inputs)
    ref, ref_layers = _spec(**_clone(inputs, torch.float64), layer_weights=[1.0, 1.0, 2.0])
    assert module.layer_losses.shape == (3,) and not module.layer_losses.requires_grad
    torch.testing.assert_close(module.layer_losses.double().cpu(), ref_layers.detach().cpu(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss.double().cpu(), ref.detach().cpu(), rtol=1e-5, atol=1e-7)


def test_autocast_runs_in_autocast_dtype():
    """Under autocast, fp32 weights and states run in bf16, and fp32 parameters get fp32 gradients."""
    inputs = _make("projection", (21,), 16, 16, 24, 2, torch.float32, "random", 8)
    dev = device()
    with torch.autocast(dev.type, dtype=torch.bfloat16):
        loss = fastted.filtered_mse(**inputs)
    loss.backward()
    ref, _ = _spec(**_clone(inputs, torch.float64))
    assert loss.dtype == torch.float32
    assert all(w.grad.dtype == torch.float32 for w in inputs["student_weights"])
    assert abs(loss.item() - ref.item()) <= 3e-2 * ref.item()


def test_float64_runs_on_reference_path():
    inputs = _make("filters", (9,), 8, 12, 10, 2, torch.float64, "random", 9)
    loss = fastted.filtered_mse(**inputs)
    ref, _ = _spec(**_clone(inputs))
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)


def _kernel_configs():
    from fastted.kernels import filtered_mse as kernel

    return kernel.AUTOTUNE_CONFIGS


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the autotuner itself runs every config")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("config", range(len(_kernel_configs())))
def test_every_autotune_config(config, dtype, monkeypatch):
    """Each tile config the GPU may pick, forced under the interpreter, on sizes that straddle its tiles."""
    from fastted.kernels import filtered_mse as kernel

    monkeypatch.setattr(kernel.filtered_mse_fwd_kernel, "configs", [kernel.AUTOTUNE_CONFIGS[config]])
    check_filtered_mse("filters", ((3, 97), 70, 90, 130), dtype, "random", 2, "triton")
    assert kernel.filtered_mse_fwd_kernel.best_config is kernel.AUTOTUNE_CONFIGS[config]


def _call(fn, inputs, grad, **kwargs):
    """(loss, layer losses, gradients) of one call: with a backward, or (grad False) a forward under no_grad."""
    if grad:
        return _run(fn, inputs, 1.0, **kwargs)
    with torch.no_grad():
        loss, layer_losses = fn(**inputs, **kwargs)
    return loss, layer_losses, []


def check_autotune_first_call(case, dtype, shape=((2, 75), 40, 56, 70), grad=True):
    """The first call of a new autotune key (the autotuner's sweep runs every config on the call's own
    buffers) equals the second (the cached config) bit for bit, and the float64 reference. grad False: a
    forward without gradient (no gradient or column-sum buffers)."""
    from fastted.kernels import filtered_mse as kernel

    kernel.filtered_mse_fwd_kernel.cache.clear()  # a new key for every config: the sweep runs again
    lead, d_s, d_t, d_f = shape
    inputs = _make(case, lead, d_s, d_t, d_f, 2, dtype, "random", seed_for("first call", case, dtype, shape, grad))
    first, second = (
        _call(fastted.filtered_mse, _clone(inputs), grad, impl="triton", return_layer_losses=True) for _ in range(2)
    )
    ref = _call(_spec, _clone(inputs, torch.float64), grad)
    lowp = _call(_spec, _clone(inputs), grad)
    names = ["loss", "layer_losses"] + [f"grad {i}" for i in range(len(first[2]))]
    for name, a, b, r, lp in zip(
        names,
        [first[0], first[1], *first[2]],
        [second[0], second[1], *second[2]],
        [ref[0], ref[1], *ref[2]],
        [lowp[0], lowp[1], *lowp[2]],
    ):
        assert torch.equal(a, b), f"{name}: the first call (autotune sweep) differs from the second"
        assert_close_to_spec(name, a, r, lp, DTYPES[dtype])


def _sweep_on_cpu(monkeypatch):
    """Makes the interpreter's autotuner sweep three configs, small tiles first, and keep the last (a large
    tile); returns the autotuner and the sweep."""
    from fastted.kernels import filtered_mse as kernel

    tuner = kernel.filtered_mse_fwd_kernel
    sweep = [kernel.INTERPRETER_CONFIG, kernel.TENSOR_CORE_CONFIGS[-1], kernel.FP32_CONFIGS[0]]
    monkeypatch.setattr(tuner, "configs", sweep)
    monkeypatch.setattr(tuner, "cache", {})
    monkeypatch.setattr(kernel, "INTERPRETER_SWEEP", len(sweep))
    timings = itertools.cycle(range(len(sweep), 0, -1))  # no GPU timer: each config "runs faster" than the last

    def bench(kernel_call, quantiles):
        kernel_call()
        return [float(next(timings))] * len(quantiles)

    monkeypatch.setattr(kernel, "INTERPRETER_TIMER", bench)
    return tuner, sweep


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU check runs this on the device")
@pytest.mark.parametrize("case", ["filters", "projection"])
def test_autotune_sweep_leaks_nothing(case, monkeypatch):
    """Under the interpreter the autotuner sweeps three configs: without zeroing the partial sums before
    each, the stale small tiles' partial sums reach the first call's loss and bias gradients."""
    tuner, sweep = _sweep_on_cpu(monkeypatch)
    check_autotune_first_call(case, torch.float32)
    assert len(tuner.configs_timings) == len(sweep) and tuner.best_config is sweep[-1]  # a sweep ran


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU check runs this on the device")
@pytest.mark.parametrize(
    "case, grad",
    [("identity", True), ("targets_no_bias", True), ("projection", False)],
    ids=["identity-student", "filter-without-bias", "no-grad-forward"],
)
def test_autotune_sweep_without_colsum(case, grad, monkeypatch):
    """The same sweep where the kernel gets no column-sum buffer (colsum None: no bias to take a gradient, or
    no gradient at all): Triton before 3.8 called .zero_() on it as a reset_to_zero argument and crashed on
    the first call of every key."""
    tuner, sweep = _sweep_on_cpu(monkeypatch)
    check_autotune_first_call(case, torch.float32, grad=grad)
    assert len(tuner.configs_timings) == len(sweep) and tuner.best_config is sweep[-1]


# --------------------------------------------------------------------------- quantized targets (a teacher cache's)


@pytest.mark.parametrize("kind", ["int8", "fp8"])
@pytest.mark.parametrize("student", ["filtered", "identity"])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_quantized_targets_against_float64(impl, dtype, student, kind):
    """int8 / fp8 targets with fp32 row scales (fastted.ops.quantize.quantize_rows), dequantized inside the kernel:
    loss,
    layer losses and the student's gradients against the float64 spec on the same quantized targets, masked."""
    from fastted.ops.quantize import quantize_rows

    g = torch.Generator().manual_seed(seed_for("quantized", impl, dtype, student, kind))
    dev = device()
    lead, d_s, d_f, n_layers = (3, 29), 40, 48, 3
    rand = lambda *shape, scale=1.0: torch.randn(*shape, generator=g, dtype=torch.float64) * scale  # noqa: E731
    states = [rand(*lead, d_s if student == "filtered" else d_f).to(dev, dtype) for _ in range(n_layers)]
    weights = [
        rand(d_f, d_s, scale=d_s**-0.5).to(dev, dtype) if student == "filtered" else None for _ in range(n_layers)
    ]
    biases = [rand(d_f, scale=0.1).to(dev, dtype) if student == "filtered" else None for _ in range(n_layers)]
    targets, scales = [], []
    for _ in range(n_layers):  # rows of very different magnitudes, as hidden states have
        q, scale = quantize_rows(
            rand(lead[0] * lead[1], d_f) * torch.logspace(-1, 1, lead[0] * lead[1], dtype=torch.float64)[:, None], kind
        )
        targets.append(q.reshape(*lead, d_f).to(dev))
        scales.append(scale.reshape(lead).to(dev))
    mask = (torch.rand(lead, generator=g) > 0.3).to(dev)

    def run(fn, s_dtype, **kw):
        s = [x.detach().to(s_dtype).requires_grad_() for x in states]
        w = [None if x is None else x.detach().to(s_dtype).requires_grad_() for x in weights]
        b = [None if x is None else x.detach().to(s_dtype).requires_grad_() for x in biases]
        loss, layer_losses = fn(
            s, w, targets, student_biases=b if student == "filtered" else None, teacher_scales=scales, mask=mask, **kw
        )
        loss.backward()
        return loss, layer_losses, [x.grad for x in s + [y for y in w + b if y is not None]]

    got = run(fastted.filtered_mse, dtype, impl=impl, return_layer_losses=True)
    ref = run(filtered_mse_reference, torch.float64)
    lowp = run(filtered_mse_reference, dtype)
    slack = DTYPES[dtype]
    assert_close_to_spec("loss", got[0], ref[0], lowp[0], slack)
    assert_close_to_spec("layer losses", got[1], ref[1], lowp[1], slack)
    for i, (a, b_, c) in enumerate(zip(got[2], ref[2], lowp[2])):
        assert a.dtype == dtype
        assert_close_to_spec(f"grad {i}", a, b_, c, slack)


@pytest.mark.bad_input
def test_quantized_targets_bad_input():
    s = [torch.randn(4, 8)]
    q = torch.zeros(4, 8, dtype=torch.int8)
    for kwargs, fragment in (
        (
            dict(teacher_states=[torch.randn(4, 8)], teacher_scales=[torch.ones(4)]),
            "teacher_states[0] has dtype torch.float32, but teacher_scales are the row scales of quantized targets",
        ),
        (
            dict(teacher_states=[q], teacher_scales=[torch.ones(5)]),
            "teacher_scales[0] has shape (5,), but needs (4,) (one scale per token)",
        ),
        (dict(teacher_states=[q], teacher_scales=[torch.ones(4, dtype=torch.long)]), "teacher_scales[0]"),
        (
            dict(
                teacher_states=[torch.zeros(4, 6, dtype=torch.int8)],
                teacher_scales=[torch.ones(4)],
                teacher_weights=[torch.randn(8, 6)],
            ),
            "teacher_scales dequantize targets given as they are",
        ),
    ):
        with pytest.raises(ValueError) as info:
            fastted.filtered_mse(s, [None], **kwargs)
        assert fragment in str(info.value), str(info.value)
