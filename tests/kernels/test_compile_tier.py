"""The compile tier: every launch variant of every kernel compiled for sm_80 and sm_90 without a GPU.

The committed table of the installed Triton (``compile-tier.json`` for CI's,
``compile-tier-triton<X.Y>.json`` for another) carries a stamp of what
produced it: the Triton and ptxas versions, a hash of each kernel source and
of ``known_bad.py``, a hash of each architecture's recorded variants. When
the stamp of the current inputs (``python -m fastted.kernels.resources
--stamp``, a few seconds) matches it, the tests read the committed table:
compiling again would give the same rows. Otherwise, or with
``FASTTED_COMPILE_TIER=force``, the table is built again by ``python -m
fastted.kernels.resources`` in a process without Triton's interpreter (the
tests' own process runs the kernels under it, where ``@triton.jit`` makes
interpreted functions that do not compile), the tests check its rows, and a
committed table it does not equal fails, naming the command that writes it.

A kernel change that overflows shared memory, spills (beyond what its ptxas
release is known to spill: ``benchmarks/results/compile-tier-spills.json``),
stops compiling or computes an offset of a size or stride in 32 bits fails
here. ``known_bad.py`` shows each check failing on a defect this project
once had.
"""

import json
import os
import subprocess
import sys

import pytest

from fastted.ops.registry import compiled_ops, tier_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The kernels every op declares (fastted.ops.registry): each must have rows for both archs.
KERNELS = tier_kernels()
ARCHS = ["sm_80", "sm_90"]
MODULE = ["-m", "fastted.kernels.resources"]
ENV = dict(os.environ, TRITON_INTERPRET="0")


def _run(args: list, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, **kwargs)


def _committed() -> dict | None:
    from fastted.kernels.resources import table_path

    if not table_path().exists():
        return None
    with open(table_path()) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def tier(tmp_path_factory) -> dict:
    """The table the tests check: the committed one when its stamp matches the current inputs, else a fresh
    compile (``compiled``: True), beside the current stamp and the committed table."""
    proc = _run([*MODULE, "--stamp"], timeout=300)
    assert proc.returncode == 0, f"no stamp:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    current, committed = json.loads(proc.stdout), _committed()
    forced = os.environ.get("FASTTED_COMPILE_TIER") == "force"
    if committed is not None and committed.get("stamp") == current and not forced:
        return dict(committed, compiled=False, current_stamp=current, committed=committed)
    out = tmp_path_factory.mktemp("compile") / "out.json"
    proc = _run([*MODULE, "--out", str(out)], timeout=3600)  # 930 variants: 4 min on 2 idle cores, 18 busy
    assert out.exists(), f"no table written (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    with open(out) as f:
        return dict(json.load(f), compiled=True, current_stamp=current, committed=committed)


def _rows(tier, kernel, arch):
    rows = [r for r in tier["rows"] if r["kernel"] == kernel and r["arch"] == arch]
    assert rows, f"no variant of {kernel} recorded for {arch}"
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kernel", KERNELS)
def test_every_variant_compiles_fits_and_does_not_spill(tier, kernel, arch):
    """Compiles; shared memory within the block limit; no spills but those known of the ptxas release that
    compiled the table, none larger; int64 offsets; grids within CUDA's limits at the largest sizes the
    API takes."""
    from fastted.kernels import ARCHS as LIMITS
    from fastted.kernels.resources import problems

    rows = _rows(tier, kernel, arch)
    ptxas = tier["stamp"]["ptxas"][arch]
    bad = [p for row in rows for p in problems(row, LIMITS[arch], ptxas)]
    assert not bad, "\n".join(bad)
    assert all(row["blocks_per_sm"] >= 1 for row in rows)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("op", [op.name for op in compiled_ops() if op.compile.expectations is not None])
def test_what_each_op_expects_of_its_variants(tier, op, arch):
    """What an op declares of its compiled variants beyond the checks above (its KERNEL_OP's expectations:
    every autotune config its pruning keeps compiled for every dtype, 128-bit loads where its rows are
    aligned, every teacher layout compiled)."""
    from fastted.ops.registry import kernel_op

    declared = kernel_op(op).compile
    rows = [row for kernel in declared.kernels for row in _rows(tier, kernel, arch)]
    problems = declared.expectations(rows, arch)
    assert not problems, "\n".join(problems)


@pytest.mark.slow
def test_table_is_committed(tier):
    """The committed table of this Triton is what the current kernels, launchers and Triton compile: its
    stamp is the current one, and compiled again (when the stamp differs, or FASTTED_COMPILE_TIER=force)
    it comes out the same. Regenerate it after a change: python -m fastted.kernels.resources --write."""
    from fastted.kernels.resources import WRITE_COMMAND, comparable, stamp_differences, table_path

    path = os.path.relpath(table_path(), ROOT)
    committed = tier["committed"]
    if committed is None:
        pytest.skip(f"no committed table for Triton {tier['triton']} ({path}): {WRITE_COMMAND} writes one")
    stale = stamp_differences(committed.get("stamp"), tier["current_stamp"])
    assert not stale, f"{path} is stale ({'; '.join(stale)} changed): regenerate it with {WRITE_COMMAND}"
    assert not committed["problems"], committed["problems"]
    if tier["compiled"]:
        fresh, then = comparable(tier), comparable(committed)
        changed = [
            f"{a['kernel']} {a['arch']} {a['dtype']} [{a['config']}]: "
            + ", ".join(
                f"{k} {a.get(k)} now, {b.get(k)} committed" for k in a.keys() | b.keys() if a.get(k) != b.get(k)
            )
            for a, b in zip(fresh["rows"], then["rows"])
            if a != b
        ]
        assert fresh == then, (
            f"{path} differs from what its stamp compiles ({len(fresh['rows'])} rows now, "
            f"{len(then['rows'])} committed; {changed[:2]}; known defects the same: "
            f"{fresh['known_bad'] == then['known_bad']}): regenerate it with {WRITE_COMMAND}"
        )


@pytest.mark.slow
def test_spill_expectations_are_current(tier):
    """Every spill expected of this table's ptxas releases still happens (a variant that stopped spilling,
    or is no longer compiled, leaves the list: python -m fastted.kernels.resources --write --expect-spills)."""
    from fastted.kernels.resources import expected_spills, row_id

    spilling = {row_id(r) for r in tier["rows"] if r.get("spill_bytes")}
    stale = [
        key
        for arch, ptxas in tier["stamp"]["ptxas"].items()
        for key in expected_spills(ptxas)
        if key[1] == arch and key not in spilling
    ]
    assert not stale, f"{len(stale)} expected spills no longer happen, e.g. {stale[:2]}"


@pytest.mark.slow
def test_checks_fail_on_known_defects(tier):
    """Each check fails on a defect the kernels once had: the contrastive kernel's old block rule with an
    fp32 bank at D = 768 (330 KB of shared memory), the old fp32 filtered-MSE tile (spills), an offset
    computed as an int32 product of a stride (verdicts compiled with the table; known_bad.py is in its
    stamp, and names the problem that catches each defect: CAUGHT_BY)."""
    from tests.kernels.known_bad import CAUGHT_BY

    by_name = {row["name"]: row for row in tier["known_bad"]}
    assert set(by_name) == set(CAUGHT_BY)
    for name, words in CAUGHT_BY.items():
        problems = by_name[name]["problems"]
        if words is None:
            assert not problems, (name, problems)
        else:
            assert any(words in p for p in problems), (name, problems)


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


def test_spills_are_checked_against_their_ptxas_release(tmp_path, monkeypatch):
    """A spill passes only where the expectation of the ptxas release that compiled it lists that variant,
    with as many bytes or more; a release without an entry may spill nothing."""
    from fastted.kernels import ARCHS as LIMITS
    from fastted.kernels import resources

    row = dict(
        kernel="k",
        arch="sm_80",
        dtype="torch.float32",
        config="BLOCK=64",
        example=dict(size="odd"),
        registers=255,
        spill_bytes=40,
        shared_bytes=0,
        blocks_per_sm=1,
        int32_arg_products=[],
        max_grid=[1, 1, 1],
    )
    listed = {key: row[key] for key in ("kernel", "arch", "dtype", "config", "example")}
    path = tmp_path / "spills.json"
    path.write_text(json.dumps(dict(releases={"12.8": dict(spills=[dict(listed, spill_bytes=40)])})))
    monkeypatch.setattr(resources, "SPILLS_PATH", path)
    assert not resources.problems(row, LIMITS["sm_80"], "12.8.93")
    assert "none expected" in resources.problems(row, LIMITS["sm_80"], "12.9.86")[0]
    assert "40 B expected" in resources.problems(dict(row, spill_bytes=48), LIMITS["sm_80"], "12.8.93")[0]
    assert "none expected" in resources.problems(dict(row, dtype="torch.bfloat16"), LIMITS["sm_80"], "12.8.93")[0]


def test_stamp_differences_name_what_changed():
    from fastted.kernels.resources import stamp_differences

    then = dict(
        triton="3.9.0", ptxas={"sm_80": "12.9.86"}, full=False, sources={"kernels/a.py": "1"}, launches={"sm_80": "x"}
    )
    assert not stamp_differences(then, then)
    now = dict(then, triton="3.6.0", sources={"kernels/a.py": "2", "kernels/b.py": "3"})
    assert stamp_differences(then, now) == ["triton: 3.9.0 then, 3.6.0 now", "sources of kernels/a.py, kernels/b.py"]
    assert stamp_differences(None, now) == ["the table has no stamp"]
