"""The ``fastted`` command.

::

    fastted pipeline                      # the embedded default: MiniLM-L6 -> 3 layers on BBC News
    fastted pipeline -c configs/smollm2-bbc.yaml distil.train.max_steps=50
    fastted finetune teacher | student    # one step of the pipeline, reading and writing output_dir
    fastted filters teacher | student
    fastted distil [--method ted ...]
    fastted evaluate
    fastted config                        # print the resolved config

Settings come from a preset (``--preset``, default bbc-minilm), then a YAML
file (``-c``), then ``key.sub=value`` overrides. Bad settings end with one
line on stderr and exit status 2 (set FASTTED_DEBUG=1 for the traceback).
Launch under ``torchrun --nproc_per_node N`` or ``deepspeed`` for several ranks.
"""
from __future__ import annotations

import argparse
import os
import sys

from fastted.config import PRESETS, ConfigError, load_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastted", description="Layer-wise knowledge distillation of transformer "
                                     "language models (TED, LWD, KD, CoDIR, RAIL-KD, DWT).")
    # The deepspeed launcher passes --local_rank before the command (the rank is also in LOCAL_RANK).
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, help_text, which=False):
        p = sub.add_parser(name, help=help_text, description=help_text)
        if which:
            p.add_argument("which", choices=("teacher", "student"))
        p.add_argument("-c", "--config", help="a YAML config file")
        p.add_argument("--preset", choices=sorted(PRESETS), help="start from this preset (default bbc-minilm)")
        p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. seed=1")
        return p

    add("pipeline", "run every step of the config's `steps`")
    add("finetune", "fine-tune the teacher or the student alone", which=True)
    add("filters", "TED stage I: learn task-aware filters", which=True)
    add("distil", "stage II of the distillation methods").add_argument(
        "--method", action="append", help="a method (repeatable); default: distil.methods")
    add("evaluate", "evaluate every model of the run; write results.json, report.md and report.png")
    add("config", "print the resolved config as YAML")
    return parser


def _check_tokenizers(config) -> None:
    """A student from another folder must share the teacher's tokenizer."""
    if config.student.path is None:
        return
    from fastted.models import load_tokenizer, model_source

    teacher = load_tokenizer(*model_source(config.teacher, "teacher"))
    student = load_tokenizer(*model_source(config.student, "student"))
    if teacher.get_vocab() != student.get_vocab():
        raise ConfigError(f"student.path: its tokenizer ({type(student).__name__}, {len(student)} tokens) differs "
                          f"from the teacher's ({type(teacher).__name__}, {len(teacher)} tokens); distillation "
                          f"compares them token by token and needs the same tokenizer")


def run(argv=None) -> dict:
    args = _parser().parse_args(argv)
    config = load_config(args.config, tuple(args.overrides), args.preset)
    if args.command == "config":
        from fastted.config import to_yaml

        print(to_yaml(config), end="")
        return {}
    from fastted import pipeline as p
    from fastted.models import model_source

    model_source(config.teacher, "teacher")  # missing model folders end here, before any work
    if config.student.path is not None:
        model_source(config.student, "student")
    _check_tokenizers(config)

    os.makedirs(config.output_dir, exist_ok=True)
    if args.command == "pipeline":
        result = p.pipeline(config)
    elif args.command == "finetune":
        result = p.finetune(config, args.which)
    elif args.command == "filters":
        result = p.learn_filters(config, args.which)
    elif args.command == "distil":
        methods = args.method or config.distil.methods
        from fastted.config import METHODS

        for method in methods:
            if method not in METHODS:
                raise ConfigError(f"--method: got {method!r}, needs one of {', '.join(METHODS)}")
        result = {method: p.distil(config, method) for method in methods}
    else:
        result = p.evaluate(config)
    if "evaluate" in result or args.command == "evaluate":
        _print_results(config, result.get("evaluate", result))
    return result


def _print_results(config, results: dict) -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:
        return
    key = "accuracy" if config.task == "classification" else "perplexity"
    print(f"\ntest {key} ({config.output_dir}):")
    for label, r in results.items():
        print(f"  {label:<22} {r[key]:.4f}")
    print(f"report: {os.path.join(config.output_dir, 'report.md')}")


def main(argv=None) -> int:
    try:
        run(argv)
    except (ConfigError, ValueError, FileNotFoundError) as error:
        if os.environ.get("FASTTED_DEBUG") == "1":
            raise
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"fastted: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastted: interrupted (the last complete checkpoint is kept; run again to resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
