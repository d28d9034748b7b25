"""A run saved on 2 ranks resumes on 1 and on 4 (ZeRO 0, 1, 2 and 3, the same global batch) with the uninterrupted
run's losses; each rank hashes only its share of a checkpoint, and the ranks agree on which checkpoint is intact.

Three launches of tests/train/reshard_worker.py (2 ranks save, 1 and 4 ranks resume), each running every ZeRO
stage in turn; and a few checks in this process."""

import json
import os
from types import SimpleNamespace

import pytest
import torch

from fastted import files
from fastted.methods import FineTune
from fastted.train.checkpoints import file_owner, universal_checkpoint, verify_checkpoint, write_manifest
from fastted.train.config import EngineConfig, TrainConfig
from fastted.train.data import MLMCollator, batch_generator, data_order
from fastted.train.engine import CheckpointError, Engine
from fastted.train.trainer import Training, micro_batches
from tests.launch import run_ranks, torchrun
from tests.tiny_models import bert
from tests.train.reshard_worker import Tokenizer, dataset

WORKER = os.path.join(os.path.dirname(__file__), "reshard_worker.py")


def _launch(tmp, ranks, phase, saved=None):
    out, directory = tmp / f"{phase}-{ranks}.json", tmp / f"{phase}-{ranks}"
    args = ["--phase", phase, "--dir", str(directory), "--out", str(out)] + (["--saved", saved] if saved else [])
    run_ranks(torchrun(ranks, WORKER, *args), timeout=600)
    with open(out) as f:
        return {**json.load(f), "dir": str(directory)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reshard")
    saved = _launch(tmp, 2, "save")
    return {2: saved, 1: _launch(tmp, 1, "resume", saved["dir"]), 4: _launch(tmp, 4, "resume", saved["dir"])}


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 4])
def test_saved_on_two_ranks_resumes_on_another_number_with_the_same_losses(runs, world):
    """From the step-2 checkpoint of 2 ranks, steps 3 and 4 on 1 rank (accumulation 4) and on 4 ranks
    (accumulation 1) give the uninterrupted run's losses, under every ZeRO stage: model, Adam's moments and step,
    schedule, the MSE scales (a buffer, set at random before the run) and the MLM masks all as they were. ZeRO
    1-3 went through the checkpoint's universal form; ZeRO-0 loaded natively."""
    saved, resumed = runs[2]["losses"], runs[world]["losses"]
    assert runs[world]["world"] == world
    for stage in "0123":
        assert list(resumed[stage]) == ["3", "4"], stage  # resumed at step 2
        assert [resumed[stage][s] for s in "34"] == pytest.approx([saved[stage][s] for s in "34"], rel=0, abs=1e-5)
        assert saved[stage]["4"] < saved[stage]["1"] - 0.2  # it learns: the losses compared are not flat
    assert runs[world]["universal"] == {"0": False, "1": True, "2": True, "3": True}
    assert runs[world]["reused"] and runs[world]["reuse_hashed"] == runs[world]["universal_bytes"]
    message = runs[world]["unconverted"]
    assert "saved on 2 ranks (ZeRO stage 2), this run has" in message and "resume through" in message


@pytest.mark.slow
def test_each_rank_hashes_its_share_once(runs):
    """The bytes hashed over both ranks: the two checkpoints' bytes once while saving them, the newest one's once
    while checking it on resume (each rank a part of it), within the 1.05x budget."""
    run = runs[2]
    assert run["saved_bytes"] <= run["saved_hashed"] <= 1.05 * run["saved_bytes"]
    by_rank = run["verify_hashed_by_rank"]
    assert run["verify_bytes"] <= sum(by_rank) <= 1.05 * run["verify_bytes"]
    assert min(by_rank) > 0.2 * run["verify_bytes"]  # both ranks hash: rank 1 its optimizer and RNG files


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 4])
def test_a_resume_on_another_world_hashes_what_it_reads_once(runs, world):
    """Resumed on another world, over all ranks: the step-2 checkpoint hashed once and its universal form hashed as
    it was written (no second read: only the few bytes of DeepSpeed's ``latest_universal``), then step 4 saved; a later
    resume on that world hashes the checkpoint's own
    files but not its DeepSpeed state, which it reads from the universal form, and the universal form once."""
    run = runs[world]
    assert run["run_bytes"] <= run["run_hashed"] <= run["run_bytes"] + 64  # DeepSpeed's latest_universal read
    assert run["reuse_verify_hashed"] == run["checkpoint_bytes"] - run["state_bytes"] > 0
    assert run["reuse_hashed"] == run["universal_bytes"]


@pytest.mark.slow
@pytest.mark.bad_input
def test_a_damaged_rank_file_is_passed_over_by_every_rank_alike(runs):
    """Step 4's optimizer file of rank 1 (which only rank 1 hashes) corrupted: both ranks resume from step 2 and
    warn alike, naming the file."""
    ranks = runs[2]["damaged"]
    assert [r["picked"] for r in ranks] == ["step-0000002", "step-0000002"]
    assert ranks[0]["warnings"] == ranks[1]["warnings"]
    [warning] = ranks[0]["warnings"]
    assert (
        "step-0000004 is damaged (state/zero_pp_rank_1_mp_rank_00_optim_states.pt differs from the manifest's SHA-256"
    ) in warning and "resuming from step-0000002" in warning


def test_file_owner_takes_the_rank_of_the_name_and_rank_0_the_shared_files():
    assert file_owner("rng-rank3.pt", 4) == 3 and file_owner("rng-rank5.pt", 4) == 1
    assert file_owner(os.path.join("state", "zero_pp_rank_6_mp_rank_00_optim_states.pt"), 4) == 2
    assert file_owner(os.path.join("state", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"), 2) == 1
    for shared in (
        "trainer.json",
        "engine.json",
        "config.yaml",
        "zero_to_fp32.py",
        os.path.join("state", "mp_rank_00_model_states.pt"),
    ):
        assert file_owner(shared, 4) == 0


def test_mlm_masks_are_keyed_by_piece_not_by_rank():
    """The micro batches of a step on 1, 2 and 4 ranks (micro batch 2, global batch 8): piece p is the same batch,
    masks included, whatever the world; on one rank, micro batch a's masks are today's (seed, step, a, 0)."""
    collator = MLMCollator(Tokenizer(), probability=0.3)
    training = Training(
        name="x",
        directory="",
        recipe=None,
        dataset=dataset(),
        collator=collator,
        train=SimpleNamespace(batch_size=8),
        seed=5,
    )
    pieces = {}
    for world in (1, 2, 4):
        for rank in range(world):
            engine = SimpleNamespace(rank=rank, world=world, accumulation=4 // world, micro_batch=2)
            for a, (_, batch) in enumerate(micro_batches(training, 3, engine)):
                pieces.setdefault(a * world + rank, []).append(batch)
    assert sorted(pieces) == list(range(4))
    for piece, batches in pieces.items():
        assert len(batches) == 3
        assert (batches[0]["labels"] != -100).any()
        for batch in batches[1:]:
            for key in ("input_ids", "labels", "attention_mask"):
                assert torch.equal(batch[key], batches[0][key]), (piece, key)
    one_rank = list(micro_batches(training, 3, SimpleNamespace(rank=0, world=1, accumulation=4, micro_batch=2)))
    order = data_order(len(training.dataset), 5, 0)[3 * 8 : 4 * 8]  # step 3 of an epoch of 6 steps
    for a, (_, batch) in enumerate(one_rank):
        examples = [training.dataset[int(i)] for i in order[2 * a : 2 * a + 2]]
        assert torch.equal(batch["labels"], collator(examples, batch_generator(5, 3, a, 0))["labels"])


@pytest.mark.bad_input
def test_a_resume_that_cannot_be_done_is_one_named_line(tmp_path):
    """Saved under another ZeRO stage: a CheckpointError naming both stages and the setting to use; a checkpoint
    DeepSpeed cannot convert: a CheckpointError naming the folder and what to do, and nothing left behind."""
    folder = tmp_path / "step-0000002"
    (folder / "state").mkdir(parents=True)
    zero2 = SimpleNamespace(ds=SimpleNamespace(zero_optimization_stage=lambda: 2), world=1)
    for saved in (0, 3):
        (folder / "engine.json").write_text(json.dumps({"world": 1, "zero_stage": saved}))
        with pytest.raises(
            CheckpointError,
            match=rf"saved under ZeRO stage {saved}, this run uses stage 2: "
            rf"resume with engine.zero_stage={saved}, or resume=false",
        ):
            Engine.needs_universal(zero2, str(folder))
    (folder / "engine.json").write_text(json.dumps({"world": 2, "zero_stage": 2}))
    assert Engine.needs_universal(zero2, str(folder))
    (folder / "engine.json").write_text(json.dumps({"world": 2, "zero_stage": 0}))
    zero0 = SimpleNamespace(ds=SimpleNamespace(zero_optimization_stage=lambda: 0), world=1)
    assert not Engine.needs_universal(zero0, str(folder))  # whole optimizer states: natively on any world
    with pytest.raises(CheckpointError) as info:
        universal_checkpoint(str(folder))  # no DeepSpeed files in it
    message = str(info.value)
    assert len(message.splitlines()) == 1
    assert message.startswith(f"checkpoint {folder}: saved on 2 ranks, it could not be converted for 1 (")
    assert message.endswith("resume on 2 ranks, or resume=false to start over")
    assert not (folder / "universal").exists() and not (folder / "universal.tmp").exists()


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


@pytest.mark.slow
@pytest.mark.bad_input
def test_at_real_tensor_sizes_a_resume_through_the_universal_form_hashes_the_checkpoint_once(tmp_path):
    """A ZeRO-2 checkpoint of a BERT with 256-wide layers (1.2M parameters, one Adam step; saved by one process and
    marked as saved by 2): the universal form costs one small file's read to make (its files are hashed as they
    are written), and a resume through it hashes the checkpoint's own files and the universal form, at most 1.05x
    the checkpoint (the 2-rank tests' tiny tensors are mostly file headers). A damaged universal form is made
    again after the state it is made from is checked; with that state damaged too, the error names both."""
    recipe = FineTune(bert(2, 256, head="mlm", seed=3), task="mlm", impl="reference")
    engine = Engine(
        recipe,
        TrainConfig(batch_size=4, max_steps=1, warmup_ratio=0.0),
        EngineConfig(zero_stage=2, impl="reference"),
        1,
        torch.device("cpu"),
    )
    collator = MLMCollator(Tokenizer(), probability=0.3)
    out = engine.forward(collator(dataset()[:4], batch_generator(0, 0, 0, 0)), step=0)
    engine.backward(out.loss)
    engine.step()
    folder = tmp_path / "step-0000001"
    folder.mkdir()
    engine.save(str(folder))
    (folder / "engine.json").write_text(json.dumps({"world": 2, "zero_stage": 2}))
    (folder / "trainer.json").write_text(json.dumps({"step": 1}))
    write_manifest(str(folder))
    records = json.loads((folder / "manifest.json").read_text())["files"]
    checkpoint = sum(r["bytes"] for r in records.values())
    state = sum(r["bytes"] for rel, r in records.items() if rel.startswith("state" + os.sep))
    assert sum(p.numel() for p in recipe.parameters()) > 1_000_000 and state > 0.9 * checkpoint

    before = files.bytes_hashed
    universal = universal_checkpoint(str(folder), 0, 1)
    assert files.bytes_hashed - before <= 64  # DeepSpeed's latest_universal, written by hand
    size = sum(r["bytes"] for r in json.loads((folder / "universal" / "manifest.json").read_text())["files"].values())
    before = files.bytes_hashed
    assert verify_checkpoint(str(folder), 0, 1) is None and universal_checkpoint(str(folder), 0, 1) == universal
    hashed = files.bytes_hashed - before
    assert hashed == checkpoint - state + size <= 1.05 * checkpoint

    damaged = next((folder / "universal").rglob("exp_avg.pt"))
    _flip(damaged)
    assert universal_checkpoint(str(folder), 0, 1) == universal  # made again, from the checked state
    before = files.bytes_hashed
    assert universal_checkpoint(str(folder), 0, 1) == universal and files.bytes_hashed - before == size
    _flip(next((folder / "universal").rglob("exp_avg.pt")))
    _flip(next((folder / "state").glob("*optim_states.pt")))
    with pytest.raises(
        CheckpointError,
        match=r"its universal form is damaged \(.*exp_avg.pt differs from the "
        r"manifest's SHA-256.*\), and so is its state \(state/.*optim_states.pt "
        r"differs",
    ):
        universal_checkpoint(str(folder), 0, 1)
