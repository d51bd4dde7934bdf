"""Packing: conversations concatenated into rows of a token budget, without padding.

Attention must not cross conversations. position_ids restart at 0 at each conversation, which is
what both paths read: flash-attn varlen takes the boundaries from them, and for sdpa transformers
builds the block-diagonal mask from packed position_ids.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from eagle_online.data.chat import TokenizedConversation


@dataclass
class PackedBatch:
    """One packed row: several whole conversations, back to back."""

    input_ids: torch.Tensor  # [1, T] int64, T <= tokens_per_batch, no padding
    position_ids: torch.Tensor  # [1, T] int64, restarting at 0 at each conversation
    loss_mask: torch.Tensor  # [1, T] int64
    num_conversations: int

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]


class PackedRows(Sequence):
    """The rows of one packing, built when read: the plan (which conversations go in which row) is
    fixed up front, the int64 tensors of a row exist only while it is used, so an epoch of a large
    corpus costs its compact token arrays, not 24 bytes per token of packed tensors."""

    def __init__(self, examples: Sequence[TokenizedConversation], rows: list[list[int]]):
        self._examples, self._rows = examples, rows

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return _batch([self._examples[k] for k in self._rows[i]])


def pack_conversations(examples: Sequence[TokenizedConversation], tokens_per_batch: int) -> PackedRows:
    """Concatenate conversations, in the given order, into rows of at most `tokens_per_batch` tokens,
    starting a new row when the next conversation does not fit. Deterministic; shuffle beforehand."""
    rows: list[list[int]] = []
    used = tokens_per_batch  # forces a first row
    for i, example in enumerate(examples):
        n = len(example.input_ids)
        if n != len(example.loss_mask):
            raise ValueError(f"conversation {i}: {n} input_ids but {len(example.loss_mask)} loss_mask entries")
        if n == 0 or n > tokens_per_batch:
            raise ValueError(f"conversation {i} has {n} tokens; a row holds 1 to {tokens_per_batch}")
        if used + n > tokens_per_batch:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return PackedRows(examples, rows)


def _batch(row: list[TokenizedConversation]) -> PackedBatch:
    def cat(arrays) -> torch.Tensor:
        return torch.from_numpy(np.concatenate([np.asarray(a, dtype=np.int64) for a in arrays])).unsqueeze(0)

    return PackedBatch(
        input_ids=cat(e.input_ids for e in row),
        position_ids=cat(np.arange(len(e.input_ids)) for e in row),
        loss_mask=cat(e.loss_mask for e in row),
        num_conversations=len(row),
    )
