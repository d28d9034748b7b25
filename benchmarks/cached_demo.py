"""The demo distilled from a teacher cache, against the demo distilled live: one result file.

Runs the README's main job (``fastted pipeline``: MiniLM-L6 into 3 of its layers on BBC News, KD, LWD and TED)
in ``<dir>/live``, then in ``<dir>/cached`` the same distillation from a cache of the teacher (``cache-teacher``
then ``distil`` with ``distil.teacher_cache=true``), on the live run's fine-tuned models and stage-I filters
(linked, not retrained), and evaluates both. The result file holds, per method: the cache's size (bytes per
token, top-64 logits in bf16 and int8 layer targets), the relative error of each loss term of the first step
against the live teacher's (same student, same batch), the distil job's wall time and median tokens/s live and
cached, the cache build's time, and the test accuracies of the students distilled live and from the cache.

    python benchmarks/cached_demo.py --json benchmarks/results/<date>-<device>-cached-demo.json [--dir runs/cached-demo]

Takes about 15 minutes on 2 CPU cores (the live demo is most of it; a finished job is not run again). Time it
on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

from fastted.methods import recipe_class
from fastted.train.cli import main as fastted

METHODS = ("kd", "lwd", "ted")
PREREQUISITES = ("finetune-teacher", "finetune-student", "filters-teacher", "filters-student", "cache")


def _run(*argv: str) -> float:
    start = time.perf_counter()
    code = fastted(list(argv))
    if code:
        raise SystemExit(f"fastted {' '.join(argv)} exited with {code}")
    return time.perf_counter() - start


def _timed(times: dict, path: str, key: str, *argv: str) -> None:
    """Run a job; keep its wall time in ``path`` the first time it runs (a rerun resumes the finished job,
    and that time would not be the job's)."""
    seconds = _run(*argv)
    if key not in times:
        times[key] = seconds
        with open(path, "w", encoding="utf-8") as f:
            json.dump(times, f, indent=1)


def _records(directory: str) -> list[dict]:
    with open(os.path.join(directory, "metrics.jsonl"), encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if "loss" in r]


def _json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def measure(root: str, preset: str) -> dict:
    live, cached = os.path.join(root, "live"), os.path.join(root, "cached")
    common = ("progress=false", "--preset", preset)
    _run(
        "pipeline",
        f"output_dir={live}",
        *common,
        "jobs=[finetune-teacher,finetune-student,filters-teacher,filters-student]",
    )
    times_path = os.path.join(root, "times.json")
    times = _json(times_path) if os.path.isfile(times_path) else {}
    for method in METHODS:
        _timed(times, times_path, f"live/{method}", "distil", "--method", method, f"output_dir={live}", *common)
    _run("evaluate", f"output_dir={live}", *common)
    os.makedirs(cached, exist_ok=True)
    for name in PREREQUISITES:  # the live run's fine-tuned models, filters and tokenized data
        link = os.path.join(cached, name)
        if not os.path.lexists(link):
            os.symlink(os.path.abspath(os.path.join(live, name)), link)
    for method in METHODS:
        options = (f"output_dir={cached}", "distil.teacher_cache=true", *common)
        _timed(times, times_path, f"cache_build/{method}", "cache-teacher", "--method", method, *options)
        _timed(times, times_path, f"cached/{method}", "distil", "--method", method, *options)
    _run("evaluate", f"output_dir={cached}", *common)

    accuracy = {
        run: {label: r["accuracy"] for label, r in _json(os.path.join(root, run, "results.json")).items()}
        for run in ("live", "cached")
    }
    methods = {}
    for method in METHODS:
        first = {run: _records(os.path.join(root, run, f"distil-{method}"))[0]["terms"] for run in ("live", "cached")}
        speed = {
            run: statistics.median(r["tokens_per_s"] for r in _records(os.path.join(root, run, f"distil-{method}")))
            for run in ("live", "cached")
        }
        label = recipe_class(method).label
        cache = _json(os.path.join(cached, f"cache-teacher-{method}", "result.json"))
        methods[method] = {
            "cache": cache,
            "first_step_terms": first,
            "relative_error": {
                name: abs(first["cached"][name] - value) / abs(value) for name, value in first["live"].items()
            },
            "distil_seconds": {run: round(times[f"{run}/{method}"], 1) for run in ("live", "cached")},
            "cache_build_seconds": round(times[f"cache_build/{method}"], 1),
            "median_tokens_per_s": {run: round(v, 1) for run, v in speed.items()},
            "accuracy": {run: accuracy[run][label] for run in ("live", "cached")},
        }
    test_examples = _json(os.path.join(live, "results.json"))["teacher"]["examples"]
    return {"methods": methods, "accuracy": accuracy, "test_examples": test_examples}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, help="the result file to write")
    parser.add_argument("--dir", default="runs/cached-demo", help="where the two runs go (default runs/cached-demo)")
    parser.add_argument("--preset", default="bbc-minilm", help="the runs' preset (default bbc-minilm, the demo's)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    result = measure(args.dir, args.preset)
    result.update(
        command=f"python benchmarks/cached_demo.py --json {args.json} --preset {args.preset}",
        device=f"CPU, {torch.get_num_threads()} threads ({platform.processor() or platform.machine()})",
        torch=torch.__version__,
        seconds=round(time.perf_counter() - start),
    )
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    for method, r in result["methods"].items():
        errors = ", ".join(f"{k} {v:.2e}" for k, v in r["relative_error"].items())
        print(
            f"{method}: {r['cache']['bytes_per_token']} B/token; first-step relative error {errors}; distil "
            f"{r['distil_seconds']['live']} s live, {r['distil_seconds']['cached']} s cached (+ "
            f"{r['cache_build_seconds']} s to build); accuracy {r['accuracy']['live']} live, "
            f"{r['accuracy']['cached']} cached"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
