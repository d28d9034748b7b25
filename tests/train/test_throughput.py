"""The numbers a run is steered by (fastted.train.throughput): model FLOPs per token against hand counts from the
configs, the GPUs' peaks, a logging window that leaves evaluation and checkpoint saves out, tokens that
continue across a resume, the teacher's share of the step, and the report's throughput figure."""

import json
import os
import time
from types import SimpleNamespace

import pytest
import torch

from fastted import KD
from fastted.methods.finetune import FineTune
from fastted.models import ModelAdapter
from fastted.train.config import EngineConfig, TrainConfig
from fastted.train.data import ClassificationCollator, data_order
from fastted.train.engine import Engine
from fastted.train.report import write_report
from fastted.train.throughput import (
    Meter,
    TeacherTimer,
    device_peak_flops,
    flops_per_token,
    peak_memory,
    peak_tflops_of,
    recipe_flops_per_token,
)
from fastted.train.trainer import Metrics, Training, read_metrics, run
from tests.test_models import llama
from tests.tiny_models import VOCAB, bert, gpt2
from tests.train.test_trainer import STEPS, _Crash, _dataset, train_run

T = 13  # an odd sequence length


# --------------------------------------------------------------------------- FLOPs: hand counts from the configs


def _gpt2_matmul(L, H, V):
    return L * (H * 3 * H + H * H + H * 4 * H + 4 * H * H), V * H  # (blocks: qkv, proj, fc, proj), lm_head


def _bert_matmul(L, H, I, V):
    return L * (4 * H * H + 2 * H * I), H * H + V * H  # (blocks: q k v o, in, out), MLM transform + decoder


def _llama_matmul(L, H, I, V, heads=4, kv=2, head_dim=None):
    d = head_dim or H // heads
    return L * (2 * H * heads * d + 2 * H * kv * d + 3 * H * I), V * H  # q o, k v (GQA), gate up down; lm_head


@pytest.mark.parametrize("name", ["gpt2", "bert-mlm", "bert-cls", "llama", "llama-head-dim"])
def test_flops_per_token_of_a_trained_student_is_the_hand_count(name):
    if name == "gpt2":
        model, (blocks, head), L, width = gpt2(2, 32), _gpt2_matmul(2, 32, VOCAB), 2, 32
    elif name == "bert-mlm":
        model, (blocks, head), L, width = bert(3, 24, head="mlm"), _bert_matmul(3, 24, 48, VOCAB), 3, 24
    elif name == "bert-cls":  # the pooler and classifier run once per sequence: not per token
        model, (blocks, _), L, width = bert(3, 24), _bert_matmul(3, 24, 48, VOCAB), 3, 24
        head = 0
    elif name == "llama":
        model, (blocks, head), L, width = llama(2, 32), _llama_matmul(2, 32, 64, VOCAB), 2, 32
    else:  # heads x head_dim (4 x 12 = 48) differs from the hidden size 32
        model, L, width = llama(2, 32, head_dim=12), 2, 48
        blocks, head = _llama_matmul(2, 32, 64, VOCAB, head_dim=12)
    adapter = ModelAdapter(model)
    want = 6 * (blocks + head) + 12 * L * width * T
    assert flops_per_token(adapter, None, T) == want
    assert flops_per_token(adapter, None, T, student_trains=False) == want // 3  # a frozen student: forward alone
    # under ZeRO-3 a rank holds none of a weight (numel 0) and counts it by ds_numel
    for p in model.parameters():
        p.ds_numel = p.numel()
        p.data = torch.empty(0)
    assert flops_per_token(adapter, None, T) == want


def test_flops_per_token_adds_the_teachers_forward():
    student, teacher = ModelAdapter(gpt2(2, 32)), ModelAdapter(gpt2(3, 48, seed=1))
    sb, sh = _gpt2_matmul(2, 32, VOCAB)
    tb, th = _gpt2_matmul(3, 48, VOCAB)
    own = 6 * (sb + sh) + 12 * 2 * 32 * T
    assert flops_per_token(student, teacher, T) == own + 2 * (tb + th) + 4 * 3 * 48 * T
    assert flops_per_token(student, teacher, T, teacher_head=False) == own + 2 * tb + 4 * 3 * 48 * T


def test_recipe_flops_follow_its_teacher():
    """KD with a live teacher counts its forward; a truncated teacher its kept blocks without the head; a cached
    teacher nothing; fine-tuning has none."""
    recipe = KD(gpt2(2, 32), gpt2(3, 48, seed=1), impl="reference")
    sb, sh = _gpt2_matmul(2, 32, VOCAB)
    tb, th = _gpt2_matmul(3, 48, VOCAB)
    own = 6 * (sb + sh) + 12 * 2 * 32 * T
    assert recipe_flops_per_token(recipe, T) == own + 2 * (tb + th) + 4 * 3 * 48 * T
    recipe._teacher_truncated = True
    assert recipe_flops_per_token(recipe, T) == own + 2 * tb + 4 * 3 * 48 * T
    recipe.teacher_cache = SimpleNamespace(directory="cache")
    assert recipe_flops_per_token(recipe, T) == own
    assert recipe_flops_per_token(FineTune(gpt2(2, 32)), T) == own


# --------------------------------------------------------------------------- device peaks


@pytest.mark.parametrize(
    "name,precision,want",
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.0),
        ("NVIDIA H100 80GB HBM3", "fp32", 494.0),
        ("NVIDIA H100 PCIe", "bf16", 756.0),
        ("NVIDIA A100-SXM4-80GB", "fp16", 312.0),
        ("NVIDIA A100-SXM4-80GB", "fp32", 156.0),
        ("NVIDIA H200", "bf16", 989.0),
        ("NVIDIA H200", "fp32", 494.0),
        ("NVIDIA GeForce RTX 4090", "bf16", None),
        ("Tesla V100-SXM2-16GB", "fp16", None),
    ],
)
def test_peak_tflops_by_name(name, precision, want):
    assert peak_tflops_of(name, precision) == want


def test_device_peak_override_wins_and_the_cpu_has_none(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert device_peak_flops(cpu, "fp32") is None
    assert device_peak_flops(cpu, "fp32", 2.5) == 2.5e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    assert device_peak_flops(gpu, "bf16") == 312e12
    assert device_peak_flops(gpu, "bf16", 100.0) == 100e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L4")
    assert device_peak_flops(gpu, "bf16") is None


# --------------------------------------------------------------------------- the window, on a fake clock


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_meter_window_on_a_fake_clock(monkeypatch):
    """Exact values: a window of 10 s holding 4 s of excluded time is 6 s of training; tokens are the mask's,
    FLOPs the recipe's per position of the padded batch; a cached teacher's share is 0."""
    import fastted.train.throughput as throughput

    clock = _Clock()
    monkeypatch.setattr(throughput.time, "perf_counter", clock)
    recipe = KD(gpt2(2, 32), gpt2(3, 48, seed=1), impl="reference")
    recipe.teacher_cache = SimpleNamespace(directory="cache")
    meter = Meter(recipe, torch.device("cpu"), 1, "fp32", peak_tflops=0.5, tokens=1000)
    mask = torch.ones(3, T, dtype=torch.long)
    mask[1, 7:] = 0
    for _ in range(2):  # two steps of one micro batch
        meter.batch({"input_ids": torch.zeros(3, T, dtype=torch.long), "attention_mask": mask})
        clock.now += 3.0
        meter.step()
    with meter.excluded():
        clock.now += 4.0
    fields = meter.fields()
    tokens, flops = 2 * (3 * T - (T - 7)), 2 * 3 * T * recipe_flops_per_token(recipe, T)
    assert fields["tokens"] == 1000 + tokens
    assert fields["tokens_per_s"] == pytest.approx(tokens / 6.0, rel=1e-12)
    assert fields["step_time"] == pytest.approx(3.0, rel=1e-12)
    assert fields["flops_per_token"] == pytest.approx(recipe_flops_per_token(recipe, T), rel=1e-12)
    assert fields["flops_per_s"] == pytest.approx(flops / 6.0, rel=1e-12)
    assert fields["mfu"] == pytest.approx(flops / 6.0 / 0.5e12, rel=1e-12)
    assert fields["teacher_share"] == 0.0
    assert fields["peak_memory_kind"] == "host rss" and fields["peak_memory"] > 2**20
    clock.now += 2.0  # the next window starts at the log
    meter.batch({"input_ids": torch.zeros(1, 5, dtype=torch.long)})  # no mask: every position
    meter.step()
    again = meter.fields()
    assert again["tokens"] == 1000 + tokens + 5 and again["tokens_per_s"] == pytest.approx(2.5, rel=1e-12)
    meter.close()


class _Event:
    """torch.cuda.Event on a fake clock: records the clock's time; elapsed_time in milliseconds."""

    clock = None
    synced = 0

    def __init__(self, enable_timing=False):
        assert enable_timing
        self.at = None

    def record(self):
        self.at = _Event.clock.now

    def synchronize(self):
        _Event.synced += 1

    def elapsed_time(self, end):
        return (end.at - self.at) * 1000.0


class _Tick(torch.nn.Module):
    """A forward that takes ``seconds`` of the fake clock."""

    def __init__(self, clock):
        super().__init__()
        self.clock = clock

    def forward(self, seconds):
        self.clock.now += seconds
        return seconds


def test_teacher_timer_on_cuda_events(monkeypatch):
    """The CUDA path: a pair of events per counted forward, read on take() (one synchronize on the last event,
    which the logged step's sync has completed already); forwards while paused are not recorded."""
    clock = _Clock()
    _Event.clock, _Event.synced = clock, 0
    monkeypatch.setattr(torch.cuda, "Event", _Event)
    module = _Tick(clock)
    timer = TeacherTimer(module, torch.device("cuda", 0))
    module(0.25)
    module(0.5)
    timer.active = False  # an evaluation's forward
    module(7.0)
    timer.active = True
    assert len(timer.pairs) == 2
    assert timer.take() == pytest.approx(0.75, rel=1e-12) and _Event.synced == 1
    assert timer.take() == 0.0 and not timer.pairs
    timer.close()
    assert not module._forward_hooks and not module._forward_pre_hooks


def test_cuda_peak_memory_is_reset_at_each_read(monkeypatch):
    peaks, resets = iter([3 << 30, 1 << 30]), []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: next(peaks))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: resets.append(device))
    gpu = torch.device("cuda", 0)
    assert peak_memory(gpu) == (3 << 30, "cuda allocated")
    assert peak_memory(gpu) == (1 << 30, "cuda allocated") and resets == [gpu, gpu]


# --------------------------------------------------------------------------- the window in a run

STEP_S = 0.3  # every step sleeps this long, so that tokens/s is stable on a loaded machine (with one thread)
EVAL_S = 5.0  # the evaluation at step 6 sleeps this long
SAVE_S = 2.0  # the checkpoint save at step 10 sleeps this long


@pytest.fixture
def one_thread():
    """One torch thread: on a loaded 2-core machine two threads make a tiny step take from 5 to 300 ms."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class _Sleepy(FineTune):
    """Fine-tuning whose every forward first sleeps ``seconds``."""

    def __init__(self, model, seconds):
        super().__init__(model, impl="reference")
        self.seconds = seconds

    def forward(self, batch, *, step=None, epoch=0):
        time.sleep(self.seconds)
        return super().forward(batch, step=step, epoch=epoch)


def _timed_run(directory, monkeypatch, eval_s, save_s):
    """12 steps, logged every 4: the evaluation at step 6 (sleeping ``eval_s`` the first time) falls in the window
    of steps 5-8, the save at step 10 (sleeping ``save_s``) in that of steps 9-12. Returns the records and, for
    each, the seconds from the start of the run to its log (what the old cumulative tokens/s divided by)."""
    recipe = _Sleepy(bert(1, 16, intermediate_size=16, seed=1), STEP_S)
    train = TrainConfig(
        batch_size=8, max_steps=12, lr=1e-3, warmup_ratio=0.0, log_every=4, eval_every=6, save_every=10, keep_last=1
    )
    engine = Engine(recipe, train, EngineConfig(impl="reference"), 12, torch.device("cpu"))
    real_save = engine.save

    def save(folder):
        real_save(folder)
        if folder.endswith("step-0000010.tmp"):
            time.sleep(save_s)

    engine.save = save
    evaluations = []

    def evaluate(engine):
        time.sleep(eval_s if not evaluations else 0.0)
        evaluations.append(1)
        return {"score": 1.0}

    logged = []
    real_log = Metrics.log
    monkeypatch.setattr(Metrics, "log", lambda self, r: (logged.append(time.perf_counter()), real_log(self, r)))
    training = Training(
        name="timed",
        directory=str(directory),
        recipe=recipe,
        dataset=_dataset(),
        collator=ClassificationCollator(0),
        train=train,
        evaluate=evaluate,
        progress=False,
    )
    began = time.perf_counter()
    run(training, engine)
    monkeypatch.setattr(Metrics, "log", real_log)
    records = read_metrics(str(directory))
    assert len(records) == len(logged)
    return [(r, at - began) for r, at in zip(records, logged) if "loss" in r]


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_evaluation_and_saves_stay_out_of_the_window(tmp_path, monkeypatch):
    """The target of issue 30: a 5 s sleep in evaluation (and a 2 s one in a checkpoint save) changes the logged
    tokens/s of its window by under 5 %, where the old tokens/s (cumulative since the start, evaluation and saves
    included) changes by more than half."""
    plain = _timed_run(tmp_path / "plain", monkeypatch, 0.0, 0.0)
    slowed = _timed_run(tmp_path / "slowed", monkeypatch, EVAL_S, SAVE_S)
    assert [r["step"] for r, _ in slowed] == [r["step"] for r, _ in plain] == [4, 8, 12]
    for (a, at_a), (b, at_b) in zip(plain[1:], slowed[1:]):  # steps 5-8 (an evaluation), 9-12 (a save)
        assert b["tokens"] == a["tokens"]
        assert b["step_time"] == pytest.approx(STEP_S, rel=0.25)  # the sleep dominates the step
        assert abs(b["tokens_per_s"] / a["tokens_per_s"] - 1) < 0.05, (a, b)
        old_a, old_b = a["tokens"] / at_a, b["tokens"] / at_b
        assert abs(old_b / old_a - 1) > 0.5, (old_a, old_b)


# --------------------------------------------------------------------------- tokens across a resume


def _step_tokens(n_steps):
    """The tokens (attention mask) of each step of test_trainer's runs, counted from the dataset."""
    data = _dataset()
    order = data_order(len(data), 0, 0)
    return [sum(len(data[int(i)]["input_ids"]) for i in order[s * 8 : (s + 1) * 8]) for s in range(n_steps)]


@pytest.mark.parametrize("log_every", [1, 3])
def test_tokens_continue_across_a_resume(tmp_path, log_every):
    """Crash during step 4, resume from the step-2 checkpoint: every record's tokens are the tokens of the steps
    up to it. With log_every 3 no record lies at the checkpoint's step: the count comes from its trainer.json."""
    per_step = _step_tokens(STEPS)
    with pytest.raises(_Crash):
        train_run("railkd", tmp_path, crash_at=3, log_every=log_every)
    saved = json.loads((tmp_path / "checkpoints" / "step-0000002" / "trainer.json").read_text())
    assert saved["tokens"] == sum(per_step[:2])
    summary, _ = train_run("railkd", tmp_path, log_every=log_every)
    assert summary["resumed_from"] == 2
    records = [r for r in read_metrics(str(tmp_path)) if "loss" in r]
    want = [s for s in range(1, STEPS + 1) if s % log_every == 0 or s == STEPS]
    assert [r["step"] for r in records] == want
    assert [r["tokens"] for r in records] == [sum(per_step[:s]) for s in want]


# --------------------------------------------------------------------------- the teacher's share

TEACHER_S = 0.2


class _SleepyKD(KD):
    """KD whose forward sleeps ``TEACHER_S`` outside the teacher too, so that the teacher's share is near a half."""

    def forward(self, batch, **kwargs):
        time.sleep(TEACHER_S)
        return super().forward(batch, **kwargs)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_teacher_share_is_the_teachers_time_over_the_step(tmp_path):
    """The teacher's forward sleeps TEACHER_S: its share of a window is at least TEACHER_S / step time and not
    far above; the teacher forwards that the evaluations run (after step 2 and in the window of steps 3-4) are not
    counted (they would add 2 x TEACHER_S to a window of about 4 x TEACHER_S)."""
    teacher = bert(2, 24, seed=2)
    real_forward = teacher.forward

    def slow_forward(*args, **kwargs):
        time.sleep(TEACHER_S)
        return real_forward(*args, **kwargs)

    teacher.forward = slow_forward
    recipe = _SleepyKD(bert(1, 16, intermediate_size=16, seed=1), teacher, impl="reference")
    train = TrainConfig(batch_size=8, max_steps=4, lr=1e-3, warmup_ratio=0.0, log_every=2, eval_every=1)
    engine = Engine(recipe, train, EngineConfig(impl="reference"), 4, torch.device("cpu"))

    def evaluate(engine):
        batch = ClassificationCollator(0)(_dataset()[:4])
        recipe.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return {"score": 1.0}

    training = Training(
        name="share",
        directory=str(tmp_path),
        recipe=recipe,
        dataset=_dataset(),
        collator=ClassificationCollator(0),
        train=train,
        evaluate=evaluate,
        progress=False,
    )
    run(training, engine)
    records = [r for r in read_metrics(str(tmp_path)) if "loss" in r]
    assert len(records) == 2
    for r in records:
        floor = TEACHER_S / r["step_time"]
        assert 0.0 < floor <= r["teacher_share"] < min(floor + 0.05, 1.0), r
    assert 0.35 < records[1]["teacher_share"] < 0.6
    assert not teacher._forward_hooks and not teacher._forward_pre_hooks  # the timing hooks are removed


def test_a_run_without_teacher_logs_its_flops_and_no_share(tmp_path):
    """One window of two padded steps of lengths 7 and 12: the FLOPs are each batch's (B x T positions at its
    own T), the tokens its mask's; no teacher, no share; the CPU has no MFU."""
    order = data_order(16, 0, 0)
    data = [None] * 16
    for k, i in enumerate(order):  # step 0's examples have 4 to 7 tokens, step 1's 5 to 12
        n = 4 + k % 4 if k < 8 else 5 + k % 8
        data[int(i)] = {"input_ids": [3 + (k + j) % 90 for j in range(n)], "label": k % 3}
    recipe = FineTune(bert(1, 16, intermediate_size=16, seed=1), impl="reference")
    train = TrainConfig(batch_size=8, max_steps=2, lr=1e-3, warmup_ratio=0.0, log_every=2)
    engine = Engine(recipe, train, EngineConfig(impl="reference"), 2, torch.device("cpu"))
    training = Training(
        name="alone",
        directory=str(tmp_path),
        recipe=recipe,
        dataset=data,
        collator=ClassificationCollator(0),
        train=train,
        progress=False,
    )
    run(training, engine)
    [record] = [r for r in read_metrics(str(tmp_path)) if "loss" in r]
    assert "teacher_share" not in record and "mfu" not in record
    flops = 8 * 7 * recipe_flops_per_token(recipe, 7) + 8 * 12 * recipe_flops_per_token(recipe, 12)
    assert record["tokens"] == (4 + 5 + 6 + 7) * 2 + sum(range(5, 13))
    assert record["flops_per_token"] == pytest.approx(flops / (8 * 7 + 8 * 12), rel=1e-12)
    assert record["flops_per_s"] * record["step_time"] * 2 == pytest.approx(flops, rel=1e-9)
    assert record["tokens_per_s"] * record["step_time"] * 2 == pytest.approx(record["tokens"], rel=1e-9)


# --------------------------------------------------------------------------- the report


def _config(out):
    return SimpleNamespace(
        output_dir=str(out),
        task="classification",
        data=SimpleNamespace(source="toy"),
        teacher=SimpleNamespace(path="teacher"),
    )


def _write_records(folder, records):
    os.makedirs(folder)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def test_report_plots_throughput_against_tokens(tmp_path, monkeypatch):
    import fastted.train.report as report

    new = [{"step": s, "loss": 2.0 / s, "tokens": 100 * s, "tokens_per_s": 50.0 + s} for s in (1, 2, 3)]
    old = [{"step": s, "loss": 1.0 / s, "tokens_per_s": 40.0} for s in (1, 2)]  # written before tokens were kept
    _write_records(tmp_path / "finetune-student", old)
    _write_records(tmp_path / "distil", new + [{"step": 3, "training": "distil", "eval": {"accuracy": 0.5}}])
    plotted = {}
    real = report._plot_throughput
    monkeypatch.setattr(report, "_plot_throughput", lambda path, curves: (plotted.update(curves), real(path, curves)))
    text = write_report(_config(tmp_path), {"student": {"accuracy": 0.5, "examples": 10}})
    assert plotted == {"distil": new}
    assert "](report-throughput.png)" in text
    assert (tmp_path / "report-throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_without_tokens_draws_no_throughput(tmp_path):
    _write_records(tmp_path / "finetune-student", [{"step": s, "loss": 1.0 / s, "tokens_per_s": 40.0} for s in (1, 2)])
    text = write_report(_config(tmp_path), {"student": {"accuracy": 0.5, "examples": 10}})
    assert "report-throughput.png" not in text and not (tmp_path / "report-throughput.png").exists()
    assert "| finetune-student | 2 | 0.5000 |" in text
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_teacher_timer_counts_a_base_model_run_alone_once():
    """The fused LM head runs the teacher's base model alone (head=False): the timer hooks it too, and a whole
    model's forward, which calls its base model, counts once."""
    from fastted.models import ModelAdapter
    from tests.tiny_models import batch, gpt2

    model = gpt2(2, 16)
    timer = TeacherTimer(model, torch.device("cpu"))
    adapter = ModelAdapter(model)
    adapter(batch("clm", 0), head=False)
    alone = timer.take()
    assert alone > 0.0 and timer._depth == 0
    calls = []
    timer.handles.append(model.transformer.register_forward_hook(lambda *a: calls.append(1)))
    adapter(batch("clm", 0))
    assert timer.take() > 0.0 and calls == [1] and timer._depth == 0
    timer.close()
    adapter(batch("clm", 0), head=False)
    assert timer.take() == 0.0  # closed: no hooks left
