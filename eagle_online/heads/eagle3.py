"""The EAGLE-3 draft head and its training-time-test (TTT) unroll.

docs/algorithms.md: the head, the draft vocabulary and the unroll, step by step.

Tensor names follow the layout SGLang and vLLM load (`fc`, `midlayer.*`, `norm`, `lm_head`, `d2t`,
`t2d`), so export is a filter over `state_dict()`, not a rename table.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRotaryEmbedding, apply_rotary_pos_emb

from eagle_online.attention import DocumentLayout, causal_plus_diagonal_attention
from eagle_online.heads.base import DraftHead, HeadOutput
from eagle_online.heads.layers import RMSNorm, SwiGLUMLP
from eagle_online.layout import (
    EMBED_NAME,
    ID_KEY,
    ExportError,
    Verifier,
    add_legacy_rope,
    check_aux_layer_ids,
    check_tensors,
    default_aux_layer_ids,
    dtype_name,
    expected_shapes,
    load_state,
    served_tensors,
    text_config,
    with_embedding,
)
from eagle_online.losses import KL, Objective, StepMetrics, TeacherTargets, linear_distillation

ARCHITECTURE = "LlamaForCausalLMEagle3"
SPECULATORS_ARCHITECTURE = "Eagle3Speculator"  # the speculators format's name for an EAGLE-3 draft
TTT_LENGTH, LOSS_DECAY = 7, 0.8  # the recipe's defaults (draft.ttt_length, draft.loss_decay)

# Serving name → shape, in the head config's dimensions (layout.expected_shapes). q/k/v read
# cat(embed, feature): 2H.
TENSORS: dict[str, tuple[str, ...]] = {
    "fc.weight": ("H", "3*Ht"),
    "midlayer.input_layernorm.weight": ("H",),
    "midlayer.hidden_norm.weight": ("H",),
    "midlayer.self_attn.q_proj.weight": ("A", "2*H"),
    "midlayer.self_attn.k_proj.weight": ("KV", "2*H"),
    "midlayer.self_attn.v_proj.weight": ("KV", "2*H"),
    "midlayer.self_attn.o_proj.weight": ("H", "A"),
    "midlayer.post_attention_layernorm.weight": ("H",),
    "midlayer.mlp.gate_proj.weight": ("I", "H"),
    "midlayer.mlp.up_proj.weight": ("I", "H"),
    "midlayer.mlp.down_proj.weight": ("H", "I"),
    "norm.weight": ("H",),
    "lm_head.weight": ("Vd", "H"),
    "d2t": ("Vd",),
    "t2d": ("V",),
}


def eagle3_config(target_config, draft_vocab_size: int) -> LlamaConfig:
    """The draft's LlamaConfig, derived from the target's: one layer with the target's attention
    shape, RoPE and MLP width, predicting over the draft vocabulary."""
    text = text_config(target_config)
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


def scored_rows(loss_mask: torch.Tensor, docs: torch.Tensor, teacher_in_draft: torch.Tensor, k: int = 0
                ) -> torch.Tensor:
    """Flat indices of the positions t whose step-k prediction is scored: x_{t+2+k} is trained
    (loss_mask), lies in t's conversation, and the teacher's full-vocabulary argmax at t+1+k is a draft
    token. t+2+k stays in the row, so rows+1+k does too."""
    valid = (shift_left(loss_mask, 2 + k).bool() & (shift_left(docs, 2 + k, fill=-1) == docs)
             & shift_left(teacher_in_draft, 1 + k, fill=False))
    return valid.reshape(-1).nonzero().squeeze(1)


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


class Eagle3Head(DraftHead):
    """EAGLE-3 draft head: fc fusion of low‖mid‖high target features, one decoder layer, a draft lm_head.
    `ttt_length` and `loss_decay` are the training forward's unroll settings."""

    ARCHITECTURE = ARCHITECTURE
    LM_HEAD = "draft"  # its lm_head covers the draft vocabulary (initialised from the target's rows)
    SERVE_METHOD = ("EAGLE3", "eagle3")
    SETTINGS = ("ttt_length", "loss_decay", "normalize_feature_scale", "feature_scale", "init_lm_head_from_target",
                "compile")
    SHOWN_SETTINGS = ("ttt_length",)

    def __init__(self, config: LlamaConfig, ttt_length: int = TTT_LENGTH, loss_decay: float = LOSS_DECAY):
        super().__init__()
        self.config = config
        self.ttt_length, self.loss_decay = ttt_length, loss_decay
        # set by calibrate: fc's learning rate is lr / feature_scale (global), or each third of its input
        # columns steps at lr / its layer's scale (per_layer, column_scale)
        self.feature_scale, self.column_scale = 1.0, None
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

    @classmethod
    def config_for(cls, target_config, draft, vocab_size: int) -> LlamaConfig:
        config = eagle3_config(target_config, draft.draft_vocab_size)
        config.vocab_size = vocab_size
        return config

    def configure_training(self, draft) -> None:
        super().configure_training(draft)
        self.ttt_length, self.loss_decay = draft.ttt_length, draft.loss_decay

    def takes_target_lm_head(self, draft) -> bool:
        return draft.init_lm_head_from_target

    def calibrate(self, draft, first_batch_aux, *, fresh: bool) -> dict:
        """How large fc's input is: the median per-token RMS of the target's aux features on the first
        batch, over all three layers (draft.feature_scale=global) or per layer (per_layer); nothing with
        draft.normalize_feature_scale off.

        fc's default init and Adam's per-weight step size both assume inputs of RMS ~1. Targets whose
        residual stream is far larger (the tiny target's is ~1300 at layers 2-5, from Muon training;
        measured fc(aux) RMS ~800 against ~0.2 for the layer's attention and MLP outputs) otherwise make
        fc(aux) drown the rest of the draft's residual, and the embedding of the next token barely
        reaches the logits: acc_0 crawls (tiny recipe, 500 steps: 0.32 without, 0.52 with).
        Dividing fc's init (when `fresh`) and learning rate by the scale is the same as training on
        aux / scale with the usual init and rate (the served weights stay plain EAGLE-3). A function of
        the recipe alone (epoch 0's first batch), so a resumed run and every rank get the same;
        run_info.json records it.

        per_layer: a target's low, mid and high layers can differ by orders of magnitude, so each third
        of fc's input columns gets its own layer's scale: their init is divided by it and their Adam
        step too (optimizer_update), which is training fc on each layer divided by its scale, with fc
        still applied to the raw features."""
        if not draft.normalize_feature_scale:
            return {"feature_scale": 1.0}
        aux = first_batch_aux()
        info = {}
        if draft.feature_scale == "global":
            self.feature_scale = float(aux.pow(2).mean(-1).sqrt().median())
            divisor = self.feature_scale
        else:
            layers = aux.reshape(*aux.shape[:-1], 3, aux.shape[-1] // 3)
            scales = [float(s) for s in layers.pow(2).mean(-1).sqrt().flatten(0, -2).median(0).values]
            self.column_scale = torch.tensor(scales).repeat_interleave(self.fc.in_features // 3)
            divisor = self.column_scale
            info["layer_feature_scales"] = scales
        if fresh:
            with torch.no_grad():
                self.fc.weight.div_(divisor)
        return {"feature_scale": self.feature_scale, **info}

    def param_groups(self, lr: float) -> list[dict]:
        """fc at lr / feature_scale (see calibrate), the rest at lr."""
        params = self.trainable_parameters()
        if self.feature_scale == 1.0:
            return [{"params": params}]
        fc = self.fc.weight
        return [{"params": [p for p in params if p is not fc]}, {"params": [fc], "lr": lr / self.feature_scale}]

    @contextlib.contextmanager
    def optimizer_update(self):
        """per_layer feature scale: fc's columns step at lr / their layer's scale (Adam's step is
        proportional to lr, so scaling the step scales the lr)."""
        if self.column_scale is None:
            yield
            return
        fc = self.fc.weight
        before = fc.detach().clone()
        yield
        with torch.no_grad():
            fc.copy_(before + (fc - before) / self.column_scale.to(fc.device))

    def serving_layout(self, aux_layer_ids, target_num_layers):
        """config.json (serving_config: the layer-id trap) and the served tensors, without the embedding
        (both engines use the target's)."""
        if aux_layer_ids is None or target_num_layers is None:
            raise ExportError("an EAGLE-3 export needs the aux layer ids and the target's number of layers")
        tensors = served_tensors(self)
        check_tensors(tensors, self.config, allow_embed=False, required=TENSORS)
        return serving_config(self.config, aux_layer_ids, target_num_layers, tensors["fc.weight"].dtype), tensors

    def speculators_layout(self, aux_layer_ids, target_num_layers, verifier: Verifier):
        """vLLM's speculators format (speculators_config): the layer's LlamaConfig nested under
        `transformer_layer_config`, the draft's own fields at the top, the target named as the verifier so
        `vllm serve DIR` needs nothing else; the layer's tensors under `layers.0.` (the speculators
        library's names). Layer ids are written when not the defaults, as given: only vLLM reads this."""
        if aux_layer_ids is None or target_num_layers is None:
            raise ExportError("an EAGLE-3 export needs the aux layer ids and the target's number of layers")
        ids = check_aux_layer_ids(aux_layer_ids, target_num_layers)
        tensors = served_tensors(self)
        check_tensors(tensors, self.config, allow_embed=False, required=TENSORS)
        layer = _served_fields(self.config, tensors["fc.weight"].dtype)
        top = {key: layer.pop(key) for key in ("draft_vocab_size", "target_hidden_size", "norm_before_residual",
                                                "dtype")}
        for key in ("architectures", ID_KEY, "eagle_config"):
            layer.pop(key, None)
        config = {
            "architectures": [SPECULATORS_ARCHITECTURE],
            "speculators_model_type": "eagle3",
            "speculators_config": {
                "algorithm": "eagle3",
                "default_proposal_method": "greedy",
                "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": verifier.speculative_tokens,
                                      "accept_tolerance": 0.0, "verifier_accept_k": 1}],
                "verifier": {"name_or_path": verifier.name_or_path, "architectures": list(verifier.architectures)},
            },
            "transformer_layer_config": layer,
            **top,
        }
        if ids != default_aux_layer_ids(target_num_layers):
            config[ID_KEY] = ids
        return config, {("layers.0." + k[len("midlayer."):] if k.startswith("midlayer.") else k): v
                        for k, v in tensors.items()}

    @classmethod
    def reads(cls, raw_config: dict) -> bool:
        return raw_config.get("speculators_model_type") is not None or super().reads(raw_config)

    @classmethod
    def from_checkpoint(cls, config, tensors):
        return head_from_tensors(config, tensors)

    @classmethod
    def from_layout(cls, raw_config, tensors, where, embed_weight, lm_head_weight):
        """Our export, the official EAGLE-3 releases (config.json + pytorch_model.bin, `midlayer.*`),
        SpecForge/SGLang (model.safetensors with embed_tokens) or vLLM speculators
        (`speculators_model_type: eagle3`, `layers.0.*`). embed_tokens comes from `embed_weight` (the
        target's) when the checkpoint has none."""
        _refuse_layer_variants(raw_config, where)
        if raw_config.get("speculators_model_type") is not None:
            if raw_config["speculators_model_type"] != "eagle3":
                raise ExportError(f"{where}: speculators_model_type {raw_config['speculators_model_type']!r}, "
                                  "only eagle3 is read")
            config = _speculators_eagle3_config(raw_config, where)
        else:
            config = LlamaConfig.from_dict(raw_config)
            architectures = getattr(config, "architectures", None) or []
            if ARCHITECTURE not in architectures:
                raise ExportError(f"{where} has architectures {architectures}, expected [{ARCHITECTURE!r}]")
            _eagle3_layer_ids(config)
        if getattr(config, "draft_vocab_size", None) is None:
            raise ExportError(f"{where} has no draft_vocab_size")
        # vLLM-side writers (speculators) name the layer `layers.0.`; SGLang and EAGLE write `midlayer.`.
        tensors = {("midlayer." + k[len("layers.0."):] if k.startswith("layers.0.") else k): v
                   for k, v in tensors.items()}
        bias = tensors.pop("fc.bias", None)
        if bias is not None and bool(bias.any()):
            raise ExportError(f"{Path(where).parent}: fc.bias is non-zero; EAGLE-3 as SGLang and vLLM serve it "
                              "has no fc bias")
        return head_from_tensors(config, tensors, embed_weight)

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
                           target.teacher_logits, target.teacher_in_draft, self.ttt_length, self.loss_decay,
                           self.objective)

    def unroll(self, aux_hidden, input_ids, position_ids, loss_mask, teacher_logits, teacher_in_draft,
               ttt_length: int, loss_decay: float = LOSS_DECAY, objective: Objective = KL) -> HeadOutput:
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
        steps, counts = [], []
        for k in range(ttt_length):
            hidden = self.step(hidden, shift_left(input_ids, 1 + k), position_ids + k, cache, layout)
            rows = scored_rows(loss_mask, docs, teacher_in_draft, k)
            normed = self.norm(hidden.reshape(b * t, -1)[rows])
            step = linear_distillation(normed, self.lm_head.weight, teacher, rows + 1 + k, objective)
            loss = loss + (loss_decay**k) * step.loss
            steps.append(step)
            counts.append(len(rows))
        return HeadOutput(loss=loss, metrics=StepMetrics.of(steps, counts))


def head_from_tensors(config, tensors, embed_weight: torch.Tensor | None = None) -> Eagle3Head:
    """An Eagle3Head holding `tensors` (checked first), in their floating-point dtype. The embedding is
    the checkpoint's when it has one, else `embed_weight` (the target's)."""
    check_tensors(tensors, config, allow_embed=True, required=TENSORS)
    tensors = dict(tensors)
    dtype = tensors["fc.weight"].dtype
    with_embedding(tensors, expected_shapes(config, TENSORS)[EMBED_NAME], dtype, EMBED_NAME, embed_weight,
                   "embedding")
    return load_state(Eagle3Head(config), tensors, dtype)


def serving_config(config, aux_layer_ids, target_num_layers: int, dtype: torch.dtype) -> dict:
    """The config.json dict both engines read, including the layer-id trap:

    with the default ids no id is written anywhere (both engines' defaults agree); with other ids the
    top-level field gets them as given (vLLM) and `eagle_config` gets them minus one (SGLang adds one),
    with a warning because SGLang's reading changed across versions."""
    ids = check_aux_layer_ids(aux_layer_ids, target_num_layers)
    cfg = _served_fields(config, dtype)
    # Drop ids the head's config may carry (e.g. loaded from another checkpoint) before deciding.
    cfg.pop(ID_KEY, None)
    eagle_config = dict(cfg.pop("eagle_config", None) or {})
    eagle_config.pop(ID_KEY, None)
    default = default_aux_layer_ids(target_num_layers)
    if ids != default:
        if min(ids) < 1:
            raise ExportError(
                f"aux layer id 0 cannot be written for SGLang, which reads eagle_config ids as id - 1: got {ids}"
            )
        cfg[ID_KEY] = ids
        eagle_config[ID_KEY] = [i - 1 for i in ids]
        warnings.warn(
            f"explicit aux layer ids {ids} (the defaults for a {target_num_layers}-layer target are {default}): "
            f"wrote {ID_KEY}={ids} at the top level for vLLM and eagle_config.{ID_KEY}={[i - 1 for i in ids]} "
            "for SGLang, which adds 1. SGLang's reading depends on its version (a 2026-05 change adds 1 only "
            "when the first id is 1): check the acceptance rate after serving, a layer off gives ~1%.",
            stacklevel=4,
        )
    if eagle_config:
        cfg["eagle_config"] = eagle_config
    return cfg


def _served_fields(config, dtype: torch.dtype) -> dict:
    """The head's config as every EAGLE-3 layout writes it, before the layer ids: every field explicit
    (engine and transformers defaults differ across versions) and the fields engines misread fixed."""
    cfg = config.to_dict()
    cfg.update(
        architectures=[ARCHITECTURE],
        num_hidden_layers=1,
        draft_vocab_size=config.draft_vocab_size,
        target_hidden_size=getattr(config, "target_hidden_size", None) or config.hidden_size,
        tie_word_embeddings=False,  # true would make SGLang use the embedding as lm_head
        norm_before_residual=False,  # vLLM's speculators format defaults it to True
        dtype=dtype_name(dtype),
    )
    add_legacy_rope(cfg)
    return cfg


# Config flags of EAGLE-3 variants that change what the layer computes (docs/serving.md, "EAGLE 3.1's
# norms"): a draft trained with one is refused, not read as the original layer.
_VARIANT_FLAGS = {
    "norm_before_residual": "the residual taken after hidden_norm",
    "fc_norm": "EAGLE 3.1's RMSNorm on each aux input before fc",
    "norm_before_fc": "an RMSNorm before fc",
    "norm_output": "EAGLE 3.1's normed state fed back between chain steps",
}


def _refuse_layer_variants(raw: dict, where: Path) -> None:
    for key, what in _VARIANT_FLAGS.items():
        for section, fields in (("", raw), ("transformer_layer_config.", raw.get("transformer_layer_config"))):
            if isinstance(fields, dict) and fields.get(key):
                raise ExportError(f"{where}: {section}{key} is {fields[key]!r} ({what}); this head implements the "
                                  "original EAGLE-3 layer only, which SGLang's llama_eagle3 serves")


def _speculators_eagle3_config(raw: dict, where: Path) -> LlamaConfig:
    """The LlamaConfig of a vLLM speculators EAGLE-3 config.json (`speculators_model_type: eagle3`, the
    layer's fields nested under `transformer_layer_config`; speculators/models/eagle3 config.py)."""
    layer = raw.get("transformer_layer_config")
    if not isinstance(layer, dict):
        raise ExportError(f"{where}: a speculators config needs a `transformer_layer_config` mapping")
    fields = {k: v for k, v in layer.items() if k not in ("architectures", "model_type", "transformers_version")}
    config = LlamaConfig(**fields)
    config.architectures = [ARCHITECTURE]
    config.num_hidden_layers = 1
    config.draft_vocab_size = raw.get("draft_vocab_size")
    config.target_hidden_size = raw.get("target_hidden_size") or config.hidden_size
    config.norm_before_residual = False
    config.tie_word_embeddings = False
    if raw.get(ID_KEY):  # vLLM's convention: captured as given, like ours
        config.eagle_aux_hidden_state_layer_ids = list(raw[ID_KEY])
    return config


def _eagle3_layer_ids(config) -> None:
    """Normalise a loaded config's explicit aux layer ids to ours (HF hidden_states index) at the top
    level: vLLM reads the top-level field as given, SGLang reads `eagle_config`'s and adds one."""
    top = getattr(config, ID_KEY, None)
    nested = (getattr(config, "eagle_config", None) or {}).get(ID_KEY)
    if not top and nested:
        config.eagle_aux_hidden_state_layer_ids = [int(i) + 1 for i in nested]
