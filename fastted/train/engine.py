"""DeepSpeed for the student (trained, ZeRO stage 0-3) and the teacher (frozen, ZeRO-3 partitioned).

One code path whatever the launch: ``deepspeed`` or ``torchrun`` set the
ranks; one process without a launcher is a world of one (gloo on the CPU,
NCCL on GPUs). The student's :class:`~fastted.methods.base.Recipe` trains
through ``deepspeed.initialize`` with a torch AdamW and fastted's own
warmup + decay schedule (:func:`lr_at`); DeepSpeed does the precision,
gradient accumulation, clipping and ZeRO partitioning. The teacher goes
through ``deepspeed.initialize`` without an optimizer at ZeRO stage 3 with no
persistent parameters, so no rank holds a full copy of it; its DeepSpeed config
(:func:`teacher_deepspeed_config`) takes from the user's ``engine.deepspeed``
only what holds for a frozen ZeRO-3 model (gather settings, parameter offload),
and ``engine.teacher_offload=cpu`` keeps its partitions in host memory. Every
model at ZeRO-3 gathers at most about two of its blocks at once unless the user
says otherwise (:func:`gather_window`).
``engine.precision: auto`` resolves to bf16 on GPUs that support it and fp32
elsewhere (:func:`resolve_precision`); ``engine.activation_checkpointing``
makes the student recompute its blocks' activations in its backward.

ZeRO-3 gathers a parameter only for the forward of the module that owns it.
The fused losses read weights outside any owner's forward (TED's filters and
LWD's projections go straight into the filtered-MSE kernel; the fused LM-head
KL reads the output embeddings), so :class:`Engine` registers the recipe's
:meth:`~fastted.methods.base.Recipe.external_parameters` with the module
DeepSpeed runs (``_RecipeStep``), which gathers them for its forward and its
backward. The engine knows a recipe only through that interface
(:mod:`fastted.methods.base`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import re
import socket
import sys
from typing import Optional

import numpy as np
import torch
from torch import nn

from fastted.methods.base import Recipe, RecipeOutput
from fastted.models import gathered, is_partitioned
from fastted.train.config import ConfigError, EngineConfig, TrainConfig
from fastted.train.loading import place

# --------------------------------------------------------------------------- devices and ranks


def resolve_device(config: EngineConfig) -> torch.device:
    """The device of this rank; a GPU-only option on a CPU-only machine is a ConfigError."""
    cuda = torch.cuda.is_available()
    if config.device == "cuda" and not cuda:
        raise ConfigError("engine.device: got 'cuda', but this machine has no CUDA GPU (use auto or cpu)")
    if not cuda or config.device == "cpu":
        if config.precision == "fp16":
            raise ConfigError(
                "engine.precision: fp16 needs a CUDA GPU (DeepSpeed's loss scaling); on a CPU use fp32 or bf16"
            )
        if config.impl == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ConfigError(
                "engine.impl: 'triton' needs a CUDA GPU (or TRITON_INTERPRET=1); on a CPU use auto or reference"
            )
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would otherwise warn that it found no GPU
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def resolve_precision(config: EngineConfig, device: Optional[torch.device] = None) -> str:
    """The precision a run computes in: ``engine.precision`` when it names one (fp32, bf16, fp16); for ``auto``,
    bf16 on a CUDA GPU that supports it (``torch.cuda.is_bf16_supported()``), else fp32 (the CPU, older GPUs).
    ``device``: this rank's (``resolve_device``); None: the one ``resolve_device`` would pick."""
    if config.precision != "auto":
        return config.precision
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() and config.device != "cpu" else "cpu")
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Host allocations of at least this many bytes get their own memory map, returned to the system when freed.
MMAP_THRESHOLD = 1 << 20


def return_freed_host_memory(threshold: int = MMAP_THRESHOLD) -> bool:
    """Make glibc give large freed blocks back to the system (``mallopt(M_MMAP_THRESHOLD, threshold)``); True when
    set. By default glibc raises its mmap threshold up to 32 MiB each time a large block is freed, after which
    blocks of that size come from its heap and stay in the process when freed: building a ZeRO-3 model tensor by
    tensor then leaves about one whole model of freed memory in every rank (measured: a 298M-parameter teacher's
    partitioned build grew each of 2 ranks by 1.0-1.2 GB instead of its 0.6 GB partition;
    benchmarks/scale_memory.py). A fixed threshold keeps large blocks memory-mapped. Skipped where the C library
    is not glibc and where the user set ``MALLOC_MMAP_THRESHOLD_`` themselves."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or not sys.platform.startswith("linux"):
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, int(threshold)))  # -3: M_MMAP_THRESHOLD in glibc's malloc.h
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size). Without a launcher this process is a world of one. Also makes freed host memory go
    back to the system (:func:`return_freed_host_memory`), so that what a rank builds and frees while loading a
    partitioned model does not stay in it."""
    import deepspeed
    import torch.distributed as dist

    return_freed_host_memory()
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.update(
                RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())
            )
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size()


def end_distributed() -> None:
    """End this process's process group cleanly, when one is up: a barrier, then ``destroy_process_group``. Left
    to the interpreter's exit, gloo's threads have aborted rank 0 ("terminate called without an active
    exception", exit status -6) after all its work was done, and torchrun then reported the run failed. A barrier
    that fails because another rank is gone leaves the group to the exit: that rank reports its own failure."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    try:
        dist.barrier()
    except RuntimeError:
        return
    dist.destroy_process_group()


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def reduce_over_ranks(values: torch.Tensor, op: str) -> torch.Tensor:
    """``values`` reduced elementwise over the ranks by ``op`` ("min" or "max")."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    values = values.clone()
    dist.all_reduce(values, op={"min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return values


def gather_over_ranks(value) -> list:
    """Every rank's ``value`` (a small picklable object: a few records, a reason), in rank order, on every rank."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """``values`` averaged over the ranks (one collective for all of them)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / dist.get_world_size()


# --------------------------------------------------------------------------- schedule


def warmup_steps(total: int, config: TrainConfig, tokens_per_step: Optional[int] = None) -> int:
    """The schedule's warmup in optimizer steps: ``warmup_tokens`` over the tokens of a step (packed
    pre-training, whose steps hold ``tokens_per_step`` tokens each), else ``warmup_ratio`` of ``total``."""
    if config.warmup_tokens is not None:
        if not tokens_per_step:
            raise ValueError("warmup_tokens: needs packed blocks (a fixed number of tokens per step)")
        return math.ceil(config.warmup_tokens / tokens_per_step)
    return int(config.warmup_ratio * total)


def lr_at(step: int, total: int, config: TrainConfig, tokens_per_step: Optional[int] = None) -> float:
    """The learning-rate multiplier at optimizer step ``step`` of ``total``: linear warmup
    (:func:`warmup_steps`), then decay (linear or cosine) to ``min_lr``, or constant."""
    warmup = warmup_steps(total, config, tokens_per_step)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if config.decay == "constant":
        return 1.0
    floor = min(config.min_lr / config.lr, 1.0) if config.lr else 0.0
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    if config.decay == "linear":
        return floor + (1.0 - floor) * (1.0 - progress)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def batch_layout(config: TrainConfig, world: int) -> tuple[int, int]:
    """(micro batch per rank, accumulation steps) for the global ``batch_size``."""
    micro = config.micro_batch_size or max(config.batch_size // world, 1)
    if config.batch_size % (micro * world):
        raise ConfigError(
            f"batch_size {config.batch_size} is not a multiple of micro_batch_size {micro} x {world} ranks"
        )
    return micro, config.batch_size // (micro * world)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _user_deepspeed(spec) -> dict:
    if spec is None:
        return {}
    if isinstance(spec, dict):
        return spec
    if not os.path.isfile(spec):
        raise ConfigError(f"engine.deepspeed: no such file {spec!r} (a DeepSpeed JSON or YAML config, or a mapping)")
    import yaml

    with open(spec, encoding="utf-8") as f:
        values = yaml.safe_load(f)  # JSON is YAML
    if not isinstance(values, dict):
        raise ConfigError(f"engine.deepspeed: {spec} holds no mapping")
    return values


def _precision_sections(engine: EngineConfig, user: dict) -> dict:
    """DeepSpeed's bf16 / fp16 sections for the resolved ``engine.precision``; a user's config that enables
    another one is a ConfigError (the teacher and the frozen modules follow engine.precision)."""
    precision = resolve_precision(engine)
    for name in ("bf16", "fp16"):
        section = user.get(name)
        enabled = section.get("enabled") if isinstance(section, dict) else None
        if isinstance(enabled, bool) and enabled != (precision == name):
            want = name if enabled else "fp32"
            raise ConfigError(
                f"engine.deepspeed: {name}.enabled is {str(enabled).lower()}, but engine.precision is "
                f"{precision!r}: set engine.precision={want} and leave {name}.enabled out (the teacher "
                f"and the frozen modules follow engine.precision)"
            )
    return {"bf16": {"enabled": precision == "bf16"}, "fp16": {"enabled": precision == "fp16"}}


def deepspeed_config(train: TrainConfig, engine: EngineConfig, world: int) -> dict:
    """The student's DeepSpeed config: fastted's settings, then the user's file or mapping over them."""
    micro, accumulation = batch_layout(train, world)
    user = _user_deepspeed(engine.deepspeed)
    config = {
        "train_batch_size": micro * accumulation * world,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": train.clip,
        "zero_optimization": {"stage": engine.zero_stage},
        **_precision_sections(engine, user),
        "steps_per_print": 2**31 - 1,
        "zero_allow_untested_optimizer": True,
    }
    return _merge(config, user)


# The user's zero_optimization settings that hold for a frozen model at ZeRO-3 (under either of DeepSpeed's
# names): how much to gather ahead, how many gathered parameters may live, when to release them. With
# offload_param (teacher_offload_param), nothing else: not the optimizer, gradients, batch sizes or the stage.
TEACHER_ZERO_KEYS = (
    "stage3_prefetch_bucket_size",
    "prefetch_bucket_size",
    "stage3_max_live_parameters",
    "max_live_parameters",
    "stage3_max_reuse_distance",
    "max_reuse_distance",
)


def teacher_offload_param(engine: EngineConfig) -> Optional[dict]:
    """Where the partitioned teacher's parameters live, as DeepSpeed's ``offload_param``: None (on the device),
    ``engine.teacher_offload=cpu``'s {device: cpu, pin_memory: true} (the user's other offload_param settings
    kept), or with ``teacher_offload`` unset the user's ``zero_optimization.offload_param``."""
    user = dict((_user_deepspeed(engine.deepspeed).get("zero_optimization") or {}).get("offload_param") or {})
    if engine.teacher_offload == "none":
        return None
    if engine.teacher_offload == "cpu":
        user.pop("nvme_path", None)
        return {"pin_memory": True, **user, "device": "cpu"}
    return user if user.get("device", "none") != "none" else None


def partitions_teacher(engine: EngineConfig, world: int) -> bool:
    """Whether the teacher is partitioned (ZeRO-3): ``engine.teacher_zero3``, by default with more than one rank or
    when its parameters are offloaded (:func:`teacher_offload_param`)."""
    if engine.teacher_zero3 is not None:
        return engine.teacher_zero3
    return world > 1 or teacher_offload_param(engine) is not None


# ZeRO-3's gather window: (DeepSpeed's default, the cap in blocks of the model it runs). DeepSpeed prefetches
# parameters in the order of its recorded trace until ``max_live_parameters`` are gathered, and keeps a parameter
# gathered while its next use lies within ``max_reuse_distance``; its defaults (1e9 each) exceed a whole model of
# under a billion parameters, so from the second forward on every rank would gather all of it (a 298M teacher:
# 1.2 GB more per rank). Capped at two blocks, a rank gathers the block it runs and the next one.
GATHER_WINDOW = {
    "stage3_prefetch_bucket_size": (50_000_000, 1),
    "stage3_max_live_parameters": (10**9, 2),
    "stage3_max_reuse_distance": (10**9, 2),
}


def block_parameters(model: nn.Module) -> Optional[int]:
    """Parameters of the largest transformer block of ``model`` (an element of one of its ``nn.ModuleList``s),
    counted whole under ZeRO-3; None when it has none."""
    sizes = [
        sum(getattr(p, "ds_numel", p.numel()) for p in block.parameters())
        for module in model.modules()
        if isinstance(module, nn.ModuleList)
        for block in module
    ]
    return max(sizes, default=0) or None


def gather_window(model: Optional[nn.Module], zero: dict) -> dict:
    """The ZeRO-3 settings of :data:`GATHER_WINDOW` that ``zero`` (the user's ``zero_optimization``) sets under
    neither of DeepSpeed's names: DeepSpeed's default capped at the blocks of ``model`` (nothing without a model
    or blocks)."""
    block = None if model is None else block_parameters(model)
    if block is None:
        return {}
    return {
        key: int(min(default, blocks * block))
        for key, (default, blocks) in GATHER_WINDOW.items()
        if key not in zero and key.removeprefix("stage3_") not in zero
    }


def teacher_deepspeed_config(engine: EngineConfig, micro: int, model: Optional[nn.Module] = None) -> dict:
    """Inference at ZeRO-3 with nothing persistent: every teacher parameter stays partitioned between uses. The
    user's ``engine.deepspeed`` gives its gather settings (:data:`TEACHER_ZERO_KEYS`), by default
    :func:`gather_window` of ``model`` (the model it runs), and :func:`teacher_offload_param` where its partitions
    live; the micro batch is the student's, the precision ``engine.precision``'s."""
    user = _user_deepspeed(engine.deepspeed)
    zero = {key: value for key, value in (user.get("zero_optimization") or {}).items() if key in TEACHER_ZERO_KEYS}
    zero.update(gather_window(model, zero))
    offload = teacher_offload_param(engine)
    if offload is not None:
        zero["offload_param"] = offload
    return {
        "train_micro_batch_size_per_gpu": micro,
        "zero_optimization": {
            **zero,
            "stage": 3,
            "stage3_param_persistence_threshold": 0,
            "stage3_model_persistence_threshold": 0,
        },
        **_precision_sections(engine, user),
        "steps_per_print": 2**31 - 1,
    }


# --------------------------------------------------------------------------- checkpoints that load without pickle

STATE = "state"  # the DeepSpeed tag (sub-folder) of a checkpoint's model, optimizer and schedule
ENGINE_FILE = "engine.json"  # how the checkpoint was laid out: its world size and ZeRO stage


def checkpoint_types() -> list:
    """The few DeepSpeed types its checkpoints hold besides tensors, containers and numbers."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_checkpoint_file(path: str, map_location=None):
    """One checkpoint file, loaded with ``weights_only=True`` and only :func:`checkpoint_types` allowed."""
    with torch.serialization.safe_globals(checkpoint_types()):
        return torch.load(path, map_location=map_location, weights_only=True)


@contextlib.contextmanager
def weights_only_loads(module_tensors_only: bool = False):
    """Every ``torch.load`` inside loads with ``weights_only=True`` (only :func:`checkpoint_types` allowed), even
    where the caller asks for pickle: DeepSpeed's universal-checkpoint conversion and loader do. With
    ``module_tensors_only``, a loaded DeepSpeed model state keeps only the tensors of its ``module`` (the
    conversion cannot take a module's extra state, which :meth:`Engine.load` restores itself)."""
    real = torch.load

    def load(f, map_location=None, *args, **kwargs):
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(checkpoint_types()):
            state = real(f, map_location, *args, **kwargs)
        if module_tensors_only and isinstance(state, dict) and isinstance(state.get("module"), dict):
            state["module"] = {k: v for k, v in state["module"].items() if torch.is_tensor(v)}
        return state

    torch.load = load
    try:
        yield
    finally:
        torch.load = real


def _safe_checkpoint_engine(ds_config):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch engine, but loading with ``weights_only=True`` (no arbitrary unpickling)."""

        def load(self, path: str, map_location=None):
            return load_checkpoint_file(path, map_location)

    return SafeCheckpointEngine(ds_config)


def saved_layout(directory: str) -> dict:
    """``{"world": ranks, "zero_stage": stage}`` of the checkpoint in ``directory``, from its engine.json (a
    checkpoint written before that file: the world is its number of rng-rank files, the stage None)."""
    path = os.path.join(directory, ENGINE_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            layout = json.load(f)
        return {"world": int(layout["world"]), "zero_stage": int(layout["zero_stage"])}
    ranks = [n for n in os.listdir(directory) if re.fullmatch(r"rng-rank\d+\.pt", n)]
    return {"world": len(ranks), "zero_stage": None}


def rng_state() -> dict:
    """This rank's random states, as tensors and numbers only (loadable with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- the engine


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss, term, gradient norm or weight; the message names the step, what was
    not finite and the last good checkpoint."""


class CheckpointError(ValueError):
    """A checkpoint cannot be resumed from: the message names the folder and what is wrong."""


class _RecipeStep(nn.Module):
    """What DeepSpeed runs: the recipe, its output returned as a plain dict, in which ZeRO-3 finds the loss
    (and hooks it for its backward)."""

    def __init__(self, recipe: Recipe):
        super().__init__()
        self.recipe = recipe

    def forward(self, batch: dict, **kwargs) -> dict:
        return self.recipe(batch, **kwargs).as_dict()


def _no_decay(name: str, param: torch.Tensor) -> bool:
    return param.ndim < 2 or "norm" in name.lower() or name.endswith(".bias")


class Engine:
    """The student's recipe under DeepSpeed, and its teacher partitioned.

    Args:
        recipe: a :class:`~fastted.methods.base.Recipe` (its parameters are what trains).
        train: the stage's TrainConfig (batch, lr, schedule, clipping).
        engine: the EngineConfig (precision, ZeRO stage, teacher partitioning and offload, activation
            checkpointing, DeepSpeed overrides); ``precision: auto`` is resolved here (:attr:`precision`).
        total_steps: optimizer steps of the run, for the schedule.
        device: this rank's device (``resolve_device``).
        tokens_per_step: the tokens of an optimizer step when it is fixed (packed blocks), for a warmup in
            tokens.
    """

    def __init__(
        self,
        recipe: Recipe,
        train: TrainConfig,
        engine: EngineConfig,
        total_steps: int,
        device: torch.device,
        tokens_per_step: Optional[int] = None,
    ):
        import deepspeed

        self.rank, self.world = init_distributed(device)
        self.device = device
        self.micro_batch, self.accumulation = batch_layout(train, self.world)
        self.recipe = recipe
        self.total_steps = total_steps
        self.engine_config = engine
        engine = dataclasses.replace(engine, precision=resolve_precision(engine, device))
        self.precision = engine.precision
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(engine.precision)
        if engine.activation_checkpointing:
            recipe.activation_checkpointing_enable()
        teacher = recipe.teacher
        if teacher is not None and partitions_teacher(engine, self.world):
            # built partitioned (fastted.train.loading), or whole (library use): DeepSpeed then partitions it parameter
            # by parameter, each moved to the device alone
            deepspeed.initialize(model=teacher, config=teacher_deepspeed_config(engine, self.micro_batch, teacher))
        # Only what ZeRO-3 does not partition moves here, one tensor at a time: under stage 3 DeepSpeed partitions
        # the recipe's parameters where they are (below), each moved alone, so only its buffers move now.
        student_config = deepspeed_config(train, engine, self.world)
        zero = student_config["zero_optimization"]
        if zero.get("stage", 0) == 3:  # the user's keys are merged in already
            zero.update(gather_window(recipe, zero))
        place(recipe, device, parameters=zero.get("stage", 0) < 3)
        for module in recipe.frozen_modules():
            place(module, device)
        if dtype is not None:  # the frozen parts of the recipe (teacher filters, stage-I models) too
            for module in recipe.frozen_modules():
                if not any(is_partitioned(p) for p in module.parameters()):
                    module.to(dtype)

        self.step_module = _RecipeStep(recipe)
        named = [(n, p) for n, p in recipe.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError(f"{type(recipe).__name__} has no trainable parameter")
        groups = [
            {"params": [p for n, p in named if not _no_decay(n, p)], "weight_decay": train.weight_decay},
            {"params": [p for n, p in named if _no_decay(n, p)], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=train.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_at(s, total_steps, train, tokens_per_step)
        )
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.step_module, optimizer=optimizer, lr_scheduler=scheduler, config=student_config
        )
        if self.ds.zero_optimization_stage() == 3:
            for param in recipe.external_parameters():
                deepspeed.zero.register_external_parameter(self.step_module, param)
        self.ds.checkpoint_engine = _safe_checkpoint_engine(self.ds._config)
        self._trained = [p for _, p in named]
        self._norm_from_grads = self.ds.zero_optimization_stage() == 0 and dtype is None

    # ------------------------------------------------------------------ one micro batch

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def forward(self, batch: dict, **kwargs) -> RecipeOutput:
        """The recipe's output on this rank's micro batch (moved to the device). Its loss is the tensor DeepSpeed
        returned, which carries ZeRO-3's backward hooks."""
        batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        return RecipeOutput(**self.ds(batch, **kwargs))

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)  # scaled by 1 / accumulation by DeepSpeed

    def step(self) -> Optional[torch.Tensor]:
        """Call after every micro batch's backward: DeepSpeed counts the micro batches and, at the accumulation
        boundary, clips, steps the optimizer and the schedule, and zeroes the gradients. Returns the gradient
        norm at the boundary (a device tensor, not synced; None between boundaries or when DeepSpeed's optimizer
        keeps none)."""
        boundary = self.ds.is_gradient_accumulation_boundary()
        norm = None
        if boundary and self._norm_from_grads:  # ZeRO and DeepSpeed's mixed-precision optimizers keep their own
            grads = [p.grad for p in self._trained if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads) if grads else None
        self.ds.step()
        if boundary and norm is None:
            norm = self.ds.get_global_grad_norm()
        return None if norm is None else torch.as_tensor(norm, device=self.device)

    def check_finite_parameters(self, where: str, last_good: Optional[str]) -> None:
        """Raise :class:`NonFiniteError` on every rank when a trained parameter holds a non-finite value on any
        rank (its shard, under ZeRO-3), naming this rank's: nothing non-finite is ever saved."""
        bad = [
            name
            for name, p in self.recipe.named_parameters()
            if p.requires_grad and not bool(torch.isfinite(p.ds_tensor if is_partitioned(p) else p).all())
        ]
        if int(reduce_over_ranks(torch.tensor(len(bad), device=self.device), "max")):
            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "") or "on another rank"
            raise NonFiniteError(
                f"{where}: non-finite weights ({shown}); not saved. Last good checkpoint: {last_good or 'none'}"
            )

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def train(self, mode: bool = True) -> None:
        self.ds.train(mode)

    # ------------------------------------------------------------------ saving

    def save(self, directory: str) -> None:
        """A DeepSpeed checkpoint (model, optimizer, schedule) plus this rank's RNG, written into ``directory``
        (the trainer makes it atomic and records the step), and from rank 0 its layout (engine.json: world size
        and ZeRO stage). Every rank must call it."""
        self.ds.save_checkpoint(directory, tag=STATE, save_latest=False)
        torch.save(rng_state(), os.path.join(directory, f"rng-rank{self.rank}.pt"))
        if self.is_main:
            layout = {"world": self.world, "zero_stage": int(self.ds.zero_optimization_stage())}
            with open(os.path.join(directory, ENGINE_FILE), "w", encoding="utf-8") as f:
                json.dump(layout, f)

    def needs_universal(self, directory: str) -> bool:
        """Whether the checkpoint in ``directory`` loads only through its universal form: saved on another number
        of ranks by a ZeRO-partitioned optimizer (stages 1-3). ZeRO-0 keeps whole optimizer states, which load
        natively on any number of ranks. Raises :class:`CheckpointError` when it was saved under another ZeRO
        stage (DeepSpeed's universal loading does not cross stages: its model-state files differ)."""
        saved, stage = saved_layout(directory), int(self.ds.zero_optimization_stage())
        if saved["zero_stage"] is not None and saved["zero_stage"] != stage:
            raise CheckpointError(
                f"checkpoint {directory}: saved under ZeRO stage {saved['zero_stage']}, this run "
                f"uses stage {stage}: resume with engine.zero_stage={saved['zero_stage']}, or "
                f"resume=false to start over"
            )
        return stage > 0 and saved["world"] != self.world

    def load(self, directory: str, universal: Optional[str] = None) -> None:
        """Restore what :meth:`save` wrote: natively, or from ``universal``, the checkpoint's universal form
        (:func:`fastted.train.checkpoints.universal_checkpoint`), where :meth:`needs_universal` says so.

        From the universal form every rank reads its own partition of each parameter and of the optimizer's
        states; the module's other entries (buffers, extra state: TED's MSE scales, memory banks, counters),
        which DeepSpeed's universal loading skips, are read from the model states (frozen parameters are not:
        they are the recipe's own, never trained). A rank that saved an RNG state (rank < the saved world size)
        restores it; a rank beyond the saved ranks keeps its own (the state its process was seeded with), so its
        random draws (dropout) differ from an uninterrupted run's."""
        layout = saved_layout(directory)
        if universal is None and self.needs_universal(directory):
            raise CheckpointError(
                f"checkpoint {directory}: saved on {layout['world']} ranks (ZeRO stage "
                f"{layout['zero_stage']}), this run has {self.world}: resume through "
                f"fastted.train.trainer.run, which converts it, or on {layout['world']} ranks"
            )
        if universal is None:
            path, _ = self.ds.load_checkpoint(directory, tag=STATE, load_module_strict=True)
        else:
            path = self._load_universal(directory, universal)
        if path is None:
            raise CheckpointError(f"checkpoint {directory}: DeepSpeed found no state in it")
        rng = os.path.join(directory, f"rng-rank{self.rank}.pt")
        if self.rank < layout["world"]:
            if not os.path.exists(rng):
                raise CheckpointError(
                    f"checkpoint {directory}: no rng-rank{self.rank}.pt, though it was saved by "
                    f"{layout['world']} ranks: resume=false to start over"
                )
            set_rng_state(torch.load(rng, weights_only=True))

    def _load_universal(self, directory: str, universal: str) -> Optional[str]:
        base = getattr(self.optimizer, "optimizer", self.optimizer)  # the torch AdamW inside ZeRO's optimizer
        settings = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in base.param_groups]
        self.ds._config.load_universal_checkpoint = True
        try:
            with weights_only_loads():
                path, _ = self.ds.load_checkpoint(universal, tag=STATE, load_module_strict=True)
        except Exception as error:  # DeepSpeed's loader: any failure is one named line
            saved, what = saved_layout(directory)["world"], (str(error).splitlines() or [""])[0]
            raise CheckpointError(
                f"checkpoint {directory}: saved on {saved} ranks, its universal form did not load "
                f"on {self.world} ({type(error).__name__}: {what}): resume on {saved} ranks, or "
                f"resume=false to start over"
            ) from error
        finally:
            self.ds._config.load_universal_checkpoint = False
        # ZeRO-3's universal loading gives every parameter group the first group's settings (the groups without
        # weight decay would decay) and one shared step tensor, which Adam then counts up once per group and
        # step. Each group gets its own settings back (the schedule's lr is the same in all) and its own step.
        for group, own in zip(base.param_groups, settings):
            group.update(own)
        seen = set()
        for state in base.state.values():
            for key, value in state.items():
                if torch.is_tensor(value) and id(value) in seen:
                    state[key] = value.clone()
                seen.add(id(value))
        # the universal form's copy of the model states: a resume through it reads nothing of the checkpoint's state
        states = sorted(n for n in os.listdir(os.path.join(universal, STATE)) if n.endswith("model_states.pt"))
        module = load_checkpoint_file(os.path.join(universal, STATE, states[0]), "cpu")["module"]
        trained = {name for name, _ in self.step_module.named_parameters(remove_duplicate=False)}  # tied too
        rest = {k: v for k, v in module.items() if k not in trained}
        missing, unexpected = self.step_module.load_state_dict(rest, strict=False)
        missing = [k for k in missing if k not in trained]
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint {directory}: its buffers do not match the recipe's (missing "
                f"{missing[:3]}, unexpected {unexpected[:3]}): resume=false to start over"
            )
        return path

    def gathered(self):
        """A context in which every recipe parameter is whole (ZeRO-3), e.g. to export the trained model."""
        return gathered(self.recipe.parameters())
