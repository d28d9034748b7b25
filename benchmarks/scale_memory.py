"""Host memory at scale: how each rank's peak memory grows with the teacher, on 2 gloo ranks (issue 29's target).

Builds two random-init Llama-style teachers of one width, a small one (2 blocks) and a large one (22 blocks,
about 300M parameters), so that what grows between them is the blocks. Each is saved twice: as safetensors
(``save_pretrained``) and as a GGUF file written with the gguf package's ``GGUFWriter`` (llama metadata, F16
matrices and F32 norms under llama.cpp's tensor names, q and k permuted as llama.cpp permutes them), both with
SmolLM2's tokenizer (its GGUF's ``tokenizer.*`` metadata copied; 49152 tokens). The weights are rounded through
float16 first, so that both files hold the same values; that transformers' GGUF load gives them back exactly is
checked on the small teacher.

Then, for each of ``distil``, ``evaluate`` and ``cache-teacher`` (task clm, method kd, ``engine.teacher_zero3=true``,
a 2-layer student, 32-token lines, two steps: from the second forward on ZeRO-3 prefetches along its recorded
trace), each format and each teacher, it launches::

    python -m torch.distributed.run --nproc_per_node 2 benchmarks/rank_memory.py <out> -m fastted <job> ...

and once more ``distil`` with the student under ZeRO-3 (``engine.zero_stage=3``). benchmarks/rank_memory.py
records each rank's peak private memory (RssAnon), proportional set size (Pss: file pages shared between the
ranks, such as memory-mapped weights, split between them) and VmHWM. The result file holds, per job, format and
rank, the growth of each peak from the small to the large teacher over the growth of the teacher's fp32 bytes,
and whether it is at most 0.6 (the target). The verdict reads VmHWM, the kernel's exact peak of the resident
set, shared file pages counted whole (the strictest of the three); RssAnon and Pss are sampled every 20 ms, so a
short peak of the small teacher's run that falls between samples inflates their growth (seen: RssAnon 0.61 on a
rank whose VmHWM grew 0.55)::

    python benchmarks/scale_memory.py [--dir runs/scale-memory]
        [--json benchmarks/results/<date>-cpu-2core-scale-memory.json] [--jobs ...] [--formats ...]

About 16 minutes on 2 CPU cores; 2.3 GB of disk for the teachers, built once per --dir (a run's output folder
is removed once it has succeeded).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this clone's fastted, as the launched ranks import it (PYTHONPATH)
WRAPPER = os.path.join(ROOT, "benchmarks", "rank_memory.py")

from benchmarks import result_file  # noqa: E402

# The teachers: SmolLM2's vocabulary, one width, two depths.
VOCAB, HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, POSITIONS = 49152, 1024, 2816, 16, 4, 2048
BLOCKS = {"small": 2, "large": 22}
STUDENT_LAYERS = 2
JOBS = ("distil", "evaluate", "cache-teacher")
FORMATS = ("safetensors", "gguf")
GGUF_NAME = "teacher.gguf"
TARGET = 0.6
VERDICT_FIELDS = ("VmHWM",)  # exact; RssAnon and Pss are sampled (see the module docstring)

# --------------------------------------------------------------------------- the teachers


def _smollm2_gguf() -> str:
    from fastted.train.config import ModelConfig
    from fastted.train.sources import model_source

    return os.path.join(*model_source(ModelConfig(path="smollm2"), "teacher"))


def llama_to_gguf_order(weight, heads: int):
    """A q or k projection's rows (``heads`` heads of ``head_dim`` rows) in llama.cpp's order: within each head,
    the rotary pairs (i, i + head_dim / 2) that transformers' rotate_half forms become neighbours (2i, 2i + 1).
    Transformers' GGUF loader undoes it (its LlamaTensorProcessor)."""
    rows = weight.shape[0]
    half = rows // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(model, path: str, tokenizer_gguf: str) -> None:
    """``model`` (a LlamaForCausalLM with tied embeddings) as a GGUF file with ``tokenizer_gguf``'s tokenizer."""
    import gguf
    import numpy as np

    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("fastted scale-memory teacher")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    rope = getattr(cfg, "rope_parameters", None) or {"rope_theta": cfg.rope_theta}
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    reader = gguf.GGUFReader(tokenizer_gguf)
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub_type)
    del reader
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight":  # tied: a GGUF without output.weight ties them again
            continue
        base, suffix = hf_name.rsplit(".", 1)
        name = names.get_name(base)
        if name is None:
            raise ValueError(f"no GGUF name for the parameter {hf_name!r}")
        values = tensor.detach().float().numpy()
        if base.endswith("self_attn.q_proj"):
            values = llama_to_gguf_order(values, cfg.num_attention_heads)
        elif base.endswith("self_attn.k_proj"):
            values = llama_to_gguf_order(values, cfg.num_key_value_heads)
        dtype = np.float16 if values.ndim > 1 else np.float32  # llama.cpp's F16 files keep norms in F32
        writer.add_tensor(f"{name}.{suffix}", np.ascontiguousarray(values, dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def build_teacher(directory: str, blocks: int, seed: int) -> dict:
    """A random-init teacher of ``blocks`` blocks in ``directory``/safetensors and ``directory``/gguf; returns its
    description (built once: a complete directory is read back)."""
    info_path = os.path.join(directory, "teacher.json")
    if os.path.exists(info_path):
        with open(info_path) as f:
            return json.load(f)
    import torch
    import transformers as tf

    from fastted.train.sources import load_tokenizer

    shutil.rmtree(directory, ignore_errors=True)
    st_dir, gguf_dir = os.path.join(directory, "safetensors"), os.path.join(directory, "gguf")
    os.makedirs(gguf_dir)
    tokenizer_gguf = _smollm2_gguf()
    tokenizer = load_tokenizer(os.path.dirname(tokenizer_gguf), os.path.basename(tokenizer_gguf))
    config = tf.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=blocks,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=POSITIONS,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = tf.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0, 0.02)
            else:  # norms away from 1, as trained ones are
                p.uniform_(0.5, 1.5)
            p.copy_(p.half().float())  # values that F16 holds exactly: both files hold the same teacher
    model.save_pretrained(st_dir)
    tokenizer.save_pretrained(st_dir)
    write_gguf(model, os.path.join(gguf_dir, GGUF_NAME), tokenizer_gguf)
    parameters = sum(p.numel() for p in model.parameters())
    info = {
        "blocks": blocks,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "heads": HEADS,
        "kv_heads": KV_HEADS,
        "vocab": VOCAB,
        "parameters": parameters,
        "fp32_bytes": 4 * parameters,
        "safetensors_bytes": sum(
            os.path.getsize(os.path.join(st_dir, f)) for f in os.listdir(st_dir) if f.endswith(".safetensors")
        ),
        "gguf_bytes": os.path.getsize(os.path.join(gguf_dir, GGUF_NAME)),
    }
    with open(info_path, "w") as f:
        json.dump(info, f, indent=1)
    return info


def check_gguf_round_trip(directory: str) -> dict:
    """transformers' GGUF load of the teacher in ``directory`` against its safetensors load: the same parameter
    names and values (exactly), the same logits on random tokens (the configs agree; the GGUF's epsilon is a
    float32) and the same tokenizer vocabulary."""
    import torch
    import transformers as tf

    from fastted.train.sources import load_tokenizer

    st_dir, gguf_dir = os.path.join(directory, "safetensors"), os.path.join(directory, "gguf")
    ours_model = tf.AutoModelForCausalLM.from_pretrained(st_dir)
    theirs_model = tf.AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
    ours, theirs = ours_model.state_dict(), theirs_model.state_dict()
    if sorted(ours) != sorted(theirs):
        raise SystemExit(f"the GGUF teacher's parameters differ by name: {sorted(set(ours) ^ set(theirs))[:5]}")
    different = [n for n in ours if ours[n].dtype != theirs[n].dtype or not torch.equal(ours[n], theirs[n])]
    if different:
        raise SystemExit(f"the GGUF teacher loads other values than the safetensors one: {different[:5]}")
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        error = (ours_model(ids).logits - theirs_model(ids).logits).abs().max().item()
    if error > 1e-4:
        raise SystemExit(f"the GGUF teacher's logits differ from the safetensors one's by up to {error}")
    if load_tokenizer(st_dir).get_vocab() != load_tokenizer(gguf_dir, GGUF_NAME).get_vocab():
        raise SystemExit("the GGUF teacher's tokenizer differs from the safetensors one's")
    return {"parameters_compared": len(ours), "equal": True, "max_logit_difference": error}


# --------------------------------------------------------------------------- the runs


def write_data(directory: str) -> tuple[str, str]:
    """Training and test lines (deterministic word salad; 16 and 4 lines, one example each: no packing)."""
    import random

    words = (
        "teacher student layer memory rank shard partition gradient token model distil scale node "
        "tensor weight cache stream batch step loss"
    ).split()
    rng = random.Random(0)
    paths = []
    for name, lines in (("train.txt", 16), ("test.txt", 4)):
        path = os.path.join(directory, name)
        with open(path, "w") as f:
            for _ in range(lines):
                f.write(" ".join(rng.choice(words) for _ in range(40)) + "\n")
        paths.append(path)
    return paths[0], paths[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fastted_args(
    job: str, run_dir: str, teacher_dir: str, fmt: str, data: tuple[str, str], zero3_student: bool
) -> list[str]:
    args = [job, "--preset", "clm"]
    if job != "evaluate":
        args += ["--method", "kd"]
    folder = os.path.join(teacher_dir, fmt)
    args += [
        f"output_dir={run_dir}",
        f"teacher.path={folder}",
        f"data.source={data[0]}",
        f"data.test_source={data[1]}",
        "data.pack=false",
        "data.max_length=32",
        "data.max_train_examples=16",
        "data.max_test_examples=4",
        "distil.methods=[kd]",
        "distil.train.batch_size=2",
        "distil.train.max_steps=2",
        "distil.train.warmup_ratio=0",
        "student.layers=null",
        f"student.num_layers={STUDENT_LAYERS}",
        "engine.teacher_zero3=true",
        "engine.threads=1",
        "progress=false",
    ]
    if fmt == "gguf":
        args.append(f"teacher.gguf_file={GGUF_NAME}")
    if zero3_student:
        args.append("engine.zero_stage=3")
    return args


def launch(out: str, argv: list[str], timeout: int) -> dict:
    """Run ``fastted <argv>`` on 2 ranks under the memory wrapper; the per-rank records and the run's status."""
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    env = {
        **os.environ,
        "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "TRITON_INTERPRET": "0",
    }
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_port()),
        WRAPPER,
        os.path.join(out, "memory"),
        "-m",
        "fastted",
        *argv,
    ]
    began = time.perf_counter()
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        code, tail = done.returncode, (done.stdout[-1500:] + done.stderr[-2500:])
    except subprocess.TimeoutExpired as e:
        code, tail = "timeout", str(e)[-2000:]
    ranks = []
    for rank in (0, 1):
        path = os.path.join(out, "memory", f"rank-{rank}.json")
        if os.path.exists(path):
            with open(path) as f:
                ranks.append(json.load(f))
    record = {"exit_code": code, "seconds": round(time.perf_counter() - began, 1), "ranks": ranks}
    if code != 0 or len(ranks) != 2:
        record["output_tail"] = tail
    return record


def growth(small: dict, large: dict, teacher_growth: int) -> list[dict]:
    """Per rank and field: the peak's growth from the small to the large teacher, over the teacher's growth."""
    rows = []
    for s, l in zip(small["ranks"], large["ranks"]):
        row = {"rank": s["rank"]}
        for field in s["peak_kib"]:
            grown = (l["peak_kib"][field] - s["peak_kib"][field]) * 1024
            ratio = grown / teacher_growth
            row[field] = {"growth_bytes": grown, "ratio": round(ratio, 3), "within_target": ratio <= TARGET}
        rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=os.path.join("runs", "scale-memory"), help="teachers, data and runs")
    parser.add_argument(
        "--json",
        default=os.path.join(
            ROOT, "benchmarks", "results", f"{datetime.date.today().isoformat()}-cpu-2core-scale-memory.json"
        ),
    )
    parser.add_argument("--jobs", default=",".join(JOBS), help="comma-separated subset of " + ",".join(JOBS))
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated subset of " + ",".join(FORMATS))
    parser.add_argument("--timeout", type=int, default=600, help="seconds per launch")
    parser.add_argument("--note", default=None, help="a line kept in the result file (what was measured, and how)")
    args = parser.parse_args(argv)
    jobs = [j for j in args.jobs.split(",") if j]
    formats = [f for f in args.formats.split(",") if f]
    for name, got, allowed in (("--jobs", jobs, JOBS), ("--formats", formats, FORMATS)):
        if not got or set(got) - set(allowed):
            parser.error(f"{name}: got {','.join(got)}, needs a comma-separated subset of {','.join(allowed)}")
    os.makedirs(args.dir, exist_ok=True)
    began = time.perf_counter()

    teachers, teacher_dirs = {}, {}
    for seed, (size, blocks) in enumerate(BLOCKS.items()):
        teacher_dirs[size] = os.path.join(args.dir, f"teacher-{size}")
        print(f"teacher {size}: {blocks} blocks ...", flush=True)
        teachers[size] = build_teacher(teacher_dirs[size], blocks, seed)
    round_trip = check_gguf_round_trip(teacher_dirs["small"]) if "gguf" in formats else None
    teacher_growth = teachers["large"]["fp32_bytes"] - teachers["small"]["fp32_bytes"]
    data = write_data(args.dir)

    cases = [(job, fmt, False) for job in jobs for fmt in formats]
    if "distil" in jobs:
        cases += [("distil", fmt, True) for fmt in formats]
    runs, growths = [], []
    for job, fmt, zero3_student in cases:
        by_size = {}
        for size in BLOCKS:
            name = f"{job}-{fmt}-{size}" + ("-zero3-student" if zero3_student else "")
            run_dir = os.path.join(args.dir, "runs", name)
            shutil.rmtree(run_dir, ignore_errors=True)  # a finished run would resume, not load and run again
            argv = fastted_args(job, run_dir, teacher_dirs[size], fmt, data, zero3_student)
            print(f"{name} ...", flush=True)
            record = launch(os.path.join(args.dir, "memory", name), argv, args.timeout)
            if record["exit_code"] == 0:  # checkpoints and caches: 11 GB over all runs, none of them needed
                shutil.rmtree(run_dir, ignore_errors=True)
            by_size[size] = {
                "job": job,
                "format": fmt,
                "teacher": size,
                "zero3_student": zero3_student,
                "argv": ["fastted", *argv],
                **record,
            }
            runs.append(by_size[size])
            print(
                f"  exit {record['exit_code']} in {record['seconds']} s: "
                + ", ".join(
                    f"rank {r['rank']} peak RssAnon {r['peak_kib']['RssAnon'] / 2**20:.2f} GiB, "
                    f"Pss {r['peak_kib']['Pss'] / 2**20:.2f} GiB"
                    for r in record["ranks"]
                ),
                flush=True,
            )
        ok = all(r["exit_code"] == 0 and len(r["ranks"]) == 2 for r in by_size.values())
        entry = {"job": job, "format": fmt, "zero3_student": zero3_student, "completed": ok}
        if ok:
            entry["ranks"] = growth(by_size["small"], by_size["large"], teacher_growth)
            entry["within_target"] = all(row[f]["within_target"] for row in entry["ranks"] for f in VERDICT_FIELDS)
            print(
                "  growth ratios: "
                + "; ".join(
                    f"rank {row['rank']} " + ", ".join(f"{f} {row[f]['ratio']}" for f in ("RssAnon", "Pss", "VmHWM"))
                    for row in entry["ranks"]
                ),
                flush=True,
            )
        growths.append(entry)

    result = {
        "command": " ".join(["python", *sys.argv]),
        "device": "CPU, 2 cores",
        "date": datetime.date.today().isoformat(),
        "note": args.note,
        "versions": result_file.versions("torch", "transformers", "deepspeed", "gguf", "safetensors"),
        "target": f"each rank's peak memory grows by at most {TARGET}x the teacher's fp32 growth (verdict on "
        f"{' and '.join(VERDICT_FIELDS)}: the kernel's exact peak resident set, shared file pages counted whole; "
        f"RssAnon and Pss, sampled every 20 ms, are shown)",
        "setup": {
            "ranks": 2,
            "backend": "gloo",
            "task": "clm",
            "method": "kd",
            "teacher_zero3": True,
            "student_layers": STUDENT_LAYERS,
            "max_length": 32,
            "train_examples": 16,
            "test_examples": 4,
            "steps": 2,
            "batch_size": 2,
            "sample_interval_s": 0.02,
        },
        "teachers": teachers,
        "teacher_growth_fp32_bytes": teacher_growth,
        "gguf_round_trip_small_teacher": round_trip,
        "growth": growths,
        "within_target": all(g.get("within_target", False) for g in growths),
        "runs": runs,
        "seconds": round(time.perf_counter() - began, 1),
    }
    result_file.write(args.json, result)
    print(f"{args.json}: within target: {result['within_target']} ({result['seconds']} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
