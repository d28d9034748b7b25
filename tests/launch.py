"""Launching test workers on gloo CPU ranks, for the multi-rank tests: a free port, the environment of a launch,
and torchrun's command line."""

import os
import socket
import subprocess
import sys

LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(**extra: str) -> dict:
    """This process's environment for a launch of CPU ranks: DeepSpeed on the CPU, one thread a rank, ``extra``, and
    none of a launcher's variables (a test run under a launcher would hand its own world down; a process started
    without them is an in-process world of one)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **extra}
    for key in LAUNCHER_VARIABLES:
        env.pop(key, None)
    return env


def torchrun(ranks: int, *args: str) -> list:
    """The command that runs ``args`` (a script and its arguments) on ``ranks`` local ranks, or, for one rank,
    in one process without a launcher."""
    if ranks == 1:
        return [sys.executable, *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(ranks),
        "--master_port",
        str(free_port()),
        *args,
    ]


def run_ranks(command: list, timeout: int = 300, env: dict = None) -> subprocess.CompletedProcess:
    """Run ``command`` (:func:`torchrun`'s, or a launcher's) and fail the test with the tails of its output unless
    it succeeded."""
    done = subprocess.run(command, env=env or rank_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def finish() -> None:
    """How a worker ends: its process group ended (:func:`fastted.train.engine.end_distributed`), its output flushed,
    and ``os._exit(0)``, as the ``fastted`` command ends (:func:`fastted.train.cli.command`): DeepSpeed's references
    keep the group's objects alive into the interpreter's teardown, where gloo's threads have aborted a rank."""
    from fastted.train.engine import end_distributed

    end_distributed()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
