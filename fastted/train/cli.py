"""The ``fastted`` command.

::

    fastted pipeline                      # the embedded default: MiniLM-L6 -> 3 layers on BBC News
    fastted pipeline -c configs/smollm2-bbc.yaml distil.train.max_steps=50
    fastted finetune teacher | student    # one job of the pipeline, reading and writing output_dir
    fastted filters teacher | student
    fastted cache-teacher [--method kd ...]  # the teacher once over the data: distil.teacher_cache=true reads it
    fastted distil [--method ted ...]
    fastted evaluate
    fastted tokenize [--out DIR]          # the corpus tokenized once into token shards (every job does it first)
    fastted config                        # print the resolved config

Settings come from a preset (``--preset``, default bbc-minilm), then a YAML
file (``-c``), then ``key.sub=value`` overrides. Bad settings end with one
line on stderr and exit status 2 (set FASTTED_DEBUG=1 for the traceback).
Launch under ``torchrun --nproc_per_node N`` or ``deepspeed`` for several ranks.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import warnings

from fastted.train.config import METHODS, PRESETS, ConfigError, ConfigKeyWarning, load_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastted",
        description="Layer-wise knowledge distillation of transformer "
        "language models (TED, LWD, KD, CoDIR, RAIL-KD, DWT).",
    )
    # The deepspeed launcher passes --local_rank before the command (the rank is also in LOCAL_RANK).
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, help_text, which=False):
        p = sub.add_parser(name, help=help_text, description=help_text)
        if which:
            p.add_argument("which", choices=("teacher", "student"))
        p.add_argument("-c", "--config", help="a YAML config file")
        p.add_argument(
            "--preset", metavar="NAME", help=f"start from this preset: {', '.join(PRESETS)} (default bbc-minilm)"
        )
        p.add_argument(
            "overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. seed=1 (anywhere on the line)"
        )
        return p

    add("pipeline", "run every job of the config's `jobs`, in order")
    add("finetune", "fine-tune the teacher or the student alone", which=True)
    add("filters", "TED stage I: learn task-aware filters", which=True)
    add(
        "cache-teacher",
        "run the teacher once over the training data and store its top-k logits and layer "
        "targets (read by distil with distil.teacher_cache=true)",
    ).add_argument("--method", action="append", help="a method (repeatable); default: distil.methods")
    add("distil", "stage II of the distillation methods").add_argument(
        "--method", action="append", help="a method (repeatable); default: distil.methods"
    )
    add("evaluate", "evaluate every model of the run; write results.json, report.md and report.png")
    add(
        "tokenize",
        "tokenize the run's corpus once into memory-mapped token shards (the jobs of an mlm or clm "
        "run then map them); with --out, the whole source into DIR, to name as data.source",
    ).add_argument("--out", metavar="DIR", help="write the whole source (no split) as token shards into DIR")
    add("config", "print the resolved config as YAML")
    return parser


def _check_tokenizers(config) -> None:
    """A student from another folder must share the teacher's tokenizer."""
    if config.student.path is None:
        return
    from fastted.models import same_tokenizer
    from fastted.train.sources import load_tokenizer, model_source

    teacher = load_tokenizer(*model_source(config.teacher, "teacher"))
    student = load_tokenizer(*model_source(config.student, "student"))
    if not same_tokenizer(student, teacher):
        raise ConfigError(
            f"student.path: its tokenizer ({type(student).__name__}, {len(student)} tokens) differs "
            f"from the teacher's ({type(teacher).__name__}, {len(teacher)} tokens); distillation "
            f"compares them token by token and needs the same tokenizer"
        )


_VALUED_OPTIONS = ("-c", "--config", "--preset", "--method", "--out", "--local_rank", "--local-rank")


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, with ``key=value`` overrides taken from anywhere in it (argparse alone refuses those
    placed after an option as unrecognized arguments)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    rest, overrides, i = [], [], 0
    while i < len(argv):
        token = argv[i]
        if token in _VALUED_OPTIONS and i + 1 < len(argv):
            rest += argv[i : i + 2]
            i += 2
            continue
        (overrides if "=" in token and not token.startswith("-") else rest).append(token)
        i += 1
    parser = _parser()
    args = parser.parse_args(rest)
    if args.overrides:  # a bare word where an override belongs: never ignored
        parser.error(f"argument {args.overrides[0]!r}: an override needs the form key.sub=value, e.g. seed=1")
    args.overrides = overrides
    return args


def check_data_source(config) -> None:
    """A local data source (or test source) exists before any work: the data is read only when a job starts."""
    from fastted.train.data import BUILT_IN, BUILT_IN_TEXT, looks_like_path

    for key, source in (("data.source", config.data.source), ("data.test_source", config.data.test_source)):
        if source is None or source in BUILT_IN:
            continue
        path = os.path.expanduser(source)
        if looks_like_path(source) and not (os.path.exists(path) or glob.glob(path)):
            raise ConfigError(
                f"{key}: got {source!r}, which does not exist (a file, folder or glob, "
                f"{BUILT_IN_TEXT} or a dataset name)"
            )


def make_output_dir(path: str) -> None:
    """Create ``output_dir``, or a ConfigError when it, or a folder above it, is a file or cannot be written."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        what = "is a file" if existing == os.path.abspath(path) else f"is under the file {existing}"
        raise ConfigError(f"output_dir: got {path!r}, which {what}; needs a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"output_dir: got {path!r}, which cannot be created ({error.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir: got {path!r}, needs a folder this user can write")


def run(argv=None) -> dict:
    args = parse_args(argv)
    config = load_config(args.config, tuple(args.overrides), args.preset)
    if args.command == "config":
        from fastted.train.config import to_yaml

        print(to_yaml(config), end="")
        return {}
    from fastted.train import pipeline as p
    from fastted.train.sources import check_against_models, model_source

    model_source(config.teacher, "teacher")  # missing model folders end here, before any work
    if config.student.path is not None:
        model_source(config.student, "student")
    _check_tokenizers(config)
    check_against_models(config)
    jobs = {
        "pipeline": list(config.jobs),
        "distil": ["distil"],
        "evaluate": ["evaluate"],
        "cache-teacher": ["cache-teacher"],
        "tokenize": [],
    }.get(args.command, [f"{args.command}-{getattr(args, 'which', '')}"])
    methods = (
        args.method if args.command in ("distil", "cache-teacher") and args.method else None
    ) or config.distil.methods
    for method in methods:
        if method not in METHODS:
            raise ConfigError(f"--method: got {method!r}, needs one of {', '.join(METHODS)}")
    p.check_prerequisites(config, jobs, methods, args.command)
    check_data_source(config)
    make_output_dir(config.output_dir)
    if args.command == "pipeline":
        result = p.pipeline(config)
    elif args.command == "finetune":
        result = p.finetune(config, args.which)
    elif args.command == "filters":
        result = p.learn_filters(config, args.which)
    elif args.command == "distil":
        result = {method: p.distil(config, method) for method in methods}
    elif args.command == "cache-teacher":
        result = {method: p.cache_teacher(config, method) for method in methods}
    elif args.command == "tokenize":
        result = p.tokenize(config, args.out)
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
    if "models" in results:  # several seeds: means, intervals and paired differences
        print(f"\ntest {key} ({config.output_dir}), seeds {results['seeds']}: mean [95% interval]")
        for label, m in results["models"].items():
            print(f"  {label:<22} {m['mean']:.4f} [{m['low']:.4f}, {m['high']:.4f}]")
        scale = 100.0 if key == "accuracy" else 1.0
        print("  differences, points [95% over the test examples] [95% over the seeds]:")
        for name, d in results["differences"].items():
            s = d["seeds"]
            print(
                f"  {name:<28} {scale * d['diff']:+.2f} [{scale * d['low']:+.2f}, {scale * d['high']:+.2f}] "
                f"[{scale * s['low']:+.2f}, {scale * s['high']:+.2f}]{'' if d['holds'] else '  (ranks nothing)'}"
            )
    else:
        print(f"\ntest {key} ({config.output_dir}):")
        for label, r in results.items():
            print(f"  {label:<22} {r[key]:.4f}")
    print(f"report: {os.path.join(config.output_dir, 'report.md')}")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """fastted's own warnings (a damaged checkpoint passed over, a torn metrics line, an old config key) as one
    line each."""
    from fastted.train.trainer import CheckpointWarning

    if issubclass(category, (CheckpointWarning, ConfigKeyWarning)):
        print(f"fastted: warning: {message}", file=sys.stderr)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


_default_showwarning = warnings.showwarning


def main(argv=None) -> int:
    """The command: 0 when it worked, 2 for a bad setting or input, 1 when training went non-finite."""
    from fastted.train.engine import NonFiniteError

    warnings.showwarning = _show_warning
    try:
        with warnings.catch_warnings():
            # an old config key's notice is for the user running the command: shown, where Python hides
            # DeprecationWarnings raised outside __main__
            warnings.simplefilter("default", ConfigKeyWarning)
            run(argv)
    except (ConfigError, ValueError, FileNotFoundError, NonFiniteError) as error:
        if os.environ.get("FASTTED_DEBUG") == "1":
            raise
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"fastted: error: {message}", file=sys.stderr)
        return 1 if isinstance(error, NonFiniteError) else 2
    except KeyboardInterrupt:
        print("fastted: interrupted (the last complete checkpoint is kept; run again to resume)", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = _default_showwarning
    return 0


def command(argv=None) -> int:
    """The ``fastted`` console command and ``python -m fastted``: :func:`main`, then, when it worked, the process
    group ended (:func:`fastted.train.engine.end_distributed`); a process that had a group ends with ``os._exit``, its
    output flushed. DeepSpeed keeps references to the group's objects, so they outlive ``destroy_process_group``
    and were torn down with the interpreter, where gloo's threads have aborted a rank ("terminate called without
    an active exception") after its work was done, and torchrun reported the run failed. :func:`main` alone
    leaves the group up, for callers that run several commands in one process."""
    import torch.distributed as dist

    code = main(argv)
    if not dist.is_initialized():
        return code
    if code == 0:
        from fastted.train.engine import end_distributed

        end_distributed()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(command())
