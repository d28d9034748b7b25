"""A memory bank of teacher vectors: the negatives of contrastive distillation (CoDIR).

Two ways to keep it, both as in the literature:

- ``mode="queue"`` (MoCo): a FIFO of the last ``size`` teacher vectors; every
  step pushes the batch's vectors over the oldest ones.
- ``mode="momentum"`` (CoDIR's and CRD's released code): one entry per
  training example, updated when the example is seen:
  ``entry = normalize(momentum * entry + (1 - momentum) * normalize(v))``;
  an entry's first update stores ``normalize(v)``.

Entries are stored L2-normalized, detached, with their labels and example
ids; :meth:`negatives` hands out the filled entries as one shared (K, D)
bank (the fastest path of :func:`fastted.contrastive_kd`), :meth:`sample`
draws K negatives per anchor. Everything, the sampler's random state too,
is in the state dict, so the bank survives checkpoint and resume.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastted.ops.checks import check_floating, check_int_tensor, check_positive_int, is_number

MODES = ("queue", "momentum")
NO_LABEL = -1  # the label of an entry pushed without one


class Negatives(NamedTuple):
    """Negatives and what identifies them: pass ``labels`` (or ``index``) as contrastive_kd's negative_labels."""

    vectors: Tensor  # (K, D) shared, or (B, K, D) per anchor
    labels: Tensor  # (K,) or (B, K) int64 labels (NO_LABEL where none was given)
    index: Tensor  # (K,) or (B, K) int64 example ids (momentum) or push order (queue)


class MemoryBank(nn.Module):
    """A bank of ``size`` L2-normalized teacher vectors of width ``dim``.

    Args:
        size: entries (queue length, or the number of training examples in
            momentum mode).
        dim: vector width.
        mode: "queue" or "momentum" (see the module docstring).
        momentum: the weight of an entry's old value in momentum mode, in [0, 1).
        dtype, device: of the stored vectors (fp32 by default: the momentum
            updates stay precise under a bf16 model).
        seed: seeds :meth:`sample`'s generator (kept in the state dict).
    """

    def __init__(
        self,
        size: int,
        dim: int,
        *,
        mode: str = "queue",
        momentum: float = 0.5,
        dtype: torch.dtype = torch.float32,
        device=None,
        seed: int = 0,
    ):
        super().__init__()
        check_positive_int("size", size)
        check_positive_int("dim", dim)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not is_number(momentum) or not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}")
        self.mode, self.momentum = mode, float(momentum)
        self.register_buffer("vectors", torch.zeros(size, dim, dtype=dtype, device=device))
        self.register_buffer("labels", torch.full((size,), NO_LABEL, dtype=torch.int64, device=device))
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.int64, device=device))
        self.register_buffer("filled", torch.zeros(size, dtype=torch.bool, device=device))
        self.register_buffer("pushed", torch.zeros((), dtype=torch.int64, device=device))  # queue: vectors so far
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self._full = False  # entries never empty again: once full, negatives() stops checking (a host sync)

    @property
    def size(self) -> int:
        return self.vectors.shape[0]

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    @property
    def empty(self) -> bool:
        """No entry filled yet (a host sync on a GPU until the bank is full once)."""
        return not self._full and not bool(self.filled.any())

    @property
    def full(self) -> bool:
        """Every entry filled (a host sync on a GPU until it is, then none)."""
        self._full = self._full or bool(self.filled.all())
        return self._full

    def __len__(self) -> int:
        """The number of filled entries (a host sync on a GPU)."""
        return int(self.filled.sum())

    # ------------------------------------------------------------------ updates

    @torch.no_grad()
    def update(self, vectors: Tensor, *, labels: Optional[Tensor] = None, index: Optional[Tensor] = None) -> None:
        """Store a batch of teacher vectors (B, D), detached and normalized.

        labels: (B,) integer labels (for different-label negatives); index:
        (B,) example ids, required in momentum mode (the entries to update),
        kept as ids in queue mode. In momentum mode a repeated id in one
        batch keeps one of its vectors. A vector with a non-finite value is
        refused (ValueError) and nothing is stored: one NaN in the bank would
        make every later loss and gradient NaN until it was evicted (on a GPU
        this check is one host sync per update).
        """
        if not isinstance(vectors, Tensor) or vectors.dim() != 2 or vectors.shape[1] != self.dim:
            got = tuple(vectors.shape) if isinstance(vectors, Tensor) else type(vectors).__name__
            raise ValueError(f"vectors has shape {got}, but needs (B, {self.dim}) (the bank's dim)")
        check_floating("vectors", vectors)  # an integer vector is an id or a label passed where a state belongs
        n = vectors.shape[0]
        finite = torch.isfinite(vectors.detach()).all(1)
        if not bool(finite.all()):
            row = int((~finite).nonzero()[0, 0])
            raise ValueError(
                f"vectors[{row}] holds a non-finite value; the bank stores only finite vectors "
                f"(nothing of this batch was stored)"
            )
        labels = self._ints("labels", labels, n)
        index = self._ints("index", index, n)
        v = F.normalize(vectors.detach().to(self.vectors.device, torch.float32), dim=1, eps=1e-12)
        if self.mode == "queue":
            self._push(v, labels, index)
            return
        if index is None:
            raise ValueError("index is required in momentum mode: the example id of each vector (its bank entry)")
        bad = (index < 0) | (index >= self.size)
        if index.device.type == "cpu" and bool(bad.any()):  # on a GPU an index out of range is a device assert
            raise ValueError(f"index holds {index[bad][0].item()}, outside [0, {self.size}) (the bank's size)")
        old = self.vectors[index].float()
        mixed = F.normalize(self.momentum * old + (1 - self.momentum) * v, dim=1, eps=1e-12)
        new = torch.where(self.filled[index][:, None], mixed, v)
        self.vectors[index] = new.to(self.vectors.dtype)
        self.ids[index] = index
        if labels is not None:
            self.labels[index] = labels
        self.filled[index] = True

    def _ints(self, name: str, x, n: int) -> Optional[Tensor]:
        if x is None:
            return None
        check_int_tensor(name, x, (n,), hint=" (one per vector)")
        return x.detach().to(self.vectors.device, torch.int64)

    def _push(self, v: Tensor, labels: Optional[Tensor], index: Optional[Tensor]) -> None:
        n, size = v.shape[0], self.size
        order = self.pushed + torch.arange(n, device=v.device)  # push order of each vector; no host sync
        keep = slice(max(0, n - size), n)  # only the newest `size` vectors survive
        slots = order[keep] % size
        self.vectors[slots] = v[keep].to(self.vectors.dtype)
        self.labels[slots] = NO_LABEL if labels is None else labels[keep]
        self.ids[slots] = (order if index is None else index)[keep]
        self.filled[slots] = True
        self.pushed += n

    # ------------------------------------------------------------------ negatives

    def negatives(self) -> Negatives:
        """All filled entries as one shared bank: vectors (K, D), labels (K,), index (K,)."""
        filled = self.filled
        if self.full:
            return Negatives(self.vectors, self.labels, self.ids)
        if not bool(filled.any()):
            raise ValueError("the memory bank is empty: update() it with teacher vectors before asking for negatives")
        return Negatives(self.vectors[filled], self.labels[filled], self.ids[filled])

    def sample(
        self,
        k: int,
        *,
        labels: Optional[Tensor] = None,
        index: Optional[Tensor] = None,
        n_anchors: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        strict: bool = True,
    ) -> Negatives:
        """k negatives per anchor, drawn uniformly (with replacement) from the filled entries.

        labels: (B,) anchor labels: entries with the anchor's label are never
        drawn (different-label negatives in fine-tuning); index: (B,) anchor
        example ids: the anchor's own entry is never drawn. n_anchors gives B
        when neither is passed. An anchor with no allowed entry (a filling
        bank that holds only its label) is a ValueError, or with
        ``strict=False`` gets k draws from every entry, which the caller
        leaves out by the returned labels or index (``contrastive_kd``'s
        ``negative_labels``). Returns vectors (B, k, D), labels and index (B, k).
        """
        check_positive_int("k", k)
        pool = self.filled.nonzero()[:, 0]  # (n_filled,) entries to draw from
        n_filled = len(pool)
        if n_filled == 0:
            raise ValueError("the memory bank is empty: update() it with teacher vectors before sampling negatives")
        if k > n_filled:
            raise ValueError(f"k={k} is larger than the memory bank's {n_filled} filled entries (of {self.size})")
        b = next((x.shape[0] for x in (labels, index) if isinstance(x, Tensor)), n_anchors)
        if b is None:
            raise ValueError("sample() needs labels, index or n_anchors to know the number of anchors")
        labels, index = self._ints("labels", labels, b), self._ints("index", index, b)
        gen = generator if generator is not None else self.generator
        device = self.vectors.device

        def forbidden(slots, anchors):  # True where a drawn entry may not serve its anchor
            bad = torch.zeros(slots.shape, dtype=torch.bool, device=device)
            if labels is not None:
                bad |= self.labels[slots] == labels[anchors, None]
            if index is not None:
                bad |= self.ids[slots] == index[anchors, None]
            return bad

        draw = lambda shape: pool[torch.randint(len(pool), shape, generator=gen).to(device)]  # noqa: E731
        every = torch.arange(b, device=device)
        slots = draw((b, k))
        for _ in range(20):  # redraw the forbidden ones
            bad = forbidden(slots, every)
            if not bool(bad.any()):
                break
            slots = torch.where(bad, draw((b, k)), slots)
        else:  # anchors with few allowed entries (or none): draw from their allowed entries directly
            for anchor in bad.any(1).nonzero()[:, 0].tolist():
                choices = pool[~forbidden(pool[None, :], torch.tensor([anchor], device=device))[0]]
                if len(choices) == 0 and not strict:
                    continue  # its draws stay forbidden ones: the caller leaves them out
                if len(choices) == 0:
                    raise ValueError(
                        f"anchor {anchor} has no allowed negative in the memory bank: every filled entry shares "
                        f"its label or is its own entry"
                    )
                redo = bad[anchor].nonzero()[:, 0]
                slots[anchor, redo] = choices[torch.randint(len(choices), (len(redo),), generator=gen).to(device)]
        return Negatives(self.vectors[slots], self.labels[slots], self.ids[slots])

    # ------------------------------------------------------------------ state

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """A saved bank of another size or width is refused by name (not with torch's list of size mismatches)."""
        saved = state_dict.get(prefix + "vectors")
        if isinstance(saved, Tensor) and tuple(saved.shape) != tuple(self.vectors.shape):
            raise ValueError(
                f"{prefix}vectors: the saved memory bank holds {saved.shape[0]} vectors of width "
                f"{saved.shape[1] if saved.dim() == 2 else '?'}, this one size={self.size}, dim={self.dim}: "
                f"build the bank with the saved size and dim to load it"
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def get_extra_state(self) -> dict:
        return {"mode": self.mode, "momentum": self.momentum, "generator": self.generator.get_state()}

    def set_extra_state(self, state: dict) -> None:
        self._full = False
        if state["mode"] != self.mode:
            raise ValueError(f"the saved memory bank is in mode {state['mode']!r}, this one in {self.mode!r}")
        self.momentum = state["momentum"]
        self.generator.set_state(state["generator"])

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, mode={self.mode!r}, momentum={self.momentum}"
