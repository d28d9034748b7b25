"""TED's task-aware filters and their stage-I heads.

A filter maps one layer's hidden states (B, T, d) to the filtered space of
width d_f: ``Linear(d, d_f)``, or with ``nonlinear`` ``Linear(d, d) ->
activation -> Linear(d, d_f)`` (TED's public code). :class:`TaskFilters`
holds one filter per mapped layer of one model and saves and loads itself
next to the model (``filters.safetensors`` + ``filters.json``): a stage-I
checkpoint is what stage II starts from.

The last Linear of every filter is what the fused filtered-MSE kernel reads
(:meth:`TaskFilters.split`): the kernel does that projection, the MSE and its
gradients for all layers in one launch; a nonlinear filter's first part runs
before it as ordinary PyTorch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Optional

from torch import Tensor, nn

from fastted.files import write_atomic
from fastted.ops.checks import check_positive_int

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh, "silu": nn.SiLU}
_WEIGHTS, _CONFIG = "filters.safetensors", "filters.json"


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]()


class Filter(nn.Module):
    """One task-aware filter: ``proj(pre(h))``, ``pre`` the identity unless ``nonlinear``."""

    def __init__(self, in_dim: int, out_dim: int, *, nonlinear: bool = False, activation: str = "gelu"):
        super().__init__()
        self.pre = nn.Sequential(nn.Linear(in_dim, in_dim), _activation(activation)) if nonlinear else nn.Identity()
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.proj(self.pre(hidden))


class TaskFilters(nn.Module):
    """One :class:`Filter` per mapped layer of one model.

    Args:
        layers: the model's mapped layers (0-based blocks), in map order.
        hidden_size: the model's width d.
        filter_dim: d_f, default ``hidden_size``; give both models the same
            d_f when their widths differ (the recipes default to the
            teacher's width).
        nonlinear, activation: see :class:`Filter`.
    """

    def __init__(
        self,
        layers: Sequence[int],
        hidden_size: int,
        filter_dim: Optional[int] = None,
        *,
        nonlinear: bool = False,
        activation: str = "gelu",
    ):
        super().__init__()
        layers = list(layers)
        if not layers or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in layers):
            raise ValueError(f"layers must be a non-empty list of layer indices, got {layers!r}")
        check_positive_int("hidden_size", hidden_size)
        filter_dim = hidden_size if filter_dim is None else check_positive_int("filter_dim", filter_dim)
        _activation(activation)
        self.config = dict(
            layers=layers,
            hidden_size=hidden_size,
            filter_dim=filter_dim,
            nonlinear=bool(nonlinear),
            activation=activation,
        )
        self.filters = nn.ModuleList(
            Filter(hidden_size, filter_dim, nonlinear=nonlinear, activation=activation) for _ in layers
        )

    @property
    def layers(self) -> list[int]:
        return self.config["layers"]

    @property
    def filter_dim(self) -> int:
        return self.config["filter_dim"]

    def __len__(self) -> int:
        return len(self.filters)

    def forward(self, states: Sequence[Tensor]) -> list[Tensor]:
        """Filter the mapped layers' states (one (B, T, d) tensor per filter) into (B, T, d_f) each."""
        self._check(states)
        return [f(h) for f, h in zip(self.filters, states)]

    def split(self, states: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Optional[Tensor]]]:
        """(inputs of each filter's last Linear, its weights, its biases): what the fused MSE kernel reads."""
        self._check(states)
        return (
            [f.pre(h) for f, h in zip(self.filters, states)],
            [f.proj.weight for f in self.filters],
            [f.proj.bias for f in self.filters],
        )

    def _check(self, states) -> None:
        if len(states) != len(self.filters):
            raise ValueError(
                f"got {len(states)} hidden states, but these filters are for {len(self.filters)} layers {self.layers}"
            )

    def extra_repr(self) -> str:
        c = self.config
        return f"layers={c['layers']}, {c['hidden_size']} -> {c['filter_dim']}, nonlinear={c['nonlinear']}"

    # ------------------------------------------------------------------ save / load

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``filters.safetensors`` and ``filters.json`` into ``directory``, each atomically."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        write_atomic(os.path.join(directory, _WEIGHTS), lambda path: save_file(tensors, path))
        write_atomic(os.path.join(directory, _CONFIG), json.dumps(self.config, indent=2))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device=None) -> TaskFilters:
        """Load filters saved by :meth:`save_pretrained` (no pickle: JSON and safetensors)."""
        from safetensors.torch import load_file

        paths = [os.path.join(directory, name) for name in (_CONFIG, _WEIGHTS)]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(
                f"no saved filters in {directory}: missing {', '.join(missing)} (save them with "
                f"TaskFilters.save_pretrained, or run TED's stage I)"
            )
        with open(paths[0]) as f:
            config = json.load(f)
        filters = cls(
            config["layers"],
            config["hidden_size"],
            config["filter_dim"],
            nonlinear=config["nonlinear"],
            activation=config["activation"],
        )
        filters.load_state_dict(load_file(paths[1], device="cpu" if device is None else str(device)))
        return filters.to(device) if device is not None else filters


class ClassificationHead(nn.Module):
    """TED's stage-I classification head on a filter's output.

    A pooler on the first token (``dense`` + activation, as DeBERTa's
    ContextPooler), dropout, then ``Linear(d_f, num_labels)``.
    """

    def __init__(self, dim: int, num_labels: int, *, dropout: float = 0.1, activation: str = "gelu"):
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("num_labels", num_labels)
        self.dense = nn.Linear(dim, dim)
        self.activation = _activation(activation)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(dim, num_labels)

    def forward(self, filtered: Tensor) -> Tensor:  # (B, T, d_f) -> (B, num_labels)
        pooled = self.activation(self.dense(filtered[:, 0]))
        return self.classifier(self.dropout(pooled))
