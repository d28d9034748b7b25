"""Models built partitioned under ZeRO-3, never whole on a rank: the pipeline's distil, cache-teacher and evaluate
on two gloo ranks (engine.zero_stage=3, engine.teacher_zero3=true) against one process without ZeRO, with every
transfer onto the device and every whole model recorded (tests/train/partitioned_worker.py); fastted.train.loading's
builds against transformers' loads in one process; the reader's unmapping; the teacher's shape settings."""

import copy
import json
import os

import pytest
import torch

from fastted.models import keep_layers
from fastted.train.config import ConfigError, check
from fastted.train.loading import build_model
from fastted.train.sources import check_against_models, load_model
from tests.launch import run_ranks, torchrun
from tests.tiny_models import WORDS, bert, gpt2, word_tokenizer

WORKER = os.path.join(os.path.dirname(__file__), "partitioned_worker.py")
TEACHER_LAYERS = 6


def _setup(tmp):
    """A tiny GPT-2 teacher folder, a corpus whose test split (8 blocks) divides into the ranks' batches, and
    the argument files of each run's commands."""
    teacher = tmp / "teacher"
    gpt2(TEACHER_LAYERS, 32).save_pretrained(teacher)
    word_tokenizer(teacher, causal=True)
    corpus = tmp / "corpus"
    corpus.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(13):
        words = torch.randint(0, len(WORDS), (31,), generator=g)
        (corpus / f"doc{i}.txt").write_text(" ".join(WORDS[int(w)] for w in words) + "\n")
    common = [
        "--preset",
        "clm",
        f"teacher.path={teacher}",
        f"data.source={corpus}",
        "data.sample_by=document",
        "data.max_length=16",
        "data.test_fraction=0.3",
        "distil.train.batch_size=4",
        "distil.train.max_steps=2",
        "progress=false",
        "student.layers=[0,2]",
        "distil.methods=[kd,lwd]",
        # LWD on the task loss alone reads no teacher layer: its teacher is cut to one block
        "distil.lwd.kl_alpha=0",
        "distil.lwd.mse_alpha=0",
    ]
    fresh = [
        "teacher.random_init=true",
        "teacher.num_layers=3",
        "teacher.hidden_size=48",
        "teacher.intermediate_size=40",
        "student.random_init=true",
    ]
    jobs = [
        ["distil", "--method", "kd"],
        ["distil", "--method", "lwd"],
        ["cache-teacher", "--method", "kd"],
        ["evaluate"],
        ["evaluate", *fresh],
    ]
    files = {}
    for run, extra in (("one", []), ("zero3", ["engine.zero_stage=3", "engine.teacher_zero3=true"])):
        files[run] = []
        for i, job in enumerate(jobs):
            out = tmp / run / ("fresh" if "teacher.random_init=true" in job else "run")
            path = tmp / f"{run}-{i}.json"
            path.write_text(json.dumps(job + common + [f"output_dir={out}"] + extra))
            files[run].append(str(path))
    return teacher, files


def _launch(tmp, run, files, ranks):
    out = tmp / f"{run}.json"
    run_ranks(torchrun(ranks, WORKER, str(out), *files, "--floor", "1000", "--stacks-after", "240"))
    records = [json.loads(out.read_text())]
    records += [json.loads((tmp / f"{run}.json.rank{r}").read_text()) for r in range(1, ranks)]
    return records


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("partitioned")
    teacher, files = _setup(tmp)
    return {
        "tmp": tmp,
        "teacher": teacher,
        "one": _launch(tmp, "one", files["one"], 1),
        "zero3": _launch(tmp, "zero3", files["zero3"], 2),
    }


def _one_layer_bytes(teacher) -> int:
    model = load_model(str(teacher), "clm")
    block = sum(p.numel() * p.element_size() for p in model.transformer.h[0].parameters())
    whole = sum(p.numel() * p.element_size() for p in model.parameters())
    assert whole > TEACHER_LAYERS * block and max(p.numel() * 4 for p in model.parameters()) < block
    return block


@pytest.mark.slow
def test_no_whole_model_reaches_the_device_under_zero3(runs):
    """On both ranks and in every job, no transfer onto the device and no model built or loaded whole exceeds
    one transformer block; the same recorder sees the whole teacher in the one-process run (that has no ZeRO-3),
    as it saw fastted before partitioned loading (in every job: the engine's teacher.to(device), cache-teacher's
    and evaluate's model.to(device))."""
    block = _one_layer_bytes(runs["teacher"])
    for rank, record in enumerate(runs["zero3"]):
        assert record["world"] == 2 and len(record["jobs"]) == 5
        for job in record["jobs"]:
            assert job["code"] == 0, job["argv"][:3]
            too_big = [e for e in job["transfers"] + job["whole_models"] if e["bytes"] > block]
            assert not too_big, (rank, job["argv"][:3], too_big[:3])
    one = runs["one"][0]["jobs"]
    assert all(job["code"] == 0 for job in one)
    teacher_bytes = sum(p.numel() * 4 for p in load_model(str(runs["teacher"]), "clm").parameters())
    assert max(e["bytes"] for e in one[0]["whole_models"]) == teacher_bytes  # the recorder does see a whole model


@pytest.mark.slow
def test_cut_blocks_are_never_read(runs):
    """Rank 0 reads every teacher block for KD (its logits need the whole teacher), and for LWD without KL and MSE
    only block 0 of the teacher and blocks 0 and 2 for the student: blocks 1, 3, 4, 5 are never read; rank 1
    reads nothing."""

    def blocks_read(job):
        return {int(name.split(".")[2]) for name in job["read"] if name.startswith("transformer.h.")}

    kd, lwd = runs["zero3"][0]["jobs"][:2]
    assert blocks_read(kd) == set(range(TEACHER_LAYERS))
    assert blocks_read(lwd) == {0, 2}
    assert sum(name == "transformer.h.0.ln_1.weight" for name in lwd["read"]) == 2  # teacher's and student's
    assert all(not job["read"] for job in runs["zero3"][1]["jobs"])


@pytest.mark.slow
def test_partitioned_results_equal_one_process(runs):
    """evaluate's LM losses (pretrained teacher, the student cut from it, KD and LWD after two steps, and a fresh
    teacher and student of the shapes set in teacher.*) and the teacher cache's identity and size equal the
    one-process run's."""
    tmp = runs["tmp"]
    for folder in ("run", "fresh"):
        one = json.loads((tmp / "one" / folder / "results.json").read_text())
        zero3 = json.loads((tmp / "zero3" / folder / "results.json").read_text())
        assert set(one) == set(zero3) and len(one) == (4 if folder == "run" else 2)
        for label in one:
            assert zero3[label]["lm_loss"] == pytest.approx(one[label]["lm_loss"], rel=1e-5, abs=0), label
    manifests = [
        json.loads((tmp / run / "run" / "cache-teacher-kd" / "manifest.json").read_text()) for run in ("one", "zero3")
    ]
    for key in ("teacher", "examples", "tokens", "layers"):
        assert manifests[0][key] == manifests[1][key], key


# --------------------------------------------------------------------------- in one process


def _same_state(got, want):
    a, b = got.state_dict(), want.state_dict()
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_whole_builds_equal_transformers_loads(tmp_path):
    """build_model without ZeRO: a folder's model as from_pretrained loads it, the random stream after it
    included (a classifier of an MLM checkpoint: the new pooler and head drawn as transformers draws them); the
    kept blocks as keep_layers cuts the whole model."""
    mlm, clm = tmp_path / "mlm", tmp_path / "clm"
    bert(4, 32, head="mlm").save_pretrained(mlm)
    gpt2(4, 32).save_pretrained(clm)
    for folder, task, kwargs in ((mlm, "classification", {"num_labels": 5}), (mlm, "mlm", {}), (clm, "clm", {})):
        torch.manual_seed(7)
        want, after_want = load_model(str(folder), task, **kwargs), torch.rand(3)
        torch.manual_seed(7)
        got, after_got = build_model(str(folder), task, **kwargs), torch.rand(3)
        _same_state(got, want)
        assert torch.equal(after_got, after_want)
        torch.manual_seed(7)  # a new head is drawn as the whole model's was
        cut = build_model(str(folder), task, blocks=[3, 1], **kwargs)
        _same_state(cut, keep_layers(copy.deepcopy(want), [3, 1]))
        assert cut.config.num_hidden_layers == 2


def test_the_reader_unmaps_the_checkpoint_every_window(tmp_path, monkeypatch):
    """The pages of a memory-mapped checkpoint stay in the process that read them while the file is mapped: the
    reader closes its files once a window of bytes was read (rank 0 reads every tensor of a partitioned model), and
    a load that unmaps after every module gives the same model."""
    from fastted.train import loading

    folder = tmp_path / "clm"
    gpt2(4, 32).save_pretrained(folder)
    file = str(folder / "model.safetensors")

    def mapped():
        with open("/proc/self/maps") as f:
            return file in f.read()

    read = loading._Reader(window=1024)
    small = read(file, "transformer.h.0.ln_1.weight")  # 32 floats: under the window
    read.unmap()
    assert small.numel() == 32 and mapped()
    large = read(file, "transformer.wte.weight")
    assert large.numel() * 4 > 1024
    del small, large
    read.unmap()
    assert not mapped()
    read.close()

    closes = []
    close = loading._Reader.close
    monkeypatch.setattr(loading._Reader, "close", lambda self: (closes.append(1), close(self)))
    want = build_model(str(folder), "clm")
    assert len(closes) == 1  # a 4-block GPT-2 is far under the default window: opened once
    monkeypatch.setattr(loading, "READ_WINDOW", 1)
    closes.clear()
    _same_state(build_model(str(folder), "clm"), want)
    assert len(closes) > 4 * 4  # after every module with weights


def test_teacher_shape_settings(tmp_path):
    """teacher.random_init with num_layers, hidden_size and intermediate_size gives that shape (heads kept);
    teacher keys that would be ignored are refused by name."""
    from fastted.train.config import load_config as load
    from fastted.train.loading import build_teacher

    def load_config(overrides):
        return load(overrides=tuple(overrides), preset="clm")

    folder = tmp_path / "teacher"
    gpt2(4, 32).save_pretrained(folder)
    word_tokenizer(folder, causal=True)
    base = [f"teacher.path={folder}", "data.max_length=32"]
    config = load_config(
        base
        + [
            "teacher.random_init=true",
            "teacher.num_layers=3",
            "teacher.hidden_size=48",
            "teacher.intermediate_size=40",
            "student.random_init=true",
        ]
    )
    check(config)
    check_against_models(config)
    model = build_teacher(config)
    assert (model.config.n_layer, model.config.n_embd, model.config.n_inner, model.config.n_head) == (3, 48, 40, 4)
    assert model.transformer.h[2].mlp.c_fc.weight.shape == (48, 40)
    refused = {
        "teacher.layers=[0,1]": "teacher.layers: got [0, 1], but it is a student setting",
        "teacher.num_layers=16": "teacher.num_layers: got 16, but it shapes a fresh teacher only",
        "teacher.hidden_size=64": "teacher.hidden_size: got 64, but it shapes a fresh teacher only",
        "teacher.intermediate_size=64": "teacher.intermediate_size: got 64, but it shapes a fresh teacher only",
        "teacher.random_init=true": "student.random_init: got false, but the student is cut from the teacher's",
    }
    for override, message in refused.items():
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            check(load_config(base + [override]))
    odd = load_config(base + ["teacher.random_init=true", "teacher.hidden_size=30", "student.random_init=true"])
    check(odd)
    with pytest.raises(ConfigError, match="teacher.hidden_size: got 30, needs a multiple of the 4 attention heads"):
        check_against_models(odd)
