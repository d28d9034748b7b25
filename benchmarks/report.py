"""Turn a pytest-benchmark JSON result file into the markdown tables of docs/benchmarks.md (and the README's summary).

One pair of tables (time, peak memory) per benchmark and parameter set other
than impl and mode (size, objective, ...), with fastted's ratio to each
baseline.

    python benchmarks/report.py benchmarks/results/<file>.json
    python benchmarks/report.py --summary benchmarks/results/<file>.json ...   # fastted's ratios, one row each
    python benchmarks/report.py --steps benchmarks/results/<file>.json      # test_step.py: each case's step
"""

from __future__ import annotations

import json
import sys

ORDER = ["fastted", "eager", "compile", "liger", "liger-triton"]
NAMES = {"compile": "torch.compile", "liger": "Liger (chunked, compiled)", "liger-triton": "Liger (Triton)"}


def _group_header(path, machine, test, info) -> str:
    facts = ", ".join(
        f"{k}={v}" for k, v in info.items() if k not in ("device", "on", "size", "peak_extra_mib", "first_call_s")
    )
    cpu = machine.get("cpu", {}).get("brand_raw", "") if info["device"] == "cpu" else ""
    where = f"{info['device']} ({cpu})" if cpu else info["device"]
    return f"{test} on {where}, size {info['size']}: {facts}; from `{path}`"


def _groups(data: dict) -> dict[tuple, dict]:
    """A result file's benchmarks by (test, params other than impl and mode): their extra_info, the
    (median ms, peak MiB) of each mode and impl, and each impl's first call."""
    groups: dict[tuple, dict] = {}
    for bench in data["benchmarks"]:
        params = dict(bench["params"])
        impl, mode = params.pop("impl", "fastted"), params.pop("mode", "full")  # a sweep has neither
        key = (bench["name"].split("[")[0], tuple(sorted(params.items())))
        group = groups.setdefault(key, {"info": bench["extra_info"], "rows": {}})
        group["rows"].setdefault(mode, {})[impl] = (
            bench["stats"]["median"] * 1e3,
            bench["extra_info"].get("peak_extra_mib"),
        )
        first = bench["extra_info"].get("first_call_s")
        if first is not None:  # the first call of a process: compilation, autotuning (whichever mode ran first)
            firsts = group.setdefault("first", {})
            firsts[impl] = max(firsts.get(impl, 0.0), first)
    return groups


def table(path: str) -> str:
    with open(path) as f:
        data = json.load(f)
    machine = data.get("machine_info", {})
    out = []
    sweeps: dict[str, list] = {}
    for (test, params), group in _groups(data).items():
        if "chunk_size" in dict(params):  # a block-size sweep: one row per block size, below
            rows = group["rows"]["full"]["fastted"]
            sweeps.setdefault(test, []).append((dict(params)["chunk_size"], group["info"], rows))
            continue
        rows = group["rows"]
        impls = [i for i in ORDER if any(i in r for r in rows.values())]
        baselines = [i for i in impls if i != "fastted"]
        names = [NAMES.get(i, i) for i in impls]
        out += [_group_header(path, machine, test, group["info"]), ""]
        out.append(
            "| mode | "
            + " | ".join(f"{n} (ms)" for n in names)
            + " | "
            + " | ".join(f"vs {NAMES.get(b, b)}" for b in baselines)
            + " |"
        )
        out.append("|---" * (1 + len(impls) + len(baselines)) + "|")
        for mode in ("forward", "backward", "full"):
            r = rows.get(mode, {})
            if "fastted" not in r:
                continue
            cells = [f"{r[i][0]:.3f}" if i in r else "-" for i in impls]
            ratios = [f"{r[b][0] / r['fastted'][0]:.2f}x" if b in r else "-" for b in baselines]
            out.append(f"| {mode} | " + " | ".join(cells + ratios) + " |")
        out += [
            "",
            "| peak beyond inputs | " + " | ".join(f"{n} (MiB)" for n in names) + " | fastted / eager |",
            "|---" * (2 + len(impls)) + "|",
        ]
        for mode in ("forward", "full"):
            r = rows.get(mode, {})
            peaks = {i: r[i][1] for i in impls if i in r and r[i][1] is not None}
            if "fastted" not in peaks:
                continue
            cells = [f"{peaks[i]:.1f}" if i in peaks else "-" for i in impls]
            ratio = f"{peaks['fastted'] / peaks['eager']:.2f}" if peaks.get("eager") else "-"
            out.append(f"| {mode} | " + " | ".join(cells) + f" | {ratio} |")
        firsts = group.get("first", {})
        if firsts:
            out += [
                "",
                "First call of the process (full step; compilation and autotuning included): "
                + ", ".join(f"{NAMES.get(i, i)} {firsts[i]:.2f} s" for i in impls if i in firsts)
                + ".",
            ]
        out.append("")
    for test, entries in sweeps.items():
        info = entries[0][1]
        out += [
            _group_header(path, machine, test, {k: v for k, v in info.items() if k != "rows"}),
            "",
            "| rows per block | full step (ms) | peak beyond inputs (MiB) |",
            "|---|---|---|",
        ]
        for chunk, entry_info, (ms, peak) in sorted(entries, key=lambda e: e[1]["rows"] + (e[0] == "default") / 2):
            label = f"{entry_info['rows']} (default)" if chunk == "default" else str(chunk)
            out.append(f"| {label} | {ms:.3f} | " + ("-" if peak is None else f"{peak:.1f}") + " |")
        out.append("")
    return "\n".join(out).rstrip()


def summary(paths: list[str]) -> str:
    """One row per suite and size: fastted's full step against each baseline (time ratio: baseline / fastted,
    above 1 is fastted faster) and its peak memory beyond inputs over each baseline's."""
    out = [
        "| suite, size, case | vs eager | vs torch.compile | vs Liger | peak / eager | peak / torch.compile "
        "| peak / Liger | result file |",
        "|---" * 8 + "|",
    ]
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        for (test, params), group in _groups(data).items():
            rows = group["rows"].get("full", {})
            if "fastted" not in rows or "chunk_size" in dict(params):
                continue
            name = test.removeprefix("test_")
            t, m = rows["fastted"]
            cells = []
            for b in ("eager", "compile", "liger"):
                cells.append(f"{rows[b][0] / t:.2f}x" if b in rows else "-")
            for b in ("eager", "compile", "liger"):
                ok = b in rows and rows[b][1] and m is not None
                cells.append(f"{m / rows[b][1]:.2f}" if ok else "-")
            label = ", ".join([name] + [str(v) for _, v in params])
            out.append(f"| {label} | " + " | ".join(cells) + f" | `{path.rsplit('/', 1)[-1]}` |")
    return "\n".join(out)


def steps(path: str) -> str:
    """benchmarks/test_step.py's cases: the median step, its ratio to the student's plain training step, and the
    teacher's forward whole against cut after its last mapped layer."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    median = {
        b["extra_info"]["case"]: b["stats"]["median"] * 1e3
        for b in data["benchmarks"]
        if b["extra_info"].get("suite") == "step"
    }
    info = next(b["extra_info"] for b in data["benchmarks"] if b["extra_info"].get("suite") == "step")
    lines = [
        f"One optimizer step, B = {info['batch']}, T = {info['seq']}, {info['threads']} threads; from `{path}`",
        "",
        "| case | median (ms) | / student's step |",
        "|---|---|---|",
    ]
    base = median.get("student")
    for case, ms in median.items():
        ratio = f"{ms / base:.2f}x" if base and not case.startswith("teacher") else ""
        lines.append(f"| {case} | {ms:.1f} | {ratio} |")
    if "teacher" in median and "teacher-truncated" in median:
        lines += [
            "",
            f"Teacher forward, whole / cut after layer 2 of 6: {median['teacher'] / median['teacher-truncated']:.2f}x",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--summary"]:
        print(summary(sys.argv[2:]))
    elif sys.argv[1:2] == ["--steps"]:
        print(steps(sys.argv[2]))
    else:
        for p in sys.argv[1:]:
            print(table(p))
