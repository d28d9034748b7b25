"""Typed configs: presets, YAML, dotted overrides, and one clear error per bad setting."""

import copy
import re
import warnings

import pytest
import yaml

from fastted.train.config import METHODS, PRESETS, Config, ConfigError, dump, from_dict, load_config, to_dict


def test_defaults_are_the_embedded_default():
    config = load_config()
    assert config.task == "classification" and config.teacher.path == "minilm"
    assert config.student.layers == [0, 2, 4] and config.data.source == "bbc-news"
    assert config.distil.methods == ["kd", "lwd", "ted"]
    assert config.jobs[0] == "finetune-teacher" and config.jobs[-1] == "evaluate"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_valid(name):
    config = load_config(preset=name)
    for key, value in PRESETS[name].items():
        target = config
        for part in key.split("."):  # sections are attributes; a mapping's entries (distil.per_method.kd.x) keys
            target = target[part] if isinstance(target, dict) else getattr(target, part)
        assert target == value, key


def test_yaml_file_then_overrides_typed(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump({"preset": "bbc-minilm-tiny", "seed": 3, "distil": {"train": {"lr": 0.002}, "methods": ["ted"]}})
    )
    config = load_config(
        str(path),
        (
            "distil.train.lr=3e-4",
            "data.max_length=48",
            "progress=true",
            "student.layers=[1,3,5]",
            "distil.methods=kd,ted",
            "data.max_test_examples=null",
        ),
    )
    assert config.output_dir == "runs/bbc-minilm-tiny"  # from the preset the file names
    assert config.seed == 3
    assert config.distil.train.lr == pytest.approx(3e-4) and isinstance(config.distil.train.lr, float)
    assert config.data.max_length == 48 and isinstance(config.data.max_length, int)
    assert config.progress is True
    assert config.student.layers == [1, 3, 5]
    assert config.distil.methods == ["kd", "ted"]
    assert config.data.max_test_examples is None
    assert config.filters.train.lr == pytest.approx(1e-3)  # untouched sections keep their defaults


def test_round_trip_through_yaml(tmp_path):
    config = load_config(preset="smollm2-bbc", overrides=("engine.deepspeed={}",))
    path = tmp_path / "config.yaml"
    dump(config, str(path))
    with open(path, encoding="utf-8") as f:
        again = from_dict(yaml.safe_load(f))
    assert to_dict(again) == to_dict(config)
    assert isinstance(again, Config)


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.max_lenght=3", "unknown config key 'data.max_lenght'"),
        ("nosuch=1", "unknown config key 'nosuch'"),
        ("data.max_length=abc", "data.max_length: got 'abc', needs an int"),
        ("data.max_length=2.5", "data.max_length: got 2.5, needs an int"),
        ("data.max_length=0", "data.max_length: got 0, needs a number > 0"),
        ("task=regression", "task: got 'regression', needs one of classification, mlm, clm"),
        ("distil.methods=ted,bogus", "distil.methods[1]: got 'bogus'"),
        ("engine.precision=fp8", "engine.precision: got 'fp8'"),
        ("engine.zero_stage=4", "engine.zero_stage: got 4"),
        ("distil.train.warmup_ratio=1.5", "distil.train.warmup_ratio: got 1.5"),
        ("progress=maybe", "progress: got 'maybe', needs true or false"),
        ("finetune.batch_size=32", None),
        ("finetune.micro_batch_size=5", "finetune.batch_size (32) must be a multiple of finetune.micro_batch_size (5)"),
        ("data=3", "data is a section"),
        ("lr", "needs the form key.sub=value"),
        ("jobs=[distil,evaluate,finetune-teacher]", None),
        ("task=clm", "jobs: 'finetune-teacher' is for classification"),
        ("student.path=x", "student.path and student.layers / num_layers exclude each other"),
        ("finetune.lr=inf", "finetune.lr: got inf, needs a finite number"),
        ("finetune.clip=nan", "finetune.clip: got nan, needs a finite number"),
        ("finetune.epochs=inf", "finetune.epochs: got inf, needs a finite number"),
        ("distil.ted.temperature=-inf", "distil.ted.temperature: got -inf, needs a finite number"),
        ("data.max_length=inf", "data.max_length: got inf, needs a finite number"),
    ],
)
@pytest.mark.bad_input
def test_bad_settings_name_the_key(override, message):
    _check_refused(override, message)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ("distil.train.max_tokens=1000",),
            "distil.train.max_tokens: got 1000, but a budget in tokens needs packed "
            "blocks (task mlm or clm with data.pack true), whose steps hold a fixed "
            "number of tokens; this run is classification",
        ),
        (
            ("task=clm", "jobs=[distil]", "data.pack=false", "distil.train.warmup_tokens=10"),
            "distil.train.warmup_tokens: got 10, but a budget in tokens needs packed blocks",
        ),
        (
            ("task=clm", "jobs=[distil]", "distil.train.max_tokens=0"),
            "distil.train.max_tokens: got 0, needs a number > 0",
        ),
        (
            ("task=clm", "jobs=[distil]", "distil.train.max_tokens=100", "distil.train.max_steps=3"),
            "distil.train.max_tokens (100) and distil.train.max_steps (3) both set the run's length; keep one",
        ),
        (("distil.train.min_lr=0.1",), "distil.train.min_lr: got 0.1, more than distil.train.lr (0.0001)"),
        (("distil.train.min_lr=-1",), "distil.train.min_lr: got -1.0, needs a number >= 0"),
        (
            ("data.document_mask=true",),
            "data.document_mask: got true, but it applies to packed blocks (task mlm or clm "
            "with data.pack true); this run is classification",
        ),
        (("data.test_documents=0",), "data.test_documents: got 0, needs a number > 0"),
        (("data.num_proc=0",), "data.num_proc: got 0, needs a number > 0"),
        (("engine.peak_tflops=-3",), "engine.peak_tflops: got -3.0, needs a number > 0"),
        (
            (
                "task=clm",
                "jobs=[distil]",
                "distil.train.max_tokens=4096",
                "distil.train.warmup_tokens=512",
                "distil.train.min_lr=1e-5",
                "data.document_mask=false",
                "data.test_documents=7",
                "data.num_proc=3",
            ),
            None,
        ),
    ],
)
@pytest.mark.bad_input
def test_bad_token_budgets_and_data_settings_name_the_key(overrides, message):
    _check_refused(overrides, message)


def _check_refused(overrides, message):
    overrides = (overrides,) if isinstance(overrides, str) else tuple(overrides)
    if message is None:
        load_config(overrides=overrides)
        return
    with pytest.raises(ConfigError, match=None) as info:
        load_config(overrides=overrides)
    assert message in str(info.value)


@pytest.mark.bad_input
def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="--config: no such file"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {max_length: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    nested = tmp_path / "nested.yaml"
    nested.write_text("data:\n  max_length: 64\n  surprise: 1\n")
    with pytest.raises(ConfigError, match="unknown config key 'data.surprise'"):
        load_config(str(nested))
    with pytest.raises(ConfigError, match="--preset: got 'nope', needs one of"):
        load_config(preset="nope")


@pytest.mark.parametrize("name", ["bbc-minilm.yaml", "smollm2-bbc.yaml", "deepspeed-zero3.yaml"])
def test_example_configs_load(name):
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "..", "configs", name)
    config = load_config(path)
    assert config.output_dir.startswith("runs/")


def test_method_settings_and_per_method_values_reach_only_their_method(tmp_path):
    from fastted.methods.ted import TEDSettings
    from fastted.train.config import method_config

    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "distil": {
                    "ted": {"mse_alpha": 2.0},
                    "lwd": {"mse_alpha": 30},
                    "per_method": {"lwd": {"train": {"lr": 5e-5}}},
                }
            }
        )
    )
    config = load_config(str(path), ("distil.ted.kl_alpha=7", "distil.lwd.temperature=3"))
    ted, lwd, kd = (method_config(config, m) for m in ("ted", "lwd", "kd"))
    assert (ted.distil.ted.kl_alpha, ted.distil.ted.mse_alpha, ted.distil.ted.temperature) == (7.0, 2.0, 2.0)
    assert isinstance(ted.distil.ted.kl_alpha, float)  # typed when applied, from the command line's text
    assert (lwd.distil.lwd.mse_alpha, lwd.distil.lwd.temperature, lwd.distil.train.lr) == (30.0, 3.0, 5e-5)
    assert lwd.distil.ted == TEDSettings()  # a job's config holds the other methods' defaults, not the run's
    assert (kd.distil.train.lr, kd.distil.methods, kd.distil.per_method) == (1e-4, ["kd"], {})
    assert config.distil.ted.mse_alpha == 2.0 and config.distil.train.lr == 1e-4 and "lwd" in config.distil.per_method


def test_old_flat_keys_load_onto_the_methods_sections_with_a_notice(tmp_path):
    """A config file, an override and a saved config of before the methods owned their settings: each old key sets
    the keys that replace it (every method that read it), with one ConfigKeyWarning naming both; an old
    per-method value still wins over the flat one, wherever the file wrote it."""
    from fastted.train.config import ConfigKeyWarning, method_config

    path = tmp_path / "old.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "distil": {
                    "per_method": {"lwd": {"mse_alpha": 30, "train": {"lr": 5e-5}}},
                    "mse_alpha": 2.0,
                    "kl_alpha": 3.0,
                    "crd_temperature": 0.5,
                    "projection_dim": 64,
                    "crd_negatives": 7,
                    "rail_per": "step",
                    "alpha_s": 2.0,
                }
            },
            sort_keys=False,
        )
    )
    with pytest.warns(ConfigKeyWarning) as caught:
        config = load_config(str(path), ("distil.per_method.ted.kl_alpha=7", "distil.temperature=3"))
    messages = {str(w.message) for w in caught}
    assert (
        "config key distil.crd_temperature is deprecated: it sets distil.codir.temperature (write those instead)"
    ) in messages
    assert (
        "config key distil.per_method.ted.kl_alpha is deprecated: it sets distil.ted.kl_alpha (write those instead)"
    ) in messages
    d = config.distil
    assert (d.ted.mse_alpha, d.lwd.mse_alpha, d.ted.kl_alpha, d.lwd.kl_alpha, d.kd.kl_alpha) == (
        2.0,
        30.0,
        7.0,
        3.0,
        3.0,
    )
    assert (d.codir.kd_alpha, d.railkd.kd_alpha, d.codir.temperature, d.codir.proj_dim, d.codir.negatives) == (
        3.0,
        3.0,
        0.5,
        64,
        7,
    )
    assert (d.codir.kd_temperature, d.ted.temperature, d.dwt.temperature, d.railkd.per, d.dwt.alpha_s) == (
        3.0,
        3.0,
        3.0,
        "step",
        2.0,
    )
    assert d.per_method == {"lwd": {"train": {"lr": 5e-5}}}
    assert method_config(config, "lwd").distil.train.lr == 5e-5
    with pytest.warns(ConfigKeyWarning, match=r"distil\.projection_dim is deprecated: it sets distil\.codir\.proj_dim"):
        assert load_config(overrides=("distil.projection_dim=32",)).distil.codir.proj_dim == 32
    with warnings.catch_warnings():  # a saved config was written by an older fastted: its keys move quietly
        warnings.simplefilter("error")
        saved = from_dict({"steps": ["distil"], "distil": {"methods": ["kd"], "kl_alpha": 0.5, "temperature": 1.0}})
    assert saved.jobs == ["distil"]
    assert (saved.distil.kd.kl_alpha, saved.distil.kd.temperature, saved.distil.methods) == (0.5, 1.0, ["kd"])


def test_published_ted_sets_stage_one_per_model_as_the_authors_script():
    """published: ted-glue-<task> sets TED's stage I (learn_filters_glue.sh): each model's own learning rate and
    batch, the epochs, no weight decay or clipping, the model's dropout on (off on RTE); the user's keys win."""
    from fastted.train.config import filters_config

    config = load_config(overrides=("published=ted-glue-sst2",))
    teacher, student = (filters_config(config, which).filters.train for which in ("teacher", "student"))
    assert (teacher.lr, student.lr, teacher.batch_size, teacher.epochs) == (2e-5, 4e-5, 32, 6.0)
    assert (teacher.weight_decay, teacher.clip, teacher.warmup_ratio, config.filters.dropout) == (0.0, 0.0, 0.0, True)
    assert config.distil.lwd.project_equal_width and not load_config().distil.lwd.project_equal_width
    mnli = filters_config(load_config(overrides=("published=ted-glue-mnli",)), "student").filters.train
    assert (mnli.lr, mnli.batch_size, mnli.warmup_ratio) == (7e-5, 64, round(1500 / (3 * -(-392_702 // 64)), 4))
    rte = load_config(overrides=("published=ted-glue-rte", "filters.per_model.teacher.lr=1e-4"))
    assert (rte.filters.dropout, rte.filters.head_dropout) == (False, 0.0)
    assert filters_config(rte, "teacher").filters.train.lr == 1e-4
    assert filters_config(rte, "student").filters.train.batch_size == 32
    assert filters_config(rte, "teacher").filters.per_model == {}


def test_pretrained_student_is_refused_for_ted_alone():
    """TED's student is stage I's fine-tuned one: distil.pretrained_student for a run with TED is refused by name;
    per method (the TED authors' protocol: KD and LWD from the pretrained student) it is what each job reads."""
    from fastted.train.config import method_config

    with pytest.raises(ConfigError, match="distil.pretrained_student: got true for ted, whose student is stage I"):
        load_config(overrides=("distil.pretrained_student=true",))
    config = load_config(
        overrides=("distil.per_method.kd.pretrained_student=true", "distil.per_method.lwd.pretrained_student=true")
    )
    assert [method_config(config, m).distil.pretrained_student for m in ("kd", "lwd", "ted")] == [True, True, False]
    with pytest.raises(ConfigError, match="pretrained_student: got true for ted"):
        load_config(overrides=("distil.per_method.ted.pretrained_student=true",))


def test_the_paper_protocol_preset_is_the_ted_authors_comparison():
    """rt-minilm-paper (with published=ted-glue-sst2, their regime): one seed, KD and LWD from the pretrained
    student, TED from stage I's,
    each job on its best dev accuracy; its dev split and the teacher cache exclude each other, by name."""
    from fastted.train.config import method_config

    config = load_config(preset="rt-minilm-paper", overrides=("published=ted-glue-sst2",))
    assert (config.seeds, config.published, config.distil.holdout, config.data.source) == (
        None,
        "ted-glue-sst2",
        0.1,
        PRESETS["rt-minilm"]["data.source"],
    )
    starts = {m: method_config(config, m).distil.pretrained_student for m in config.distil.methods}
    assert starts == {"kd": True, "lwd": True, "ted": False}
    for override, message in (
        ("distil.teacher_cache=true", "distil.holdout: got 0.1, but a teacher cache holds the rows"),
        ("distil.holdout=1.0", "distil.holdout: got 1.0, needs a number in [0, 1)"),
        ("distil.patience=0", "distil.patience: got 0"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(preset="rt-minilm-paper", overrides=(override,))


def test_a_checkpoint_written_before_the_new_keys_resumes_unless_its_form_changed():
    """A job's saved config without the keys added since (stage I's schedule per model, the dev split, ...) compares
    equal to today's at their defaults, so it resumes; RAIL-KD's, written when both projections trained, reads as
    train_teacher_projection: true and differs from today's default (never resumed silently in another form)."""
    from fastted.train.config import method_config
    from fastted.train.trainer import _run_settings

    differing = {}
    for method in ("ted", "railkd"):
        now = to_dict(method_config(load_config(overrides=("distil.methods=[kd,lwd,ted,railkd]",)), method))
        old = copy.deepcopy(now)
        for key in ("pretrained_student", "holdout", "patience", "watch_every"):
            del old["distil"][key]
        for key in ("per_model", "dropout", "head_dropout", "holdout", "patience", "watch_every"):
            del old["filters"][key]
        del old["distil"]["railkd"]["train_teacher_projection"], old["distil"]["lwd"]["project_equal_width"]
        before, after = _run_settings(yaml.safe_dump(old)), _run_settings(yaml.safe_dump(now))
        differing[method] = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        assert _run_settings(yaml.safe_dump(now)) == after
    assert differing == {"ted": [], "railkd": ["distil"]}


def test_filters_per_model_names_its_bad_keys():
    for override, message in (
        ("filters.per_model.coach.lr=1e-3", "filters.per_model: got 'coach', needs one of teacher, student"),
        ("filters.per_model.teacher.lr=-1", "filters.per_model.teacher.lr: got -1.0"),
        ("filters.per_model.student.nope=1", "unknown config key 'filters.per_model.student.nope'"),
        ("filters.per_model.student=3", "filters.per_model.student: got '3', needs a mapping"),
        ("filters.head_dropout=1.5", "filters.head_dropout: got 1.5, needs a number in [0, 1)"),
        ("filters.holdout=1", "filters.holdout: got 1.0, needs a number in [0, 1)"),
        ("filters.patience=0", "filters.patience: got 0"),
        ("filters.watch_every=0", "filters.watch_every: got 0"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(overrides=(override,))
    with pytest.raises(ConfigError, match="filters.holdout: got 0.1, but the probes it watches are classification"):
        load_config(preset="mlm", overrides=("filters.holdout=0.1",))


def test_published_sets_a_papers_values_under_the_users():
    from fastted.train.config import method_config
    from fastted.train.published import PUBLISHED, SOURCES

    config = load_config(overrides=("published=ted-glue-mnli", "distil.ted.mse_alpha=50", "distil.train.lr=1e-5"))
    assert config.published == "ted-glue-mnli"
    ted, lwd, kd = config.distil.ted, config.distil.lwd, config.distil.kd
    assert (ted.kl_alpha, ted.mse_alpha) == (5.0, 50.0)  # the user's mse_alpha over the script's 7500
    assert (lwd.kl_alpha, lwd.mse_alpha) == (5.0, 100.0)
    assert (kd.kl_alpha, kd.temperature) == (5.0, 2.0)
    assert config.distil.train.lr == 1e-5 and config.distil.train.batch_size == 64
    # The scripts' 1,500 warmup steps of 3 epochs over MNLI's 392,702 pairs at batch 64, as a ratio.
    assert config.distil.train.warmup_ratio == pytest.approx(1500 / (3 * 6136), abs=1e-4)
    sst2 = load_config(overrides=("published=ted-glue-sst2",))
    assert method_config(sst2, "ted").distil.ted.mse_alpha == 20.0 and sst2.distil.train.warmup_ratio == 0.0
    one = method_config(load_config(overrides=("published=codir-paper",)), "codir").distil
    codir = one.codir
    assert (codir.bank_mode, codir.negatives, codir.pooling, codir.proj_dim) == ("momentum", 100, "first", 128)
    assert (codir.task_alpha, codir.kd_alpha, codir.kd_temperature, codir.temperature) == (0.5, 0.5, 2.0, 0.07)
    assert (one.train.epochs, one.train.weight_decay, one.train.warmup_ratio) == (10.0, 0.1, 0.06)
    railkd = load_config(overrides=("published=railkd-paper",)).distil.railkd
    assert (railkd.task_alpha, railkd.kd_alpha, railkd.rail_alpha, railkd.per) == (1 / 3, 1 / 3, 1 / 3, "epoch")
    dwt = load_config(overrides=("published=dwt-paper",)).distil.dwt
    assert (dwt.alpha_h, dwt.alpha_s, dwt.alpha_s_end, dwt.remap) == (1.0, 4.0, 1.0, False)
    assert set(SOURCES) == set(PUBLISHED)
    for name in PUBLISHED:  # every entry applies and checks, for every method
        one = load_config(overrides=(f"published={name}",))
        for method in METHODS:
            method_config(one, method)


@pytest.mark.parametrize(
    "override, message",
    [
        ("published=ted-glue-bogus", "published: got 'ted-glue-bogus', needs one of ted-glue-mnli"),
        ("distil.per_method.bogus.mse_alpha=1", "distil.per_method: got 'bogus', needs one of ted"),
        ("distil.per_method.ted.mse_alhpa=1", "unknown config key 'distil.per_method.ted.mse_alhpa'"),
        ("distil.per_method.lwd.train.lr=-2", "distil.per_method.lwd: distil.train.lr: got -2.0, needs a number >= 0"),
        ("distil.per_method.lwd.mse_alpha=-2", "distil.lwd.mse_alpha: got -2.0, needs a number >= 0"),
        (
            "distil.per_method.ted.lwd.kl_alpha=1",
            "distil.per_method.ted.lwd.kl_alpha: a method's settings are its own section; set distil.lwd.kl_alpha",
        ),
        ("distil.per_method.ted.train.lr=fast", "distil.per_method.ted.train.lr: got 'fast', needs a number"),
        ("distil.codir.bank_mode=fifo", "distil.codir.bank_mode: got 'fifo', needs one of queue, momentum"),
        ("distil.codir.negatives=-1", "distil.codir.negatives: got -1, needs a number >= 0"),
        ("distil.railkd.per=batch", "distil.railkd.per: got 'batch', needs one of step, epoch"),
        ("distil.dwt.alpha_s_schedule=exp", "distil.dwt.alpha_s_schedule: got 'exp', needs one of constant, linear"),
        ("distil.per_method.codir.pooling=max", "distil.codir.pooling: got 'max', needs one of mean"),
        (
            "distil.per_method.ted.teacher_cache=true",
            "distil.per_method.ted.teacher_cache: distil.teacher_cache holds for the whole run",
        ),
    ],
)
@pytest.mark.bad_input
def test_bad_per_method_and_published_settings(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=(override,))
    assert message in str(info.value)


def test_a_job_compares_its_own_methods_settings_and_reads_an_older_checkpoints_flat_keys():
    """What resume compares (fastted.train.trainer): a job's own method's section alone, whole, and an older
    checkpoint's saved flat keys as the sections they now are."""
    from fastted.train.config import job_settings, method_config, to_yaml

    job = yaml.safe_load(
        to_yaml(method_config(load_config(overrides=("distil.kd.kl_alpha=0.5", "distil.ted.mse_alpha=9")), "kd"))
    )
    old = copy.deepcopy(job)
    for method in METHODS:
        old["distil"].pop(method)
    old["distil"].update({"kl_alpha": 0.5, "temperature": 2.0, "mse_alpha": 1.0, "crd_temperature": 0.07})
    assert job_settings(old) == job_settings(job)
    assert "kd" in job_settings(job)["distil"] and "ted" not in job_settings(job)["distil"]
    old["distil"]["temperature"] = 3.0
    assert job_settings(old) != job_settings(job)


def test_the_old_key_steps_sets_jobs_with_one_notice_from_a_file_and_the_command_line(tmp_path):
    """``steps`` (the pipeline's units before they were named jobs, "step" being the optimizer's) still loads,
    from a YAML file and from an override, with one ConfigKeyWarning naming ``jobs``; the validation names
    ``jobs``."""
    from fastted.train.config import ConfigKeyWarning

    notice = "config key steps is deprecated: it sets jobs (write those instead)"
    path = tmp_path / "old.yaml"
    path.write_text("steps: [distil, evaluate]\n")
    with pytest.warns(ConfigKeyWarning) as caught:
        config = load_config(str(path))
    assert [str(w.message) for w in caught] == [notice]
    assert config.jobs == ["distil", "evaluate"] and "jobs" in config.explicit_keys
    with pytest.warns(ConfigKeyWarning) as caught:
        config = load_config(overrides=("steps=[filters-teacher,filters-student,distil]",))
    assert [str(w.message) for w in caught] == [notice]
    assert config.jobs == ["filters-teacher", "filters-student", "distil"]
    with pytest.warns(ConfigKeyWarning), pytest.raises(ConfigError, match=r"jobs\[0\]: got 'bogus'"):
        load_config(overrides=("steps=[bogus]",))


def test_an_old_saved_config_reads_steps_as_jobs_quietly(recwarn):
    """A checkpoint's config.yaml written before the rename holds ``steps``: read back (from_dict) and compared on
    resume (job_settings, trainer._run_settings) as ``jobs``, without a notice (the user never wrote it)."""
    from fastted.train.config import job_settings, to_yaml
    from fastted.train.trainer import _run_settings

    now = load_config(overrides=("jobs=[distil,evaluate]",))
    text = to_yaml(now)
    values = yaml.safe_load(text)
    old = {("steps" if key == "jobs" else key): value for key, value in values.items()}
    assert "steps" in old and "jobs" not in old
    assert from_dict(old).jobs == ["distil", "evaluate"]
    assert job_settings(old) == job_settings(values)
    assert _run_settings(yaml.safe_dump(old, sort_keys=False)) == _run_settings(text)
    old["steps"] = ["distil"]
    assert _run_settings(yaml.safe_dump(old, sort_keys=False)) != _run_settings(text)
    assert not [w for w in recwarn if "steps" in str(w.message)]
