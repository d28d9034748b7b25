"""The whole GPU check of fastted, in one run built for a short window (see shared GPU.md).

Sections, in order, each timed, each written to the result file as soon as it
ends (a crash or a time-out keeps what was measured), each run even when one
before it failed, each skipped when the time budget (--budget, seconds) left
is below its estimate:

1. recipes: every recipe (TED, LWD, KD, CoDIR, RAIL-KD, DWT) on tiny BERT and
   GPT-2 models in bf16 and fp16 through the kernels, against itself in
   float64 (the tests' check).
2. correctness:<loss>: each loss in bf16 and fp16 against float64 references,
   with the test suite's own checks, on the tests' shapes and a realistic one.
3. autotune: the first call of every autotuned kernel (the autotuner's sweep
   runs every config on the call's own buffers) against its second call and
   the reference.
4. resources: the compile tier's table read back on the device: every
   variant compiled for this GPU and loaded, registers, spills and shared
   memory from the loaded binaries, against the table compiled without a GPU.
5. ceilings: a large bf16 matmul (TFLOP/s) and a device-to-device copy (GB/s).
6. bench:<loss>: fastted vs eager PyTorch vs torch.compile (vs Liger where
   installed) at the benchmark sizes, forward, backward and full step (median
   of triton.testing.do_bench), peak memory beyond the inputs; each
   GEMM-bound loss beside its own GEMM floor (the same GEMMs alone through
   cuBLAS, in the same run), each memory-bound one beside the copy ceiling.
   The fused LM head against Liger-Kernel's chunked (compiled) fused-linear
   JSD loss on both objectives and its Triton LigerFusedLinearJSD on JSD.
7. blocks:<loss>: a blocked loss's full step at several block sizes and at
   its default (the fused LM head at V = 128,256): does the block rule pick a
   block whose GEMMs are compute-bound on this GPU?

The losses, their checks, benchmarks, floors and block sweeps are what each
op declares of itself (``KERNEL_OP`` of ``fastted/ops/<op>.py``, read through
:mod:`fastted.ops.registry`); its checks and benchmark are the modules of its
name, ``tests/ops/test_<op>.py`` and ``benchmarks/test_<op>.py``. This script
names no op.

On a CPU it runs the same sections at the small sizes, the kernels under
Triton's interpreter and the resources section compiling (not loading) a few
variants, which checks the script, not the GPU; CI runs it so (``--smoke``
keeps one case per section).

    python3 benchmarks/gpu_check.py     # budget 420 s by default
    python3 benchmarks/gpu_check.py --only autotune resources --budget 120

It runs from the checkout without installing fastted: the repository root goes
on sys.path (and PYTHONPATH, for its subprocesses), where
``fastted.kernels`` reads the kernels from ``kernels/``. It imports torch,
triton, transformers, numpy and pytest, nothing of the engine (no deepspeed,
no datasets) and no setuptools, so it starts with the GPU machine's own
python3 (Python 3.12, torch 2.11, triton 3.6, transformers 5.17, reaching
no package index) and nothing carried to it; benchmarks/test_gpu_check.py
runs it with those three unimportable. Optional wheels, built for Python 3.12
by ``scripts/gpu_wheels.sh`` into ``build/gpu-wheels`` and installed there
with ``python3 -m pip install --no-index --no-deps build/gpu-wheels/*.whl``:
liger-kernel 0.8.5 (the Liger baselines of the fused LM head's bench; skipped
without it) and setuptools 84.2.1 (only for ``pip install --no-deps
--no-build-isolation -e .``, which the check does not need).

The per-section estimates in ``sections()`` (about 7 minutes in all on an
H100/H200) are estimates until a GPU has run it: the result file records what
each section took.
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
import tempfile
import time
import traceback

import torch

CUDA = torch.cuda.is_available()
if not CUDA:  # before Triton is imported: the kernels run under the interpreter on a CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)  # the repository root: fastted (installed or not), the tests and benchmarks packages
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)  # subprocesses

import triton  # noqa: E402

import fastted  # noqa: E402
from benchmarks.memory import cuda_peak_extra_mb  # noqa: E402
from fastted.ops.registry import kernel_ops  # noqa: E402
from tests.methods import test_methods as t_methods  # noqa: E402

IMPL = "triton"  # on a CPU, under the interpreter
DEVICE = torch.device("cuda" if CUDA else "cpu")
LOW_PRECISION = (torch.bfloat16, torch.float16)


def _module(name: str):
    """An op's tests or benchmark module (its checks are the one definition of "correct"); None if absent."""
    return importlib.import_module(name) if importlib.util.find_spec(name) is not None else None


# Every declared op by its sections' name: those with checks of their own, with a benchmark, with a block sweep.
OPS = {op.gpu.name: op for op in kernel_ops()}
CHECKED = [name for name, op in OPS.items() if op.gpu.cases is not None]
SUITES = {name: bench for name, op in OPS.items() if (bench := _module(op.benchmark)) is not None}
BLOCKED = [name for name in SUITES if OPS[name].gpu.blocks is not None]


def bench_ms(fn, setup=None) -> float:
    """Median milliseconds of fn(); setup() runs untimed before each call when given."""
    if CUDA and setup is None:
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    times = []
    for _ in range(10 if CUDA else 3):
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


def checked(label: dict, check) -> dict:
    """Runs one check: the label with ok, and the assertion's message when it failed."""
    try:
        check()
        return dict(label, ok=True)
    except AssertionError as err:
        return dict(label, ok=False, error=str(err)[:2000])


# --------------------------------------------------------------------------- correctness


def _cases(cases: list, smoke: bool) -> list:
    return cases[:1] if smoke else cases


def correctness_recipes(smoke: bool) -> list[dict]:
    """Every recipe on tiny BERT / GPT-2 models in bf16 and fp16 through the kernels, against float64."""
    cases = [
        (dtype, task, name, recipe)
        for dtype in LOW_PRECISION
        for task in t_methods.TASKS
        for name, recipe in t_methods.recipes_of(task)
    ]
    return [
        checked(
            dict(recipe=name, task=task, dtype=str(dtype)),
            lambda: t_methods.check_recipe_lowp(recipe, task, dtype, DEVICE, IMPL if CUDA else "auto"),
        )
        for dtype, task, name, recipe in _cases(cases, smoke)
    ]


def _loss_cases(loss: str, dtype) -> list[tuple[dict, object]]:
    """(label, check) of one loss in one dtype: the tests' checks (on a GPU also at a realistic shape)."""
    op = OPS[loss]
    return op.gpu.cases(_module(op.tests), dtype, IMPL, CUDA)


def correctness(loss: str, smoke: bool) -> list[dict]:
    """One loss's checks in bf16 and fp16."""
    cases = [(dict(label, dtype=str(dtype)), fn) for dtype in LOW_PRECISION for label, fn in _loss_cases(loss, dtype)]
    return [checked(label, fn) for label, fn in _cases(cases, smoke)]


def autotune_first_calls(smoke: bool) -> list[dict]:
    """Every autotuned kernel's first call of a new key against its second and the reference (each op's
    declared cases; on a CPU the interpreter's autotuner is told to sweep)."""
    return [
        checked(label, fn)
        for op in OPS.values()
        if op.gpu.autotune is not None
        for label, fn in op.gpu.autotune(_module(op.tests), smoke, CUDA)
    ]


# --------------------------------------------------------------------------- resources on the device


def resources(smoke: bool) -> dict:
    """The compile tier's variants for this GPU, compiled and loaded: the table from the binaries.

    On a CPU (no binary to load) a few variants are compiled for sm_90 in a
    process without the interpreter, which exercises the same code.
    """
    if not CUDA:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "table.json")
            env = dict(os.environ, TRITON_INTERPRET="0")
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "fastted.kernels.resources",
                    "--arch",
                    "sm_90",
                    "--limit",
                    "4",
                    "--workers",
                    "1",
                    "--out",
                    out,
                ],
                check=True,
                env=env,
                capture_output=True,
                text=True,
            )
            with open(out) as f:
                table = json.load(f)
        return dict(rows=table["rows"], problems=table["problems"], loaded=False)
    from fastted.kernels import device_arch
    from fastted.kernels import resources as tier

    arch = device_arch(DEVICE)
    rows = tier.table_on_device(arch, limit=8 if smoke else None)
    return dict(arch=arch.name, rows=rows, problems=[p for row in rows for p in tier.problems(row, arch)], loaded=True)


# --------------------------------------------------------------------------- ceilings, floors, timings


def ceilings() -> dict:
    n = 8192 if CUDA else 512
    a = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16 if CUDA else torch.float32)
    x = torch.randn(64 * 2**20 // 4 if CUDA else 2**20, device=DEVICE)
    y = torch.empty_like(x)
    return dict(
        matmul_tflops=2 * n**3 / bench_ms(lambda: a @ a) / 1e9,
        copy_gbs=2 * x.numel() * x.element_size() / bench_ms(lambda: y.copy_(x)) / 1e6,
    )


def gemms(loss: str, size: dict) -> list[tuple[int, int, int]] | None:
    """The (m, k, n) GEMMs of one full training step of a GEMM-bound loss; None for a memory-bound one."""
    declared = OPS[loss].gpu.gemms
    return None if declared is None else declared(size)


def gemm_floor_ms(shapes, dtype) -> float:
    """Milliseconds of the same GEMMs alone through torch (cuBLAS on a GPU), one after the other."""
    ops = [
        (torch.randn(m, k, device=DEVICE, dtype=dtype), torch.randn(k, n, device=DEVICE, dtype=dtype))
        for m, k, n in shapes
    ]
    return bench_ms(lambda: [a @ b for a, b in ops])


def min_bytes(loss: str, size: dict, extra: dict) -> int:
    """The least memory a full step of a memory-bound loss must move."""
    return OPS[loss].gpu.min_bytes(size, extra)


def _sizes(module) -> list[str]:
    sizes = module.SIZES
    if "on" not in next(iter(sizes.values())):
        return ["realistic" if CUDA else "small"]
    return [name for name, s in sizes.items() if s["on"] == ("gpu" if CUDA else "cpu")]


def _variants(loss: str, module) -> list[dict]:
    return OPS[loss].gpu.variants(module)


def bench(loss: str, smoke: bool, ceiling: dict) -> list[dict]:
    """fastted, eager and torch.compile (and Liger) side by side at the suite's sizes, with the floor."""
    module = SUITES[loss]
    liger = CUDA and importlib.util.find_spec("liger_kernel") is not None
    runs = []
    for size_name in _sizes(module)[: 1 if smoke else None]:
        size = module.SIZES[size_name]
        for extra in _variants(loss, module)[: 1 if smoke else None]:
            impls = ["fastted", "eager", "compile"]
            if liger and OPS[loss].gpu.liger is not None:  # Liger's implementations of the same loss
                impls += OPS[loss].gpu.liger(extra)
            run = dict(size=size_name, sizes=size, **extra, timings=[])
            shapes = gemms(loss, size)
            if shapes is not None:
                run["floor_ms"] = gemm_floor_ms(shapes, getattr(torch, size["dtype"]))
                run["floor_tflops"] = sum(2 * m * k * n for m, k, n in shapes) / run["floor_ms"] / 1e9
            else:
                run["min_bytes"] = min_bytes(loss, size, extra)
                run["floor_ms"] = run["min_bytes"] / ceiling["copy_gbs"] / 1e6
            for impl in impls[: 2 if smoke else None]:
                case = module.make_case(impl, size_name, DEVICE, **extra)
                for _ in range(2):  # warm-up: autotuning, compilation, allocator
                    case.full()
                row = dict(
                    impl=impl,
                    forward_ms=bench_ms(case.forward),
                    backward_ms=bench_ms(case.backward, setup=case.prepare_backward),
                    full_ms=bench_ms(case.full),
                )
                row["x_floor"] = row["full_ms"] / run["floor_ms"]
                del case
                if CUDA:
                    row["peak_extra_mib"] = cuda_peak_extra_mb(module.step(impl, size_name, "full", "cuda", **extra))
                    torch.cuda.empty_cache()
                run["timings"].append(row)
            runs.append(run)
    return runs


# --------------------------------------------------------------------------- the run


def blocks(loss: str, smoke: bool) -> list[dict]:
    """A blocked loss's full step at several block sizes and at its default, at the size it declares (the fused
    LM head's JSD at V = 128,256 on a GPU): where the GEMMs stop paying for re-reading the heads on this GPU
    (the default's rule, checked)."""
    module = SUITES[loss]
    gpu_size, cpu_size, extra = OPS[loss].gpu.blocks
    size_name = gpu_size if CUDA else cpu_size
    size = module.SIZES[size_name]
    default = module.default_rows(size_name, DEVICE)
    rows = []
    for chunk in (["default"] + module.BLOCKS)[: 2 if smoke else None]:
        if chunk != "default" and chunk >= size["n_rows"]:
            continue
        case = module.make_case("fastted", size_name, DEVICE, chunk_size=chunk, **extra)
        case.full()
        row = dict(chunk_size=chunk, rows=default if chunk == "default" else chunk, full_ms=bench_ms(case.full))
        del case
        if CUDA:
            row["peak_extra_mib"] = cuda_peak_extra_mb(
                module.step("fastted", size_name, "full", "cuda", chunk_size=chunk, **extra)
            )
            torch.cuda.empty_cache()
        rows.append(row)
    return rows


def sections(smoke: bool) -> list[tuple[str, float, object]]:
    """(name, estimated seconds on an H100, function of the results so far) in the order they run."""
    out = [("recipes", 40, lambda r: correctness_recipes(smoke))]
    out += [(f"correctness:{loss}", 25, lambda r, loss=loss: correctness(loss, smoke)) for loss in CHECKED]
    out += [
        ("autotune", 20, lambda r: autotune_first_calls(smoke)),
        ("resources", 60, lambda r: resources(smoke)),
        ("ceilings", 5, lambda r: ceilings()),
    ]
    out += [
        (f"bench:{loss}", 30, lambda r, loss=loss: bench(loss, smoke, r["sections"]["ceilings"]["data"]))
        for loss in SUITES
    ]
    out += [(f"blocks:{loss}", 20, lambda r, loss=loss: blocks(loss, smoke)) for loss in BLOCKED]
    return out


def failures(data) -> list:
    """The failed checks of a section's data."""
    if isinstance(data, list):
        return [c for c in data if isinstance(c, dict) and c.get("ok") is False]
    if isinstance(data, dict):
        return list(data.get("problems", []))
    return []


def write(result: dict, out: str) -> None:
    """Atomically: a kill mid-write leaves the previous file."""
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, out)


BENCH_KEYS = ("size", "sizes", "timings", "floor_ms", "floor_tflops", "min_bytes")


def summary(result: dict) -> None:
    print(f"\n{result['device']}, torch {result['torch']}, triton {result['triton']}")
    for name, sec in result["sections"].items():
        bad = sec.get("failed", [])
        print(f"{name:28s} {sec['status']:8s} {sec['seconds']:6.1f} s  {len(bad)} failed")
        for b in bad[:5]:
            print(f"    {b}")
        if name.startswith("bench:") and sec["status"] == "ok":
            for run in sec["data"]:
                label = " ".join(str(v) for k, v in run.items() if k not in BENCH_KEYS)  # the variant
                by = {row["impl"]: row for row in run["timings"]}
                line = "  ".join(
                    f"{impl} {row['full_ms']:.3f} ms ({row['x_floor']:.2f}x floor)" for impl, row in by.items()
                )
                print(f"    {run['size']} {label}: {line}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for the whole run (default 420)")
    parser.add_argument("--only", nargs="+", help="run only these sections (names as in the summary)")
    parser.add_argument("--smoke", action="store_true", help="one case per section: checks the script")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    start = time.monotonic()
    name = torch.cuda.get_device_name() if CUDA else "cpu"
    try:  # a copy of the tree without .git, or a machine without git: no commit, but the check runs
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
    except OSError:
        commit = ""
    result = dict(
        device=name,
        torch=torch.__version__,
        triton=triton.__version__,
        fastted=fastted.__version__,
        commit=commit,
        date=datetime.date.today().isoformat(),
        budget_s=args.budget,
        smoke=args.smoke,
        liger=importlib.util.find_spec("liger_kernel") is not None,
        sections={},
    )
    out = args.out or os.path.join(HERE, "results", f"{result['date']}-{name.replace(' ', '-').lower()}-gpu-check.json")
    for section, estimate, fn in sections(args.smoke):
        if args.only and section not in args.only:
            continue
        left = args.budget - (time.monotonic() - start)
        if left < estimate and not args.smoke:
            result["sections"][section] = dict(
                status="skipped", seconds=0.0, reason=f"{left:.0f} s of the budget left, {estimate} s estimated"
            )
        else:
            began = time.monotonic()
            try:
                data = fn(result)
                bad = failures(data)
                entry = dict(status="failed" if bad else "ok", data=data, failed=bad)
            except Exception:  # a broken section is reported and the run goes on
                entry = dict(status="error", error=traceback.format_exc()[-4000:], failed=["exception"])
            entry["seconds"] = round(time.monotonic() - began, 1)
            result["sections"][section] = entry
            if CUDA:
                torch.cuda.empty_cache()
        result["seconds"] = round(time.monotonic() - start, 1)
        write(result, out)  # after every section
    summary(result)
    print(f"wrote {out} ({result['seconds']} s)")
    return 0 if all(s["status"] in ("ok", "skipped") for s in result["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
