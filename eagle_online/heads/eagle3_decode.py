"""The EAGLE-3 head at inference: KV-cached chain drafting with the trained modules of `Eagle3Head`.

Kept apart from the TTT training code (heads/eagle3.py), which attends over whole packed rows; here
one sequence grows a step at a time, as SGLang's and vLLM's EAGLE-3 workers run the same weights:

- accepted positions: pair t reads fc(target aux features at t) and embed(token t+1), at RoPE
  position t, and is committed to the cache;
- chain step j: the head's own pre-norm output of the step before and the embedding of the token it
  just proposed, one position further; it attends to the committed pairs and to the earlier chain
  steps, which is exactly the TTT pattern it was trained with (step-0 keys causally plus its own chain).
"""
from __future__ import annotations

import torch

from eagle_online.heads.base import DraftStep, LayerDrafter, scatter_to_target
from eagle_online.heads.eagle3 import Eagle3Head


class Eagle3Drafter(LayerDrafter):
    """Chain drafting with an Eagle3Head (see the module docstring)."""

    feature = "aux_hidden"

    def __init__(self, head: Eagle3Head):
        self.head = head.eval()
        self.vocab_size = head.config.vocab_size
        self.reset()

    def _fuse(self, features: torch.Tensor) -> torch.Tensor:
        return self.head.fc(features.to(self.head.fc.weight.dtype))

    @torch.no_grad()
    def _layer(self, hidden: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One pass of the decoder layer over m new positions: hidden [m, H], tokens/positions [m]. The
        layer's own pieces around attention (the ones training runs), with the KV cache as attention."""
        head, layer = self.head, self.head.midlayer
        hidden = hidden.to(head.fc.weight.dtype)
        embeds = head.embed_tokens(tokens).to(hidden.dtype)
        cos, sin = head.rotary_emb(hidden[None], positions[None])
        q, k, v = layer.qkv(embeds[None], hidden[None], cos, sin)  # [m, heads, d], [m, kv_heads, d]
        return layer.finish(hidden, self.cache.attend(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)))

    def _propose(self) -> DraftStep:
        logits = self.head.logits(self._last[-1:]).float()[0]
        return DraftStep(logits=scatter_to_target(logits, self.head.d2t, self.vocab_size))
