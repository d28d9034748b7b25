"""A teacher cache names its teacher by what describes it (its config, its checkpoint files' headers, sizes and
times) and distilling from the cache reads none of the teacher's weights: every read of the teacher's weight
files is counted (each byte read through ``open``, each tensor through safetensors, any ``torch.load``,
``os.open`` or memory map), and weights overwritten with other values (headers, sizes and times kept) leave the
distilled students bit for bit the same. A cache of another teacher is refused by name."""

import gc
import io
import json
import os

import pytest
import torch

from fastted.train.cli import main
from fastted.train.config import load_config
from fastted.train.identity import gguf_header, teacher_identity
from fastted.train.loading import weight_files
from tests.tiny_models import WORDS, gpt2, word_tokenizer

# The command as a CPU user runs it (see tests/conftest.py's cpu_users_path).
pytestmark = pytest.mark.usefixtures("cpu_users_path")

METHODS = ("ted", "lwd", "kd", "codir", "railkd")  # every method that reads a teacher cache


def _run(tmp_path, methods=METHODS, student=True) -> list:
    """A tiny clm run: a 4-block GPT-2 teacher with its own word tokenizer, a separate 2-block student of another
    width (``student``; else the student is cut from the teacher's blocks 0 and 3), a 40-line corpus. Returns
    the command's settings."""
    teacher = tmp_path / "teacher"
    gpt2(4, 32, seed=2).save_pretrained(teacher)
    word_tokenizer(teacher, causal=True)
    g = torch.Generator().manual_seed(1)
    lines = [
        " ".join(WORDS[int(w)] for w in torch.randint(0, len(WORDS), (int(n),), generator=g))
        for n in torch.randint(3, 30, (40,), generator=g)
    ]
    (tmp_path / "corpus.txt").write_text("\n".join(lines) + "\n")
    argv = [
        "--preset",
        "clm",
        f"teacher.path={teacher}",
        f"data.source={tmp_path / 'corpus.txt'}",
        "data.max_length=16",
        "data.max_test_examples=4",
        "progress=false",
        f"output_dir={tmp_path / 'run'}",
        "distil.train.batch_size=4",
        "distil.train.max_steps=2",
        "filters.train.batch_size=4",
        "filters.train.max_steps=1",
        "distil.ted.mse_alpha=1.0",
        "distil.lwd.mse_alpha=1.0",
        f"distil.methods=[{','.join(methods)}]",
    ]
    if student:
        gpt2(2, 24, seed=1).save_pretrained(tmp_path / "student")
        word_tokenizer(tmp_path / "student", causal=True)
        argv.append(f"student.path={tmp_path / 'student'}")
    return argv


def _header_end(path) -> int:
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


class _CountedRaw(io.RawIOBase):
    """An unbuffered file that logs each read as (path, first byte, bytes): what the system was asked for, below
    any buffer that reads ahead."""

    def __init__(self, raw, path, log):
        self.raw, self.path, self.log = raw, path, log

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, *args):
        return self.raw.seek(*args)

    def tell(self):
        return self.raw.tell()

    def fileno(self):
        return self.raw.fileno()

    def readinto(self, buffer):
        start = self.raw.tell()
        n = self.raw.readinto(buffer)
        if n:
            self.log.append((self.path, start, n))
        return n

    def close(self):
        self.raw.close()
        super().close()


class _Slice:
    """A safetensors slice that logs the bytes of each piece got from it."""

    def __init__(self, piece, path, name, log):
        self._piece, self._path, self._name, self._log = piece, path, name, log

    def __getitem__(self, index):
        tensor = self._piece[index]
        self._log.append((self._path, self._name, tensor.numel() * tensor.element_size()))
        return tensor

    def __getattr__(self, name):
        return getattr(self._piece, name)


class _Handle:
    """A safetensors handle that logs each tensor (or piece of one) got from it."""

    def __init__(self, handle, path, log):
        self._handle, self._path, self._log = handle, path, log

    def __enter__(self):
        self._handle.__enter__()
        return self

    def __exit__(self, *exc):
        return self._handle.__exit__(*exc)

    def get_tensor(self, name):
        tensor = self._handle.get_tensor(name)
        self._log.append((self._path, name, tensor.numel() * tensor.element_size()))
        return tensor

    def get_slice(self, name):
        return _Slice(self._handle.get_slice(name), self._path, name, self._log)

    def __getattr__(self, name):
        return getattr(self._handle, name)


class _Reads:
    """Every read of the ``files`` while it is installed (on ``monkeypatch``): ``reads`` through ``open`` /
    ``io.open``, at the system's level; ``tensors`` got through ``safetensors.safe_open``; ``other``: any
    ``os.open``, ``torch.load``, ``safetensors.torch.load_file`` or write of them, and any memory map of them
    (``/proc/self/maps``) when the models are built. ``values``: where each file's values start (default: after
    its safetensors header)."""

    def __init__(self, files, monkeypatch, values=None):
        import safetensors
        import safetensors.torch

        from fastted.train import pipeline

        self.files = {os.path.realpath(f): (values or {}).get(f) or _header_end(f) for f in files}
        self.reads, self.tensors, self.other = [], [], []
        real_open, real_os_open, real_safe_open = io.open, os.open, safetensors.safe_open
        real_load, real_load_file, real_train = torch.load, safetensors.torch.load_file, pipeline._train

        def watched(file):
            return isinstance(file, (str, os.PathLike)) and os.path.realpath(file) in self.files

        def counted_open(file, mode="r", buffering=-1, encoding=None, *args, **kwargs):
            if not watched(file):
                return real_open(file, mode, buffering, encoding, *args, **kwargs)
            if set(mode) - set("rbt"):
                self.other.append(("open for writing", str(file)))
                return real_open(file, mode, buffering, encoding, *args, **kwargs)
            raw = _CountedRaw(real_open(file, "rb", buffering=0), os.path.realpath(file), self.reads)
            if "b" in mode:
                return raw if buffering == 0 else io.BufferedReader(raw)
            return io.TextIOWrapper(io.BufferedReader(raw), encoding=encoding)

        def counted_os_open(path, *args, **kwargs):
            if watched(path):
                self.other.append(("os.open", str(path)))
            return real_os_open(path, *args, **kwargs)

        def counted_safe_open(path, *args, **kwargs):
            handle = real_safe_open(path, *args, **kwargs)
            return _Handle(handle, os.path.realpath(path), self.tensors) if watched(path) else handle

        def counted_load(file, *args, **kwargs):
            if watched(file):
                self.other.append(("torch.load", str(file)))
            return real_load(file, *args, **kwargs)

        def counted_load_file(path, *args, **kwargs):
            if watched(path):
                self.other.append(("load_file", str(path)))
            return real_load_file(path, *args, **kwargs)

        def mapped() -> list:
            with real_open("/proc/self/maps") as f:
                maps = f.read()
            return [path for path in self.files if path in maps]

        def train_checking_maps(*args, **kwargs):  # the models are built: none may hold a teacher file mapped
            self.other += [("mapped", path) for path in mapped()]
            return real_train(*args, **kwargs)

        gc.collect()  # the models of earlier commands in this process, whose maps would hide new ones
        assert mapped() == [], "a teacher file is mapped before the command"

        for module, name, patched in [
            ("builtins", "open", counted_open),
            ("io", "open", counted_open),
            ("os", "open", counted_os_open),
            ("torch", "load", counted_load),
            ("safetensors", "safe_open", counted_safe_open),
            ("safetensors.torch", "safe_open", counted_safe_open),
            ("safetensors.torch", "load_file", counted_load_file),
            ("transformers.modeling_utils", "safe_open", counted_safe_open),
            ("fastted.train.pipeline", "_train", train_checking_maps),
        ]:
            monkeypatch.setattr(f"{module}.{name}", patched, raising=False)

    def value_bytes(self) -> int:
        """Bytes read through ``open`` past the files' headers (the tensors' values) and got as tensors."""
        past = sum(max(0, start + n - max(start, self.files[path])) for path, start, n in self.reads)
        return past + sum(n for _, _, n in self.tensors)


def _state(folder) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


def _overwrite_values(path, seed) -> None:
    """Other finite values in every tensor of the safetensors ``path`` (all float32 here); header, size and
    modification time kept."""
    stat = os.stat(path)
    start = _header_end(path)
    values = torch.randn((stat.st_size - start) // 4, generator=torch.Generator().manual_seed(seed))
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(values.numpy().tobytes())
    assert os.path.getsize(path) == stat.st_size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def _error(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err and err[-1].startswith("fastted: error: "), err[-3:]
    return err[-1]


def test_distilling_from_the_cache_reads_no_teacher_weight(tmp_path, monkeypatch):
    """KD, LWD, TED, CoDIR and RAIL-KD distilled from their caches: no byte of the teacher's values is read (the
    run's teacher, and TED's teacher of the filters job), though the headers are; each cache names its teacher
    by teacher_identity; and with other values in the teachers' weight files every student comes out the same,
    while the live teacher's distillation does not."""
    argv = _run(tmp_path)
    run = tmp_path / "run"
    assert main(["pipeline", *argv, "jobs=[filters-teacher,filters-student,cache-teacher]"]) == 0
    config = load_config(None, tuple(argv[2:]), "clm")
    folders = {"ted": str(run / "filters-teacher" / "model")}
    for method in METHODS:
        manifest = json.loads((run / f"cache-teacher-{method}" / "manifest.json").read_text())
        identity = teacher_identity(config, folders.get(method))
        assert manifest["teacher"] == identity and set(identity) == {"config", "weights"}, method
    files = weight_files(str(tmp_path / "teacher")) + weight_files(folders["ted"])

    with monkeypatch.context() as patch:
        reads = _Reads(files, patch)
        assert main(["distil", *argv, "distil.teacher_cache=true"]) == 0
    assert {path for path, _, _ in reads.reads} == set(reads.files)  # every header read: the identity
    assert reads.value_bytes() == 0 and reads.tensors == [] and reads.other == []
    distilled = {method: _state(run / f"distil-{method}" / "model") for method in METHODS}

    for seed, path in enumerate(files):
        _overwrite_values(path, seed)
    assert main(["distil", *argv, "distil.teacher_cache=true", "resume=false"]) == 0
    for method in METHODS:
        again = _state(run / f"distil-{method}" / "model")
        assert again.keys() == distilled[method].keys()
        for name, value in distilled[method].items():
            assert torch.equal(again[name], value), (method, name)
    with monkeypatch.context() as patch:  # the live teacher reads the new values, and the count sees it
        reads = _Reads(files, patch)
        assert main(["distil", "--method", "kd", *argv, "resume=false"]) == 0
    assert reads.value_bytes() == os.path.getsize(files[0]) - _header_end(files[0])  # every value, once
    live = _state(run / "distil-kd" / "model")
    assert any(not torch.equal(live[name], value) for name, value in distilled["kd"].items())


@pytest.mark.bad_input
def test_a_cache_of_another_teacher_is_refused(tmp_path, capsys):
    """The teacher's config changed, a checkpoint's header changed (same size), its size changed (same header) or
    its modification time: the cache is refused, naming the teacher, with the command that rebuilds it; the
    teacher as it was is accepted again."""
    argv = _run(tmp_path, methods=("kd",))
    assert main(["cache-teacher", *argv]) == 0
    distil = ["distil", *argv, "distil.teacher_cache=true", "resume=false"]
    config_file, weights = tmp_path / "teacher" / "config.json", str(tmp_path / "teacher" / "model.safetensors")
    original, stat = config_file.read_bytes(), os.stat(weights)
    with open(weights, "rb") as f:
        data = f.read()

    def refused(what):
        line = _error(capsys, distil)
        assert "was made for another run (teacher: cache {'config': " in line, (what, line)
        assert "run `fastted cache-teacher --method kd` with this run's settings" in line, (what, line)

    config_file.write_text(json.dumps({**json.loads(original), "layer_norm_epsilon": 2e-5}))
    refused("config")
    config_file.write_bytes(original)
    assert b'"format":"pt"' in data[: _header_end(weights)]
    changes = {"header": data.replace(b'"format":"pt"', b'"format":"PT"', 1), "size": data + bytes(8)}
    for what, content in changes.items():
        with open(weights, "wb") as f:
            f.write(content)
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        refused(what)
    with open(weights, "wb") as f:
        f.write(data)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # rewritten in place: told by its time
    refused("time")
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert main(distil) == 0


def test_a_student_cut_from_the_teacher_reads_its_own_blocks_alone(tmp_path, monkeypatch):
    """A student cut from the teacher (blocks 0 and 3 of 4) is initialized from the teacher's files: distilling
    from a cache reads the student's tensors there, each once, and never the teacher's other blocks."""
    import re

    from safetensors import safe_open

    argv = _run(tmp_path, methods=("kd",), student=False)
    assert main(["cache-teacher", *argv]) == 0
    file = weight_files(str(tmp_path / "teacher"))
    with safe_open(file[0], "pt") as f:
        names = list(f.keys())
    with monkeypatch.context() as patch:
        reads = _Reads(file, patch)
        assert main(["distil", *argv, "distil.teacher_cache=true"]) == 0
    got = sorted(name for _, name, _ in reads.tensors)
    want = sorted(name for name in names if not re.match(r"transformer\.h\.[12]\.", name))
    assert got == want and reads.other == []
    assert reads.value_bytes() == sum(n for _, _, n in reads.tensors)  # nothing past the header through open


def test_the_identity_reads_descriptions_alone(tmp_path):
    """teacher_identity: the same for config.json written otherwise and for other values in the weights (header,
    size and time kept), another for another time; in a hub cache the blob's name in place of the time; a
    pytorch_model.bin by its size and time; a fresh teacher by its source's config, seed and shape."""
    config = load_config(None, (f"teacher.path={tmp_path / 'teacher'}",), "clm")
    folder = str(tmp_path / "teacher")
    gpt2(2, 32).save_pretrained(folder)
    weights = os.path.join(folder, "model.safetensors")
    first = teacher_identity(config, folder)
    config_file = os.path.join(folder, "config.json")
    with open(config_file) as f:
        text = f.read()
    with open(config_file, "w") as f:  # the same content, written otherwise
        json.dump(json.loads(text), f, indent=4, sort_keys=True)
    assert teacher_identity(config, folder) == first
    _overwrite_values(weights, 0)
    assert teacher_identity(config, folder) == first
    os.utime(weights, ns=(0, 10**9))
    assert teacher_identity(config, folder)["weights"] != first["weights"]

    # A hub snapshot: the weights a link into blobs/, named by their SHA-256, whatever their time.
    hub = tmp_path / "hub"
    (hub / "blobs").mkdir(parents=True)
    (hub / "snapshots" / "main").mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        blob = hub / "blobs" / ("b" * 64 if name == "model.safetensors" else "c" * 40)
        blob.write_bytes(open(os.path.join(folder, name), "rb").read())
        os.symlink(os.path.relpath(blob, hub / "snapshots" / "main"), hub / "snapshots" / "main" / name)
    snapshot = str(hub / "snapshots" / "main")
    named = teacher_identity(config, snapshot)
    os.utime(hub / "blobs" / ("b" * 64), ns=(0, 5 * 10**9))
    assert teacher_identity(config, snapshot) == named
    os.rename(hub / "blobs" / ("b" * 64), hub / "blobs" / ("d" * 64))
    os.remove(hub / "snapshots" / "main" / "model.safetensors")
    os.symlink("../../blobs/" + "d" * 64, hub / "snapshots" / "main" / "model.safetensors")
    assert teacher_identity(config, snapshot)["weights"] != named["weights"]

    # pytorch_model.bin: its size and time (nothing of it read)
    binary = str(tmp_path / "bin")
    os.makedirs(binary)
    with open(os.path.join(binary, "config.json"), "w") as f:
        f.write(text)
    torch.save(gpt2(2, 32).state_dict(), os.path.join(binary, "pytorch_model.bin"))
    pickled = teacher_identity(config, binary)
    assert pickled["config"] == first["config"] and pickled["weights"] != first["weights"]
    os.utime(os.path.join(binary, "pytorch_model.bin"), ns=(0, 10**9))
    assert teacher_identity(config, binary)["weights"] != pickled["weights"]

    # A fresh teacher: its source's config, seed and shape.
    word_tokenizer(folder, causal=True)
    fresh = [f"teacher.path={folder}", "teacher.random_init=true", "student.random_init=true"]
    drawn = teacher_identity(load_config(None, tuple(fresh), "clm"))
    assert drawn["fresh"]["seed"] == config.seed and "weights" not in drawn
    assert teacher_identity(load_config(None, (*fresh, "seed=7"), "clm")) != drawn
    assert teacher_identity(load_config(None, (*fresh, "teacher.num_layers=3"), "clm")) != drawn


def test_a_gguf_header_is_read_to_its_tensor_table(tmp_path, monkeypatch):
    """The GGUF metadata's digest and the tensor table's: each changes with what it describes and neither with
    the tensors' values, and not a byte of the values is read."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    def write(path, name="general", shape=(3, 4), values=0.0):
        out = gguf.GGUFWriter(str(path), "llama")
        out.add_string(f"{name}.name", "tiny")
        out.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc"])
        out.add_array("tokenizer.ggml.scores", [0.5, 0.25, 0.125])
        out.add_tensor("a", np.full(shape, values, dtype=np.float32))
        out.add_tensor("b", np.ones(5, dtype=np.float16))
        out.write_header_to_file()
        out.write_kv_data_to_file()
        out.write_tensors_to_file()
        out.close()
        return str(path)

    base = write(tmp_path / "base.gguf")
    start = gguf.GGUFReader(base).data_offset  # the values start here (after the table's padding)
    with monkeypatch.context() as patch:
        reads = _Reads([base], patch, values={base: start})
        metadata, table = gguf_header(base)
    assert reads.reads and reads.value_bytes() == 0
    assert gguf_header(write(tmp_path / "values.gguf", values=1.0)) == (metadata, table)
    assert gguf_header(write(tmp_path / "meta.gguf", name="other"))[1] == table
    assert gguf_header(write(tmp_path / "meta.gguf", name="other"))[0] != metadata
    shaped = gguf_header(write(tmp_path / "shape.gguf", shape=(4, 3)))
    assert shaped[0] == metadata and shaped[1] != table
