"""A top-k teacher in a few hundred bytes a token: the packed form a teacher cache stores and the sparse KL reads.

A row (token) of a top-k teacher is its k largest logits, their vocabulary ids and the log-sum-exp of its
other logits at temperature T (:func:`fastted.reference.sparse_logit_kd_reference`). Packed:

- ``words`` (..., W) int32: the k ids, ``id_bits`` = ceil(log2 V) bits each (17 at Llama 3's 128,256), id j
  at bits [j * id_bits, (j + 1) * id_bits) of the row, counting from bit 0 of word 0 (little-endian); a row
  takes W = ceil(k * id_bits / 32) words;
- ``levels`` (..., k) uint8: the values as steps below the row's largest, ``value = top - level * step``, with
  ``step = (top - smallest) / 255``: an error of at most step / 2 per value (bf16's is |value| / 512);
- ``top``, ``step``, ``tail`` (...) fp32.

At k = 64 and V = 128,256 that is 136 + 64 + 12 = 212 bytes a token, against 388 for int32 ids and bf16
values. :func:`pack_topk` makes it, :func:`unpack_topk` undoes it (the spec of every reader);
:func:`~fastted.ops.sparse_logit_kd.sparse_logit_kd` and
:func:`~fastted.ops.sparse_logit_kd.fused_linear_sparse_kd` read it as it is.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

LEVELS = 255  # the largest level of a value: uint8


class PackedTopK(NamedTuple):
    """A top-k teacher, packed (see the module): ``words``, ``levels``, ``top``, ``step``, ``tail`` and the
    ``id_bits`` of each id."""

    words: Tensor
    levels: Tensor
    top: Tensor
    step: Tensor
    tail: Tensor
    id_bits: int

    @property
    def k(self) -> int:
        return self.levels.shape[-1]

    @property
    def lead(self) -> tuple:
        return tuple(self.levels.shape[:-1])

    def to(self, device, non_blocking: bool = False) -> PackedTopK:
        return PackedTopK(*(x.to(device, non_blocking=non_blocking) for x in self[:5]), self.id_bits)

    def reshape_rows(self) -> PackedTopK:
        """The same teacher as (N, ...) rows."""
        return PackedTopK(
            self.words.reshape(-1, self.words.shape[-1]),
            self.levels.reshape(-1, self.k),
            self.top.reshape(-1),
            self.step.reshape(-1),
            self.tail.reshape(-1),
            self.id_bits,
        )

    def rows(self, r) -> PackedTopK:
        """Rows ``r`` (a slice or an index) of an (N, ...) teacher."""
        return PackedTopK(*(x[r] for x in self[:5]), self.id_bits)


def id_bits(vocab: int) -> int:
    """The bits an id of a ``vocab``-entry vocabulary takes."""
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:
        raise ValueError(f"vocab must be an int >= 1, got {vocab!r}")
    return max(1, (vocab - 1).bit_length())


def words_per_row(k: int, bits: int) -> int:
    return -(-k * bits // 32)


def pack_ids(ids: Tensor, bits: int) -> Tensor:
    """(..., k) ids in [0, 2**bits) as (..., W) int32 words (see the module). An id spans at most two words: its
    low part is added into the first, shifted up, its high part into the next (the bits never overlap)."""
    if not 1 <= bits <= 32:
        raise ValueError(f"id_bits must be in [1, 32], got {bits}")
    lead, k = ids.shape[:-1], ids.shape[-1]
    ids = ids.reshape(-1, k).to(torch.int64)
    n_words = words_per_row(k, bits)
    start = torch.arange(k, device=ids.device) * bits
    word, shift = start >> 5, start & 31
    words = torch.zeros(ids.shape[0], n_words + 1, dtype=torch.int64, device=ids.device)
    words.index_add_(1, word, (ids << shift) & 0xFFFFFFFF)
    words.index_add_(1, word + 1, ids >> (32 - shift))
    words = words[:, :n_words]
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.reshape(*lead, n_words)


def unpack_ids(words: Tensor, bits: int, k: int) -> Tensor:
    """The (..., k) int64 ids of :func:`pack_ids`'s (..., W) words."""
    lead = words.shape[:-1]
    w = words.reshape(-1, words.shape[-1]).to(torch.int64) & 0xFFFFFFFF
    w = torch.nn.functional.pad(w, (0, 1))  # the word after the last: an id may end in the last one
    start = torch.arange(k, device=words.device) * bits
    word, shift = start >> 5, start & 31
    pair = w[:, word] | (w[:, word + 1] << 32)
    return ((pair >> shift) & ((1 << bits) - 1)).reshape(*lead, k)


def pack_topk(values: Tensor, ids: Tensor, tail: Tensor, vocab: int) -> PackedTopK:
    """The packed form of a top-k teacher: ``values`` (..., k) its k largest logits (finite), ``ids`` (..., k)
    their ids in [0, vocab), ``tail`` (...) the log-sum-exp of the others at the cache's temperature."""
    values = values.detach().float()
    if not bool(torch.isfinite(values).all()):
        raise ValueError("topk_values holds a non-finite logit: the teacher's logits must be finite to be cached")
    if bool((tail.isnan() | (tail == float("inf"))).any()):
        raise ValueError(
            "tail_lse holds NaN or +inf (-inf alone means no tail): the teacher's other logits were not finite"
        )
    top, low = values.amax(-1), values.amin(-1)
    step = ((top - low) / LEVELS).clamp_min(torch.finfo(torch.float32).tiny)
    levels = ((top[..., None] - values) / step[..., None]).round().clamp(0, LEVELS).to(torch.uint8)
    bits = id_bits(vocab)
    return PackedTopK(pack_ids(ids, bits), levels, top, step, tail.detach().float(), bits)


def unpack_topk(packed: PackedTopK) -> tuple[Tensor, Tensor, Tensor]:
    """(values fp32, ids int64, tail fp32) of a packed teacher: what the readers of the packed form compute."""
    values = packed.top[..., None] - packed.levels.float() * packed.step[..., None]
    return values, unpack_ids(packed.words, packed.id_bits, packed.k), packed.tail.float()


def padding_row(k: int, bits: int) -> PackedTopK:
    """The packed teacher of a padding row: ids 0..k-1 (distinct, as the losses need), equal values, no tail."""
    return PackedTopK(
        pack_ids(torch.arange(k), bits),
        torch.zeros(k, dtype=torch.uint8),
        torch.zeros(()),
        torch.zeros(()),
        torch.full((), float("-inf")),
        bits,
    )
