"""DeepSpeed for the student (trained, ZeRO stage 0-3) and the teacher (frozen, ZeRO-3 partitioned).

One code path whatever the launch: ``deepspeed`` or ``torchrun`` set the
ranks; one process without a launcher is a world of one (gloo on the CPU,
NCCL on GPUs). The student's :class:`~fastted.methods.base.Recipe` trains
through ``deepspeed.initialize`` with a torch AdamW and fastted's own
warmup + decay schedule (:func:`lr_at`); DeepSpeed does the precision,
gradient accumulation, clipping and ZeRO partitioning. The teacher goes
through ``deepspeed.initialize`` without an optimizer at ZeRO stage 3 with no
persistent parameters, so no rank holds a full copy of it.

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

import math
import os
import random
import socket
from typing import Optional

import numpy as np
import torch
from torch import nn

from fastted.config import ConfigError, EngineConfig, TrainConfig
from fastted.methods.base import Recipe, RecipeOutput
from fastted.loading import place
from fastted.models import gathered, is_partitioned

# --------------------------------------------------------------------------- devices and ranks


def resolve_device(config: EngineConfig) -> torch.device:
    """The device of this rank; a GPU-only option on a CPU-only machine is a ConfigError."""
    cuda = torch.cuda.is_available()
    if config.device == "cuda" and not cuda:
        raise ConfigError("engine.device: got 'cuda', but this machine has no CUDA GPU (use auto or cpu)")
    if not cuda or config.device == "cpu":
        if config.precision == "fp16":
            raise ConfigError("engine.precision: fp16 needs a CUDA GPU (DeepSpeed's loss scaling); on a CPU use "
                              "fp32 or bf16")
        if config.impl == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ConfigError("engine.impl: 'triton' needs a CUDA GPU (or TRITON_INTERPRET=1); on a CPU use auto "
                              "or reference")
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would otherwise warn that it found no GPU
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size). Without a launcher this process is a world of one."""
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(_free_port()))
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size()


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


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """``values`` averaged over the ranks (one collective for all of them)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / dist.get_world_size()


# --------------------------------------------------------------------------- schedule


def lr_at(step: int, total: int, config: TrainConfig) -> float:
    """The learning-rate multiplier at optimizer step ``step`` of ``total``: linear warmup, then decay to 0."""
    warmup = int(config.warmup_ratio * total)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if config.decay == "constant":
        return 1.0
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    if config.decay == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def batch_layout(config: TrainConfig, world: int) -> tuple[int, int]:
    """(micro batch per rank, accumulation steps) for the global ``batch_size``."""
    micro = config.micro_batch_size or max(config.batch_size // world, 1)
    if config.batch_size % (micro * world):
        raise ConfigError(f"batch_size {config.batch_size} is not a multiple of micro_batch_size {micro} x "
                          f"{world} ranks")
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


def deepspeed_config(train: TrainConfig, engine: EngineConfig, world: int) -> dict:
    """The student's DeepSpeed config: fastted's settings, then the user's file or mapping over them."""
    micro, accumulation = batch_layout(train, world)
    config = {
        "train_batch_size": micro * accumulation * world,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": train.clip,
        "zero_optimization": {"stage": engine.zero_stage},
        "bf16": {"enabled": engine.precision == "bf16"},
        "fp16": {"enabled": engine.precision == "fp16"},
        "steps_per_print": 2**31 - 1,
        "zero_allow_untested_optimizer": True,
    }
    return _merge(config, _user_deepspeed(engine.deepspeed))


def partitions_teacher(engine: EngineConfig, world: int) -> bool:
    """Whether the teacher is partitioned (ZeRO-3): ``engine.teacher_zero3``, by default with more than one rank."""
    return engine.teacher_zero3 if engine.teacher_zero3 is not None else world > 1


def teacher_deepspeed_config(engine: EngineConfig, micro: int) -> dict:
    """Inference at ZeRO-3 with nothing persistent: every teacher parameter stays partitioned between uses."""
    return {
        "train_micro_batch_size_per_gpu": micro,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                              "stage3_model_persistence_threshold": 0},
        "bf16": {"enabled": engine.precision == "bf16"},
        "fp16": {"enabled": engine.precision == "fp16"},
        "steps_per_print": 2**31 - 1,
    }


# --------------------------------------------------------------------------- checkpoints that load without pickle


def checkpoint_types() -> list:
    """The few DeepSpeed types its checkpoints hold besides tensors, containers and numbers."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _safe_checkpoint_engine(ds_config):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch engine, but loading with ``weights_only=True`` (no arbitrary unpickling)."""

        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(checkpoint_types()):
                return torch.load(path, map_location=map_location, weights_only=True)

    return SafeCheckpointEngine(ds_config)


def rng_state() -> dict:
    """This rank's random states, as tensors and numbers only (loadable with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
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
        engine: the EngineConfig (precision, ZeRO stage, DeepSpeed overrides).
        total_steps: optimizer steps of the run, for the schedule.
        device: this rank's device (``resolve_device``).
    """

    def __init__(self, recipe: Recipe, train: TrainConfig, engine: EngineConfig, total_steps: int,
                 device: torch.device):
        import deepspeed

        self.rank, self.world = init_distributed(device)
        self.device = device
        self.micro_batch, self.accumulation = batch_layout(train, self.world)
        self.recipe = recipe
        self.total_steps = total_steps
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(engine.precision)
        teacher = recipe.teacher
        if teacher is not None and partitions_teacher(engine, self.world):
            # built partitioned (fastted.loading), or whole (library use): DeepSpeed then partitions it parameter
            # by parameter, each moved to the device alone
            deepspeed.initialize(model=teacher, config=teacher_deepspeed_config(engine, self.micro_batch))
        # Only what ZeRO-3 does not partition moves here, one tensor at a time: under stage 3 DeepSpeed partitions
        # the recipe's parameters where they are (below), each moved alone, so only its buffers move now.
        student_config = deepspeed_config(train, engine, self.world)
        place(recipe, device, parameters=student_config["zero_optimization"].get("stage", 0) < 3)
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
        groups = [{"params": [p for n, p in named if not _no_decay(n, p)], "weight_decay": train.weight_decay},
                  {"params": [p for n, p in named if _no_decay(n, p)], "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=train.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, total_steps, train))
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.step_module, optimizer=optimizer, lr_scheduler=scheduler,
            config=student_config)
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
        bad = [name for name, p in self.recipe.named_parameters() if p.requires_grad
               and not bool(torch.isfinite(p.ds_tensor if is_partitioned(p) else p).all())]
        if int(reduce_over_ranks(torch.tensor(len(bad), device=self.device), "max")):
            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "") or "on another rank"
            raise NonFiniteError(f"{where}: non-finite weights ({shown}); not saved. Last good checkpoint: "
                                 f"{last_good or 'none'}")

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def train(self, mode: bool = True) -> None:
        self.ds.train(mode)

    # ------------------------------------------------------------------ saving

    def save(self, directory: str) -> None:
        """A DeepSpeed checkpoint (model, optimizer, schedule) plus this rank's RNG, written into ``directory``
        (the trainer makes it atomic and records the step). Every rank must call it."""
        self.ds.save_checkpoint(directory, tag="state", save_latest=False)
        torch.save(rng_state(), os.path.join(directory, f"rng-rank{self.rank}.pt"))

    def load(self, directory: str) -> None:
        """Restore what :meth:`save` wrote."""
        path, _ = self.ds.load_checkpoint(directory, tag="state", load_module_strict=True)
        if path is None:
            raise ValueError(f"checkpoint {directory}: DeepSpeed found no state in it")
        rng = os.path.join(directory, f"rng-rank{self.rank}.pt")
        if not os.path.exists(rng):
            raise CheckpointError(f"checkpoint {directory}: no rng-rank{self.rank}.pt (saved by fewer ranks than "
                                  f"{self.world}?): resume with the same number of ranks, or resume=false")
        set_rng_state(torch.load(rng, weights_only=True))

    def gathered(self):
        """A context in which every recipe parameter is whole (ZeRO-3), e.g. to export the trained model."""
        return gathered(self.recipe.parameters())
