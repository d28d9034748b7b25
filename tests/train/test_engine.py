"""The engine: schedule, batch layout, DeepSpeed configs, GPU-only options, and ZeRO-2 / ZeRO-3 on two ranks
(gloo, on the CPU) against one process, with a resume in each: TED's stage II, and LWD with the fused LM head."""

import json
import math
import os
import sys

import pytest
import torch

from fastted.train.config import ConfigError, EngineConfig, TrainConfig
from fastted.train.engine import batch_layout, checkpoint_types, deepspeed_config, lr_at, resolve_device
from tests.launch import free_port, run_ranks, torchrun

WORKER = os.path.join(os.path.dirname(__file__), "engine_worker.py")


@pytest.mark.parametrize("decay", ["linear", "cosine", "constant"])
def test_lr_at_warms_up_then_decays(decay):
    config = TrainConfig(warmup_ratio=0.2, decay=decay)
    total, warmup = 50, 10
    values = [lr_at(s, total, config) for s in range(total)]
    assert values[:warmup] == pytest.approx([(s + 1) / (warmup + 1) for s in range(warmup)])
    for s in range(warmup, total):
        p = (s - warmup) / (total - warmup)
        want = {"linear": 1 - p, "cosine": 0.5 * (1 + torch.cos(torch.tensor(torch.pi * p)).item()), "constant": 1.0}[
            decay
        ]
        assert values[s] == pytest.approx(want, abs=1e-6), s


@pytest.mark.parametrize("decay", ["linear", "cosine"])
def test_lr_at_warms_up_in_tokens_and_decays_to_min_lr(decay):
    """warmup_tokens 1000 at 96 tokens a step: 11 warmup steps; the decay ends at min_lr / lr = 0.1."""
    config = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_ratio=0.5, warmup_tokens=1000, decay=decay)
    total, warmup, floor = 40, 11, 0.1
    values = [lr_at(s, total, config, tokens_per_step=96) for s in range(total + 5)]
    assert values[:warmup] == pytest.approx([(s + 1) / (warmup + 1) for s in range(warmup)])
    for s in range(warmup, total + 5):
        p = min((s - warmup) / (total - warmup), 1.0)
        shape = 1 - p if decay == "linear" else 0.5 * (1 + math.cos(math.pi * p))
        assert values[s] == pytest.approx(floor + (1 - floor) * shape, abs=1e-9), s
    assert values[-1] == pytest.approx(floor)  # past the end: held at min_lr
    with pytest.raises(ValueError, match="warmup_tokens: needs packed blocks"):
        lr_at(0, total, config)


def test_max_tokens_sets_the_steps():
    from fastted.train.trainer import total_steps

    config = TrainConfig(batch_size=4, max_tokens=10_000)
    assert total_steps(1000, config, tokens_per_step=4 * 128) == 20  # 10,000 / 512, rounded up
    assert total_steps(1000, TrainConfig(batch_size=4, epochs=2)) == 500
    with pytest.raises(ValueError, match="distil.train.max_tokens: needs packed blocks"):
        total_steps(1000, config, "distil.train")


def test_batch_layout_and_deepspeed_config(tmp_path):
    train = TrainConfig(batch_size=32, micro_batch_size=4, clip=0.5)
    assert batch_layout(train, 2) == (4, 4)
    assert batch_layout(TrainConfig(batch_size=32), 4) == (8, 1)
    with pytest.raises(ConfigError, match="batch_size 32 is not a multiple of micro_batch_size 4 x 3 ranks"):
        batch_layout(train, 3)
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"overlap_comm": True}, "gradient_clipping": 2.0}))
    ds = deepspeed_config(train, EngineConfig(zero_stage=2, precision="bf16", deepspeed=str(user)), 2)
    assert ds["train_batch_size"] == 32 and ds["gradient_accumulation_steps"] == 4
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True}  # merged, not replaced
    assert ds["gradient_clipping"] == 2.0 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    with pytest.raises(ConfigError, match="engine.deepspeed: no such file"):
        deepspeed_config(train, EngineConfig(deepspeed=str(tmp_path / "nope.json")), 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only errors")
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"device": "cuda"}, "engine.device: got 'cuda', but this machine has no CUDA GPU"),
        ({"precision": "fp16"}, "engine.precision: fp16 needs a CUDA GPU"),
        ({"impl": "triton"}, "engine.impl: 'triton' needs a CUDA GPU"),
    ],
)
def test_gpu_only_options_on_cpu(kwargs, message, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match=message):
        resolve_device(EngineConfig(**kwargs))
    assert resolve_device(EngineConfig()).type == "cpu"


def _launch(tmp, stage, ranks, recipe="ted", launcher="torchrun"):
    out, directory = tmp / f"{recipe}-zero{stage}-{ranks}.json", tmp / f"{recipe}-zero{stage}-{ranks}"
    args = ["--zero-stage", str(stage), "--recipe", recipe, "--dir", str(directory), "--out", str(out)]
    if ranks == 1 or launcher == "torchrun":
        command = torchrun(ranks, WORKER, *args)
    else:  # DeepSpeed's launcher (it adds --local_rank to the script's arguments)
        command = [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            "--num_gpus",
            str(ranks),
            "--master_port",
            str(free_port()),
            WORKER,
            *args,
        ]
    run_ranks(command)
    with open(out) as f:
        return {**json.load(f), "dir": str(directory)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("engine")
    runs = {"single": _launch(tmp, 0, 1), 2: _launch(tmp, 2, 2, launcher="deepspeed"), 3: _launch(tmp, 3, 2)}
    for recipe in ("lwd-clm", "lwd-mlm", "lwd-cut", "ted-cached"):
        runs[recipe, 1], runs[recipe, 3] = _launch(tmp, 0, 1, recipe), _launch(tmp, 3, 2, recipe)
    return runs


def test_one_process_resumes_where_it_stopped(runs):
    single = runs["single"]
    assert single["world"] == 1 and single["resumed_from"] == 2
    assert len(single["losses"]) == 4 and single["losses"][0] > single["losses"][-1]  # it learns
    assert single["resumed"][2:] == pytest.approx(single["losses"][2:], rel=1e-6, abs=0)


@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_match_one_process(runs, stage):
    """The same global batch of 8 split 4 + 4 over two ranks (ZeRO-2 under the deepspeed launcher, ZeRO-3 under
    torchrun): the same losses at every step, and again after a resume from the step-2 checkpoint (model,
    optimizer, schedule restored on both ranks)."""
    run = runs[stage]
    assert run["world"] == 2
    assert run["losses"] == pytest.approx(runs["single"]["losses"], rel=1e-4, abs=1e-6)
    assert run["resumed"][2:] == pytest.approx(run["losses"][2:], rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("recipe", ["lwd-clm", "lwd-mlm"])
def test_fused_lm_head_under_zero3_matches_one_process(runs, recipe):
    """The fused LM head reads the student's output embeddings (an external parameter of the engine's module) and
    the partitioned teacher's (gathered for the loss) outside their forwards: the same losses as one process."""
    one, two = runs[recipe, 1], runs[recipe, 3]
    assert two["teacher_partitioned"] and two["student_partitioned"]
    if recipe == "lwd-mlm":  # (random tokens: the causal LM has nothing to learn in four steps)
        assert one["losses"][0] > one["losses"][-1]
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-4, abs=1e-6)
    assert two["resumed"][2:] == pytest.approx(two["losses"][2:], rel=1e-5, abs=1e-7)


def test_a_cut_teacher_under_zero3_matches_one_process(runs):
    """LWD without the KL on a teacher cut after its last mapped layer: ZeRO-3 partitions only the two blocks
    kept, and two ranks give one process's losses, resumed included."""
    one, two = runs["lwd-cut", 1], runs["lwd-cut", 3]
    assert two["teacher_partitioned"] and two["teacher_blocks"] == 2 and one["teacher_blocks"] == 2
    assert one["losses"][0] > one["losses"][-1]
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-4, abs=1e-6)
    assert two["resumed"][2:] == pytest.approx(two["losses"][2:], rel=1e-5, abs=1e-7)


def test_a_teacher_cache_built_on_two_ranks_trains_under_zero3(runs):
    """TED from a teacher cache that two ranks build half each (merged by rank 0): no teacher module is left to
    partition, and the two ranks' ZeRO-3 run gives one process's losses (from its own one-rank cache); the first
    step's is the live teacher's within int8's error (later steps part: Adam at lr 1e-2 turns the noise-level
    gradients of a tiny model's attention key biases, 1e-12, into full-size steps either way)."""
    one, two, live = runs["ted-cached", 1], runs["ted-cached", 3], runs["single"]
    assert two["teacher_partitioned"] is None and two["student_partitioned"]
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-4, abs=1e-6)
    assert two["resumed"][2:] == pytest.approx(two["losses"][2:], rel=1e-5, abs=1e-7)
    assert one["losses"][0] == pytest.approx(live["losses"][0], rel=1e-3)
    assert os.listdir(two["dir"] + "-cache").count("manifest.json") == 1
    assert sorted(n for n in os.listdir(two["dir"] + "-cache") if n.startswith("shard-")) == [
        "shard-000-00000.safetensors",
        "shard-001-00000.safetensors",
    ]


def test_zero3_partitions_teacher_and_student(runs):
    z3, z2 = runs[3], runs[2]
    assert z3["teacher_partitioned"] and z3["student_partitioned"]
    assert z3["teacher_local_fraction"] == pytest.approx(0.5, abs=0.01)  # each rank holds half of the teacher
    assert not z2["teacher_partitioned"] and not z2["student_partitioned"]


def test_checkpoints_load_without_pickle(runs):
    """Every file of every checkpoint loads with weights_only=True, with only DeepSpeed's four plain types
    allowed; the model weights are safetensors in the exported model."""
    files = []
    for run in runs.values():
        for root, _, names in os.walk(os.path.join(run["dir"], "checkpoints")):
            files += [os.path.join(root, n) for n in names if n.endswith(".pt")]
    assert len(files) >= 6
    with torch.serialization.safe_globals(checkpoint_types()):
        for path in files:
            state = torch.load(path, weights_only=True, map_location="cpu")
            assert isinstance(state, dict) and state, path
    assert {t.__name__ for t in checkpoint_types()} == {
        "LossScaler",
        "DynamicLossScaler",
        "ZeroStageEnum",
        "fragment_address",
    }


@pytest.mark.parametrize("code", [0, 2])
def test_the_command_ends_its_process_group(tmp_path, code):
    """`fastted` (cli.command) ends the process group after a command that worked and exits through os._exit
    with main's status, its output flushed, so no rank is left to gloo's threads at the interpreter's teardown; a
    failed command exits with its status, the group left to the launcher. In a process of its own: this one's
    group serves the other tests."""
    import subprocess

    from tests.launch import rank_env

    script = tmp_path / "ends.py"
    script.write_text(f"""
import atexit, torch, torch.distributed as dist
from fastted.train import cli, engine
from fastted.train.engine import init_distributed
ending = engine.end_distributed
engine.end_distributed = lambda: (ending(), print("ended", dist.is_initialized()))
engine.end_distributed()  # nothing up: nothing to do
cli.main = lambda argv=None: (init_distributed(torch.device("cpu")), print("worked"), {code})[2]
atexit.register(lambda: print("teardown"))  # skipped by os._exit
cli.command([])
print("not reached")
""")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run(
        [sys.executable, str(script)], env=rank_env(PYTHONPATH=root), capture_output=True, text=True, timeout=120
    )
    ours = ("ended True", "ended False", "worked", "teardown", "not reached")  # DeepSpeed prints too
    lines = [line for line in done.stdout.splitlines() if line in ours]
    assert done.returncode == code, done.stderr[-3000:]
    assert lines == ["ended False", "worked"] + (["ended False"] if code == 0 else []), done.stdout
