"""The compile tier: every launch variant of every kernel compiled for sm_80 and sm_90 without a GPU.

The table is built once per session by ``python -m fastted.kernels.resources``
in a process without Triton's interpreter (the tests' own process runs the
kernels under it, where ``@triton.jit`` makes interpreted functions that do
not compile); the tests read its rows. A kernel change that overflows shared
memory, spills, stops compiling or computes an offset of a size or stride in
32 bits fails here. ``known_bad.py`` shows each check failing on a defect
this project once had.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KERNELS = ["filtered_mse_fwd_kernel", "logit_kd_kernel", "sparse_kd_kernel", "contrastive_partials_kernel",
           "contrastive_finalize_kernel", "mean_pool_fwd_kernel", "mean_pool_bwd_kernel"]
ARCHS = ["sm_80", "sm_90"]


def _compiled(tmp_path_factory, module, *args) -> dict:
    out = tmp_path_factory.mktemp("compile") / "out.json"
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, *module, "--out", str(out), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert out.exists(), f"no table written (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    with open(out) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def tier(tmp_path_factory) -> dict:
    return _compiled(tmp_path_factory, ["-m", "fastted.kernels.resources"])


@pytest.fixture(scope="module")
def known_bad(tmp_path_factory) -> dict:
    return _compiled(tmp_path_factory, [os.path.join(ROOT, "tests", "kernels", "known_bad.py")])


def _rows(tier, kernel, arch):
    rows = [r for r in tier["rows"] if r["kernel"] == kernel and r["arch"] == arch]
    assert rows, f"no variant of {kernel} recorded for {arch}"
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kernel", KERNELS)
def test_every_variant_compiles_fits_and_does_not_spill(tier, kernel, arch):
    """Compiles; shared memory within the block limit; no spills (none are allowed); int64 offsets;
    grids within CUDA's limits at the largest sizes the API takes."""
    from fastted.kernels import ARCHS as LIMITS
    from fastted.kernels.resources import problems

    rows = _rows(tier, kernel, arch)
    bad = [p for row in rows for p in problems(row, LIMITS[arch])]
    assert not bad, "\n".join(bad)
    assert all(row["blocks_per_sm"] >= 1 for row in rows)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_every_autotune_config_of_each_dtype_is_compiled(tier, arch):
    """The autotuner may pick any config its pruning keeps: each one is in the table, for every dtype."""
    from fastted.kernels import ARCHS as LIMITS
    from fastted.kernels import filtered_mse
    from fastted.kernels.resources import config_label

    import torch

    rows = _rows(tier, "filtered_mse_fwd_kernel", arch)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        configs = filtered_mse.configs_for(dtype, LIMITS[arch])
        assert configs
        compiled = {r["config"] for r in rows if r["dtype"] == str(dtype)}
        for config in configs:
            label = config_label(config.all_kwargs())
            assert label in compiled, f"{dtype} config {label} not compiled for {arch}"


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_aligned_rows_load_128_bits(tier, arch):
    """Pooling (aligned layers) and the logit kernel on aligned rows use vector loads; the logit kernel on
    BERT's 30,522-wide unpadded rows cannot, which is why the fused LM head pads its logits buffers."""
    pool = _rows(tier, "mean_pool_fwd_kernel", arch)
    assert all(r["vector_loads"] for r in pool if r["example"]["size"] != "odd")
    logits = _rows(tier, "logit_kd_kernel", arch)
    padded = [r for r in logits if r["example"]["padded"] or r["example"]["size"] == "llama3"]
    assert padded and all(r["vector_loads"] for r in padded)
    bert = [r for r in logits if r["example"]["size"] == "bert" and not r["example"]["padded"]]
    assert bert and not any(r["vector_loads"] for r in bert)


@pytest.mark.slow
def test_table_is_committed(tier):
    """The committed resource table lists the variants compiled now (regenerate it after a kernel change:
    python -m fastted.kernels.resources --out benchmarks/results/compile-tier.json)."""
    path = os.path.join(ROOT, "benchmarks", "results", "compile-tier.json")
    with open(path) as f:
        committed = json.load(f)
    key = lambda r: (r["kernel"], r["arch"], r["dtype"], r["config"], json.dumps(r["example"], sort_keys=True))
    missing = {key(r) for r in tier["rows"]} - {key(r) for r in committed["rows"]}
    assert not missing, f"{len(missing)} variants missing from {path}, e.g. {sorted(missing)[:3]}"
    assert not committed["problems"]


@pytest.mark.slow
def test_checks_fail_on_known_defects(known_bad):
    """Each check fails on a defect the kernels once had: the contrastive kernel's old block rule with an
    fp32 bank at D = 768 (330 KB of shared memory), the old fp32 filtered-MSE tile (spills), an offset
    computed as an int32 product of a stride."""
    by_name = {row["name"]: row for row in known_bad["rows"]}
    assert any("shared memory" in p for p in by_name["contrastive fp32 bank, old blocks"]["problems"])
    assert any("spills" in p for p in by_name["filtered_mse fp32, 128x256 tile"]["problems"])
    assert any("32-bit products" in p for p in by_name["int32 stride product"]["problems"])
    assert not by_name["int64 stride product"]["problems"]


def test_int32_products_of_arguments_are_found():
    """The TTIR scan flags a 32-bit multiply by a kernel argument, splatted or not, and nothing else."""
    from fastted.kernels.resources import int32_arg_products

    ttir = """
    tt.func public @k(%x_ptr: !tt.ptr<f32> {tt.divisibility = 16 : i32}, %stride: i32, %N: i32) {
    %rows = tt.make_range {end = 64 : i32, start = 0 : i32} : tensor<64xi32> loc(#loc12)
    %x_1 = tt.splat %stride : i32 -> tensor<64xi32> loc(#loc14)
    %x_2 = arith.muli %rows, %x_1 : tensor<64xi32> loc(#loc14)
    %x_3 = arith.muli %N, %c4_i32 : i32 loc(#loc1)
    %x_4 = arith.muli %rows, %rows : tensor<64xi32> loc(#loc2)
    %x_5 = arith.muli %x_6, %x_7 : tensor<64xi64> loc(#loc3)
    """
    assert len(int32_arg_products(ttir)) == 2
