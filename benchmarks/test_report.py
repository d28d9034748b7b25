"""benchmarks/report.py on a made-up result file: the ratios, the first calls, the block-size sweep."""

import json

from benchmarks.report import steps, summary, table


def _bench(name, params, median, peak=None, **info):
    return dict(
        name=f"{name}[x]",
        params=params,
        stats=dict(median=median),
        extra_info=dict(device="cpu", size="small", peak_extra_mib=peak, **info),
    )


def test_tables_and_summary(tmp_path):
    benches = [
        _bench("test_op", dict(impl="fastted", mode="full", size="small"), 0.5, 10.0, first_call_s=0.1),
        _bench("test_op", dict(impl="eager", mode="full", size="small"), 1.0, 40.0, first_call_s=0.2),
        _bench("test_op", dict(impl="compile", mode="full", size="small"), 0.4, 20.0, first_call_s=7.5),
        _bench("test_op", dict(impl="liger", mode="full", size="small"), 0.75, 50.0, first_call_s=3.0),
        _bench("test_op_blocks", dict(chunk_size=64, size="small"), 0.3, 5.0, rows=64),
        _bench("test_op_blocks", dict(chunk_size="default", size="small"), 0.2, 6.0, rows=128),
    ]
    path = tmp_path / "result.json"
    path.write_text(json.dumps(dict(machine_info={}, benchmarks=benches)))
    text = table(str(path))
    assert "| full | 500.000 | 1000.000 | 400.000 | 750.000 | 2.00x | 0.80x | 1.50x |" in text
    assert "torch.compile 7.50 s" in text and "Liger (chunked, compiled) 3.00 s" in text
    assert "| 64 | 300.000 | 5.0 |" in text and "| 128 (default) | 200.000 | 6.0 |" in text
    row = summary([str(path)]).splitlines()[2]
    assert row.startswith("| op, small | 2.00x | 0.80x | 1.50x | 0.25 | 0.50 | 0.20 |")


def test_steps(tmp_path):
    benches = [
        dict(
            name=f"test_step[{case}]",
            params=dict(case=case),
            stats=dict(median=ms / 1e3),
            extra_info=dict(suite="step", case=case, batch=8, seq=128, threads=2),
        )
        for case, ms in (("student", 100.0), ("kd", 250.0), ("teacher", 60.0), ("teacher-truncated", 30.0))
    ]
    path = tmp_path / "steps.json"
    path.write_text(json.dumps(dict(machine_info={}, benchmarks=benches)))
    text = steps(str(path))
    assert "| student | 100.0 | 1.00x |" in text and "| kd | 250.0 | 2.50x |" in text
    assert "| teacher | 60.0 |  |" in text and "whole / cut after layer 2 of 6: 2.00x" in text
