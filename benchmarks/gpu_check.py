"""The whole GPU check of fastted's fused losses, in one run (see shared GPU.md).

First, every recipe (TED, LWD, KD, CoDIR, RAIL-KD, DWT) on tiny BERT and
GPT-2 models in bf16 and fp16 through the kernels, against itself in float64
(the tests' check). Then, for each loss (filtered_mse, logit_kd,
fused_linear_kd, contrastive_kd; --loss picks some):

1. Correctness in bf16 and fp16 on the GPU against float64 references: the
   test suite's own checks (loss and every gradient, within twice PyTorch's
   own error in that dtype plus a small slack), on the tests' shapes and on
   one realistic shape.
2. Ceilings measured in the same run: a bf16 torch matmul of the step's FLOP
   count (TFLOP/s) and a device-to-device copy (GB/s).
3. fastted vs eager PyTorch vs torch.compile (vs Liger-Kernel's fused-linear
   JSD where installed) at the issue's sizes: forward, backward and full step
   (median of triton.testing.do_bench), achieved TFLOP/s (GEMM losses) or
   GB/s (logit_kd, which is memory-bound), peak memory beyond the inputs.

It prints a short table per loss and writes everything to
benchmarks/results/<date>-<gpu>-gpu-check.json (or --out). On a CPU it runs
the same steps at the small sizes on the CPU paths, which checks the script,
not the GPU.

    pip install --no-deps -e . && python benchmarks/gpu_check.py
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repository root: the tests and benchmarks packages

import triton  # noqa: E402

import fastted  # noqa: E402
from benchmarks import test_contrastive_kd, test_filtered_mse, test_fused_linear_kd, test_logit_kd  # noqa: E402
from benchmarks.memory import cuda_peak_extra_mb  # noqa: E402
from tests.ops import test_filtered_mse as t_mse  # noqa: E402  (one definition of "correct")
from tests.ops import test_fused_linear_kd as t_flkd  # noqa: E402
from tests.ops import test_contrastive_kd as t_ckd  # noqa: E402
from tests.ops import test_logit_kd as t_lkd  # noqa: E402
from tests.methods import test_methods as t_methods  # noqa: E402
from tests.ops import test_pooling as t_pool  # noqa: E402

CUDA = torch.cuda.is_available()
IMPL = "triton" if CUDA else "reference"


def bench_ms(fn, setup=None) -> float:
    """Median milliseconds of fn(); setup() runs untimed before each call when given."""
    if CUDA and setup is None:
        return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
    times = []
    for _ in range(30 if CUDA else 5):
        if setup is not None:
            setup()
        if CUDA:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if CUDA:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _checked(label: dict, check) -> dict:
    try:
        check()
        return dict(label, ok=True)
    except AssertionError as err:
        return dict(label, ok=False, error=str(err))


# --------------------------------------------------------------------------- correctness, per loss


def correctness_filtered_mse(dtype) -> list[dict]:
    return [
        _checked(dict(case=case, shape=str(shape), dtype=str(dtype)),
                 lambda: t_mse.check_filtered_mse(case, shape, dtype, "random", 3, IMPL))
        for case in t_mse.CASES
        for shape in t_mse.SHAPES + ([((4, 512), 768, 1024, 1024)] if CUDA else [])
    ]


def correctness_logit_kd(dtype) -> list[dict]:
    shapes = t_lkd.SHAPES + ([((8,), 128256)] if CUDA else [])
    return [
        _checked(dict(divergence=div, beta=beta, temperature=temp, shape=str(shape), dtype=str(dtype)),
                 lambda: t_lkd.check_logit_kd(IMPL, shape[0], shape[1], dtype, div, beta, temp))
        for div, beta in t_lkd.DIVERGENCES
        for temp in (1.0, 2.0)
        for shape in shapes
    ]


def correctness_fused_linear_kd(dtype) -> list[dict]:
    shapes = t_flkd.SHAPES + ([((2, 64), 2048, 4096, 128256)] if CUDA else [])
    return [
        _checked(dict(divergence=div, beta=beta, shape=str(shape), dtype=str(dtype)),
                 lambda: t_flkd.check_fused_linear_kd(IMPL, shape, dtype, div, beta))
        for div, beta in t_flkd.DIVERGENCES
        for shape in shapes
    ]


def correctness_contrastive_kd(dtype) -> list[dict]:
    shapes = t_ckd.SHAPES + ([(256, 65536, 128), (256, 4096, 768)] if CUDA else [])
    checks = [
        _checked(dict(part="contrastive_kd", shape=str(shape), per_anchor=per_anchor, labels=labels, dtype=str(dtype)),
                 lambda: t_ckd.check_contrastive_kd(IMPL, *shape, dtype, per_anchor=per_anchor, use_labels=labels))
        for shape in shapes
        for per_anchor in (False, True)
        for labels in (False, True)
        if not (per_anchor and shape[0] * shape[1] * shape[2] > 2**27)  # per-anchor banks of 8 GiB: no
    ]
    pool_shapes = t_pool.SHAPES + ([(256, 128, 768, 12)] if CUDA else [])
    checks += [
        _checked(dict(part="pool_states", shape=str(shape), mask=mask, dtype=str(dtype)),
                 lambda: t_pool.check_pool_states(IMPL, *shape, dtype, "mean", mask))
        for shape in pool_shapes
        for mask in ("random", "right_padding", "one_empty")
    ]
    return checks


def correctness_recipes(dtype) -> list[dict]:
    """Every recipe on tiny BERT / GPT-2 models in ``dtype`` through the kernels, against itself in float64."""
    device = "cuda" if CUDA else "cpu"
    return [
        _checked(dict(recipe=name, task=task, dtype=str(dtype)),
                 lambda: t_methods.check_recipe_lowp(recipe, task, dtype, device, IMPL if CUDA else "auto"))
        for task in t_methods.TASKS
        for name, recipe in t_methods.recipes_of(task)
    ]


# --------------------------------------------------------------------------- ceilings and work


def matmul_ceiling(m: int, k: int, n: int, repeat: int, dtype) -> tuple[int, float]:
    """FLOPs of `repeat` (m x k) @ (k x n) matmuls and their TFLOP/s through torch."""
    device = "cuda" if CUDA else "cpu"
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    flops = 2 * m * k * n * repeat
    return flops, flops / bench_ms(lambda: [torch.mm(a, b) for _ in range(repeat)]) / 1e9


def copy_ceiling() -> float:
    x = torch.randn(64 * 2**20 // 4, device="cuda" if CUDA else "cpu")  # 64 MiB
    y = torch.empty_like(x)
    return 2 * x.numel() * x.element_size() / bench_ms(lambda: y.copy_(x)) / 1e6


def work(loss: str, size: dict, level: str = "states") -> dict:
    """The full step's GEMM FLOPs (and its matmul ceiling), or its minimal memory traffic."""
    dtype = getattr(torch, size["dtype"])
    if loss == "filtered_mse":
        n, layers, d_s, d_t, d_f = (size[k] for k in ("n_tokens", "n_layers", "d_s", "d_t", "d_f"))
        # 2 N d_f (d_s + d_t) forward + 2 * 2 N d_f d_s backward, as one matmul of K = 3 d_s + d_t
        flops, tflops = matmul_ceiling(n, 3 * d_s + d_t, d_f, layers, dtype)
        return dict(flops=flops, matmul_tflops=tflops)
    if loss == "fused_linear_kd":
        n, h_s, h_t, v = (size[k] for k in ("n_rows", "h_s", "h_t", "vocab"))
        # both heads forward + the student's two backward GEMMs: 2 N V (3 H_s + H_t)
        flops, tflops = matmul_ceiling(n, 3 * h_s + h_t, v, 1, dtype)
        return dict(flops=flops, matmul_tflops=tflops)
    if loss == "contrastive_kd":
        # read the bank once (the gradient comes with the forward); from hidden states, also read both models'
        # states and write the student's gradient
        states = size["n_layers"] * size["batch"] * size["seq"] * size["width"]
        return dict(bytes=(size["bank"] * size["proj"] + (3 * states if level == "states" else 0)) * dtype.itemsize)
    n, v = size["n_rows"], size["vocab"]
    return dict(bytes=3 * n * v * dtype.itemsize)  # read s and t, write dLoss/ds: the least a full step moves


# --------------------------------------------------------------------------- timings


def timings(module, impls, size_name: str, extra: dict, w: dict) -> list[dict]:
    device = torch.device("cuda" if CUDA else "cpu")
    rows = []
    for impl in impls:
        case = module.make_case(impl, size_name, device, **extra)
        for _ in range(3):  # warm-up: autotuning, compilation, allocator
            case.full()
        row = dict(
            impl=impl,
            forward_ms=bench_ms(case.forward),
            backward_ms=bench_ms(case.backward, setup=case.prepare_backward),
            full_ms=bench_ms(case.full),
        )
        if "flops" in w:
            row["full_tflops"] = w["flops"] / row["full_ms"] / 1e9
        else:
            row["full_gbs"] = w["bytes"] / row["full_ms"] / 1e6
        del case
        if CUDA:
            row["forward_peak_extra_mib"] = cuda_peak_extra_mb(module.step(impl, size_name, "forward", "cuda", **extra))
            row["peak_extra_mib"] = cuda_peak_extra_mb(module.step(impl, size_name, "full", "cuda", **extra))
            torch.cuda.empty_cache()
        rows.append(row)
    return rows


def _sizes(module) -> list[str]:
    sizes = module.SIZES
    if "on" not in next(iter(sizes.values())):
        return ["realistic" if CUDA else "small"]
    return [name for name, s in sizes.items() if s["on"] == ("gpu" if CUDA else "cpu")]


def suite(loss: str) -> dict:
    module = {"filtered_mse": test_filtered_mse, "logit_kd": test_logit_kd,
              "fused_linear_kd": test_fused_linear_kd, "contrastive_kd": test_contrastive_kd}[loss]
    check = {"filtered_mse": correctness_filtered_mse, "logit_kd": correctness_logit_kd,
             "fused_linear_kd": correctness_fused_linear_kd, "contrastive_kd": correctness_contrastive_kd}[loss]
    result = dict(correctness=[c for dtype in (torch.bfloat16, torch.float16) for c in check(dtype)], runs=[])
    liger = CUDA and importlib.util.find_spec("liger_kernel") is not None
    for size_name in _sizes(module):
        size = module.SIZES[size_name]
        variants = [{}]
        if loss == "fused_linear_kd":
            variants = [dict(objective=o) for o in module.OBJECTIVES]
        if loss == "contrastive_kd":
            variants = [dict(level=level) for level in module.LEVELS]
        for extra in variants:
            w = work(loss, size, extra.get("level", "states"))
            impls = ["fastted", "eager", "compile"] + (["liger"] if liger and extra.get("objective") == "jsd" else [])
            result["runs"].append(dict(size=size_name, sizes=size, **extra, work=w,
                                       timings=timings(module, impls, size_name, extra, w)))
    return result


def report(loss: str, res: dict, copy_gbs: float) -> None:
    failed = [c for c in res["correctness"] if not c["ok"]]
    n = len(res["correctness"])
    print(f"\n== {loss}: correctness {n - len(failed)}/{n} within tolerance")
    for c in failed:
        print(f"  FAILED {c}")
    for run in res["runs"]:
        w = run["work"]
        ceiling = (f"matmul {w['matmul_tflops']:.1f} TFLOP/s" if "flops" in w else f"copy {copy_gbs:.0f} GB/s")
        print(f"-- size {run['size']} {run['sizes']} {run.get('objective', run.get('level', ''))}; ceiling: {ceiling}")
        print(f"{'impl':8s} {'fwd ms':>9s} {'bwd ms':>9s} {'full ms':>9s} {'rate':>9s} {'% ceil':>7s} {'peak MiB':>9s}")
        by = {r["impl"]: r for r in run["timings"]}
        for r in run["timings"]:
            rate = r.get("full_tflops", r.get("full_gbs"))
            ceil = w["matmul_tflops"] if "flops" in w else copy_gbs
            print(f"{r['impl']:8s} {r['forward_ms']:9.3f} {r['backward_ms']:9.3f} {r['full_ms']:9.3f} {rate:9.1f} "
                  f"{100 * rate / ceil:6.0f}% {r.get('peak_extra_mib', float('nan')):9.1f}")
        f = by["fastted"]
        line = f"full step: {by['eager']['full_ms'] / f['full_ms']:.2f}x eager, "
        line += f"{by['compile']['full_ms'] / f['full_ms']:.2f}x torch.compile"
        if "liger" in by:
            line += f", {by['liger']['full_ms'] / f['full_ms']:.2f}x Liger"
        if CUDA:
            line += f"; peak memory {f['peak_extra_mib'] / by['eager']['peak_extra_mib']:.2f} of eager's"
        print(line)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    losses = ["filtered_mse", "logit_kd", "fused_linear_kd", "contrastive_kd"]
    parser.add_argument("--loss", nargs="+", default=losses, choices=losses)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    name = torch.cuda.get_device_name() if CUDA else "cpu"
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
    copy_gbs = copy_ceiling()
    result = dict(
        device=name, torch=torch.__version__, triton=triton.__version__, fastted=fastted.__version__,
        commit=commit, date=datetime.date.today().isoformat(), copy_gbs=copy_gbs,
        liger=importlib.util.find_spec("liger_kernel") is not None, losses={},
    )
    out = args.out or os.path.join(HERE, "results", f"{result['date']}-{name.replace(' ', '-').lower()}-gpu-check.json")
    result["recipes"] = [c for dtype in (torch.bfloat16, torch.float16) for c in correctness_recipes(dtype)]
    for loss in args.loss:
        result["losses"][loss] = suite(loss)
        with open(out, "w") as f:  # after every loss: a later failure keeps what was measured
            json.dump(result, f, indent=1)
    print(f"\n{name}, torch {torch.__version__}, triton {triton.__version__}, copy {copy_gbs:.0f} GB/s")
    for loss, res in result["losses"].items():
        report(loss, res, copy_gbs)
    failed = [c for c in result["recipes"] if not c["ok"]]
    print(f"recipes (TED, LWD, KD, CoDIR, RAIL-KD, DWT x 3 tasks) in bf16 and fp16: "
          f"{len(result['recipes']) - len(failed)}/{len(result['recipes'])} within tolerance")
    for c in failed:
        print(f"  FAILED {c['recipe']} {c['task']} {c['dtype']}: {c['error']}")
    print(f"wrote {out}")
    checks = [c for res in result["losses"].values() for c in res["correctness"]] + result["recipes"]
    return 1 if any(not c["ok"] for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
