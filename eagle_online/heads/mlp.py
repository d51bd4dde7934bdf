"""The beginner's MLP draft, kept as a baseline.

    logits_t = lm_head(blocks(embed(x_{t+1})))       blocks: N × (Linear H→H, ReLU, LayerNorm)

It sees one token and no context (no target feature, no attention), so it can learn at best a bigram
of the target's predictions; the quality benchmark shows it beside the EAGLE heads. The embedding and
lm_head (draft-vocabulary rows) are frozen copies of the target's; it is trained with the same soft
cross-entropy against the teacher as the EAGLE-3 head. No engine serves it: its export is our own
layout (config.json + model.safetensors), read back by `eagle_online.export.load_draft`.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig

from eagle_online.heads.base import Drafter, DraftHead, DraftStep, HeadOutput, frozen_copy, scatter_to_target
from eagle_online.heads.eagle3 import DocumentLayout, scored_rows
from eagle_online.layout import EMBED_NAME, dtype_name, load_state, served_tensors, text_config, with_embedding
from eagle_online.losses import StepMetrics, TeacherTargets, linear_distillation

ARCHITECTURE = "EagleOnlineMLPDraft"


def mlp_config(target_config, draft_vocab_size: int, num_blocks: int = 3) -> LlamaConfig:
    """The MLP draft's config (a LlamaConfig as a container, so it saves and loads like the others)."""
    text = text_config(target_config)
    return LlamaConfig(
        architectures=[ARCHITECTURE], hidden_size=text.hidden_size, num_hidden_layers=num_blocks,
        num_attention_heads=text.num_attention_heads, vocab_size=text.vocab_size,
        draft_vocab_size=draft_vocab_size, tie_word_embeddings=False,
    )


class MLPHead(DraftHead):
    """Embedding → N × (Linear, ReLU, LayerNorm) → frozen draft-vocabulary lm_head."""

    ARCHITECTURE = ARCHITECTURE
    LM_HEAD = "draft"
    SETTINGS = ("mlp_blocks",)

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, h)
        self.embed_tokens.weight.requires_grad_(False)
        self.blocks = nn.Sequential(*(
            nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.LayerNorm(h)) for _ in range(config.num_hidden_layers)
        ))
        self.lm_head = nn.Linear(h, config.draft_vocab_size, bias=False)
        self.lm_head.weight.requires_grad_(False)
        self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(config.vocab_size, dtype=torch.bool))

    @torch.no_grad()
    def init_from_target(self, embed_weight, lm_head_draft, d2t, t2d) -> None:
        """Frozen copies of the target's embedding and draft-vocabulary lm_head rows; the vocab maps."""
        if lm_head_draft is None:
            raise ValueError("the MLP draft reads its logits through the target's lm_head rows: pass them")
        self.embed_tokens.weight = frozen_copy(embed_weight)
        self.lm_head.weight = frozen_copy(lm_head_draft)
        self.d2t.copy_(d2t)
        self.t2d.copy_(t2d)

    @classmethod
    def config_for(cls, target_config, draft, vocab_size: int) -> LlamaConfig:
        config = mlp_config(target_config, draft.draft_vocab_size, draft.mlp_blocks)
        config.vocab_size = vocab_size
        return config

    def serving_layout(self, aux_layer_ids=None, target_num_layers=None):
        """Our own layout (no engine serves it): config.json, and the blocks, draft-vocabulary lm_head
        rows and vocab maps, without the embedding."""
        tensors = served_tensors(self)
        config = self.config.to_dict()
        config["dtype"] = dtype_name(tensors["lm_head.weight"].dtype)
        return config, tensors

    @classmethod
    def from_layout(cls, raw_config, tensors, where, embed_weight, lm_head_weight):
        """The MLP baseline's export; the embedding is the target's."""
        config = LlamaConfig.from_dict(raw_config)
        tensors = dict(tensors)
        dtype = tensors["lm_head.weight"].dtype
        with_embedding(tensors, (config.vocab_size, config.hidden_size), dtype, EMBED_NAME, embed_weight,
                       "embedding")
        return load_state(cls(config), tensors, dtype)

    def logits(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits of the token after each of `token_ids`."""
        x = self.embed_tokens(token_ids).to(self.lm_head.weight.dtype)
        return self.lm_head(self.blocks(x))

    def forward(self, target, batch) -> HeadOutput:
        """Position t reads x_{t+1} alone and learns the teacher at t+1, where x_{t+2} is trained, in the
        same conversation, and the teacher's full-vocabulary argmax is a draft token."""
        input_ids, loss_mask = batch.input_ids, batch.loss_mask
        b, t = input_ids.shape
        doc = DocumentLayout.from_position_ids(batch.position_ids).doc
        rows = scored_rows(loss_mask, doc, target.teacher_in_draft)
        hidden = self.blocks(self.embed_tokens(input_ids.reshape(-1)[rows + 1]).to(self.lm_head.weight.dtype))
        teacher = TeacherTargets.from_logits(target.teacher_logits.reshape(b * t, -1))
        ce = linear_distillation(hidden, self.lm_head.weight, teacher, rows + 1, self.objective)
        return HeadOutput(loss=ce.loss, metrics=StepMetrics.of([ce], [len(rows)]))


class MLPDrafter(Drafter):
    """Chain drafting with an MLPHead: each proposal reads only the token before it."""

    feature = None

    def __init__(self, head: MLPHead):
        self.head = head.eval()
        self.vocab_size = head.config.vocab_size

    def reset(self) -> None:
        pass

    @torch.no_grad()
    def _propose(self, token: torch.Tensor) -> DraftStep:
        logits = self.head.logits(token.reshape(1))[0].float()
        return DraftStep(logits=scatter_to_target(logits, self.head.d2t, self.vocab_size))

    def extend(self, features, tokens, positions) -> DraftStep:
        return self._propose(tokens[-1])

    def chain(self, token: int, position: int) -> DraftStep:
        return self._propose(torch.tensor(token, device=self.head.d2t.device))
