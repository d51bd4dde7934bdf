"""The EAGLE-3 draft head and its training-time-test (TTT) unroll.

docs/algorithms.md: the head, the draft vocabulary and the unroll, step by step.

Tensor names follow the layout SGLang and vLLM load (`fc`, `midlayer.*`, `norm`, `lm_head`, `d2t`,
`t2d`), so export is a filter over `state_dict()`, not a rename table.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRotaryEmbedding, apply_rotary_pos_emb

from eagle_online.attention import DocumentLayout, causal_plus_diagonal_attention
from eagle_online.heads.base import HeadOutput
from eagle_online.heads.layers import RMSNorm, SwiGLUMLP
from eagle_online.losses import StepMetrics, TeacherTargets, linear_soft_cross_entropy

ARCHITECTURE = "LlamaForCausalLMEagle3"


def eagle3_config(target_config, draft_vocab_size: int) -> LlamaConfig:
    """The draft's LlamaConfig, derived from the target's: one layer with the target's attention
    shape, RoPE and MLP width, predicting over the draft vocabulary."""
    text = target_config.get_text_config() if hasattr(target_config, "get_text_config") else target_config
    hidden = text.hidden_size
    heads = text.num_attention_heads
    return LlamaConfig(
        architectures=[ARCHITECTURE],
        hidden_size=hidden,
        intermediate_size=text.intermediate_size,
        num_hidden_layers=1,
        num_attention_heads=heads,
        num_key_value_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or hidden // heads,
        hidden_act=getattr(text, "hidden_act", "silu"),
        rms_norm_eps=getattr(text, "rms_norm_eps", 1e-6),
        max_position_embeddings=text.max_position_embeddings,
        rope_parameters=dict(text.rope_parameters) if getattr(text, "rope_parameters", None) else None,
        vocab_size=text.vocab_size,
        draft_vocab_size=draft_vocab_size,
        target_hidden_size=hidden,
        tie_word_embeddings=False,
        norm_before_residual=False,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=getattr(text, "bos_token_id", None),
        eos_token_id=getattr(text, "eos_token_id", None),
        use_cache=True,
    )


def shift_left(x: torch.Tensor, n: int, fill=0) -> torch.Tensor:
    """x[:, t + n] at position t along dim 1, `fill` past the end."""
    if n == 0:
        return x
    pad = torch.full_like(x[:, :n], fill)
    return torch.cat([x[:, n:], pad], dim=1)


class TTTAttention(nn.Module):
    """Attention over 2H-wide inputs (or `in_features`) with the TTT pattern: causal (within a conversation) over the
    step-0 keys, plus the keys each later step wrote at the query's own position.

    No [T × T] mask or score matrix is built per step: the step-0 part runs through a varlen /
    flash kernel (eagle_online.attention) and the diagonal keys join its softmax through the
    log-sum-exp, with gradients through both. `kernel` forces one (None: the best for the device).
    """

    kernel: str | None = None

    def __init__(self, config: LlamaConfig, in_features: int | None = None):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        h = config.hidden_size
        width = in_features or 2 * h
        self.q_proj = nn.Linear(width, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(width, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(width, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=False)

    def project(self, x, cos, sin):
        """Queries [B·T, heads, d] and keys and values [B·T, kv_heads, d] of x [B, T, in], RoPE applied."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
        return q.to(v.dtype).flatten(0, 1), k.to(v.dtype).flatten(0, 1), v.flatten(0, 1)

    def attend(self, q, cache: list[tuple[torch.Tensor, torch.Tensor]], layout: DocumentLayout) -> torch.Tensor:
        """Attention of q over the cached keys in the TTT pattern, [B·T, heads·d] (before o_proj)."""
        out = causal_plus_diagonal_attention(q, [k for k, _ in cache], [v for _, v in cache], layout,
                                             1.0 / math.sqrt(self.head_dim), self.kernel)
        return out.flatten(1)

    def forward(self, x, cos, sin, cache: list[tuple[torch.Tensor, torch.Tensor]], layout: DocumentLayout):
        """x [B, T, 2H]. `cache` holds earlier steps' keys and values, token-major [B·T, kv_heads, d];
        this step's are appended."""
        q, k, v = self.project(x, cos, sin)
        cache.append((k, v))
        return self.o_proj(self.attend(q, cache, layout).view(*x.shape[:-1], -1))


class Eagle3DecoderLayer(nn.Module):
    """One decoder layer whose attention reads cat(input_layernorm(embedding), hidden_norm(feature))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        h = config.hidden_size
        self.input_layernorm = RMSNorm(h, eps=config.rms_norm_eps)
        self.hidden_norm = RMSNorm(h, eps=config.rms_norm_eps)
        self.self_attn = TTTAttention(config)
        self.post_attention_layernorm = RMSNorm(h, eps=config.rms_norm_eps)
        self.mlp = (SwiGLUMLP(h, config.intermediate_size, config.mlp_bias) if config.hidden_act == "silu"
                    else LlamaMLP(config))

    def forward(self, embeds, hidden, cos, sin, cache, layout):
        q, k, v = self.qkv(embeds, hidden, cos, sin)
        cache.append((k, v))
        return self.finish(hidden, self.self_attn.attend(q, cache, layout).view(*hidden.shape[:-1], -1))

    # The layer around its attention, in two pieces that hold no Python state (no cache list, no
    # layout), so that torch.compile (Eagle3Head.compile_layer) traces each once for all TTT steps.
    def qkv(self, embeds, hidden, cos, sin):
        """Queries, keys and values of cat(input_layernorm(embeds), hidden_norm(hidden))."""
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)
        return self.self_attn.project(x, cos, sin)

    def finish(self, hidden, attn):
        """o_proj, the residual (the feature before hidden_norm: norm_before_residual = False), the MLP."""
        hidden = hidden + self.self_attn.o_proj(attn)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class Eagle3Head(nn.Module):
    """EAGLE-3 draft head: fc fusion of low‖mid‖high target features, one decoder layer, a draft lm_head.
    `ttt_length` and `loss_decay` are the training forward's unroll settings."""

    LM_HEAD = "draft"  # its lm_head covers the draft vocabulary (initialised from the target's rows)

    def __init__(self, config: LlamaConfig, ttt_length: int = 7, loss_decay: float = 0.8):
        super().__init__()
        self.config = config
        self.ttt_length, self.loss_decay = ttt_length, loss_decay
        h = config.hidden_size
        target_h = getattr(config, "target_hidden_size", None) or h
        self.embed_tokens = nn.Embedding(config.vocab_size, h)
        self.embed_tokens.weight.requires_grad_(False)  # a frozen copy of the target's
        self.fc = nn.Linear(3 * target_h, h, bias=False)
        self.midlayer = Eagle3DecoderLayer(config)
        self.norm = RMSNorm(h, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(h, config.draft_vocab_size, bias=False)
        self.rotary_emb = LlamaRotaryEmbedding(config)
        self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(config.vocab_size, dtype=torch.bool))

    @torch.no_grad()
    def init_from_target(self, embed_weight: torch.Tensor, lm_head_draft: torch.Tensor | None,
                         d2t: torch.Tensor, t2d: torch.Tensor) -> None:
        """Copy the target's embedding (and, optionally, its draft-vocab lm_head rows) and the vocab maps."""
        self.embed_tokens.weight.copy_(embed_weight)
        if lm_head_draft is not None:
            self.lm_head.weight.copy_(lm_head_draft)
        self.d2t.copy_(d2t)
        self.t2d.copy_(t2d)

    def compile_layer(self, **kwargs) -> None:
        """torch.compile the decoder layer's two pieces around its attention (parameter names, hence
        export, unchanged), with dynamic shapes since packed rows vary in length: norms, rotary,
        SiLU and residual adds fuse around the matmuls; the attention kernels run as they are.
        `kwargs` go to torch.compile."""
        layer = self.midlayer
        layer.qkv = torch.compile(layer.qkv, dynamic=True, **kwargs)
        layer.finish = torch.compile(layer.finish, dynamic=True, **kwargs)

    def step(self, hidden, token_ids, position_ids, cache, layout: DocumentLayout) -> torch.Tensor:
        """One draft step's pre-norm output. `hidden` is fc(aux) at step 0 and the previous step's
        pre-norm output after; `token_ids` are the tokens whose embeddings go beside it."""
        cos, sin = self.rotary_emb(hidden, position_ids)
        embeds = self.embed_tokens(token_ids).to(hidden.dtype)
        return self.midlayer(embeds, hidden, cos, sin, cache, layout)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits of pre-norm outputs."""
        return self.lm_head(self.norm(hidden))

    def forward(self, target, batch) -> HeadOutput:
        """The training forward: the TTT unroll of `target` (a TargetOutput) over `batch` (a PackedBatch)."""
        return self.unroll(target.aux_hidden, batch.input_ids, batch.position_ids, batch.loss_mask,
                           target.teacher_logits, target.teacher_in_draft, self.ttt_length, self.loss_decay)

    def unroll(self, aux_hidden, input_ids, position_ids, loss_mask, teacher_logits, teacher_in_draft,
               ttt_length: int, loss_decay: float = 0.8) -> HeadOutput:
        """The TTT unroll over packed rows.

        Position t pairs the target feature g_t with embed(x_{t+1}) and learns the target's
        distribution at t+1 (the token x_{t+2}). Step k feeds the draft its own step k-1 output
        instead of g and shifts tokens and targets k places further: at step k, position t reads
        x_{t+1+k} at RoPE position pos_t + k and predicts x_{t+2+k} against the teacher at t+1+k.
        A prediction counts when x_{t+2+k} is trained (loss_mask), lies in t's conversation, and
        the teacher's full-vocabulary argmax is a draft token; logits are computed for those
        positions only, a chunk of them at a time, inside the loss (no [positions × vocab] logits
        are kept for backward, and the teacher stays in its own dtype).
        loss = Σ_k decay^k · softCE_k.
        """
        b, t = input_ids.shape
        layout = DocumentLayout.from_position_ids(position_ids)
        docs = layout.doc
        teacher = TeacherTargets.from_logits(teacher_logits.reshape(b * t, -1))
        hidden = self.fc(aux_hidden.to(self.fc.weight.dtype))
        cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        loss = hidden.new_zeros((), dtype=torch.float32)
        losses, accs, counts = [], [], []
        for k in range(ttt_length):
            hidden = self.step(hidden, shift_left(input_ids, 1 + k), position_ids + k, cache, layout)
            valid = (
                shift_left(loss_mask, 2 + k).bool()
                & (shift_left(docs, 2 + k, fill=-1) == docs)
                & shift_left(teacher_in_draft, 1 + k, fill=False)
            )
            rows = valid.reshape(-1).nonzero().squeeze(1)  # t+2+k stays in the row, so rows+1+k does too
            normed = self.norm(hidden.reshape(b * t, -1)[rows])
            step = linear_soft_cross_entropy(normed, self.lm_head.weight, teacher, rows + 1 + k)
            loss = loss + (loss_decay**k) * step.loss
            losses.append(step.loss.detach())
            accs.append(step.accuracy)
            counts.append(len(rows))
        return HeadOutput(loss=loss, metrics=StepMetrics(losses, accs, counts))

    def trainable_parameters(self):
        """Everything but the frozen embedding."""
        return [p for p in self.parameters() if p.requires_grad]
