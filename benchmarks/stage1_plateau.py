"""TED's stage I, watched: how a filter's accuracy as a probe grows with stage I's steps, and where it stops.

Runs the fine-tuning jobs and both filters jobs of a preset with ``filters.holdout`` (a share of the training set
held out, stage I ended when the filters' mean probe accuracy on it stops improving) and the test-split probes
evaluated every ``--every`` steps, then writes one result file: each model's own test accuracy, and per filters
job the held-out takes, the test probes at each evaluation, where it stopped and the final probes.

    python benchmarks/stage1_plateau.py --preset bbc-minilm --epochs 8 --every 27 \\
        --out benchmarks/results/2026-12-05-cpu-2core-stage1-plateau-bbc.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.result_file import versions, write  # noqa: E402


def _read(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="bbc-minilm")
    parser.add_argument("--epochs", type=float, default=8.0, help="stage I's cap, in epochs")
    parser.add_argument("--every", type=int, required=True, help="optimizer steps between takes and test probes")
    parser.add_argument("--holdout", type=float, default=0.1)
    parser.add_argument("--patience", type=int, default=2)
    parser.add_argument("--run-dir", default="runs/stage1-plateau")
    parser.add_argument("--out", required=True, help="the result file (JSON)")
    parser.add_argument("overrides", nargs="*", help="more key=value config overrides")
    args = parser.parse_args()

    from fastted.train.cli import main as fastted

    run_dir = os.path.join(args.run_dir, args.preset)
    overrides = [
        f"output_dir={run_dir}",
        "jobs=[finetune-teacher,finetune-student,filters-teacher,filters-student]",
        "progress=false",
        f"filters.holdout={args.holdout}",
        f"filters.patience={args.patience}",
        f"filters.watch_every={args.every}",
        f"filters.train.eval_every={args.every}",
        f"filters.train.epochs={args.epochs}",
        *args.overrides,
    ]
    command = ["fastted", "pipeline", "--preset", args.preset, *overrides]
    start = time.perf_counter()
    code = fastted(command[1:])
    if code != 0:
        return code
    seconds = time.perf_counter() - start
    result = {
        "what": "TED's stage I watched on a held-out share of the training set: probe accuracy per filter",
        "command": " ".join(command),
        "device": "CPU",
        "seconds": round(seconds, 1),
        "versions": versions("torch", "triton", "transformers"),
        "models": {},
    }
    for which in ("teacher", "student"):
        with open(os.path.join(run_dir, f"finetune-{which}", "result.json"), encoding="utf-8") as f:
            own = json.load(f)["eval"]["accuracy"]
        job = os.path.join(run_dir, f"filters-{which}")
        records = _read(os.path.join(job, "metrics.jsonl"))
        with open(os.path.join(job, "result.json"), encoding="utf-8") as f:
            done = json.load(f)
        result["models"][which] = {
            "own_test_accuracy": own,
            "steps_planned": done["steps"],
            "stopped_at": done["watch"]["stopped_at"],
            "holdout_takes": [
                {"step": r["step"], "mean_probe_accuracy": r["holdout_probe_accuracy"]}
                for r in records
                if "holdout_probe_accuracy" in r
            ],
            "test_probes": [
                {"step": r["step"], "probe_accuracy": r["eval"]["probe_accuracy"]}
                for r in records
                if "eval" in r and "probe_accuracy" in r["eval"]
            ],
            "final": done["eval"],
        }
    write(args.out, result)
    print(json.dumps({w: (m["own_test_accuracy"], m["final"]["probe_accuracy"]) for w, m in result["models"].items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
