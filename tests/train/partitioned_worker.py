"""Runs fastted commands in one process of a launch and records every model that reaches the device whole.

``partitioned_worker.py OUT.json ARGV1.json [ARGV2.json ...]``: each ARGV file holds the argument list of one
``fastted`` command (``distil ...``, ``cache-teacher ...``, ``evaluate ...``), run in turn by
``fastted.train.cli.main`` in this process. Around them it records, for each command:

- ``transfers``: every ``Module.to`` / ``Module.cuda`` call, and every ``Tensor.to`` / ``Tensor.cuda`` call on a
  parameter or its data, whose destination is the engine's device (``resolve_device``; on the CPU the CPU itself:
  the call is the transfer, even when it moves nothing), with the bytes it sends: of the module's parameters and
  buffers, or of the tensor, that ZeRO-3 does not partition;
- ``whole_models``: every Hugging Face model that is whole (not partitioned, not on the meta device) when it is
  built (the end of ``post_init``) or loaded (``from_pretrained``), with its bytes;
- ``read``: the checkpoint entries :mod:`fastted.train.loading` read on this rank.

Each list keeps the events of more than ``--floor`` bytes, each with the fastted frames that made it. Writes OUT
(rank 0's and rank 1's records: ``OUT`` and ``OUT.rank1``).
"""

import argparse
import json
import os
import sys
import traceback
import weakref

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from fastted.train.config import EngineConfig  # noqa: E402
from fastted.train.engine import resolve_device  # noqa: E402
from tests.launch import finish  # noqa: E402

RECORD: dict = {}
PARAMETERS: dict = {}  # id -> weak reference of every parameter a module registered


def _where() -> list[str]:
    frames = traceback.extract_stack()[:-2]
    return [
        f"{os.path.basename(f.filename)}:{f.lineno} {f.name}"
        for f in frames
        if "fastted" in f.filename and "partitioned_worker" not in f.filename
    ][-4:]


def _whole_bytes(tensors) -> int:
    return sum(
        t.numel() * t.element_size()
        for t in tensors
        if t is not None and not hasattr(t, "ds_id") and t.device.type != "meta"
    )


def _holds_a_parameter(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a module's parameter or its data (not e.g. DeepSpeed's flat optimizer partitions)."""
    if isinstance(tensor, torch.nn.Parameter):
        return True
    ptr = tensor.untyped_storage().data_ptr()
    alive = [p for p in (ref() for ref in list(PARAMETERS.values())) if p is not None]
    return bool(ptr) and any(p.untyped_storage().data_ptr() == ptr for p in alive)


def _note(kind: str, nbytes: int, what: str) -> None:
    if nbytes > RECORD["floor"]:
        RECORD["job"][kind].append({"bytes": nbytes, "what": what, "where": _where()})


def _device_of(args, kwargs):
    try:
        return torch._C._nn._parse_to(*args, **kwargs)[0]
    except (TypeError, RuntimeError):
        return None


def _install(device: torch.device) -> None:
    import transformers

    def lands(target) -> bool:
        return target is not None and torch.device(target).type == device.type

    module_to, module_cuda = torch.nn.Module.to, torch.nn.Module.cuda
    tensor_to, tensor_cuda = torch.Tensor.to, torch.Tensor.cuda

    def record_module(self, target):
        if lands(target):
            _note("transfers", _whole_bytes(list(self.parameters()) + list(self.buffers())), type(self).__name__)

    def m_to(self, *args, **kwargs):
        record_module(self, _device_of(args, kwargs))
        return module_to(self, *args, **kwargs)

    def m_cuda(self, device=None):
        record_module(self, "cuda")
        return module_cuda(self, device)

    def record_tensor(tensor):
        nbytes = _whole_bytes([tensor])
        if nbytes > RECORD["floor"] and _holds_a_parameter(tensor):
            _note("transfers", nbytes, f"parameter {tuple(tensor.shape)}")

    def t_to(self, *args, **kwargs):
        if lands(_device_of(args, kwargs)):
            record_tensor(self)
        return tensor_to(self, *args, **kwargs)

    def t_cuda(self, *args, **kwargs):
        record_tensor(self)
        return tensor_cuda(self, *args, **kwargs)

    register = torch.nn.Module.register_parameter

    def registered(self, name, param):
        register(self, name, param)
        if param is not None:
            PARAMETERS[id(param)] = weakref.ref(param)

    torch.nn.Module.to, torch.nn.Module.cuda = m_to, m_cuda
    torch.Tensor.to, torch.Tensor.cuda = t_to, t_cuda
    torch.nn.Module.register_parameter = registered

    base = transformers.PreTrainedModel
    post_init, from_pretrained = base.post_init, base.from_pretrained.__func__

    def recorded_post_init(self):
        post_init(self)
        _note("whole_models", _whole_bytes(self.parameters()), f"built {type(self).__name__}")

    def recorded_from_pretrained(cls, *args, **kwargs):
        model = from_pretrained(cls, *args, **kwargs)
        _note("whole_models", _whole_bytes(model.parameters()), f"loaded {type(model).__name__}")
        return model

    base.post_init = recorded_post_init
    base.from_pretrained = classmethod(recorded_from_pretrained)
    try:
        from fastted.train import loading
    except ImportError:  # fastted before partitioned loading
        return
    read = loading._Reader.__call__

    def recorded_read(self, file, name):
        RECORD["job"]["read"].append(name)
        return read(self, file, name)

    loading._Reader.__call__ = recorded_read


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("commands", nargs="+")
    parser.add_argument("--floor", type=int, default=0)
    parser.add_argument(
        "--stacks-after",
        type=float,
        default=0,
        help="seconds: then print every thread's stack "
        "and exit (a hung collective ends the test instead of its timeout)",
    )
    args = parser.parse_args()
    if args.stacks_after:
        import faulthandler

        faulthandler.dump_traceback_later(args.stacks_after, exit=True)
    from fastted.train.cli import main as fastted

    RECORD.update(floor=args.floor, jobs=[])
    _install(resolve_device(EngineConfig()))
    for path in args.commands:
        with open(path) as f:
            argv = json.load(f)
        RECORD["job"] = {"argv": argv, "transfers": [], "whole_models": [], "read": []}
        RECORD["job"]["code"] = fastted(argv)
        RECORD["jobs"].append(RECORD.pop("job"))
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    with open(args.out + (f".rank{rank}" if rank else ""), "w") as f:
        json.dump({"world": dist.get_world_size() if dist.is_initialized() else 1, "jobs": RECORD["jobs"]}, f)
    finish()  # the group ended, then os._exit: no interpreter teardown (tests/launch.py)


if __name__ == "__main__":
    main()
