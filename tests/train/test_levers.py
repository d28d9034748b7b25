"""The engine's memory levers and the teacher's DeepSpeed config: ``engine.precision: auto`` (resolved once, saved
resolved), the teacher's config merged from the user's ``engine.deepspeed`` and ``engine.teacher_offload``, and
``engine.activation_checkpointing`` (a GPT-2 step keeps fewer activations for its backward, same losses).
Their multi-rank runs under ZeRO-3 are in tests/train/test_zero3_ranks.py."""

import pytest
import torch
import yaml

from fastted import LWD
from fastted.train.config import ConfigError, EngineConfig, TrainConfig, load_config, to_yaml
from fastted.train.data import CLMCollator
from fastted.train.engine import (
    Engine,
    block_parameters,
    deepspeed_config,
    gather_window,
    resolve_precision,
    teacher_deepspeed_config,
    teacher_offload_param,
)
from tests.tiny_models import gpt2

# --------------------------------------------------------------------------- precision


def test_auto_precision_is_fp32_on_the_cpu_and_an_explicit_one_wins():
    cpu = torch.device("cpu")
    assert EngineConfig().precision == "auto"
    assert resolve_precision(EngineConfig(), cpu) == "fp32"
    for precision in ("fp32", "bf16", "fp16"):
        assert resolve_precision(EngineConfig(precision=precision), cpu) == precision
    if not torch.cuda.is_available():
        assert resolve_precision(EngineConfig()) == "fp32"  # the device resolve_device would pick
    ds = deepspeed_config(TrainConfig(batch_size=4), EngineConfig(), 1)
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]


@pytest.mark.parametrize("bf16_supported, want", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_on_a_gpu_follows_its_bf16_support(monkeypatch, bf16_supported, want):
    """The GPU side with torch.cuda's answers stubbed (a real GPU run is owed): bf16 where the GPU supports it,
    fp32 on older GPUs; engine.device=cpu keeps fp32 on a GPU machine."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16_supported)
    assert resolve_precision(EngineConfig(), torch.device("cuda", 0)) == want
    assert resolve_precision(EngineConfig()) == want
    assert resolve_precision(EngineConfig(device="cpu")) == "fp32"
    assert resolve_precision(EngineConfig(precision="fp16"), torch.device("cuda", 0)) == "fp16"
    ds = teacher_deepspeed_config(EngineConfig(), 2)
    assert ds["bf16"]["enabled"] == (want == "bf16") and not ds["fp16"]["enabled"]


@pytest.mark.bad_input
def test_a_deepspeed_precision_against_engine_precision_is_refused():
    with pytest.raises(
        ConfigError,
        match=r"engine.deepspeed: bf16.enabled is true, but engine.precision is 'fp32': "
        r"set engine.precision=bf16",
    ):
        deepspeed_config(TrainConfig(batch_size=4), EngineConfig(deepspeed={"bf16": {"enabled": True}}), 1)
    with pytest.raises(ConfigError, match=r"fp16.enabled is false, but engine.precision is 'fp16'"):
        teacher_deepspeed_config(EngineConfig(precision="fp16", deepspeed={"fp16": {"enabled": False}}), 1)
    ds = deepspeed_config(
        TrainConfig(batch_size=4), EngineConfig(precision="bf16", deepspeed={"bf16": {"enabled": True}}), 1
    )
    assert ds["bf16"]["enabled"]


def test_a_job_saves_the_resolved_precision(monkeypatch, tmp_path):
    """Every pipeline job starts in pipeline._start, which writes the resolved precision into the config that
    the job reads (cache-teacher's dtype, the engine) and saves in its checkpoints."""
    import fastted.train.pipeline as pipeline

    monkeypatch.setattr(pipeline, "model_source", lambda model, which: (str(tmp_path), None))
    monkeypatch.setattr(pipeline, "load_tokenizer", lambda path, gguf=None: None)
    monkeypatch.setattr(pipeline, "prepare_data", lambda config, tokenizer, rank: "data")
    config = load_config(overrides=(f"output_dir={tmp_path}", "progress=false"))
    assert config.engine.precision == "auto"
    pipeline._start(config)
    assert config.engine.precision == "fp32"
    assert yaml.safe_load(to_yaml(config))["engine"]["precision"] == "fp32"


# --------------------------------------------------------------------------- the teacher's DeepSpeed config

USER = {
    "train_batch_size": 512,
    "train_micro_batch_size_per_gpu": 16,
    "gradient_accumulation_steps": 4,
    "gradient_clipping": 0.5,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
    "scheduler": {"type": "WarmupLR"},
    "zero_optimization": {
        "stage": 2,
        "overlap_comm": True,
        "reduce_bucket_size": 5e7,
        "allgather_bucket_size": 5e7,
        "stage3_prefetch_bucket_size": 2e7,
        "stage3_max_live_parameters": 3e8,
        "max_reuse_distance": 1e8,
        "stage3_param_persistence_threshold": 1e6,
        "offload_optimizer": {"device": "cpu"},
        "offload_param": {"device": "cpu", "pin_memory": False, "buffer_count": 7},
    },
}


def test_the_teacher_takes_the_users_gather_settings_and_offload_alone(tmp_path):
    """From a user's DeepSpeed file: the stage-3 prefetch, live-parameter and reuse settings and offload_param
    reach the teacher; its stage, persistence, micro batch and precision stay fastted's; the optimizer, scheduler,
    batch sizes, gradient settings and optimizer offload do not reach it. DeepSpeed's own ZeRO config reads it."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    path = tmp_path / "ds.yaml"
    path.write_text(yaml.safe_dump(USER))
    ds = teacher_deepspeed_config(EngineConfig(deepspeed=str(path)), 3)
    assert ds == {
        "train_micro_batch_size_per_gpu": 3,
        "steps_per_print": 2**31 - 1,
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "zero_optimization": {
            "stage": 3,
            "stage3_param_persistence_threshold": 0,
            "stage3_model_persistence_threshold": 0,
            "stage3_prefetch_bucket_size": 2e7,
            "stage3_max_live_parameters": 3e8,
            "max_reuse_distance": 1e8,
            "offload_param": {"device": "cpu", "pin_memory": False, "buffer_count": 7},
        },
    }
    zero = DeepSpeedZeroConfig(**ds["zero_optimization"])
    assert (
        zero.stage,
        zero.prefetch_bucket_size,
        zero.max_live_parameters,
        zero.max_reuse_distance,
        zero.param_persistence_threshold,
    ) == (3, 2e7, 3e8, 1e8, 0)
    assert zero.offload_param.device == "cpu" and zero.offload_optimizer is None
    student = deepspeed_config(TrainConfig(batch_size=512, micro_batch_size=16), EngineConfig(deepspeed=USER), 8)
    assert student["zero_optimization"]["stage"] == 2 and student["optimizer"]["type"] == "AdamW"  # unchanged
    plain = teacher_deepspeed_config(EngineConfig(), 2)["zero_optimization"]
    assert plain == {"stage": 3, "stage3_param_persistence_threshold": 0, "stage3_model_persistence_threshold": 0}


def test_the_gather_window_is_deepspeeds_default_capped_at_the_models_blocks():
    """One block prefetched, two live and within reuse distance (the block that runs and the next); a setting the
    user made, under either of DeepSpeed's names, is kept; a model whose blocks exceed DeepSpeed's defaults keeps
    them; a model without blocks gets none. (What it does on 2 ranks: tests/train/test_zero3_ranks.py.)"""
    model = gpt2(3, 32, seed=0)
    block = block_parameters(model)
    assert block == sum(p.numel() for p in model.transformer.h[0].parameters())
    window = {
        "stage3_prefetch_bucket_size": block,
        "stage3_max_live_parameters": 2 * block,
        "stage3_max_reuse_distance": 2 * block,
    }
    assert gather_window(model, {}) == window
    assert gather_window(model, {"prefetch_bucket_size": 7, "stage3_max_live_parameters": 9}) == {
        "stage3_max_reuse_distance": 2 * block
    }
    assert gather_window(None, {}) == {} and gather_window(torch.nn.Linear(4, 4), {}) == {}
    huge = torch.nn.ModuleList([torch.nn.Linear(40_000, 40_000, device="meta")])  # 1.6e9 parameters
    assert gather_window(huge, {}) == {
        "stage3_prefetch_bucket_size": 50_000_000,
        "stage3_max_live_parameters": 10**9,
        "stage3_max_reuse_distance": 10**9,
    }
    zero = teacher_deepspeed_config(EngineConfig(deepspeed=USER), 2, model)["zero_optimization"]
    assert (zero["stage3_prefetch_bucket_size"], zero["stage3_max_live_parameters"], zero["max_reuse_distance"]) == (
        2e7,
        3e8,
        1e8,
    ) and "stage3_max_reuse_distance" not in zero  # the user's three settings
    zero = teacher_deepspeed_config(EngineConfig(), 2, model)["zero_optimization"]
    assert {key: zero[key] for key in window} == window


@pytest.mark.parametrize(
    "offload, user, want",
    [
        (None, None, None),
        ("cpu", None, {"device": "cpu", "pin_memory": True}),
        ("none", {"device": "cpu"}, None),
        (None, {"device": "none"}, None),
        (None, {"device": "cpu", "pin_memory": False}, {"device": "cpu", "pin_memory": False}),
        (
            "cpu",
            {"device": "nvme", "nvme_path": "/nvme", "buffer_count": 6},
            {"device": "cpu", "pin_memory": True, "buffer_count": 6},
        ),
    ],
)
def test_teacher_offload(offload, user, want):
    """engine.teacher_offload=cpu puts the teacher's partitions in host memory (pinned, the user's other offload
    settings kept), none keeps them on the device whatever the user's file says, unset follows the file."""
    deepspeed = None if user is None else {"zero_optimization": {"offload_param": user}}
    config = EngineConfig(teacher_offload=offload, deepspeed=deepspeed)
    assert teacher_offload_param(config) == want
    assert teacher_deepspeed_config(config, 1)["zero_optimization"].get("offload_param") == want


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "overrides, message",
    [
        (("engine.teacher_offload=gpu",), "engine.teacher_offload: got 'gpu', needs one of cpu, none"),
        (
            ("engine.teacher_offload=cpu", "engine.teacher_zero3=false"),
            "engine.teacher_offload: got 'cpu' with engine.teacher_zero3 false, needs the teacher partitioned",
        ),
        (("engine.precision=fp64",), "engine.precision: got 'fp64', needs one of auto, fp32, bf16, fp16"),
        (
            ("engine.activation_checkpointing=sometimes",),
            "engine.activation_checkpointing: got 'sometimes', needs true",
        ),
    ],
)
def test_bad_lever_settings_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


# --------------------------------------------------------------------------- activation checkpointing


def _lwd_step_run(checkpointing: bool, steps: int = 3):
    """LWD on a 4-block GPT-2 student for ``steps`` steps in one process: the losses, and per step the bytes of
    the tensors autograd saved for the backward (parameters left out: they are kept either way)."""
    recipe = LWD(gpt2(4, 64, seed=1), gpt2(4, 64, seed=2), impl="reference")
    train = TrainConfig(batch_size=4, max_steps=steps, lr=3e-3, warmup_ratio=0.0)
    engine = Engine(
        recipe,
        train,
        EngineConfig(impl="reference", activation_checkpointing=checkpointing),
        steps,
        torch.device("cpu"),
    )
    params = {p.untyped_storage().data_ptr() for p in recipe.parameters()}
    g = torch.Generator().manual_seed(3)
    collator, losses, saved = CLMCollator(0), [], []
    engine.train(True)
    for step in range(steps):
        rows = [{"input_ids": torch.randint(3, 97, (48,), generator=g).tolist()} for _ in range(4)]
        storages = {}

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                storages[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = engine.forward(collator(rows), step=step)
        engine.backward(out.loss)
        engine.step()
        losses.append(float(out.loss.detach()))
        saved.append(sum(storages.values()))
    return losses, saved, recipe


def checkpointing(recipe) -> bool:
    model = recipe.student_model.model
    if hasattr(type(model), "is_activation_checkpointing"):  # transformers 5's name
        return bool(model.is_activation_checkpointing)
    return bool(model.is_gradient_checkpointing)


def test_activation_checkpointing_keeps_fewer_activations_and_the_losses():
    """engine.activation_checkpointing=true: the student's blocks recompute their activations in the backward, so
    a step saves less than half the bytes for it (the blocks' inputs, which the recomputation keeps, counted in:
    one (B, T, d) fp32 tensor per block), and every loss of three steps is the plain run's to 1e-6 (the MSE's
    gradient reaches the student through the recomputed blocks)."""
    plain_losses, plain_saved, plain = _lwd_step_run(False)
    losses, saved, recipe = _lwd_step_run(True)
    assert checkpointing(recipe) and not checkpointing(plain)
    assert len(set(plain_losses)) == 3
    assert losses == pytest.approx(plain_losses, rel=0, abs=1e-6)
    block_inputs = 4 * (4 * 48 * 64 * 4)  # blocks x (B x T x d x 4 bytes)
    for a, b in zip(saved, plain_saved):
        assert a + block_inputs < 0.5 * b, (a, b)
    print(
        f"saved for backward per step: {plain_saved[0]} B plain, {saved[0]} B + {block_inputs} B of block inputs "
        f"checkpointed"
    )


def test_freed_host_memory_goes_back_unless_the_user_set_the_threshold(monkeypatch):
    """init_distributed fixes glibc's mmap threshold (benchmarks/scale_memory.py measured what the default keeps);
    a MALLOC_MMAP_THRESHOLD_ of the user's wins, and a C library without mallopt is skipped."""
    import platform

    from fastted.train.engine import return_freed_host_memory

    glibc = platform.libc_ver()[0] == "glibc"
    assert return_freed_host_memory() is glibc
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert return_freed_host_memory() is False
