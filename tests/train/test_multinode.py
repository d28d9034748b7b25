"""Two "nodes" of two ranks each on localhost: two torchrun launcher agents, started apart, meet at 127.0.0.1
through a c10d rendezvous (as agents on two machines meet at the first one's address), and their four gloo
ranks run TED's stage II at ZeRO-3 (tests/train/engine_worker.py): steps, checkpoints, and a resume from the
step-2 checkpoint, against one process on the same global batch."""

import json
import os
import subprocess
import sys

import pytest

from tests.launch import free_port, rank_env

WORKER = os.path.join(os.path.dirname(__file__), "engine_worker.py")


def _result(out, directory):
    with open(out) as f:
        return {**json.load(f), "dir": str(directory)}


@pytest.mark.slow
def test_two_nodes_of_two_ranks_train_checkpoint_and_resume_as_one_process(tmp_path):
    args = ["--zero-stage", "3", "--recipe", "ted"]
    one_out, one_dir = tmp_path / "one.json", tmp_path / "one"  # the reference: one process, no ZeRO
    one = subprocess.Popen(
        [sys.executable, WORKER, "--zero-stage", "0", "--recipe", "ted", "--dir", str(one_dir), "--out", str(one_out)],
        env=rank_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out, directory = tmp_path / "nodes.json", tmp_path / "nodes"  # one output_dir: the nodes' shared storage
    endpoint = f"127.0.0.1:{free_port()}"
    agents = []
    for node in (0, 1):
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "2",
            "--nproc_per_node",
            "2",
            "--rdzv_backend",
            "c10d",
            "--rdzv_endpoint",
            endpoint,
            "--rdzv_id",
            "fastted-two-nodes",
            "--rdzv_conf",
            f"is_host={'true' if node == 0 else 'false'}",
            "--max_restarts",
            "0",
            WORKER,
            *args,
            "--dir",
            str(directory),
            "--out",
            str(out),
        ]
        agents.append(
            subprocess.Popen(command, env=rank_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    logs = [p.communicate(timeout=400)[0] for p in (*agents, one)]
    for p, log in zip((*agents, one), logs):
        assert p.returncode == 0, log[-6000:]
    nodes, single = _result(out, directory), _result(one_out, one_dir)
    assert nodes["world"] == 4 and single["world"] == 1
    assert nodes["teacher_partitioned"] and nodes["student_partitioned"]
    assert nodes["teacher_local_fraction"] == pytest.approx(0.25, abs=0.01)  # a quarter of the teacher a rank
    assert len(single["losses"]) == 4 and single["losses"][0] > single["losses"][-1]
    assert nodes["losses"] == pytest.approx(single["losses"], rel=1e-4, abs=1e-6)
    assert nodes["resumed_from"] == 2
    assert nodes["resumed"][2:] == pytest.approx(nodes["losses"][2:], rel=1e-5, abs=1e-7)
