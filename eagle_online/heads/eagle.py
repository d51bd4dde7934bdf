"""The EAGLE-1/2 draft head: feature regression through the target's frozen lm_head.

    f_t = the target's final post-norm hidden state at t (what its lm_head reads)
    pred_t = layer(fc(cat(embed(x_{t+1}), f_t)))      one Llama decoder layer *without* input_layernorm
    loss = 1.0 · SmoothL1(pred_t, f_{t+1}) + 0.1 · softCE(lm_head(pred_t), softmax(lm_head(f_{t+1})))

At inference the draft feeds its own prediction back as the next feature and reads its logits through
the target's lm_head (EAGLE-2 differs only by its dynamic draft tree, an inference-time choice).

Tensor names are the serving layout both engines load for EAGLE-1/2: `fc.weight` (+ `fc.bias`),
`layers.0.self_attn.{q,k,v,o}_proj.weight`, `layers.0.post_attention_layernorm.weight`,
`layers.0.mlp.{gate,up,down}_proj.weight`. SGLang's LlamaForCausalLMEagle
(python/sglang/srt/models/llama_eagle.py) builds `fc = nn.Linear(2H, H)` (bias on), deletes layer 0's
input_layernorm and loads everything but lm_head under `model.`; vLLM's EagleLlamaForCausalLM
(vllm/model_executor/models/llama_eagle.py) builds the same layer with input_layernorm = Identity and
`fc` with bias=False. Both take embed_tokens and lm_head from the target.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRotaryEmbedding

from eagle_online.heads.base import DraftHead, DraftStep, HeadOutput, LayerDrafter, frozen_copy
from eagle_online.heads.eagle3 import DocumentLayout, TTTAttention, eagle3_config, scored_rows, shift_left
from eagle_online.heads.layers import RMSNorm, SwiGLUMLP
from eagle_online.layout import (
    EMBED_NAME,
    add_legacy_rope,
    check_tensors,
    draft_ids,
    dtype_name,
    load_state,
    served_tensors,
    with_embedding,
)
from eagle_online.losses import StepMetrics, TeacherTargets, linear_distillation

# SGLang registers LlamaForCausalLMEagle; vLLM's EAGLEConfig turns each architecture not starting with
# "Eagle" into "Eagle" + name (vllm/transformers_utils/configs/eagle.py) and registers
# EagleLlamaForCausalLM. Both resolve the first registered name of the list, so the export lists both:
# SGLang takes the first, vLLM maps it to an unknown name and takes the second.
ARCHITECTURE = "LlamaForCausalLMEagle"
VLLM_ARCHITECTURE = "EagleLlamaForCausalLM"

# The served tensors: layer 0 without input_layernorm, fc over cat(embed, feature), no norm and no
# lm_head (both engines use the target's lm_head and embedding). `fc.bias` is written when the head has
# one (OPTIONAL_TENSORS). Shapes as in layout.expected_shapes.
TENSORS: dict[str, tuple[str, ...]] = {
    "fc.weight": ("H", "2*H"),
    "layers.0.self_attn.q_proj.weight": ("A", "H"),
    "layers.0.self_attn.k_proj.weight": ("KV", "H"),
    "layers.0.self_attn.v_proj.weight": ("KV", "H"),
    "layers.0.self_attn.o_proj.weight": ("H", "A"),
    "layers.0.post_attention_layernorm.weight": ("H",),
    "layers.0.mlp.gate_proj.weight": ("I", "H"),
    "layers.0.mlp.up_proj.weight": ("I", "H"),
    "layers.0.mlp.down_proj.weight": ("H", "I"),
}
OPTIONAL_TENSORS = {"fc.bias": ("H",)}


def eagle_config(target_config, fc_bias: bool = True) -> LlamaConfig:
    """The EAGLE-1/2 draft's LlamaConfig: one layer shaped like the target's."""
    # The EAGLE-3 config minus its EAGLE-3 fields: the same attention shape, RoPE and MLP width.
    fields = eagle3_config(target_config, 1).to_dict()
    for key in ("draft_vocab_size", "target_hidden_size", "norm_before_residual", "architectures", "model_type",
                "transformers_version"):
        fields.pop(key, None)
    return LlamaConfig(**fields, architectures=[ARCHITECTURE, VLLM_ARCHITECTURE], eagle_fc_bias=fc_bias)


class EagleAttention(TTTAttention):
    """Llama self-attention over H-wide inputs, causal within each packed conversation: the TTT
    attention with step-0 keys only (the same varlen kernels, no padding or mask)."""

    def __init__(self, config: LlamaConfig):
        super().__init__(config, in_features=config.hidden_size)


class EagleDecoderLayer(nn.Module):
    """A Llama decoder layer without input_layernorm (its input is fc's output)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.self_attn = EagleAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = (SwiGLUMLP(config.hidden_size, config.intermediate_size, config.mlp_bias)
                    if config.hidden_act == "silu" else LlamaMLP(config))

    def finish(self, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Residual around attention, then the MLP block."""
        h = x + attn_out
        return h + self.mlp(self.post_attention_layernorm(h))


class EagleHead(DraftHead):
    """EAGLE-1/2 head (see the module docstring). `noise` is the half-width of the uniform noise added
    to the input features in training; the loss weights are the paper's."""

    ARCHITECTURE = ARCHITECTURE
    SERVED_NAMES = (VLLM_ARCHITECTURE,)
    SERVE_METHOD = ("EAGLE", "eagle")
    SETTINGS = ("fc_bias", "feature_noise")
    LM_HEAD = "full"  # reads its logits through the target's whole lm_head

    def __init__(self, config: LlamaConfig, noise: float = 0.1, feature_weight: float = 1.0,
                 ce_weight: float = 0.1):
        super().__init__()
        self.config = config
        self.noise, self.feature_weight, self.ce_weight = noise, feature_weight, ce_weight
        h = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, h)
        self.embed_tokens.weight.requires_grad_(False)
        self.fc = nn.Linear(2 * h, h, bias=bool(getattr(config, "eagle_fc_bias", True)))
        self.layers = nn.ModuleList([EagleDecoderLayer(config)])
        self.lm_head = nn.Linear(h, config.vocab_size, bias=False)
        self.lm_head.weight.requires_grad_(False)
        self.rotary_emb = LlamaRotaryEmbedding(config)
        # The draft vocabulary the teacher is given over (training only; engines use the full lm_head),
        # not saved: checkpoints and exports hold the served weights only.
        self.register_buffer("d2t", torch.zeros(0, dtype=torch.long), persistent=False)

    @torch.no_grad()
    def init_from_target(self, embed_weight, lm_head_weight, d2t, t2d=None) -> None:
        """Frozen copies of the target's embedding and whole lm_head, and the draft vocabulary map."""
        if lm_head_weight is None:
            raise ValueError("an EAGLE-1/2 head reads its logits through the target's lm_head: pass it")
        self.embed_tokens.weight = frozen_copy(embed_weight)
        self.lm_head.weight = frozen_copy(lm_head_weight)
        self.set_draft_vocab(d2t)

    def set_draft_vocab(self, d2t: torch.Tensor) -> None:
        """The draft vocabulary the teacher comes over (training only: not part of the served weights)."""
        self.d2t = d2t.detach().clone().to(self.embed_tokens.weight.device)

    @classmethod
    def config_for(cls, target_config, draft, vocab_size: int) -> LlamaConfig:
        config = eagle_config(target_config, fc_bias=draft.fc_bias)
        config.vocab_size = vocab_size
        return config

    def configure_training(self, draft) -> None:
        super().configure_training(draft)
        self.noise = draft.feature_noise

    def serving_layout(self, aux_layer_ids=None, target_num_layers=None):
        """config.json naming both engines' architectures, and the layer-0 tensors, without embedding
        or lm_head (the module docstring)."""
        tensors = served_tensors(self, leave_out=(EMBED_NAME, "lm_head.weight"))
        check_tensors(tensors, self.config, allow_embed=False, required=TENSORS, optional=OPTIONAL_TENSORS)
        config = self.config.to_dict()
        config.update(
            architectures=[ARCHITECTURE, VLLM_ARCHITECTURE],
            num_hidden_layers=1,
            tie_word_embeddings=False,  # SGLang would read its lm_head from the embedding
            eagle_fc_bias="fc.bias" in tensors,
            dtype=dtype_name(tensors["fc.weight"].dtype),
        )
        # No `bias` key: vLLM's Llama layers read it as attention_bias.
        config.pop("bias", None)
        add_legacy_rope(config)
        return config, tensors

    @classmethod
    def from_layout(cls, raw_config, tensors, where, embed_weight, lm_head_weight):
        """Ours, SGLang's LlamaForCausalLMEagle, vLLM's EagleLlamaForCausalLM or an official EAGLE
        release; embedding and lm_head are the target's unless the checkpoint carries them."""
        config = LlamaConfig.from_dict(raw_config)
        tensors = dict(tensors)
        config.eagle_fc_bias = "fc.bias" in tensors
        lm_shape = (config.vocab_size, config.hidden_size)
        check_tensors({k: v for k, v in tensors.items() if k != "lm_head.weight"}, config, allow_embed=True,
                      required=TENSORS, optional=OPTIONAL_TENSORS)
        dtype = tensors["fc.weight"].dtype
        with_embedding(tensors, lm_shape, dtype, EMBED_NAME, embed_weight, "embedding")
        with_embedding(tensors, lm_shape, dtype, "lm_head.weight", lm_head_weight, "lm_head")
        config.architectures = [ARCHITECTURE, VLLM_ARCHITECTURE]
        return load_state(cls(config), tensors, dtype)

    def predict(self, features, token_ids, position_ids, layout: DocumentLayout) -> torch.Tensor:
        """The predicted next features [B, T, H] for packed rows."""
        dtype = self.fc.weight.dtype
        x = self.fc(torch.cat([self.embed_tokens(token_ids).to(dtype), features.to(dtype)], dim=-1))
        cos, sin = self.rotary_emb(x, position_ids)
        layer = self.layers[0]
        return layer.finish(x, layer.self_attn(x, cos, sin, [], layout))

    def forward(self, target, batch) -> HeadOutput:
        """Position t pairs f_t with embed(x_{t+1}) and regresses f_{t+1}, scored where x_{t+2} is
        trained, inside t's conversation, and the teacher's full-vocabulary argmax is a draft token."""
        input_ids, position_ids, loss_mask = batch.input_ids, batch.position_ids, batch.loss_mask
        b, t = input_ids.shape
        layout = DocumentLayout.from_position_ids(position_ids)
        feats = target.last_hidden
        noisy = feats + (torch.rand_like(feats) * 2 - 1) * self.noise if self.training and self.noise else feats
        pred = self.predict(noisy, shift_left(input_ids, 1), position_ids, layout)
        rows = scored_rows(loss_mask, layout.doc, target.teacher_in_draft)
        pred = pred.reshape(b * t, -1)[rows].float()
        goal = feats.reshape(b * t, -1)[rows + 1].float()
        feature_loss = F.smooth_l1_loss(pred, goal) if len(rows) else pred.sum()
        # The CE is over the draft-vocabulary rows of lm_head: the teacher comes that way (the full
        # vocabulary at 16k tokens × 128k would be 8 GB of fp32 logits) and the regression carries
        # the rest of the signal. Fused and chunked as EAGLE-3's: no [rows × vocab] logits are kept.
        teacher = TeacherTargets.from_logits(target.teacher_logits.reshape(b * t, -1))
        ce = linear_distillation(pred, self.lm_head.weight[draft_ids(self.d2t)], teacher, rows + 1, self.objective)
        loss = self.feature_weight * feature_loss + self.ce_weight * ce.loss
        return HeadOutput(loss=loss, metrics=StepMetrics.of([ce], [len(rows)]))


class EagleDrafter(LayerDrafter):
    """KV-cached chain drafting with an EagleHead: accepted pairs read the target's post-norm feature,
    chain steps the head's own prediction; logits through the target's full lm_head."""

    feature = "last_hidden"

    def __init__(self, head: EagleHead):
        self.head = head.eval()
        self.reset()

    @torch.no_grad()
    def _layer(self, features, tokens, positions) -> torch.Tensor:
        head = self.head
        dtype = head.fc.weight.dtype
        x = head.fc(torch.cat([head.embed_tokens(tokens).to(dtype), features.to(dtype)], dim=-1))
        cos, sin = head.rotary_emb(x[None], positions[None])
        layer = head.layers[0]
        q, k, v = layer.self_attn.project(x[None], cos, sin)  # [m, heads, d], [m, kv_heads, d]
        return layer.finish(x, layer.self_attn.o_proj(self.cache.attend(q.transpose(0, 1), k.transpose(0, 1),
                                                                        v.transpose(0, 1))))

    def _propose(self) -> DraftStep:
        return DraftStep(logits=(self._last[-1] @ self.head.lm_head.weight.T).float())
