"""Per-rank loops under ZeRO-3 on 2 and 3 gloo ranks (tests/train/zero3_worker.py), against one process: the
evaluation of a partitioned student on a test split the ranks do not divide evenly, a teacher cache built over an
odd number of rows by a partitioned teacher, ZeRO-3's gather window, and the memory levers (teacher offload, activation
checkpointing)
under ZeRO-3 against the same run without them."""

import json

import pytest
import torch

from fastted.models import ModelAdapter
from fastted.train.cache import TeacherCache, build_teacher_cache
from fastted.train.data import CLMCollator
from fastted.train.engine import block_parameters
from fastted.train.trainer import evaluate_model
from tests.launch import run_ranks, torchrun
from tests.train import zero3_worker as worker

pytestmark = pytest.mark.slow


def _launch(tmp, ranks, parts):
    out, directory = tmp / f"zero3-{ranks}.json", tmp / f"zero3-{ranks}"
    directory.mkdir()
    run_ranks(torchrun(ranks, worker.__file__, "--parts", parts, "--dir", str(directory), "--out", str(out)))
    with open(out) as f:
        return {**json.load(f), "dir": directory}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zero3")
    return {2: _launch(tmp, 2, "eval,cache,window,levers"), 3: _launch(tmp, 3, "eval")}


def _one_rank(task, n):
    model = worker.evaluation_model(task).eval()
    with torch.no_grad():
        return evaluate_model(
            ModelAdapter(model, task), worker.evaluation_data(task, n), task, worker.MICRO, "cpu", per_example=True
        )


@pytest.mark.parametrize("ranks", [2, 3])
def test_a_zero3_student_evaluates_on_uneven_ranks_as_on_one(runs, ranks):
    """13 test rows in micro batches of 2: 7 batches, which 2 ranks share 4 + 3 and 3 ranks 3 + 2 + 2. Every
    forward of the partitioned student gathers its parameters from all ranks, so without the stand-in batches a
    rank waits for a gather that never comes (the worker's process group times out). The result is one rank's:
    the accuracy and every example's verdict, the LM's loss to 1e-6 and its token count."""
    run = runs[ranks]
    assert run["world"] == ranks
    one = _one_rank("classification", 13)
    got = run["eval"]["classification"]
    assert 0 < one["accuracy"] < 1 and got["examples"] == one["examples"] == 13
    assert got["accuracy"] == one["accuracy"] and got["correct"] == one["correct"]
    one, got = _one_rank("clm", 13), run["eval"]["clm"]
    assert got["tokens"] == one["tokens"] > 13
    assert got["lm_loss"] == pytest.approx(one["lm_loss"], rel=0, abs=1e-6)


def test_a_cache_built_by_uneven_ranks_under_a_zero3_teacher(runs, tmp_path):
    """9 rows, batches of 2: rank 0 runs 3 batches (5 rows), rank 1 two real ones and a stand-in. The merged
    cache holds every row once, with one process's top-k logits and layer targets."""
    run = runs[2]
    assert run["cache_examples"] == 9
    two = TeacherCache(str(run["dir"] / "cache"))
    rows = worker.cache_rows(9)
    build_teacher_cache(
        ModelAdapter(worker.cache_teacher().eval(), "clm"),
        rows,
        CLMCollator(0),
        str(tmp_path),
        layers=[0, 2],
        k=5,
        batch_size=worker.MICRO,
    )
    one = TeacherCache(str(tmp_path))
    assert two.manifest["tokens"] == one.manifest["tokens"] == sum(len(r["input_ids"]) for r in rows)
    for i in range(9):
        a, b = one.example(i), two.example(i)
        assert torch.equal(a["topk_ids"], b["topk_ids"]), i
        step = float(a["topk_values"].max() - a["topk_values"].min()) / 255  # one uint8 level at most
        torch.testing.assert_close(a["topk_values"], b["topk_values"], rtol=0, atol=step)
        torch.testing.assert_close(a["tail_lse"], b["tail_lse"], rtol=1e-6, atol=1e-6)
        for x, y in zip(a["targets"], b["targets"]):
            torch.testing.assert_close(x, y, rtol=0, atol=x.abs().max().item() / 127)  # one int8 step


def test_teacher_offload_and_activation_checkpointing_keep_the_losses(runs):
    """LWD with the fused LM head, student and teacher at ZeRO-3 on 2 ranks: the teacher's partitions offloaded to
    the CPU (DeepSpeed's own config says so) and, apart, the student's activation checkpointing give the losses of
    the plain run to 1e-6. (On the CPU the offload moves nothing; what it saves on a GPU is owed to a GPU run.)"""
    levers = runs[2]["levers"]
    plain = levers["plain"]
    assert plain["teacher_offload"] is None and not plain["checkpointing"] and plain["teacher_partitioned"]
    assert levers["offload"]["teacher_offload"] == "cpu" and levers["offload"]["teacher_partitioned"]
    assert levers["checkpointing"]["checkpointing"]
    assert plain["losses"][0] != plain["losses"][1]
    for name in ("offload", "checkpointing"):
        assert levers[name]["losses"] == pytest.approx(plain["losses"], rel=0, abs=1e-6), name


def test_a_partitioned_teacher_gathers_two_blocks_at_most(runs):
    """From its second forward on, DeepSpeed prefetches until max_live_parameters are gathered: with its default
    (1e9) a teacher of under a billion parameters is gathered whole on every rank. fastted's window keeps the
    block that runs and the next (and the largest module outside the blocks, gathered for its own forward)."""
    teacher = worker.window_teacher()
    whole = sum(p.numel() for p in teacher.parameters())
    block = block_parameters(teacher)
    outside = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in teacher.modules())
    got = runs[2]["window"]
    assert got["defaults"] == whole  # the whole teacher on each rank: what the window is for
    assert 0 < got["windowed"] <= 2 * block + outside < whole / 2


def test_the_engine_gives_teacher_and_zero3_student_a_window_of_their_blocks(runs):
    """The Engine's teacher and its ZeRO-3 student run under DeepSpeed's defaults capped at one block (prefetch)
    and two (live parameters, reuse distance), as DeepSpeed itself read the configs."""
    for run in runs[2]["levers"].values():
        for which in ("teacher", "student"):
            block = run["blocks"][which]
            assert 0 < block < 50_000_000
            assert run["windows"][which] == [block, 2 * block, 2 * block], which
