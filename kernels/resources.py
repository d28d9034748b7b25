"""The compile tier: every launch variant of fastted's kernels compiled for Ampere and Hopper, without a GPU.

The launchers themselves pick the variants. Inside
:func:`fastted.kernels.recording` they run on meta tensors (nothing is
allocated, nothing launched) for the cases the public API can reach, which
each op declares beside itself (the compile tier of its ``KERNEL_OP``, read
through :mod:`fastted.ops.registry`: this file lists no op), and their
launches are recorded; an autotuned kernel's launch becomes one
variant per config its pruning keeps on that architecture, and heuristics
are resolved as at a launch. Each variant is then bound by Triton's own
argument binder (the same signature, constexprs and divisibility attributes
a launch would get) and compiled with the installed Triton and ptxas for
sm_80 or sm_90(a), which reports registers and spills; shared memory comes
from the compiled metadata.

What is asserted (``problems``): it compiles; the shared memory fits a block
of the architecture; no spills but those expected of the ptxas release that
compiled it (``expected_spills``), none larger than expected; no int32
product of a size or stride argument (an offset that could pass 2^31); every
recorded grid within CUDA's limits, at the largest sizes too (N = 1M tokens,
V = 256k); the loads that should be 128-bit are.

    python -m fastted.kernels.resources --write

writes the committed resource table of the installed Triton (``table_path``:
``compile-tier.json`` for CI's Triton, ``compile-tier-triton<X.Y>.json`` for
another): every variant's kernel, arch, dtype, config, registers, spills,
shared bytes and blocks per SM, the verdicts on the known defects
(``tests/kernels/known_bad.py``), and the table's stamp: what produced it
(``stamp``: the Triton and ptxas versions, a hash of each kernel source, a
hash of each architecture's recorded variants). The tier's test compares the
stamp of the current inputs (``--stamp``, a second's recording on meta
tensors) with the committed one and reads the committed table when they
match; it compiles everything again only when they differ, and then fails
until the table is written again. ``--out FILE`` writes the table elsewhere.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import io
import itertools
import json
import multiprocessing
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.autotuner import Autotuner, Heuristics
from triton.runtime.jit import create_function_from_signature

from fastted.kernels import ARCHS, MAX_GRID, Arch, Launch, recording

# The checkout: kernels/ sits in the repository root (in a wheel, fastted/kernels/: no table there).
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# The Triton release CI installs: its table keeps the name the README cites.
CI_TRITON = "3.9"
# The spills each ptxas release is known to produce, variant by variant: a release not listed may spill nothing.
SPILLS_PATH = RESULTS / "compile-tier-spills.json"
# The defects the checks must catch, compiled with every table (in the checkout only).
KNOWN_BAD_PATH = ROOT / "tests" / "kernels" / "known_bad.py"
WRITE_COMMAND = "python -m fastted.kernels.resources --write"

META = torch.device("meta")
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclasses.dataclass
class Variant:
    """One kernel specialization a launcher can launch: what compiles, and which cases lead to it."""

    kernel: str
    jit: object  # the JITFunction
    args: tuple
    kwargs: dict  # constexprs and compile options (num_warps, num_stages)
    config: str  # the autotune config or launcher choice, for the table
    dtype: str
    cases: list  # the recorded cases (op, sizes, flags) that launch it
    grids: list  # their grids


# --------------------------------------------------------------------------- what the launchers launch


def empty(shape, dtype, stride=None):
    """A meta tensor: what the ops' compile-tier cases pass the launchers (nothing is allocated)."""
    if stride is None:
        return torch.empty(shape, dtype=dtype, device=META)
    return torch.empty_strided(shape, stride, dtype=dtype, device=META)


def reduced(dtype: torch.dtype, size: str) -> bool:
    """Whether a case needs only the covering set's first combination (see :func:`flag_sets`)."""
    return dtype == torch.float16 or size == "odd"


def flag_sets(full: bool, reduced: bool, **flags):
    """The flag combinations to record, each with how many autotune configs to compile ("all" or "first").

    Each flag's values come most-code first. full: every combination, on every config. Otherwise a
    covering set: all flags at their first value on every config, then (unless reduced: fp16, whose code
    is bf16's but for conversions, and odd sizes) each other value of one flag at a time on the first
    (largest) config.
    """
    names = list(flags)
    first = {name: values[0] for name, values in flags.items()}
    if reduced and not full:
        yield first, "all"
        return
    if full:
        for combo in itertools.product(*flags.values()):
            yield dict(zip(names, combo)), "all"
        return
    yield first, "all"
    for name, values in flags.items():
        for value in values[1:]:
            yield dict(first, **{name: value}), "first"


def recorded_launches(arch: Arch, full: bool = False) -> list[tuple[dict, Launch]]:
    """Every launch the launchers make on ``arch`` for the cases the ops declare (their ``KERNEL_OP``'s
    compile tier, in the registry's order), with its case (full: every flag combination, else the covering
    set of :func:`flag_sets`)."""
    from fastted.ops.registry import compiled_ops

    cases = itertools.chain.from_iterable(op.compile.cases(full) for op in compiled_ops())
    out = []
    with recording(arch) as launches:
        for case, run in cases:  # each run as it is yielded: its closure sees that case's tensors
            start = len(launches)
            run()
            out += [(case, launch) for launch in launches[start:]]
    return out


def config_label(kwargs: dict) -> str:
    """The table's name of a launch's choice: its block sizes, group size, warps and stages."""
    return ",".join(
        f"{k}={v}" for k, v in kwargs.items() if k.startswith("BLOCK") or k in ("GROUP_M", "num_warps", "num_stages")
    )


def _unwrap(launch: Launch, arch: Arch):
    """(JITFunction, [(config label, kwargs)]) of a recorded launch: one entry per config kept on arch."""
    kernel, kwargs = launch.kernel, dict(launch.kwargs)
    configs = [None]
    if isinstance(kernel, Autotuner):
        named = dict(zip(kernel.arg_names, launch.args))
        with recording(arch):  # the pruning asks device_arch
            configs = kernel.early_config_prune(kernel.configs, named) if kernel.early_config_prune else kernel.configs
        kernel = kernel.fn
    if isinstance(kernel, Heuristics):
        named = dict(zip(kernel.arg_names, launch.args))
        for name, rule in kernel.values.items():
            kwargs[name] = rule({**named, **kwargs})
        kernel = kernel.fn
    out = []
    for config in configs:
        kw = dict(kwargs, **(config.all_kwargs() if config is not None else {}))
        out.append((config_label(kw), kw))
    return kernel, out


def _grid(launch: Launch, kwargs: dict) -> tuple:
    grid = launch.grid
    if callable(grid):
        grid = grid(kwargs)
    return tuple(grid) + (1,) * (3 - len(grid))


@functools.cache
def _binder(jit, capability: int):
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    return target, backend, create_function_from_signature(jit.signature, jit.params, backend)


def _specialize(jit, args, kwargs, arch: Arch):
    """What a launch of jit(args, kwargs) compiles: (target, signature, constexprs, attrs, options)."""
    target, backend, binder = _binder(jit, arch.capability)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialization, options)
    return target, signature, constexprs, attrs, options


def variants(arch: Arch, full: bool = False) -> list[Variant]:
    """The distinct specializations the recorded launches compile on ``arch`` (sizes that specialize the
    same way share one)."""
    found: dict = {}
    for case, launch in recorded_launches(arch, full):
        jit, entries = _unwrap(launch, arch)
        if case.get("configs") == "first":
            entries = entries[:1]
        for config, kwargs in entries:
            args = launch.args
            _, signature, constexprs, attrs, options = _specialize(jit, args, kwargs, arch)
            key = (
                jit.__name__,
                tuple(signature.items()),
                tuple(sorted(map(repr, constexprs.items()))),
                tuple(sorted(map(repr, attrs.items()))),
                repr(options),
            )
            dtype = case["dtype"]
            if key not in found:
                found[key] = Variant(jit.__name__, jit, args, kwargs, config, dtype, [], [])
            found[key].cases.append(case)
            found[key].grids.append(_grid(launch, kwargs))
    return list(found.values())


# --------------------------------------------------------------------------- the stamp: what a table depends on


@functools.cache
def ptxas_version(arch: str) -> str:
    """The release of the ptxas Triton runs for ``arch`` ("12.9.86"); Triton 3.9 takes a newer one, its
    ``ptxas-blackwell``, from sm_90 on, 3.6 the same one up to sm_100."""
    from triton.backends.nvidia.compiler import get_ptxas

    text = subprocess.check_output([get_ptxas(ARCHS[arch].capability).path, "--version"], text=True)
    return re.search(r"V(\d+\.\d+\.\d+)", text).group(1)


def _release(version: str) -> str:
    return ".".join(version.split(".")[:2])


def source_hashes() -> dict[str, str]:
    """sha256 (16 hex digits) of each file whose text can change a row: the kernel modules (kernels, their
    launchers, this tier's own measuring and checks) and the known defects."""
    files = {f"kernels/{p.name}": p for p in sorted(Path(__file__).parent.glob("*.py")) if p.name != "__init__.py"}
    if KNOWN_BAD_PATH.exists():
        files["tests/kernels/known_bad.py"] = KNOWN_BAD_PATH
    return {name: hashlib.sha256(p.read_bytes()).hexdigest()[:16] for name, p in files.items()}


def _options(options) -> dict:
    """A variant's compile options, machine-independent: libdevice by file name, not by its path."""
    out = dict(vars(options))
    if out.get("extern_libs"):
        out["extern_libs"] = [(name, os.path.basename(path)) for name, path in out["extern_libs"]]
    return out


def launches_hash(arch: Arch, full: bool = False) -> str:
    """sha256 of every variant the launchers record on ``arch``: what compiles (signature, constexprs,
    divisibility attributes, options) and why (config, dtype, cases, grids). Anything that changes a
    launcher's choices (a heuristic, a pruning rule, torch's strides) changes it."""
    digest = hashlib.sha256()
    for v in _variants(arch, full):
        _, signature, constexprs, attrs, options = _specialize(v.jit, v.args, v.kwargs, arch)
        item = [
            v.kernel,
            v.config,
            v.dtype,
            list(signature.items()),
            sorted(map(repr, constexprs.items())),
            sorted(map(repr, attrs.items())),
            _options(options),
            v.cases,
            v.grids,
        ]
        digest.update(json.dumps(item, sort_keys=True, default=repr).encode())
    return digest.hexdigest()[:16]


def stamp(archs=("sm_80", "sm_90"), full: bool = False) -> dict:
    """What the table of ``archs`` depends on; equal stamps, equal tables (compiling is deterministic)."""
    return dict(
        triton=triton.__version__,
        ptxas={a: ptxas_version(a) for a in archs},
        full=full,
        sources=source_hashes(),
        launches={a: launches_hash(ARCHS[a], full) for a in archs},
    )


def stamp_differences(committed: dict | None, current: dict) -> list[str]:
    """What differs between a table's stamp and the current one, in words (empty: they match)."""
    if not committed:
        return ["the table has no stamp"]
    out = []
    for key in ("triton", "full"):
        if committed.get(key) != current[key]:
            out.append(f"{key}: {committed.get(key)} then, {current[key]} now")
    for key in ("ptxas", "launches", "sources"):
        then, now = committed.get(key, {}), current[key]
        changed = sorted(k for k in then.keys() | now.keys() if then.get(k) != now.get(k))
        if changed:
            out.append(f"{key} of {', '.join(changed)}")
    return out


def table_path(version: str = triton.__version__) -> Path:
    """The committed table of a Triton release: CI's keeps the plain name."""
    release = _release(version)
    return RESULTS / ("compile-tier.json" if release == CI_TRITON else f"compile-tier-triton{release}.json")


def row_id(row: dict) -> tuple:
    """A variant's name across tables: kernel, arch, dtype, config, and the first case that launches it."""
    return row["kernel"], row["arch"], row["dtype"], row["config"], json.dumps(row["example"], sort_keys=True)


def expected_spills(ptxas: str) -> dict[tuple, int]:
    """{row id: bytes per thread} the variants ptxas of this release (or "12.8.93") is known to spill."""
    if not SPILLS_PATH.exists():
        return {}
    with open(SPILLS_PATH) as f:
        entry = json.load(f)["releases"].get(_release(ptxas), {})
    return {row_id(r): r["spill_bytes"] for r in entry.get("spills", [])}


def write_expected_spills(rows: list[dict], ptxas: dict[str, str]) -> None:
    """Record the spills of ``rows`` as those expected of the ptxas releases that compiled them (their
    archs' entries replaced, other archs' kept): a deliberate step, reviewed in the diff."""
    expected = {"releases": {}}
    if SPILLS_PATH.exists():
        with open(SPILLS_PATH) as f:
            expected = json.load(f)
    for release in sorted({_release(v) for v in ptxas.values()}):
        archs = {a for a, v in ptxas.items() if _release(v) == release}
        entry = expected["releases"].get(release, {})
        kept = [r for r in entry.get("spills", []) if r["arch"] not in archs]
        new = [
            dict(
                kernel=r["kernel"],
                arch=r["arch"],
                dtype=r["dtype"],
                config=r["config"],
                example=r["example"],
                spill_bytes=r["spill_bytes"],
            )
            for r in rows
            if r["arch"] in archs and r.get("spill_bytes")
        ]
        if kept or new:
            expected["releases"][release] = dict(triton=triton.__version__, spills=kept + new)
        else:
            expected["releases"].pop(release, None)
    expected["about"] = (
        "The spills each ptxas release is known to produce (bytes per thread; the tier fails on "
        "any other, or a larger one; a release not listed may spill nothing). Written by "
        f"{WRITE_COMMAND} --expect-spills under the Triton that ships that ptxas."
    )
    with open(SPILLS_PATH, "w") as f:
        json.dump(dict(about=expected.pop("about"), **expected), f, indent=1)
        f.write("\n")


# --------------------------------------------------------------------------- compiling and reading resources


def occupancy(arch: Arch, registers: int, shared: int, num_warps: int) -> int:
    """Blocks of this kernel one SM holds at once (registers allocated per warp in units of 256)."""
    threads = 32 * num_warps
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = arch.regs_per_sm // (regs_per_warp * num_warps)
    by_threads = arch.max_threads_per_sm // threads
    by_shared = arch.shared_per_sm // shared if shared else arch.max_blocks_per_sm
    return min(by_regs, by_threads, by_shared, arch.max_blocks_per_sm)


# i32 multiplies with an operand that is (a splat of) an i32 kernel argument: a size or stride times an
# index computed in 32 bits, which passes 2^31 on large inputs.
_MULI = re.compile(r"= arith\.muli %([\w#]+), %([\w#]+)[^:]*: (?:tensor<[^>]*xi32>|i32)(?:\s|$)")


def int32_arg_products(ttir: str) -> list[str]:
    """The TTIR lines that multiply an i32 kernel argument (a size or a stride) in 32 bits."""
    args = {name for line in ttir.splitlines() if "tt.func" in line for name in re.findall(r"%(\w+): i32", line)}
    splats = {m.group(1) for m in re.finditer(r"%(\w+) = tt\.splat %(\w+) : i32", ttir) if m.group(2) in args}
    return [
        line.strip()
        for line in ttir.splitlines()
        if (m := _MULI.search(line)) and ({m.group(1), m.group(2)} & (args | splats))
    ]


def compile_variant(variant: Variant, arch: Arch, load: bool = False) -> dict:
    """Compile one variant for arch with Triton's pipeline and ptxas: its row of the resource table.

    Registers and spills come from ptxas's report, or with ``load`` (on a GPU of that architecture) from
    the binary loaded on the device.
    """
    from triton import knobs

    row = dict(
        kernel=variant.kernel,
        arch=arch.name,
        dtype=variant.dtype,
        config=variant.config,
        num_warps=variant.kwargs.get("num_warps", 4),
        cases=len(variant.cases),
        example=variant.cases[0],
        loaded=load,
    )
    target, signature, constexprs, attrs, options = _specialize(variant.jit, variant.args, variant.kwargs, arch)
    log = io.StringIO()
    start = time.perf_counter()
    old = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
    if not load:  # ptxas -v's report, so every variant really goes through ptxas (no cache hit)
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = True, True
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                ASTSource(variant.jit, signature, constexprs, attrs), target=target, options=options.__dict__
            )
        if load:
            compiled._init_handles()
    except Exception as err:  # a compile error is a row of the table, and a failure of the tier
        row.update(error=f"{type(err).__name__}: {str(err)[:400]}", compile_s=time.perf_counter() - start)
        return row
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = old
    if load:
        registers, spills = compiled.n_regs, compiled.n_spills
    else:
        text = log.getvalue()
        registers = int(re.search(r"Used (\d+) registers", text).group(1))
        spills = int(re.search(r"(\d+) bytes spill stores", text).group(1))
    ptx = compiled.asm["ptx"]
    row.update(
        registers=registers,
        spill_bytes=spills,
        shared_bytes=compiled.metadata.shared,
        blocks_per_sm=occupancy(arch, registers, compiled.metadata.shared, row["num_warps"]),
        vector_loads=bool(re.search(r"ld\.global(\.\w+)*\.v[248]", ptx)),
        int32_arg_products=int32_arg_products(compiled.asm["ttir"]),
        max_grid=[max(g[i] for g in variant.grids) for i in range(3)],
        compile_s=round(time.perf_counter() - start, 2),
    )
    return row


def problems(row: dict, arch: Arch, ptxas: str | None = None) -> list[str]:
    """What is wrong with one row of the table compiled by ``ptxas`` (its version; default: the one the
    installed Triton runs for the row's arch). Empty: nothing."""
    name = f"{row['kernel']} {row['arch']} {row['dtype']} [{row['config']}]"
    if "error" in row:
        return [f"{name}: does not compile: {row['error']}"]
    out = []
    if row["shared_bytes"] > arch.shared_per_block:
        out.append(f"{name}: {row['shared_bytes']} B of shared memory, over {arch.gpus}'s {arch.shared_per_block}")
    if row["spill_bytes"]:
        ptxas = ptxas or ptxas_version(row["arch"])
        expected = expected_spills(ptxas).get(row_id(row))
        if expected is None or row["spill_bytes"] > expected:
            known = "none expected" if expected is None else f"{expected} B expected"
            out.append(
                f"{name}: spills {row['spill_bytes']} B per thread ({row['registers']} registers; "
                f"{known} of ptxas {ptxas}, {SPILLS_PATH.name})"
            )
    if row["blocks_per_sm"] < 1:
        out.append(f"{name}: no block fits an SM ({row['registers']} registers, {row['shared_bytes']} B shared)")
    if row["int32_arg_products"]:
        out.append(f"{name}: 32-bit products of sizes or strides: {row['int32_arg_products'][:3]}")
    if any(g > limit for g, limit in zip(row["max_grid"], MAX_GRID)):
        out.append(f"{name}: grid {row['max_grid']} over CUDA's {MAX_GRID}")
    return out


@functools.cache
def _variants(arch: Arch, full: bool) -> list[Variant]:
    return variants(arch, full)


def _compile_index(arch: Arch, full: bool, index: int, load: bool = False) -> dict:
    return compile_variant(_variants(arch, full)[index], arch, load)


def table(
    archs=("sm_80", "sm_90"), full: bool = False, workers: int | None = None, limit: int | None = None, kernels=None
) -> list[dict]:
    """The resource table: every variant (of ``kernels``, or all; the first ``limit`` per arch) compiled for
    every arch, over ``workers`` processes."""
    jobs = [
        (ARCHS[a], full, i)
        for a in archs
        for i in [i for i, v in enumerate(_variants(ARCHS[a], full)) if not kernels or v.kernel in kernels][:limit]
    ]
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        return [_compile_index(*job) for job in jobs]
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_compile_index, *zip(*jobs), chunksize=4))


def table_on_device(arch: Arch, limit: int | None = None, workers: int | None = None) -> list[dict]:
    """The table read from the binaries loaded on this process's GPU (of architecture ``arch``).

    The variants are compiled in fresh worker processes first, in parallel, which fills Triton's cache;
    this process then loads each one from the cache and asks the driver for its registers and spills.
    """
    indices = range(len(_variants(arch, False)[:limit]))
    context = multiprocessing.get_context("spawn")  # never fork a process that holds a CUDA context
    with concurrent.futures.ProcessPoolExecutor(workers or os.cpu_count() or 1, mp_context=context) as pool:
        list(pool.map(_warm, [arch] * len(indices), indices))
    return [_compile_index(arch, False, i, load=True) for i in indices]


def _warm(arch: Arch, index: int) -> None:
    """Compile one variant into Triton's cache (no report, no load): the parallel half of table_on_device."""
    variant = _variants(arch, False)[index]
    target, signature, constexprs, attrs, options = _specialize(variant.jit, variant.args, variant.kwargs, arch)
    with contextlib.suppress(Exception):  # compile errors are reported by the loading pass
        triton.compile(ASTSource(variant.jit, signature, constexprs, attrs), target=target, options=options.__dict__)


def summary(rows: list[dict]) -> list[dict]:
    """One line per (kernel, arch, dtype): variants, the most registers, spills and shared memory, and the
    fewest blocks per SM of any variant (the README's table)."""
    groups: dict = {}
    for row in rows:
        if "error" not in row:
            groups.setdefault((row["kernel"], row["arch"], row["dtype"]), []).append(row)
    return [
        dict(
            kernel=k,
            arch=a,
            dtype=d.replace("torch.", ""),
            variants=len(g),
            max_registers=max(r["registers"] for r in g),
            max_spill_bytes=max(r["spill_bytes"] for r in g),
            max_shared_bytes=max(r["shared_bytes"] for r in g),
            min_blocks_per_sm=min(r["blocks_per_sm"] for r in g),
        )
        for (k, a, d), g in sorted(groups.items())
    ]


def format_summary(lines: list[dict]) -> str:
    """The summary as a Markdown table."""
    out = [
        "| kernel | arch | dtype (vectors/bank) | variants | registers (max) | spills (max, B) | "
        "shared memory (max, B) | blocks/SM (min) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    out += [
        f"| {x['kernel']} | {x['arch']} | {x['dtype']} | {x['variants']} | {x['max_registers']} | "
        f"{x['max_spill_bytes']} | {x['max_shared_bytes']:,} | {x['min_blocks_per_sm']} |"
        for x in lines
    ]
    return "\n".join(out)


def known_bad_verdicts() -> list[dict]:
    """The checks' verdicts on the known defects of ``tests/kernels/known_bad.py`` (empty outside a
    checkout): with the table, so that a matching stamp spares compiling them too."""
    if not KNOWN_BAD_PATH.exists():
        return []
    spec = importlib.util.spec_from_file_location("fastted_known_bad", KNOWN_BAD_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.verdicts()


def comparable(table: dict) -> dict:
    """What of a table must come out the same from the same stamp: rows without their compile times, the
    known defects' verdicts, the problems."""
    volatile = ("compile_s", "loaded")
    return dict(
        rows=[{k: v for k, v in r.items() if k not in volatile} for r in table["rows"]],
        known_bad=[dict(name=r["name"], problems=r["problems"]) for r in table.get("known_bad", [])],
        problems=table["problems"],
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Compile every launch variant for sm_80 and sm_90; write the resource table."
    )
    parser.add_argument("--out", help="JSON file for the table")
    parser.add_argument(
        "--write", action="store_true", help=f"write the committed table of the installed Triton ({table_path().name})"
    )
    parser.add_argument("--stamp", action="store_true", help="print the stamp of the current inputs; compile nothing")
    parser.add_argument(
        "--expect-spills",
        action="store_true",
        help=f"record this table's spills as those expected of its ptxas ({SPILLS_PATH.name})",
    )
    parser.add_argument("--arch", nargs="+", default=["sm_80", "sm_90"], choices=sorted(ARCHS))
    parser.add_argument(
        "--full",
        action="store_true",
        help="every flag combination on every config (default: the covering set CI compiles)",
    )
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--limit", type=int, default=None, help="compile only the first LIMIT variants per arch")
    parser.add_argument("--kernels", nargs="+", help="compile only these kernels (default: all)")
    args = parser.parse_args(argv)
    whole = args.limit is None and not args.kernels  # a partial table gets no stamp: it can never stand for one
    if args.stamp:
        print(json.dumps(stamp(tuple(args.arch), args.full), indent=1))
        return 0
    if args.write:
        if not whole or args.full or args.arch != ["sm_80", "sm_90"]:
            parser.error("--write writes the committed table: every kernel, both archs, the covering set")
        args.out = str(table_path())
    start = time.perf_counter()
    # the inputs' stamp before compiling them: a source edited meanwhile makes the table stale, not wrong
    stamped = stamp(tuple(args.arch), args.full) if whole and args.out else None
    rows = table(tuple(args.arch), args.full, args.workers, args.limit, args.kernels)
    ptxas = {a: ptxas_version(a) for a in args.arch}
    if args.expect_spills:
        write_expected_spills(rows, ptxas)
    bad = [p for row in rows for p in problems(row, ARCHS[row["arch"]], ptxas[row["arch"]])]
    known_bad = known_bad_verdicts() if whole and args.out else []
    elapsed = time.perf_counter() - start
    print(format_summary(summary(rows)))
    print("\n".join(bad) or "no problems")
    print(f"{len(rows)} variants in {elapsed:.0f} s")
    if args.out:
        command = (
            "python -m fastted.kernels.resources"
            + " --full" * args.full
            + (" --write" if args.write else f" --out {args.out}")
        )
        result = dict(
            triton=triton.__version__,
            torch=torch.__version__,
            machine="CPU only (compiled, not run)",
            command=command,
            stamp=stamped,
            full=args.full,
            seconds=round(elapsed),
            archs={a: dataclasses.asdict(ARCHS[a]) for a in args.arch},
            problems=bad,
            known_bad=known_bad,
            summary=summary(rows),
            rows=rows,
        )
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
