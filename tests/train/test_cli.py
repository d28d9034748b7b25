"""The `fastted` command: one clear line and exit status 2 for each bad setting, and the embedded pipeline end to
end at its tiny size (fine-tune, stage I, KD / LWD / TED, evaluate, report), then resumed."""

import json
import os

import pytest
import torch
import yaml

from fastted.train.cli import main
from fastted.train.trainer import read_metrics
from tests.tiny_models import bert, minilm_path

# The command as a CPU user runs it (see tests/conftest.py's cpu_users_path).
pytestmark = pytest.mark.usefixtures("cpu_users_path")


def _error(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) >= 1 and err[-1].startswith("fastted: error: ")
    assert "Traceback" not in "\n".join(err)
    return err[-1]


@pytest.fixture()
def other_tokenizer_model(tmp_path):
    """A tiny BERT whose tokenizer is not MiniLM's."""
    from transformers import BertTokenizer

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(92)]))
    path = tmp_path / "other"
    BertTokenizer(str(vocab)).save_pretrained(path)
    bert(2, 32).save_pretrained(path)
    return str(path)


def test_help_from_the_repository_root():
    """`python -m fastted --help` as a user types it in a clone (the root first on sys.path): every command
    listed."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-m", "fastted", "--help"], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for command in ("pipeline", "finetune", "filters", "cache-teacher", "distil", "evaluate", "config"):
        assert f"    {command}" in done.stdout, command


@pytest.mark.bad_input
def test_unknown_key(capsys):
    line = _error(capsys, "pipeline", "distil.ted.tempreature=3")
    assert "unknown config key 'distil.ted.tempreature'" in line and "temperature" in line


@pytest.mark.bad_input
def test_missing_model_path(capsys, tmp_path):
    line = _error(capsys, "pipeline", f"teacher.path={tmp_path / 'nope'}")
    assert (
        line == f"fastted: error: teacher.path: no such model folder '{tmp_path / 'nope'}' (a Hugging Face "
        f"model folder, 'minilm' or 'smollm2')"
    )


@pytest.mark.bad_input
def test_missing_dataset_path(capsys, tmp_path):
    minilm_path()
    line = _error(capsys, "finetune", "teacher", f"output_dir={tmp_path}", f"data.source={tmp_path / 'x.jsonl'}")
    assert "data.source" in line and "x.jsonl" in line


@pytest.mark.bad_input
def test_mismatched_tokenizers(capsys, tmp_path, other_tokenizer_model):
    minilm_path()
    line = _error(
        capsys, "distil", f"output_dir={tmp_path}", f"student.path={other_tokenizer_model}", "student.layers=null"
    )
    assert "student.path: its tokenizer" in line and "differs from the teacher's" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only errors")
@pytest.mark.parametrize(
    "override, message", [("engine.precision=fp16", "fp16 needs a CUDA GPU"), ("engine.device=cuda", "no CUDA GPU")]
)
@pytest.mark.bad_input
def test_gpu_only_option_on_cpu(capsys, tmp_path, override, message):
    minilm_path()
    line = _error(capsys, "finetune", "teacher", f"output_dir={tmp_path}", override)
    assert message in line


@pytest.mark.bad_input
def test_bad_command_line(capsys):
    with pytest.raises(SystemExit) as info:
        main(["finetune", "teachers"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:  # a bare word where an override belongs: never ignored
        main(["config", "--preset", "bbc-minilm-tiny", "seed"])
    assert info.value.code == 2
    assert "argument 'seed': an override needs the form key.sub=value" in capsys.readouterr().err
    assert (
        _error(capsys, "distil", "--method", "bogus")
        == "fastted: error: --method: got 'bogus', needs one of ted, lwd, kd, codir, railkd, dwt"
    )


TINY = ("--preset", "bbc-minilm-tiny")

# Bad settings that must end before any training, each in one line naming the key (argv after the output_dir).
BAD_SETTINGS = {
    "output_dir_is_a_file": (["output_dir={file}"], "output_dir: got '{file}', which is a file; needs a folder"),
    "output_dir_under_a_file": (["output_dir={file}/run"], "output_dir: got '{file}/run', which is under the file"),
    "output_dir_empty": (["output_dir="], "output_dir: got an empty path, needs a folder"),
    "layers_repeated": (["student.layers=[0,0]"], "student.layers: got [0, 0], needs distinct teacher layer"),
    "layers_empty": (["student.layers=[]"], "student.layers: got [], needs at least one teacher layer index"),
    "layers_beyond_teacher": (
        ["student.layers=[0,9]"],
        "student.layers: got [0, 9], needs indices of the teacher's 6 layers (0..5)",
    ),
    "layers_negative": (["student.layers=[-1,2]"], "student.layers: got [-1, 2], needs distinct teacher layer"),
    "fewer_examples_than_a_batch": (
        ["data.max_train_examples=4"],
        "finetune.batch_size: got 16, needs at most the 4 training examples",
    ),
    "max_length_beyond_positions": (["data.max_length=100000"], "data.max_length: got 100000, needs at most 512"),
    "epochs_inf": (["finetune.epochs=inf"], "finetune.epochs: got inf, needs a finite number"),
    "lr_nan": (["finetune.lr=nan"], "finetune.lr: got nan, needs a finite number"),
    "clip_nan": (["distil.train.clip=nan"], "distil.train.clip: got nan, needs a finite number"),
    "bank_size_zero": (["distil.codir.bank_size=0"], "distil.codir.bank_size: got 0, needs a number > 0"),
    "crd_temperature_negative": (
        ["distil.codir.temperature=-1"],
        "distil.codir.temperature: got -1.0, needs a number > 0",
    ),
    "mse_alpha_negative": (["distil.ted.mse_alpha=-2"], "distil.ted.mse_alpha: got -2.0, needs a number >= 0"),
    "old_key_negative": (["distil.mse_alpha=-2"], "distil.ted.mse_alpha: got -2.0, needs a number >= 0"),
    "mlm_probability": (["data.mlm_probability=1.5"], "data.mlm_probability: got 1.5, needs a number in (0, 1)"),
    "csv_without_labels": (
        ["data.source={csv}"],
        "data.label_field: got 'label', but data.source has the columns ['text', 'sentiment']",
    ),
    "binary_config_file": (["-c", "{binary}"], "--config {binary}: got bytes that are not UTF-8 text"),
    "unknown_preset": (["--preset", "bogus"], "--preset: got 'bogus', needs one of bbc-minilm, bbc-minilm-tiny"),
    "teacher_cache_for_mlm": (
        ["task=mlm", "jobs=[distil]", "distil.teacher_cache=true"],
        "distil.teacher_cache: a masked LM's teacher sees each step's own random masks",
    ),
    "teacher_cache_for_dwt": (
        ["distil.teacher_cache=true", "distil.methods=[kd,dwt]"],
        "distil.teacher_cache: dwt needs the live teacher (a teacher cache serves ted, lwd, kd, codir, railkd)",
    ),
    "cache_quantization": (["distil.cache_quantization=int4"], "distil.cache_quantization: got 'int4'"),
    "cache_k_negative": (["distil.cache_k=-1"], "distil.cache_k: got -1, needs a number >= 0"),
}


@pytest.mark.parametrize("case", list(BAD_SETTINGS))
@pytest.mark.bad_input
def test_bad_settings_end_in_one_named_line(case, capsys, tmp_path):
    minilm_path()
    files = {"file": tmp_path / "a-file", "csv": tmp_path / "no-labels.csv", "binary": tmp_path / "binary.yaml"}
    files["file"].write_text("not a folder")
    files["csv"].write_text("text,sentiment\nhello world,1\nbad day,0\n" * 10)
    files["binary"].write_bytes(bytes(range(128, 256)) * 3)
    args, fragment = BAD_SETTINGS[case]
    names = {key: str(path) for key, path in files.items()}
    preset = () if "--preset" in args else TINY
    argv = ["finetune", "student", *preset, f"output_dir={tmp_path / 'run'}", *(a.format(**names) for a in args)]
    line = _error(capsys, *argv)
    assert line.startswith("fastted: error: " + fragment.format(**names)), line
    assert not (tmp_path / "run" / "finetune-student").exists()  # nothing ran


def test_overrides_may_follow_options(capsys, tmp_path):
    config = tmp_path / "my=run.yaml"  # an option's value holding "=" stays the option's
    config.write_text("seed: 1\ndistil:\n  kd: {kl_alpha: 2.0}\n")
    assert (
        main(
            [
                "config",
                "seed=3",
                "--preset",
                "bbc-minilm-tiny",
                "data.max_length=16",
                "-c",
                str(config),
                "distil.kd.temperature=3",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "seed: 3" in out and "max_length: 16" in out and "temperature: 3.0" in out and "kl_alpha: 2.0" in out


def test_an_old_config_key_still_sets_its_methods_with_one_notice(capsys, tmp_path):
    """The flat keys of configs written before each method owned its settings, in a file and on the command line:
    each sets the keys that replace it, with one line on stderr naming both."""
    config = tmp_path / "old.yaml"
    config.write_text("distil:\n  mse_alpha: 0.25\n")
    assert main(["config", "--preset", "bbc-minilm-tiny", "-c", str(config), "distil.crd_temperature=0.2"]) == 0
    out, err = capsys.readouterr()
    assert (
        "fastted: warning: config key distil.crd_temperature is deprecated: it sets distil.codir.temperature "
        "(write those instead)"
    ) in err.splitlines()
    assert (
        "fastted: warning: config key distil.mse_alpha is deprecated: it sets distil.ted.mse_alpha, "
        "distil.lwd.mse_alpha (write those instead)"
    ) in err.splitlines()
    values = yaml.safe_load(out)["distil"]
    assert values["codir"]["temperature"] == 0.2 and values["ted"]["mse_alpha"] == values["lwd"]["mse_alpha"] == 0.25
    assert "crd_temperature" not in values and "mse_alpha" not in values


def test_the_old_key_steps_sets_jobs_with_one_line(capsys, tmp_path):
    """``steps`` (the pipeline's jobs under their old name), in a file or on the command line: one line on stderr,
    and the resolved config holds ``jobs`` alone."""
    notice = "fastted: warning: config key steps is deprecated: it sets jobs (write those instead)"
    config = tmp_path / "old.yaml"
    config.write_text("steps: [distil, evaluate]\n")
    assert main(["config", "--preset", "bbc-minilm-tiny", "-c", str(config)]) == 0
    out, err = capsys.readouterr()
    assert err.splitlines() == [notice]
    assert yaml.safe_load(out)["jobs"] == ["distil", "evaluate"] and "steps" not in yaml.safe_load(out)
    assert main(["config", "--preset", "bbc-minilm-tiny", "steps=[evaluate]"]) == 0
    out, err = capsys.readouterr()
    assert err.splitlines() == [notice] and yaml.safe_load(out)["jobs"] == ["evaluate"]


@pytest.mark.bad_input
def test_a_run_gone_non_finite_exits_1_naming_the_step(capsys, tmp_path):
    """lr = 1e30 is finite but blows the weights up: the run stops at the first synced step with one line, exit
    status 1, and no model is exported."""
    minilm_path()
    code = main(["finetune", "student", *TINY, f"output_dir={tmp_path}", "finetune.lr=1e30"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith(
        "fastted: error: finetune-student: non-finite loss, task, gradient "
        "norm at step 2 of 2; stopped before saving it. Last good checkpoint: "
        "none"
    )
    assert not (tmp_path / "finetune-student" / "model").exists()
    assert not (tmp_path / "finetune-student" / "checkpoints").exists()


def test_config_prints_the_resolved_config(capsys):
    assert main(["config", "--preset", "bbc-minilm-tiny", "seed=9"]) == 0
    out = capsys.readouterr().out
    assert "seed: 9" in out and "max_length: 32" in out
    assert main(["--local_rank=1", "config"]) == 0  # as the deepspeed launcher calls it
    assert "output_dir: runs/bbc-minilm" in capsys.readouterr().out


def test_tiny_pipeline_end_to_end_then_resumed(tmp_path, capsys):
    minilm_path()
    out = tmp_path / "run"
    assert (
        main(
            [
                "pipeline",
                "--preset",
                "bbc-minilm-tiny",
                f"output_dir={out}",
                "distil.kd.kl_alpha=0.5",
                "distil.methods=[kd,lwd,ted,codir]",
                "published=codir-paper",
                "filters.per_model.student.lr=2e-3",
                "filters.dropout=true",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    for label in ("teacher", "student alone", "KD", "LWD", "TED", "CoDIR"):
        assert label in printed
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["teacher", "student alone", "KD", "LWD", "TED", "CoDIR"]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["examples"] == 32 for r in results.values())
    report = (out / "report.md").read_text()
    assert "| TED |" in report and "report.png" in report
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for step in (
        "finetune-teacher",
        "finetune-student",
        "filters-teacher",
        "filters-student",
        "distil-kd",
        "distil-lwd",
        "distil-ted",
    ):
        assert (out / step / "model" / "config.json").exists(), step
        assert (out / step / "model" / "tokenizer.json").exists() or (out / step / "model" / "vocab.txt").exists()
        assert (out / step / "checkpoints" / "latest").read_text() == "step-0000002"
    assert (out / "filters-student" / "model" / "filters.safetensors").exists()
    assert (out / "distil-ted" / "model" / "filters.safetensors").exists()
    # Stage I: each model's own schedule (filters.per_model) saved alone; each filter's probe accuracy in the
    # filters job's result and in the report beside its model's accuracy.
    for which, lr in (("teacher", 1e-3), ("student", 2e-3)):
        saved_filters = yaml.safe_load(
            (out / f"filters-{which}" / "checkpoints" / "step-0000002" / "config.yaml").read_text()
        )["filters"]
        assert (saved_filters["train"]["lr"], saved_filters["per_model"], saved_filters["dropout"]) == (lr, {}, True)
        probe = json.loads((out / f"filters-{which}" / "result.json").read_text())["eval"]
        assert probe["examples"] == 32 and len(probe["probe_layers"]) == len(probe["probe_accuracy"]) == 3
        assert all(0.0 <= a <= 1.0 for a in probe["probe_accuracy"])
        own = f"{results['teacher' if which == 'teacher' else 'student alone']['accuracy']:.4f} |"
        for layer, accuracy in zip(probe["probe_layers"], probe["probe_accuracy"]):
            assert f"| filters-{which} | {layer} | {accuracy:.4f} | {own}" in report
    records = [json.loads(line) for line in (out / "distil-ted" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2] and len(train[0]["layer_losses"]) == 3
    assert set(train[0]["terms"]) == {"task", "kd", "mse"} and train[0]["tokens_per_s"] > 0
    assert any("eval" in r for r in records)
    # Each distil job ran with its own values (distil.<method>) and saved those alone.
    saved = {
        m: yaml.safe_load((out / f"distil-{m}" / "checkpoints" / "step-0000002" / "config.yaml").read_text())
        for m in ("kd", "ted")
    }
    assert saved["kd"]["distil"]["kd"]["kl_alpha"] == 0.5 and saved["ted"]["distil"]["ted"]["kl_alpha"] == 1.0
    assert saved["ted"]["distil"]["kd"]["kl_alpha"] == 1.0  # another method's settings: its defaults
    assert saved["ted"]["distil"]["per_method"] == {} and saved["ted"]["distil"]["methods"] == ["ted"]
    # CoDIR as its authors' code runs it (published: codir-paper): a bank of one entry per training example,
    # keyed by the example ids the step adds to a classification set, 100 negatives drawn per anchor (as many as
    # the bank holds at step 2: the 16 examples of step 1).
    codir = _train_records(out, "distil-codir")
    assert codir[0]["terms"]["crd"] == 0.0 and codir[1]["terms"]["crd"] > 0.0
    assert codir[1]["weights"] == {"task": 0.5, "kd": 0.5, "crd": 0.1}
    saved_codir = yaml.safe_load((out / "distil-codir" / "checkpoints" / "step-0000002" / "config.yaml").read_text())
    assert (saved_codir["distil"]["codir"]["bank_mode"], saved_codir["distil"]["codir"]["negatives"]) == (
        "momentum",
        100,
    )
    # Run again (without KD's entry, which TED's checkpoint never held): every job resumes from its last
    # checkpoint and trains nothing more.
    before = (out / "distil-ted" / "metrics.jsonl").read_text().count('"loss"')
    stage1 = ["filters.per_model.student.lr=2e-3", "filters.dropout=true"]  # TED's filters as they were learnt
    assert main(["distil", "--method", "ted", "--preset", "bbc-minilm-tiny", f"output_dir={out}", *stage1]) == 0
    assert json.loads((out / "distil-ted" / "result.json").read_text())["resumed_from"] == 2
    assert (out / "distil-ted" / "metrics.jsonl").read_text().count('"loss"') == before
    assert (out / "distil-ted" / "metrics.jsonl").read_text().count('"eval"') == 1  # evaluated again, not doubled
    # The same output_dir with other settings is refused, not silently mixed.
    line = _error(
        capsys,
        "distil",
        "--method",
        "ted",
        "--preset",
        "bbc-minilm-tiny",
        f"output_dir={out}",
        *stage1,
        "distil.ted.temperature=3",
    )
    assert "holds a checkpoint of a run with other settings (differing: distil)" in line
    assert os.path.isdir(out / "cache")


def _train_records(out, step):
    lines = (out / step / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def test_distil_from_the_teacher_cache(tmp_path, capsys):
    """cache-teacher then distil with distil.teacher_cache: the same step-1 terms as the live teacher (KL and
    task exact to the bf16-stored logits, MSE within int8's 1 %), the cache's size reported; a cache of other
    settings refused with the command that rebuilds it."""
    minilm_path()
    out = tmp_path / "run"
    code = main(
        [
            "pipeline",
            *TINY,
            f"output_dir={out}",
            "distil.teacher_cache=true",
            "progress=false",
            "jobs=[finetune-teacher,finetune-student,filters-teacher,filters-student,cache-teacher,distil]",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    for method in ("kd", "lwd", "ted"):
        result = json.loads((out / f"cache-teacher-{method}" / "result.json").read_text())
        assert result["examples"] == 64 and result["tokens"] > 64 and result["bytes_per_token"] > 0
        assert f"cache-teacher-{method}: 64 examples" in printed
    assert json.loads((out / "cache-teacher-kd" / "result.json").read_text())["layers"] == []
    cached = {m: _train_records(out, f"distil-{m}")[0]["terms"] for m in ("kd", "lwd", "ted")}
    assert main(["distil", *TINY, f"output_dir={out}", "resume=false"]) == 0
    for method, terms in cached.items():
        live = _train_records(out, f"distil-{method}")[0]["terms"]
        assert terms.keys() == live.keys()
        for name, value in live.items():
            assert terms[name] == pytest.approx(value, rel=1e-2 if name != "task" else 1e-5), (method, name)
    line = _error(
        capsys,
        "distil",
        "--method",
        "kd",
        *TINY,
        f"output_dir={out}",
        "distil.teacher_cache=true",
        "distil.kd.temperature=3",
        "resume=false",
    )
    assert (
        "was made for another run (temperature: cache 2.0, run 3.0): run `fastted cache-teacher --method kd` "
        "with this run's settings"
    ) in line, line


def test_mlm_continual_pretraining(tmp_path):
    """task=mlm from the pretrained MiniLM: TED's stage I with the model's own LM head, then TED, DWT (cosine
    alpha_s) and CoDIR (block ids as the bank's exclusions) with the fused LM head; perplexities at the end."""
    minilm_path()
    out = tmp_path / "mlm"
    code = main(
        [
            "pipeline",
            "--preset",
            "bbc-minilm-tiny",
            f"output_dir={out}",
            "task=mlm",
            "jobs=[filters-teacher,filters-student,distil,evaluate]",
            "distil.methods=[ted,dwt,codir]",
            "distil.dwt.alpha_s=4",
            "distil.dwt.alpha_s_end=1",
            "data.max_length=24",
            "distil.codir.bank_size=64",
        ]
    )
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["teacher (pretrained)", "student (initial)", "TED", "DWT", "CoDIR"]
    for r in results.values():
        assert r["tokens"] > 0 and 1.0 < r["perplexity"] < 1e6

    def train(step):
        lines = (out / step / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if "loss" in r]

    dwt = train("distil-dwt")
    assert [r["weights"]["kd"] for r in dwt] == pytest.approx([4.0, 2.5])  # cosine from 4 to 1 over 2 steps
    assert set(train("distil-ted")[0]["terms"]) == {"task", "kd", "mse"}
    assert set(train("distil-codir")[-1]["terms"]) == {"task", "kd", "crd"}
    assert (out / "filters-teacher" / "model" / "filters.safetensors").exists()


def test_stage_one_ends_when_its_holdout_probes_stop_improving(tmp_path):
    """filters.holdout: a share of the training set held out; stage I ends after `patience` takes of the filters'
    mean probe accuracy on it without a gain (or at the end of its schedule), as the logged takes say."""
    minilm_path()
    out = tmp_path / "run"
    argv = ["pipeline", "--preset", "bbc-minilm-tiny", f"output_dir={out}", "jobs=[finetune-teacher,filters-teacher]"]
    argv += ["filters.holdout=0.25", "filters.watch_every=1", "filters.patience=1", "filters.train.max_steps=8"]
    assert main(argv) == 0
    result = json.loads((out / "filters-teacher" / "result.json").read_text())
    takes = [r for r in read_metrics(str(out / "filters-teacher")) if "holdout_probe_accuracy" in r]
    scores = [r["holdout_probe_accuracy"] for r in takes]
    assert takes and all(0.0 <= a <= 1.0 for a in scores)
    best, expected = scores[0], None
    for take, score in zip(takes[1:], scores[1:]):
        if score <= best:
            expected = take["step"]
            break
        best = score
    assert result["watch"] == {"best": max(scores), "stopped_at": expected}
    steps = [r["step"] for r in read_metrics(str(out / "filters-teacher")) if "loss" in r]
    assert steps[-1] == (expected or 8) and len(result["eval"]["probe_accuracy"]) == 3


def test_a_dev_split_keeps_the_distil_jobs_best_weights(tmp_path):
    """distil.holdout (the papers' best epoch on a dev set): a share of the training set held out, its accuracy
    taken every watch_every steps and at the end, and the job ends on the best take's weights (its checkpoint
    kept); the takes are logged, the result names the best step."""
    minilm_path()
    out = tmp_path / "run"
    argv = ["pipeline", "--preset", "bbc-minilm-tiny", f"output_dir={out}", "jobs=[finetune-teacher,distil]"]
    argv += ["distil.methods=[kd]", "distil.pretrained_student=true", "distil.holdout=0.25", "distil.watch_every=1"]
    argv += ["distil.train.max_steps=4", "distil.train.lr=1e-3", "distil.train.keep_last=1"]
    assert main(argv) == 0
    result = json.loads((out / "distil-kd" / "result.json").read_text())
    takes = [(r["step"], r["dev_accuracy"]) for r in read_metrics(str(out / "distil-kd")) if "dev_accuracy" in r]
    assert [step for step, _ in takes] == [1, 2, 3, 4] and all(0.0 <= a <= 1.0 for _, a in takes)
    best_step, best = max(takes, key=lambda take: (take[1], -take[0]))  # the first of the best
    assert result["watch"] == {"best": best, "stopped_at": None, "best_step": best_step}
    kept = {f"step-{step:07d}" for step in (best_step, 4)}
    assert {d for d in os.listdir(out / "distil-kd" / "checkpoints") if d.startswith("step-")} == kept


def test_pretrained_student_distils_without_the_finetuned_student(tmp_path, capsys):
    """distil.pretrained_student (the TED authors' KD and LWD): the student starts cut from the pretrained teacher
    (at learning rate 0 the distilled model is that start: the pretrained embeddings, not the fine-tuned
    teacher's), so the run needs no finetune-student job; without it, KD needs that job's model."""
    from safetensors.torch import load_file

    path = minilm_path()
    out = tmp_path / "run"
    base = ["--preset", "bbc-minilm-tiny", f"output_dir={out}", "distil.methods=[kd]"]
    jobs = ["jobs=[finetune-teacher,distil]", "distil.train.lr=0", "finetune.lr=1e-2"]
    assert main(["pipeline", *base, *jobs, "distil.pretrained_student=true"]) == 0
    assert not (out / "finetune-student").exists()
    key = "bert.embeddings.word_embeddings.weight"
    start = load_file(str(out / "distil-kd" / "model" / "model.safetensors"))[key]
    teacher = load_file(str(out / "finetune-teacher" / "model" / "model.safetensors"))[key]
    pretrained = {k.removeprefix("bert."): v for k, v in load_file(os.path.join(path, "model.safetensors")).items()}
    assert torch.equal(start, pretrained[key.removeprefix("bert.")]) and not torch.equal(start, teacher)
    line = _error(capsys, "distil", "--method", "kd", *base[:2], f"output_dir={tmp_path / 'other'}", base[3])
    assert "finetune-student/model" in line


# --------------------------------------------------------------------------- your own data and model


def _model_folder(path, model, causal=False):
    from tests.tiny_models import word_tokenizer

    model.save_pretrained(path)
    word_tokenizer(path, causal=causal)
    return str(path)


def test_string_labels_in_a_column_of_your_choice(capsys, tmp_path):
    """A CSV whose labels are class names in column `sentiment`: mapped to ids, the names saved as id2label."""
    from transformers import AutoConfig

    minilm_path()
    rows = ["text,sentiment"] + [
        f"{'good fine nice' if i % 2 else 'bad awful poor'} day {i},{'positive' if i % 2 else 'negative'}"
        for i in range(60)
    ]
    (tmp_path / "reviews.csv").write_text("\n".join(rows) + "\n")
    code = main(
        [
            "finetune",
            "teacher",
            *TINY,
            f"output_dir={tmp_path / 'run'}",
            f"data.source={tmp_path}/reviews.csv",
            "data.label_field=sentiment",
            "finetune.max_steps=1",
        ]
    )
    assert code == 0, capsys.readouterr().err
    config = AutoConfig.from_pretrained(tmp_path / "run" / "finetune-teacher" / "model")
    assert config.id2label == {0: "negative", 1: "positive"} and config.label2id == {"negative": 0, "positive": 1}


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["distil", "--method", "ted"], "jobs: distil (ted) needs filters-teacher/model, filters-student/model in"),
        (["distil", "--method", "kd"], "jobs: distil (kd) needs finetune-teacher/model, finetune-student/model"),
        (["filters", "student"], "jobs: filters-student needs finetune-student/model in"),
        (
            ["distil", "--method", "kd", "distil.teacher_cache=true"],
            "cache-teacher-kd/manifest.json in {out}, which no earlier job writes: run `fastted finetune teacher` and "
            "`fastted finetune student` and `fastted cache-teacher --method kd` first",
        ),
        (
            ["pipeline", "jobs=[finetune-teacher,distil,evaluate]", "distil.methods=[lwd]"],
            "jobs: distil (lwd) needs finetune-student/model in {out}, which no earlier job writes: add "
            "finetune-student to jobs before 'distil'",
        ),
    ],
)
def test_missing_prerequisites_end_before_any_training(argv, fragment, capsys, tmp_path):
    minilm_path()
    out = tmp_path / "run"
    line = _error(capsys, *argv, *TINY, f"output_dir={out}")
    assert fragment.format(out=out) in line, line
    assert not out.exists() or os.listdir(out) == []


@pytest.mark.bad_input
def test_a_model_folder_without_tokenizer_or_with_a_preset_layer_it_lacks(capsys, tmp_path):
    from tests.tiny_models import bert

    bare = tmp_path / "bare"
    bert(3, 32).save_pretrained(bare)
    line = _error(capsys, "finetune", "teacher", *TINY, f"teacher.path={bare}", f"output_dir={tmp_path / 'a'}")
    assert "teacher.path" in line and "tokenizer" in line, line
    folder = _model_folder(tmp_path / "three", bert(3, 32))
    line = _error(capsys, "finetune", "student", *TINY, f"teacher.path={folder}", f"output_dir={tmp_path / 'b'}")
    assert line.endswith(
        "student.layers: got [0, 2, 4], needs indices of the teacher's 3 layers (0..2) (the value "
        "of the preset bbc-minilm-tiny: set student.layers for your model)"
    ), line


def test_continual_pretraining_of_your_own_causal_lm_on_a_folder_of_text(capsys, tmp_path):
    """--preset clm with teacher.path and data.source a folder of .txt documents; progress=false prints one line
    per logged step; the student keeps half the teacher's layers."""
    from transformers import AutoConfig

    from tests.tiny_models import WORDS, gpt2

    teacher = _model_folder(tmp_path / "teacher", gpt2(4, 32), causal=True)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(12):
        words = torch.randint(0, len(WORDS), (40,), generator=g)
        (corpus / f"doc{i}.txt").write_text(" ".join(WORDS[int(w)] for w in words) + "\n")
    out = tmp_path / "run"
    code = main(
        [
            "pipeline",
            "--preset",
            "clm",
            f"teacher.path={teacher}",
            f"data.source={corpus}",
            "data.sample_by=document",
            f"output_dir={out}",
            "data.max_length=16",
            "distil.train.batch_size=4",
            "distil.train.max_steps=2",
            "progress=false",
            "data.test_fraction=0.25",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert "distil-kd step 1/2: loss " in printed and "distil-lwd step 2/2: loss " in printed
    assert "it/s" not in printed
    assert AutoConfig.from_pretrained(out / "distil-lwd" / "model").num_hidden_layers == 2
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"teacher (pretrained)", "student (initial)", "KD", "LWD"}


def test_several_seeds_with_intervals_and_paired_differences(tmp_path, capsys):
    """seeds=[0, 1]: each seed trains in its own folder on one test split, the teacher fine-tuned once and shared;
    evaluate reports each model's mean and interval over the seeds and each method's paired difference against
    the student alone and KD, from the per-example results of every seed."""
    minilm_path()
    out = tmp_path / "run"
    code = main(
        [
            "pipeline",
            *TINY,
            f"output_dir={out}",
            "seeds=[0,1]",
            "distil.methods=[kd,lwd]",
            "jobs=[finetune-teacher,finetune-student,distil,evaluate]",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert (out / "seed-1" / "finetune-teacher").is_symlink()
    assert not (out / "seed-0" / "finetune-teacher").is_symlink()
    assert (out / "seed-1" / "distil-lwd" / "model" / "config.json").exists()
    per_seed = [json.loads((out / f"seed-{s}" / "results.json").read_text()) for s in (0, 1)]
    assert per_seed[0]["teacher"]["correct"] == per_seed[1]["teacher"]["correct"]  # one teacher, one split
    summary = json.loads((out / "results.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["test_examples"] == 32
    for label in ("teacher", "student alone", "KD", "LWD"):
        m = summary["models"][label]
        values = [r[label]["accuracy"] for r in per_seed]
        assert m["per_seed"] == {"0": values[0], "1": values[1]} and m["mean"] == pytest.approx(sum(values) / 2)
        assert m["low"] <= m["mean"] <= m["high"]
    assert set(summary["differences"]) == {"KD - student alone", "LWD - student alone", "LWD - KD"}
    lwd = [sum(r["LWD"]["correct"][i] - r["KD"]["correct"][i] for r in per_seed) / 2 for i in range(32)]
    d = summary["differences"]["LWD - KD"]
    assert d["diff"] == pytest.approx(sum(lwd) / 32) and d["low"] <= d["diff"] <= d["high"]
    by_seed = [r["LWD"]["accuracy"] - r["KD"]["accuracy"] for r in per_seed]  # the same difference over the seeds
    assert d["seeds"]["per_seed"] == pytest.approx(by_seed) and d["seeds"]["mean"] == pytest.approx(d["diff"])
    assert d["seeds"]["low"] <= d["seeds"]["mean"] <= d["seeds"]["high"]
    assert d["holds"] == ((d["low"] > 0 and d["seeds"]["low"] > 0) or (d["high"] < 0 and d["seeds"]["high"] < 0))
    report = (out / "report.md").read_text()
    assert "| LWD - KD |" in report and "95% interval" in report and "95% over seeds" in report
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "seeds [0, 1]: mean [95% interval]" in printed and "LWD - KD" in printed


def test_tokenize_once_then_pretrain_on_the_shards_with_a_token_budget(capsys, tmp_path):
    """`fastted tokenize --out` writes a corpus of token shards with 2 workers; a clm run names it as its source,
    trains for distil.train.max_tokens (32 tokens a step: 3 steps for 70 tokens) with a warmup in tokens, and holds
    out its last documents. `fastted tokenize` without --out makes the run's own shards, which the jobs reuse."""
    from fastted.train import shards
    from tests.tiny_models import WORDS, gpt2

    teacher = _model_folder(tmp_path / "teacher", gpt2(4, 32), causal=True)
    g = torch.Generator().manual_seed(1)
    lines = [
        " ".join(WORDS[int(w)] for w in torch.randint(0, len(WORDS), (int(n),), generator=g))
        for n in torch.randint(3, 30, (60,), generator=g)
    ]
    (tmp_path / "corpus.txt").write_text("\n".join(lines) + "\n")
    common = ["--preset", "clm", f"teacher.path={teacher}", "data.max_length=16", "data.num_proc=2", "progress=false"]
    assert main(["tokenize", "--out", str(tmp_path / "tokens"), f"data.source={tmp_path / 'corpus.txt'}", *common]) == 0
    assert "tokenize: corpus: " in capsys.readouterr().out
    corpus = shards.TokenCorpus(str(tmp_path / "tokens"))
    assert corpus.n_documents == 60 and len(corpus.shards) == 2

    out = tmp_path / "run"
    code = main(
        [
            "pipeline",
            f"data.source={tmp_path / 'tokens'}",
            f"output_dir={out}",
            "distil.methods=[kd]",
            "distil.train.batch_size=2",
            "distil.train.max_steps=null",
            "distil.train.max_tokens=70",
            "distil.train.warmup_tokens=40",
            "distil.train.min_lr=1e-5",
            "data.test_documents=6",
            *common,
        ]
    )
    assert code == 0
    records = [json.loads(line) for line in (out / "distil-kd" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3] and [r["tokens"] for r in train] == [32, 64, 96]
    assert [r["lr"] for r in train[:2]] == pytest.approx([1e-4 / 3, 2e-4 / 3])  # 2 warmup steps (40 / 32)
    assert json.loads((out / "results.json").read_text())["KD"]["tokens"] > 0

    # the teacher cached over the same packed blocks (document masks on), then distilled from
    cached = tmp_path / "cached"
    shared = [
        f"data.source={tmp_path / 'tokens'}",
        f"output_dir={cached}",
        "distil.train.batch_size=2",
        "distil.train.max_steps=2",
        "data.test_documents=6",
        *common,
    ]
    assert main(["cache-teacher", "--method", "kd", *shared]) == 0
    manifest = json.loads((cached / "cache-teacher-kd" / "manifest.json").read_text())
    blocks = corpus.document_end(corpus.n_documents - 7) // 16  # the blocks before the 6 held-out documents
    assert manifest["examples"] == blocks and manifest["tokens"] == 16 * blocks
    assert main(["distil", "--method", "kd", "distil.teacher_cache=true", *shared]) == 0
    assert [
        r["step"]
        for r in map(json.loads, (cached / "distil-kd" / "metrics.jsonl").read_text().splitlines())
        if "loss" in r
    ] == [1, 2]

    # the run's own shards of the raw corpus: made by `fastted tokenize`, then reused by the jobs
    raw = tmp_path / "raw"
    assert main(["tokenize", f"data.source={tmp_path / 'corpus.txt'}", f"output_dir={raw}", *common]) == 0
    made = [p for p in (raw / "cache").iterdir() if p.name.startswith("tokens-")]
    assert len(made) == 1
    stamp = (made[0] / "train" / shards.META).stat().st_mtime_ns
    assert (
        main(
            [
                "distil",
                "--method",
                "kd",
                f"data.source={tmp_path / 'corpus.txt'}",
                f"output_dir={raw}",
                "distil.train.max_steps=1",
                "distil.train.batch_size=2",
                *common,
            ]
        )
        == 0
    )
    assert (made[0] / "train" / shards.META).stat().st_mtime_ns == stamp  # not tokenized again
    assert [p.name for p in (raw / "cache").iterdir() if p.name.startswith("tokens-")] == [made[0].name]


@pytest.mark.bad_input
def test_tokenize_refuses_what_it_cannot_make(capsys, tmp_path):
    assert main(["tokenize", "--preset", "bbc-minilm-tiny", f"output_dir={tmp_path}"]) == 2
    assert "fastted tokenize makes the token shards of packed pre-training" in capsys.readouterr().err
