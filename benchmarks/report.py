"""Turn a pytest-benchmark JSON result file into the README's markdown table.

    python benchmarks/report.py benchmarks/results/<file>.json
"""
from __future__ import annotations

import json
import sys


def table(path: str) -> str:
    with open(path) as f:
        data = json.load(f)
    machine = data.get("machine_info", {})
    rows = {}
    for bench in data["benchmarks"]:
        impl, mode = bench["params"]["impl"], bench["params"]["mode"]
        rows.setdefault(mode, {})[impl] = (bench["stats"]["median"] * 1e3, bench["extra_info"].get("peak_extra_mib"))
    info = data["benchmarks"][0]["extra_info"]
    lines = [
        f"{info['device']} ({machine.get('cpu', {}).get('brand_raw', '')}), size {info['size']}: "
        f"N={info['n_tokens']}, L={info['n_layers']}, d_s={info['d_s']}, d_t={info['d_t']}, d_f={info['d_f']}, "
        f"{info['dtype']}; from `{path}`",
        "",
        "| mode | fastted (ms) | eager (ms) | torch.compile (ms) | vs eager | vs compile |",
        "|---|---|---|---|---|---|",
    ]
    for mode in ("forward", "backward", "full"):
        r = rows.get(mode, {})
        if not {"fastted", "eager", "compile"} <= r.keys():
            continue
        f, e, c = r["fastted"][0], r["eager"][0], r["compile"][0]
        lines.append(f"| {mode} | {f:.3f} | {e:.3f} | {c:.3f} | {e / f:.2f}x | {c / f:.2f}x |")
    lines += ["", "| mode | peak beyond inputs: fastted (MiB) | eager (MiB) | torch.compile (MiB) | vs eager |",
              "|---|---|---|---|---|"]
    for mode in ("forward", "full"):
        peaks = [rows.get(mode, {}).get(k, (0, None))[1] for k in ("fastted", "eager", "compile")]
        if None not in peaks:
            lines.append(f"| {mode} | {peaks[0]:.1f} | {peaks[1]:.1f} | {peaks[2]:.1f} | {peaks[0] / peaks[1]:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(sys.argv[1]))
