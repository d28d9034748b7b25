"""benchmarks/gpu_check.py in its CPU mode, as CI runs it: every section runs and its result file is whole.

A GPU is lent for minutes; a script that broke since its last run would waste
them. On a CPU the sections run at the small sizes (the kernels under Triton's
interpreter, the resources section compiling a few variants for sm_90), one
case each (--smoke), and each one must end "ok".
"""
import json
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU, run the check itself")
def test_gpu_check_cpu_smoke(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, os.path.join(HERE, "gpu_check.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, env=dict(os.environ, TRITON_INTERPRET="1"))
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    expected = ["recipes", "correctness:filtered_mse", "correctness:logit_kd", "correctness:fused_linear_kd",
                "correctness:contrastive_kd", "correctness:pool_states", "autotune", "resources", "ceilings",
                "bench:filtered_mse", "bench:logit_kd", "bench:fused_linear_kd", "bench:contrastive_kd",
                "bench:pool_states", "bench:pooled_distance", "blocks:fused_linear_kd"]
    assert list(result["sections"]) == expected
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
