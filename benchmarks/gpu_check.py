"""The whole GPU check of the fused filtered MSE, in one run (see shared GPU.md).

1. Correctness in bf16 and fp16 on the GPU against float64 references: every
   case of the test suite's table (TED, LWD, identity, ...), loss and every
   gradient, within twice PyTorch's own error in that dtype plus a small slack.
2. Ceilings measured in the same run: a bf16 torch matmul of the step's FLOP
   count (TFLOP/s) and a device-to-device copy (GB/s).
3. fastted vs eager PyTorch vs torch.compile at the issue's size: forward,
   backward and full step (median of triton.testing.do_bench), achieved
   TFLOP/s, peak memory beyond inputs and weights.

It prints a short table last and writes everything to
benchmarks/results/<date>-<gpu>.json (or --out). On a CPU it runs the same
steps at a small size on the CPU paths, which checks the script, not the GPU.

    pip install --no-deps -e . && python benchmarks/gpu_check.py
"""
from __future__ import annotations

import argparse
import datetime
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
from benchmarks._memory import cuda_peak_extra_mb  # noqa: E402
from benchmarks.test_filtered_mse import SIZES, make_case, step  # noqa: E402
from tests import test_filtered_mse as tests  # noqa: E402  (one definition of "correct")


def bench_ms(fn, setup=None) -> float:
    """Median milliseconds of fn(); setup() runs untimed before each call when given."""
    if torch.cuda.is_available() and setup is None:
        return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
    times = []
    for _ in range(10 if not torch.cuda.is_available() else 30):
        if setup is not None:
            setup()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def correctness(dtypes) -> list[dict]:
    results = []
    for dtype in dtypes:
        for case in tests.CASES:
            for shape in tests.SHAPES + [((4, 512), 768, 1024, 1024)]:
                for impl in ("triton",) if torch.cuda.is_available() else ("reference",):
                    entry = dict(case=case, shape=str(shape), dtype=str(dtype), impl=impl)
                    try:
                        tests._check_filtered_mse(case, shape, dtype, "random", 3, impl)
                        entry["ok"] = True
                    except AssertionError as err:
                        entry.update(ok=False, error=str(err))
                    results.append(entry)
    return results


def ceilings(size: dict, device: torch.device) -> dict:
    n, layers, d_s, d_t, d_f = (size[k] for k in ("n_tokens", "n_layers", "d_s", "d_t", "d_f"))
    dtype = getattr(torch, size["dtype"])
    k = 3 * d_s + d_t  # the full step's FLOPs: 2 N d_f (d_s + d_t) forward + 2 * 2 N d_f d_s backward
    a = torch.randn(n, k, device=device, dtype=dtype)
    b = torch.randn(k, d_f, device=device, dtype=dtype)
    flops = 2 * n * k * d_f * layers
    ms = bench_ms(lambda: [torch.mm(a, b) for _ in range(layers)])
    x = torch.randn(64 * 2**20 // 2, device=device, dtype=dtype)  # 64 MiB
    y = torch.empty_like(x)
    copy_ms = bench_ms(lambda: y.copy_(x))
    return dict(
        matmul_flops=flops, matmul_ms=ms, matmul_tflops=flops / ms / 1e9,
        copy_bytes=2 * x.numel() * x.element_size(), copy_ms=copy_ms,
        copy_gbs=2 * x.numel() * x.element_size() / copy_ms / 1e6,
    )


def timings(size_name: str, device: torch.device, flops: int) -> list[dict]:
    rows = []
    for impl in ("fastted", "eager", "compile"):
        case = make_case(impl, size_name, device)
        for _ in range(3):  # warm-up: autotuning, compilation, allocator
            case.full()
        row = dict(
            impl=impl,
            forward_ms=bench_ms(case.forward),
            backward_ms=bench_ms(case.backward, setup=case.prepare_backward),
            full_ms=bench_ms(case.full),
        )
        row["full_tflops"] = flops / row["full_ms"] / 1e9
        del case
        if device.type == "cuda":
            row["forward_peak_extra_mib"] = cuda_peak_extra_mb(step(impl, size_name, "forward", "cuda"))
            row["peak_extra_mib"] = cuda_peak_extra_mb(step(impl, size_name, "full", "cuda"))
            torch.cuda.empty_cache()
        rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    size_name = args.size or ("realistic" if cuda else "small")
    size = SIZES[size_name]
    name = torch.cuda.get_device_name() if cuda else "cpu"
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()

    checks = correctness([torch.bfloat16, torch.float16])
    ceil = ceilings(size, device)
    rows = timings(size_name, device, ceil["matmul_flops"])
    result = dict(
        device=name, torch=torch.__version__, triton=triton.__version__, fastted=fastted.__version__,
        commit=commit, date=datetime.date.today().isoformat(), size=size_name, sizes=size,
        correctness=checks, ceilings=ceil, timings=rows,
    )
    out = args.out or os.path.join(
        HERE, "results", f"{result['date']}-{name.replace(' ', '-').lower()}-filtered-mse.json"
    )
    with open(out, "w") as f:
        json.dump(result, f, indent=1)

    failed = [c for c in checks if not c["ok"]]
    print(f"\n{name}, torch {torch.__version__}, triton {triton.__version__}, size {size_name} {size}")
    print(f"correctness: {len(checks) - len(failed)}/{len(checks)} cases within tolerance")
    for c in failed:
        print(f"  FAILED {c['case']} {c['shape']} {c['dtype']}: {c['error']}")
    print(f"ceilings: {size['dtype']} matmul {ceil['matmul_tflops']:.1f} TFLOP/s, copy {ceil['copy_gbs']:.1f} GB/s")
    print(f"{'impl':8s} {'fwd ms':>9s} {'bwd ms':>9s} {'full ms':>9s} {'TFLOP/s':>8s} {'% mm':>6s} {'peak MiB':>9s}")
    for r in rows:
        print(f"{r['impl']:8s} {r['forward_ms']:9.3f} {r['backward_ms']:9.3f} {r['full_ms']:9.3f} "
              f"{r['full_tflops']:8.1f} {100 * r['full_tflops'] / ceil['matmul_tflops']:5.0f}% "
              f"{r.get('peak_extra_mib', float('nan')):9.1f}")
    fused, eager, compiled = rows
    print(f"full step: {eager['full_ms'] / fused['full_ms']:.2f}x eager (target 1.5x), "
          f"{compiled['full_ms'] / fused['full_ms']:.2f}x torch.compile (target 1.15x)")
    if cuda:
        print(f"peak memory: {fused['peak_extra_mib'] / eager['peak_extra_mib']:.2f} of eager's (target 0.5)")
    print(f"wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
