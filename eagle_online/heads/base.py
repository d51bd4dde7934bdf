"""What every draft head shares: the result of a training forward, the frozen copies of the target's
embedding / lm_head, and the KV cache its drafter decodes with.

A head's training forward is `head(target_out, batch) -> HeadOutput`: it gets the frozen target's
output for a packed batch (aux features, last hidden state, teacher logits over the draft vocab) and
the batch itself, and returns its loss and per-step metrics. At inference a head is driven by a
*drafter* (see `Drafter`), which keeps a KV cache and is fed the target's features as an engine does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from eagle_online.losses import StepMetrics


@dataclass
class HeadOutput:
    """One training forward's result: the loss to backpropagate and per-step metrics."""

    loss: torch.Tensor
    metrics: StepMetrics


def frozen_copy(weight: torch.Tensor) -> torch.nn.Parameter:
    """A parameter holding a copy of a target weight that never trains (an embedding or lm_head)."""
    return torch.nn.Parameter(weight.detach().clone(), requires_grad=False)


def draft_ids(d2t: torch.Tensor) -> torch.Tensor:
    """The target ids of the draft vocabulary: draft id i is target id i + d2t[i]."""
    return torch.arange(len(d2t), device=d2t.device) + d2t


@dataclass
class DraftStep:
    """What a drafter proposes at one chain position: logits over the target vocabulary (−inf outside
    the draft vocabulary) for the next token."""

    logits: torch.Tensor  # [V] fp32


class LayerKVCache:
    """Keys and values of one attention layer for one sequence, [heads, length, head_dim] each, with a
    committed prefix: chain steps append past it and are dropped by `rollback` before the next extend."""

    def __init__(self):
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.committed = 0

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[1]

    def rollback(self) -> None:
        """Forget everything past the committed prefix."""
        if self.keys is not None:
            self.keys, self.values = self.keys[:, : self.committed], self.values[:, : self.committed]

    def commit(self) -> None:
        """Make everything cached so far part of the committed prefix."""
        self.committed = self.length

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Append m new keys/values and attend the m new queries ([heads, m, d], kv heads may be fewer)
        causally: query j sees the whole cache before it and new keys 0..j. Returns [m, heads·d]."""
        self.keys = k if self.keys is None else torch.cat([self.keys, k], dim=1)
        self.values = v if self.values is None else torch.cat([self.values, v], dim=1)
        heads, m, d = q.shape
        keys, values = self.keys, self.values
        if keys.shape[0] != heads:  # grouped-query attention
            keys = keys.repeat_interleave(heads // keys.shape[0], dim=0)
            values = values.repeat_interleave(heads // values.shape[0], dim=0)
        total = keys.shape[1]
        mask = torch.ones(m, total, dtype=torch.bool, device=q.device).tril(total - m)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=1.0 / math.sqrt(d))
        return out.transpose(0, 1).reshape(m, heads * d)


class Drafter:
    """Drives a head at inference, one sequence at a time, as an engine's chain drafting does.

    `extend(features, tokens, positions)` commits pairs (target feature at position t, token t+1)
    for newly accepted positions and returns the proposal for the token after the last one;
    `chain(token, position)` feeds the head its own output with the token just proposed (not
    committed: the next `extend` forgets it) and returns the next proposal. `reset()` starts a new
    sequence. Subclasses set `feature` to the TargetStep field they read ("aux_hidden" or
    "last_hidden", None for heads that read no feature).
    """

    feature: str | None = None

    def reset(self) -> None:
        raise NotImplementedError

    def extend(self, features: torch.Tensor | None, tokens: torch.Tensor, positions: torch.Tensor) -> DraftStep:
        raise NotImplementedError

    def chain(self, token: int, position: int) -> DraftStep:
        raise NotImplementedError


class LayerDrafter(Drafter):
    """A drafter for heads with one KV-cached decoder layer (EAGLE-3, EAGLE-1/2): accepted pairs are
    committed to the cache; a chain step feeds the layer its own newest output and the token just
    proposed, uncommitted. Subclasses give `_layer` (new positions through the layer, appending to
    `self.cache`), `_propose` (the proposal from `self._last`) and, if the feature needs one, `_fuse`."""

    def reset(self) -> None:
        self.cache = LayerKVCache()
        self._last: torch.Tensor | None = None  # the layer's output at the newest position(s)

    def _fuse(self, features: torch.Tensor) -> torch.Tensor:
        return features

    def _layer(self, hidden: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _propose(self) -> DraftStep:
        raise NotImplementedError

    @torch.no_grad()
    def extend(self, features, tokens, positions) -> DraftStep:
        self.cache.rollback()
        self._last = self._layer(self._fuse(features), tokens, positions)
        self.cache.commit()
        return self._propose()

    @torch.no_grad()
    def chain(self, token: int, position: int) -> DraftStep:
        device = self._last.device
        self._last = self._layer(self._last[-1:], torch.tensor([token], device=device),
                                 torch.tensor([position], device=device))
        return self._propose()


def scatter_to_target(draft_logits: torch.Tensor, d2t: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Draft-vocabulary logits [..., Vd] as target-vocabulary logits [..., V], −inf outside the draft
    vocabulary (so its softmax is the draft distribution mapped through d2t)."""
    out = draft_logits.new_full((*draft_logits.shape[:-1], vocab_size), float("-inf"))
    out[..., draft_ids(d2t)] = draft_logits
    return out
