"""What a training run is steered by: tokens, tokens per second, step time, peak memory, model FLOPs and MFU,
and the teacher's share of the step.

Model FLOPs per token position of a sequence of T positions (PaLM, appendix B; nanoGPT's ``estimate_mfu``),
N a model's matmul weights (:func:`matmul_parameters`), L its blocks and W its attention width
(heads x head size):

    student (trained):   6 N + 12 L W T     (forward and backward)
    teacher (live):      2 N +  4 L W T     (forward only)

N counts every ``nn.Linear`` (and GPT-2's ``Conv1D``) weight inside the transformer blocks and, for a language
model whose head runs, the head's (BERT's MLM transform and decoder, the ``lm_head`` of GPT-2 and Llama: V x H,
counted per use even when tied to the input embeddings). Embedding lookups, norms, biases and a classifier's
pooler and head (one per sequence, not per token) are not counted. A cached teacher costs nothing, a truncated
one its kept blocks without its head, a frozen student (TED's stage I) its forward alone. Activation
checkpointing's recomputed forward is not counted: these are model FLOPs, not hardware FLOPs.

Everything per step stays on the host: tokens are counted from the batch as the collator returned it (a CPU
tensor, before the engine moves it), FLOPs from the batch's shape, and the teacher's forward is timed by hooks
with CUDA events read only on the logged step, after the sync logging does anyway (:class:`TeacherTimer`).
"""

from __future__ import annotations

import contextlib
import resource
import time
from typing import Optional

import torch
from torch import nn

from fastted.train.engine import mean_over_ranks, reduce_over_ranks

# Dense peak TFLOP/s per GPU without sparsity, from NVIDIA's data sheets: (bf16 / fp16 tensor cores, fp32 as TF32).
# The first entry whose name is in the device's name wins (the H100 PCIe before the SXM H100).
PEAK_TFLOPS = (
    ("H100 PCIe", (756.0, 378.0)),
    ("H100", (989.0, 494.0)),
    ("H200", (989.0, 494.0)),
    ("A100", (312.0, 156.0)),
)


def _weights(module: nn.Module) -> int:
    """Matmul weights of ``module`` and its children, counted whole under ZeRO-3 (``ds_numel``)."""
    return sum(
        getattr(m.weight, "ds_numel", m.weight.numel())
        for m in module.modules()
        if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"
    )


def matmul_parameters(adapter, head: bool = True) -> int:
    """The matmul weights a token position goes through in ``adapter``'s model (a
    :class:`~fastted.models.ModelAdapter`): those of its blocks and, for a language model with ``head``, those
    outside the blocks (the LM head). A classifier's head runs once per sequence: not counted."""
    if not head or adapter.task == "classification":
        return _weights(adapter.layers)
    return _weights(adapter.model)


def attention_width(adapter) -> int:
    """Heads x head size of the model's attention (``num_attention_heads * head_dim`` where the config gives a head
    size, else its hidden size)."""
    config = adapter.model.config
    heads, size = getattr(config, "num_attention_heads", None), getattr(config, "head_dim", None)
    return int(heads * size) if heads and size else adapter.hidden_size


def model_flops_per_token(adapter, seq_len: int, *, backward: bool, head: bool = True) -> int:
    """Model FLOPs per token position of ``adapter``'s model on sequences of ``seq_len`` positions: forward
    ``2 N + 4 L W T``, and with ``backward`` three times that (the module docstring)."""
    forward = 2 * matmul_parameters(adapter, head) + 4 * adapter.num_layers * attention_width(adapter) * seq_len
    return 3 * forward if backward else forward


def flops_per_token(student, teacher, seq_len: int, *, student_trains: bool = True, teacher_head: bool = True) -> int:
    """Model FLOPs per token position of one training step: the ``student`` adapter's forward and backward (its
    forward alone when ``student_trains`` is False) plus the ``teacher`` adapter's forward (None: no live teacher),
    with its head when ``teacher_head``."""
    total = model_flops_per_token(student, seq_len, backward=student_trains)
    if teacher is not None:
        total += model_flops_per_token(teacher, seq_len, backward=False, head=teacher_head)
    return total


def recipe_flops_per_token(recipe, seq_len: int) -> int:
    """:func:`flops_per_token` of a :class:`~fastted.methods.base.Recipe`: no teacher when it has none or reads a
    teacher cache; a truncated teacher without its head; a frozen student's forward alone."""
    student = recipe.student_model
    teacher = None if getattr(recipe, "teacher_cache", None) is not None else recipe.teacher_model
    trains = any(p.requires_grad for p in student.model.parameters())
    return flops_per_token(
        student, teacher, seq_len, student_trains=trains, teacher_head=not getattr(recipe, "teacher_truncated", False)
    )


def peak_tflops_of(name: str, precision: str) -> Optional[float]:
    """The dense peak TFLOP/s of the GPU called ``name`` (``torch.cuda.get_device_name()``) in ``precision``
    ("bf16", "fp16"; "fp32" as TF32), or None for a GPU not in :data:`PEAK_TFLOPS`."""
    for key, (half, tf32) in PEAK_TFLOPS:
        if key.lower() in name.lower():
            return tf32 if precision == "fp32" else half
    return None


def device_peak_flops(device: torch.device, precision: str, override_tflops: Optional[float] = None) -> Optional[float]:
    """Peak FLOP/s of ``device`` in ``precision``: ``override_tflops`` (``engine.peak_tflops``) when given, else
    from the GPU's name (:func:`peak_tflops_of`); None on a CPU or an unknown GPU (no MFU then)."""
    if override_tflops is not None:
        return float(override_tflops) * 1e12
    if device.type != "cuda":
        return None
    tflops = peak_tflops_of(torch.cuda.get_device_name(device), precision)
    return None if tflops is None else tflops * 1e12


def host_peak_rss() -> int:
    """The process's peak resident set in bytes since it started (``VmHWM``; ``ru_maxrss`` where there is no
    /proc)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, kind): on CUDA the peak allocated since the last call (the peak is reset), kind "cuda allocated";
    elsewhere the process's peak resident set since it started (:func:`host_peak_rss`), kind "host rss"."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return int(peak), "cuda allocated"
    return host_peak_rss(), "host rss"


def batch_tokens(batch: dict) -> int:
    """The tokens of a collated batch: the attention mask's non-zero entries (a (B, T) mask), else every position.
    Call it on the batch as the collator returned it (on the host): no device sync."""
    mask = batch.get("attention_mask")
    if torch.is_tensor(mask) and mask.dim() == 2:
        return int(torch.count_nonzero(mask))
    return int(batch["input_ids"].numel())


class TeacherTimer:
    """Seconds spent in the forwards of ``module`` (the teacher's model), from a forward pre-hook and a forward
    hook: ``time.perf_counter`` on the host, a pair of ``torch.cuda.Event(enable_timing=True)`` per forward on
    CUDA, read by :meth:`take` only after a sync (no sync per forward). Forwards while :attr:`active` is False
    (evaluation) are not counted. :meth:`close` removes the hooks."""

    def __init__(self, module: nn.Module, device: torch.device):
        self.cuda = device.type == "cuda"
        self.active = True
        self.seconds = 0.0  # host-timed forwards since the last take()
        self.pairs: list = []  # CUDA: (start, end) events since the last take()
        self._start = None
        self._depth = 0  # forwards of the hooked modules in progress (the model's own calls its base model's)
        # The model and its base model: a language model's adapter runs the base model alone when the fused LM
        # head takes the logits' place.
        modules = [module] + [
            m for m in (getattr(module, "base_model", None),) if isinstance(m, nn.Module) and m is not module
        ]
        self.handles = [
            h
            for m in modules
            for h in (m.register_forward_pre_hook(self._begin, prepend=True), m.register_forward_hook(self._end))
        ]  # before ZeRO-3's gathers

    def _begin(self, module, args) -> None:
        self._depth += 1
        if not self.active or self._depth > 1:
            return
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def _end(self, module, args, output) -> None:
        self._depth -= 1
        if self._start is None or self._depth:
            return
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.pairs.append((self._start, end))
        else:
            self.seconds += time.perf_counter() - self._start
        self._start = None

    def take(self) -> float:
        """Seconds of the counted forwards since the last call; on CUDA call it after a sync of the stream."""
        if self.pairs:
            self.pairs[-1][1].synchronize()  # done already after the logged step's sync: costs nothing
            self.seconds += sum(start.elapsed_time(end) for start, end in self.pairs) / 1000.0
            self.pairs.clear()
        seconds, self.seconds = self.seconds, 0.0
        return seconds

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


class Meter:
    """The throughput of one rank's run, by logging window (the optimizer steps since the previous logged step).

    Per micro batch :meth:`batch` counts its tokens and model FLOPs (from the host batch: no sync); per optimizer
    step :meth:`step`; evaluations and checkpoint saves run inside :meth:`excluded`, whose time is taken out of
    the window (the teacher's forwards in it are not counted). :meth:`fields` (every rank, on a logged step after
    the step's sync) returns the record's keys and starts the next window. ``tokens``: the run's tokens before
    this process (a resume), summed over ranks. A recipe without the :class:`~fastted.methods.base.Recipe`
    adapters (``student_model``, ``teacher_model``) gets no FLOPs and no teacher share."""

    def __init__(
        self,
        recipe,
        device: torch.device,
        world: int,
        precision: str,
        peak_tflops: Optional[float] = None,
        tokens: int = 0,
    ):
        self.recipe, self.device, self.world = recipe, device, world
        self.peak = device_peak_flops(device, precision, peak_tflops)
        self.counts_flops = getattr(recipe, "student_model", None) is not None
        teacher = getattr(recipe, "teacher_model", None)
        live = teacher is not None and getattr(recipe, "teacher_cache", None) is None
        self.cached_teacher = teacher is not None and not live
        self.timer = TeacherTimer(teacher.model, device) if live else None
        self.tokens = int(tokens)  # over all ranks, up to the start of the window
        self._flops_at: dict[int, int] = {}  # per-position FLOPs by sequence length
        self._open()

    def _open(self) -> None:
        self.start, self.excluded_s = time.perf_counter(), 0.0
        self.steps, self.window_tokens, self.positions, self.flops = 0, 0, 0, 0

    def batch(self, batch: dict) -> None:
        """Count a micro batch of this rank, as the collator returned it."""
        shape = batch["input_ids"].shape  # (B, T)
        if self.counts_flops and shape[1] not in self._flops_at:
            self._flops_at[shape[1]] = recipe_flops_per_token(self.recipe, shape[1])
        self.window_tokens += batch_tokens(batch)
        self.positions += shape[0] * shape[1]
        self.flops += self._flops_at.get(shape[1], 0) * shape[0] * shape[1]

    def step(self) -> None:
        self.steps += 1

    @contextlib.contextmanager
    def excluded(self):
        """A block whose time is not the window's (evaluation, a checkpoint save), the teacher's timer paused."""
        begin = time.perf_counter()
        if self.timer is not None:
            self.timer.active = False
        try:
            yield
        finally:
            if self.timer is not None:
                self.timer.active = True
            self.excluded_s += time.perf_counter() - begin

    def total_tokens(self) -> int:
        """The run's tokens so far over all ranks (a collective: every rank calls it)."""
        window = torch.tensor([float(self.window_tokens)], dtype=torch.float64, device=self.device)
        return self.tokens + round(float(mean_over_ranks(window)[0]) * self.world)

    def fields(self) -> dict:
        """The window's throughput keys of a logged record (a collective: every rank calls it), and a new window."""
        teacher = self.timer.take() if self.timer is not None else 0.0
        seconds = max(time.perf_counter() - self.start - self.excluded_s, 1e-9)
        local = torch.tensor(
            [self.window_tokens, self.flops, self.positions, teacher], dtype=torch.float64, device=self.device
        )
        tokens, flops, positions, teacher = (mean_over_ranks(local) * self.world).tolist()
        memory, kind = peak_memory(self.device)
        memory = int(reduce_over_ranks(torch.tensor(memory, dtype=torch.long, device=self.device), "max"))
        self.tokens += round(tokens)
        out = {
            "tokens": self.tokens,
            "tokens_per_s": tokens / seconds,
            "step_time": seconds / max(self.steps, 1),
            "peak_memory": memory,
            "peak_memory_kind": kind,
        }
        if self.counts_flops:
            out.update(flops_per_token=flops / max(positions, 1), flops_per_s=flops / self.world / seconds)
            if self.peak is not None:
                out["mfu"] = out["flops_per_s"] / self.peak
        if self.timer is not None:
            out["teacher_share"] = teacher / self.world / seconds
        elif self.cached_teacher:
            out["teacher_share"] = 0.0
        self._open()
        return out

    def close(self) -> None:
        if self.timer is not None:
            self.timer.close()
