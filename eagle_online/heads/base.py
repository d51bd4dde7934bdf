"""What every draft head shares: the result of a training forward, the frozen copies of the target's
embedding / lm_head, and the KV cache its drafter decodes with.

A head's training forward is `head(target_out, batch) -> HeadOutput`: it gets the frozen target's
output for a packed batch (aux features, last hidden state, teacher logits over the draft vocab) and
the batch itself, and returns its loss and per-step metrics. At inference a head is driven by a
*drafter* (see `Drafter`), which keeps a KV cache and is fed the target's features as an engine does.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from eagle_online.errors import RecipeError
from eagle_online.layout import EMBED_NAME, ExportError, Verifier, draft_ids, load_state
from eagle_online.losses import KL, Objective, StepMetrics


@dataclass
class HeadOutput:
    """One training forward's result: the loss to backpropagate and per-step metrics."""

    loss: torch.Tensor
    metrics: StepMetrics


class DraftHead(nn.Module):
    """What the trainer, the evaluation and the export ask of every draft head. A new head is one module
    with a subclass of this and its Drafter, plus one line in heads/__init__.py's registry.

    Class attributes: `ARCHITECTURE`, the name its config.json's `architectures` carries (the registry's
    key and the recipe's `draft.architecture`); `SERVED_NAMES`, every architecture name that marks a
    checkpoint in its layout (other engines' names for it too); `LM_HEAD`, "draft" when its lm_head holds
    the target's draft-vocabulary rows, "full" when it reads the target's whole lm_head.

    The training forward is `head(target_out, batch) -> HeadOutput`. The methods below have the defaults
    of a head with nothing to set, calibrate or compile; a head overrides what it needs.
    """

    ARCHITECTURE: ClassVar[str]
    SERVED_NAMES: ClassVar[tuple[str, ...]] = ()
    LM_HEAD: ClassVar[str] = "draft"
    # How the engines are told to run it: (SGLang's --speculative-algorithm, vLLM's speculative method),
    # None when no engine serves it; the SGLang side None when only vLLM does
    SERVE_METHOD: ClassVar[tuple[str | None, str] | None] = None
    # The recipe's `draft` keys only this head reads: the recipe refuses them under another architecture
    SETTINGS: ClassVar[tuple[str, ...]] = ()
    SHOWN_SETTINGS: ClassVar[tuple[str, ...]] = ()  # the recipe's `draft` keys the banner and the card show
    objective: Objective = KL  # the training loss against the teacher (draft.loss), set by configure_training

    # -- building, from the recipe's `draft` section and the target
    @classmethod
    def config_for(cls, target_config, draft, vocab_size: int):
        """The head's config for a target (a transformers config that saves as draft_config.json)."""
        raise NotImplementedError

    def configure_training(self, draft) -> None:
        """Set the recipe's training-forward settings (on a head built fresh or loaded from a checkpoint);
        a head that overrides this calls it too (the loss against the teacher, every head's)."""
        self.objective = Objective.of(draft)

    def takes_target_lm_head(self, draft) -> bool:
        """Whether init_from_target is given the target's lm_head (rows, or whole: LM_HEAD)."""
        return True

    def init_from_target(self, embed_weight: torch.Tensor, lm_head_weight: torch.Tensor | None,
                         d2t: torch.Tensor, t2d: torch.Tensor) -> None:
        """Copy what the head takes from the target, and the draft vocabulary maps."""
        raise NotImplementedError

    def set_draft_vocab(self, d2t: torch.Tensor) -> None:
        """The draft vocabulary, for heads whose teacher vocabulary is not part of their weights."""

    def compile_layer(self, **kwargs) -> None:
        """torch.compile the head's hot path (draft.compile)."""
        raise RecipeError(f"draft.compile: the {self.ARCHITECTURE} head has no compiled path (EAGLE-3 only)")

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer trains: everything but the frozen copies of the target's weights."""
        return [p for p in self.parameters() if p.requires_grad]

    # -- calibration and the optimizer
    def calibrate(self, draft, first_batch_aux: Callable[[], torch.Tensor], *, fresh: bool) -> dict:
        """Measure what the head's training needs from the target before step 1 (`first_batch_aux()` is
        the target's aux features on epoch 0's first micro-batch, a function of the recipe alone) and
        apply it, to the init too when `fresh` (not loaded from a checkpoint). Returns the figures for
        run_info.json."""
        return {"feature_scale": 1.0}

    def param_groups(self, lr: float) -> list[dict]:
        """The trainable parameters in optimizer groups (the first group's rate is the one logged)."""
        return [{"params": self.trainable_parameters()}]

    def optimizer_update(self) -> contextlib.AbstractContextManager:
        """A context around the optimizer's step, for heads that rescale part of the update."""
        return contextlib.nullcontext()

    # -- serving
    def serving_layout(self, aux_layer_ids: list[int] | None, target_num_layers: int | None
                       ) -> tuple[dict, dict[str, torch.Tensor]]:
        """The config.json dict and the tensors of the head's export, checked (ExportError otherwise)."""
        raise NotImplementedError

    def speculators_layout(self, aux_layer_ids: list[int] | None, target_num_layers: int | None,
                           verifier: Verifier) -> tuple[dict, dict[str, torch.Tensor]]:
        """The same in vLLM's speculators format (a config that names its target), for heads it has."""
        raise ExportError(f"the speculators format holds EAGLE-3 drafts, not {self.ARCHITECTURE}: export with "
                          "export.format=eagle3")

    @classmethod
    def served_names(cls) -> tuple[str, ...]:
        """Every architecture name that marks a checkpoint in this head's layout."""
        return (cls.ARCHITECTURE, *cls.SERVED_NAMES)

    @classmethod
    def reads(cls, raw_config: dict) -> bool:
        """Whether a checkpoint's config.json is in this head's layout."""
        names = raw_config.get("architectures") or []
        return any(name in cls.served_names() for name in names)

    @classmethod
    def from_checkpoint(cls, config, tensors: dict[str, torch.Tensor]) -> DraftHead:
        """A head holding a training checkpoint's state_dict (the frozen copies included), in its dtype."""
        return load_state(cls(config), tensors, tensors[EMBED_NAME].dtype)

    @classmethod
    def from_layout(cls, raw_config: dict, tensors: dict[str, torch.Tensor], where: Path,
                    embed_weight: torch.Tensor | None, lm_head_weight: torch.Tensor | None) -> DraftHead:
        """A head holding a checkpoint in its layout (`where` is its config.json, for messages); the
        target's embedding and lm_head fill in what the checkpoint leaves out."""
        raise NotImplementedError


def frozen_copy(weight: torch.Tensor) -> torch.nn.Parameter:
    """A parameter holding a copy of a target weight that never trains (an embedding or lm_head)."""
    return torch.nn.Parameter(weight.detach().clone(), requires_grad=False)


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

    def rewind(self) -> None:
        """Forget the chain steps since the last `extend` (nothing to forget for a drafter whose chain
        step reads only the token it is given)."""

    def path(self, tokens: list[int], position: int) -> DraftStep:
        """The proposal after drafting `tokens` as chain steps from the last `extend` (the first at RoPE
        position `position`): a draft tree's node is expanded by replaying the path to it."""
        self.rewind()
        step = None
        for j, token in enumerate(tokens):
            step = self.chain(token, position + j)
        return step


class LayerDrafter(Drafter):
    """A drafter for heads with one KV-cached decoder layer (EAGLE-3, EAGLE-1/2): accepted pairs are
    committed to the cache; a chain step feeds the layer its own newest output and the token just
    proposed, uncommitted. Subclasses give `_layer` (new positions through the layer, appending to
    `self.cache`), `_propose` (the proposal from `self._last`) and, if the feature needs one, `_fuse`."""

    def reset(self) -> None:
        self.cache = LayerKVCache()
        self._last: torch.Tensor | None = None  # the layer's output at the newest position(s)
        self._committed_last: torch.Tensor | None = None  # ... as the last extend left it

    def _fuse(self, features: torch.Tensor) -> torch.Tensor:
        return features

    def _layer(self, hidden: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _propose(self) -> DraftStep:
        raise NotImplementedError

    @torch.no_grad()
    def extend(self, features, tokens, positions) -> DraftStep:
        self.cache.rollback()
        self._last = self._committed_last = self._layer(self._fuse(features), tokens, positions)
        self.cache.commit()
        return self._propose()

    def rewind(self) -> None:
        self.cache.rollback()
        self._last = self._committed_last

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
