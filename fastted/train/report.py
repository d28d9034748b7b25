"""The run's closing report: results.json, report.md (a table of the test metric of every model, and
each job's last losses), report.png (each job's loss curve, and the test metric of every model) and, for the
jobs whose records count their tokens, report-throughput.png (the training loss and tokens/s against tokens)."""

from __future__ import annotations

import json
import os

from fastted.files import write_atomic
from fastted.train.trainer import read_metrics


def _metric(config) -> tuple[str, str]:
    return ("accuracy", "accuracy") if config.task == "classification" else ("perplexity", "perplexity")


def write_report(config, results: dict) -> str:
    """Write the files into ``config.output_dir``; returns the markdown."""
    out = config.output_dir
    os.makedirs(out, exist_ok=True)
    key, title = _metric(config)
    write_atomic(os.path.join(out, "results.json"), json.dumps(results, indent=1))
    lines = [
        f"# fastted report: {os.path.basename(os.path.abspath(out))}",
        "",
        f"Task: {config.task}; data: {config.data.source}; teacher: {config.teacher.path}.",
        "",
        f"| model | test {title} | examples / tokens |",
        "| --- | --- | --- |",
    ]
    for label, r in results.items():
        value = r.get(key)
        shown = f"{value:.4f}" if isinstance(value, float) else "-"
        lines.append(f"| {label} | {shown} | {r.get('examples', r.get('tokens', '-'))} |")
    lines += _probe_lines(out, results)
    curves = {}
    order = ["finetune-teacher", "finetune-student", "filters-teacher", "filters-student"]
    for job in sorted(os.listdir(out), key=lambda d: (order.index(d) if d in order else len(order), d)):
        records = [r for r in read_metrics(os.path.join(out, job)) if "loss" in r]
        if records:
            curves[job] = records
    if curves:
        lines += ["", "| job | optimizer steps | last loss | terms | tokens/s |", "| --- | --- | --- | --- | --- |"]
        for job, records in curves.items():
            last = records[-1]
            terms = ", ".join(f"{k} {v:.4f}" for k, v in last.get("terms", {}).items())
            lines.append(
                f"| {job} | {last['step']} | {last['loss']:.4f} | {terms} | {last.get('tokens_per_s', 0):.0f} |"
            )
    lines += ["", "![loss curves and test metric](report.png)", ""]
    counted = {job: [r for r in records if "tokens" in r] for job, records in curves.items()}
    counted = {job: records for job, records in counted.items() if records}  # records before tokens were kept: none
    if counted:
        lines += ["![training loss and throughput against tokens](report-throughput.png)", ""]
    text = "\n".join(lines)
    write_atomic(os.path.join(out, "report.md"), text)
    _plot(os.path.join(out, "report.png"), curves, results, key, title)
    if counted:
        _plot_throughput(os.path.join(out, "report-throughput.png"), counted)
    return text


PROBED = {"filters-teacher": "teacher", "filters-student": "student alone"}  # a filters job -> its model's label


def probes(out: str) -> dict:
    """The stage-I probes the run's filters jobs wrote (their result.json's evaluation), by job: each filter's
    layer and its accuracy as a probe on the test split."""
    found = {}
    for job in PROBED:
        path = os.path.join(out, job, "result.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                evaluation = json.load(f).get("eval") or {}
            if "probe_accuracy" in evaluation:
                found[job] = evaluation
    return found


def _probe_lines(out: str, results: dict) -> list[str]:
    """report.md's table of TED's filters as probes, layer by layer, beside their model's own test accuracy:
    whether stage I made them task-aware."""
    found = probes(out)
    if not found:
        return []
    lines = [
        "",
        "TED's stage I: each filter, read by its head, as a probe on the test split (the model's own test accuracy "
        "beside it).",
        "",
        "| filters job | layer | probe accuracy | model's accuracy |",
        "| --- | --- | --- | --- |",
    ]
    for job, evaluation in found.items():
        own = (results.get(PROBED[job]) or {}).get("accuracy")
        shown = f"{own:.4f}" if isinstance(own, float) else "-"
        for layer, accuracy in zip(evaluation["probe_layers"], evaluation["probe_accuracy"]):
            lines.append(f"| {job} | {layer} | {accuracy:.4f} | {shown} |")
    return lines


def _plot(path: str, curves: dict, results: dict, key: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for job, records in curves.items():
        left.plot([r["step"] for r in records], [r["loss"] for r in records], label=job)
    left.set_xlabel("optimizer step")
    left.set_ylabel("training loss")
    left.set_title("loss curves")
    if curves:
        left.legend(fontsize=7)
    labels = [label for label, r in results.items() if isinstance(r.get(key), float)]
    values = [results[label][key] for label in labels]
    bars = right.bar(range(len(labels)), values, color="#4878a8")
    right.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
    right.set_title(f"test {title}")
    for bar, value in zip(bars, values):
        right.annotate(
            f"{value:.3f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8
        )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_throughput(path: str, curves: dict) -> None:
    """Each job's training loss and tokens/s (of each logging window) against the tokens trained."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for job, records in curves.items():
        tokens = [r["tokens"] for r in records]
        left.plot(tokens, [r["loss"] for r in records], label=job)
        right.plot(tokens, [r["tokens_per_s"] for r in records], label=job)
    for ax, label, title in (
        (left, "training loss", "loss against tokens"),
        (right, "tokens / s (logging window)", "throughput"),
    ):
        ax.set_xlabel("tokens trained")
        ax.set_ylabel(label)
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_seeds_report(config, summary: dict) -> str:
    """A run of several seeds: results.json (the summary, each seed's numbers included), report.md (each model's
    mean, standard deviation and 95 % interval; each method's paired difference against the student alone and
    against KD, in points) and report.png (the means with their intervals, on an axis fitted to them)."""
    out = config.output_dir
    os.makedirs(out, exist_ok=True)
    write_atomic(os.path.join(out, "results.json"), json.dumps(summary, indent=1))
    key, scale = summary["metric"], (100.0 if summary["metric"] == "accuracy" else 1.0)
    seeds = ", ".join(map(str, summary["seeds"]))
    lines = [
        f"# fastted report: {os.path.basename(os.path.abspath(out))}",
        "",
        f"Task: {config.task}; data: {config.data.source}; teacher: {config.teacher.path}; seeds {seeds} "
        f"(one test split of {summary['test_examples']} examples).",
        "",
        f"| model | mean test {key} | std | 95% interval (t, over seeds) | per seed |",
        "| --- | --- | --- | --- | --- |",
    ]
    for label, m in summary["models"].items():
        per = ", ".join(f"{v:.4f}" for v in m["per_seed"].values())
        lines.append(f"| {label} | {m['mean']:.4f} | {m['std']:.4f} | [{m['low']:.4f}, {m['high']:.4f}] | {per} |")
    if summary["differences"]:
        lines += [
            "",
            "Paired differences on the same test examples and seeds: a bootstrap over the examples "
            "(10,000 resamples, the seeds held fixed) and a paired t interval over the seeds (the test "
            "split held fixed). A difference holds when both leave out 0 on one side; otherwise it "
            "ranks nothing:",
            "",
            "| difference | points | 95% over examples | 95% over seeds | per seed | holds |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for name, d in summary["differences"].items():
            s = d["seeds"]
            per = ", ".join(f"{scale * v:+.2f}" for v in s["per_seed"])
            lines.append(
                f"| {name} | {scale * d['diff']:+.2f} | [{scale * d['low']:+.2f}, {scale * d['high']:+.2f}] "
                f"| [{scale * s['low']:+.2f}, {scale * s['high']:+.2f}] | {per} | "
                f"{'yes' if d['holds'] else 'no'} |"
            )
    lines += ["", "![test metric over seeds](report.png)", ""]
    text = "\n".join(lines)
    write_atomic(os.path.join(out, "report.md"), text)
    _plot_seeds(os.path.join(out, "report.png"), summary)
    return text


def _plot_seeds(path: str, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(summary["models"])
    models = [summary["models"][label] for label in labels]
    means = [m["mean"] for m in models]
    errors = [[m["mean"] - m["low"] for m in models], [m["high"] - m["mean"] for m in models]]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.errorbar(range(len(labels)), means, yerr=errors, fmt="o", capsize=4, color="#4878a8")
    for i, m in enumerate(models):
        ax.scatter([i] * len(m["per_seed"]), list(m["per_seed"].values()), s=10, color="#999999", zorder=3)
    low = min(min(m["low"] for m in models), min(min(m["per_seed"].values()) for m in models))
    high = max(max(m["high"] for m in models), max(max(m["per_seed"].values()) for m in models))
    pad = max(high - low, 1e-3) * 0.15
    ax.set_ylim(low - pad, high + pad)  # fitted to the data, not from 0: differences of a point show
    ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
    ax.set_title(f"test {summary['metric']}: mean and 95% interval over seeds {summary['seeds']} (dots: seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
