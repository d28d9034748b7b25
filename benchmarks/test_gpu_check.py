"""benchmarks/gpu_check.py in its CPU mode, as CI runs it: every section runs and its result file is whole.

A GPU is lent for minutes; a script that broke since its last run would waste
them. On a CPU the sections run at the small sizes (the kernels under Triton's
interpreter, the resources section compiling a few variants for sm_90), one
case each (--smoke), and each one must end "ok". It runs as on the GPU
machine, whose python3 has no deepspeed, datasets or setuptools: none of them
can be imported, in the check or its subprocesses.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from fastted.ops.registry import kernel_ops

HERE = os.path.dirname(os.path.abspath(__file__))
ABSENT_ON_GPU_MACHINE = ("deepspeed", "datasets", "setuptools")
# On PYTHONPATH as sitecustomize, run at the start of every Python process: the path finder no longer sees
# those packages, so importing one fails and importlib.util.find_spec answers None, as where they are absent.
BLOCKER = f"""import sys
from importlib.machinery import PathFinder


class PathFinderWithout(PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in {ABSENT_ON_GPU_MACHINE!r}:
            return None
        return super().find_spec(name, path, target)


sys.meta_path[:] = [PathFinderWithout if finder is PathFinder else finder for finder in sys.meta_path]
"""


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU, run the check itself")
def test_gpu_check_cpu_smoke(tmp_path):
    out = tmp_path / "check.json"
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "gpu_check.py"), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
        env=dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path),
    )
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    # the sections of every op that declares them (fastted.ops.registry), in the registry's order
    ops = kernel_ops()
    benchmarked = [op for op in ops if importlib.util.find_spec(op.benchmark) is not None]
    expected = (
        ["recipes"]
        + [f"correctness:{op.gpu.name}" for op in ops if op.gpu.cases is not None]
        + ["autotune", "resources", "ceilings"]
        + [f"bench:{op.gpu.name}" for op in benchmarked]
        + [f"blocks:{op.gpu.name}" for op in benchmarked if op.gpu.blocks is not None]
    )
    assert list(result["sections"]) == expected
    assert {
        "correctness:logit_kd",
        "correctness:pool_states",
        "bench:pooled_distance",
        "blocks:fused_linear_kd",
    } <= set(expected)
    not_ok = {name: s.get("error", s.get("failed")) for name, s in result["sections"].items() if s["status"] != "ok"}
    assert not not_ok, not_ok
    assert proc.returncode == 0, proc.stdout[-3000:]
    for name, section in result["sections"].items():
        assert section["seconds"] >= 0 and section["data"], name
    assert result["sections"]["resources"]["data"]["rows"]
    assert all(run["floor_ms"] > 0 for run in result["sections"]["bench:filtered_mse"]["data"])
    assert "matmul_tflops" in result["sections"]["ceilings"]["data"]
    blocks = result["sections"]["blocks:fused_linear_kd"]["data"]
    assert blocks[0]["chunk_size"] == "default" and all(row["full_ms"] > 0 for row in blocks)
