"""The frozen target: loading, capturing the aux features, and the teacher distribution.

Only what the head needs is kept: the residual streams entering three decoder layers (captured by
forward pre-hooks, never `output_hidden_states=True`, which keeps all N+1 tensors and whose last
entry is post-norm) and the final post-norm hidden state, from which the teacher distribution is
computed over the draft vocabulary rows of lm_head only.
"""
from __future__ import annotations

import importlib.util
import inspect
from dataclasses import dataclass

import torch
from torch import nn

from eagle_online.attention import VARLEN, DocumentLayout, register_varlen_attention
from eagle_online.layout import default_aux_layer_ids, text_config
from eagle_online.recipe import TargetConfig, resolve_target
from eagle_online.sharded import full_params

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is bf16 on an accelerator and fp32 on CPU."""
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return _DTYPES[name]


# Families whose attention has learned sinks (a logit per head in every softmax's denominator), which
# transformers' flash_attention_2 path drops without a word when the installed flash-attn cannot take them.
SINK_MODEL_TYPES = frozenset({"gpt_oss"})


def resolve_attn_implementation(name: str, device: torch.device, config=None) -> str:
    """The attention a target runs on packed rows. `auto`: flash-attn's varlen kernels when the
    flash-attn package is installed on a GPU, else our mask-free `varlen` (torch's own flash varlen
    kernel on CUDA, a causal kernel over conversations regrouped one per row on CPU, explicit scores for
    the windows and soft-caps those cannot take); `varlen` also for a family with attention sinks, which
    flash-attn 2 cannot compute. `varlen` is registered with transformers when chosen."""
    text = text_config(config) if config is not None else None
    sinks = text is not None and getattr(text, "model_type", None) in SINK_MODEL_TYPES
    if name == "auto":
        flash = device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
        name = "flash_attention_2" if flash and not sinks else VARLEN
    elif name == "flash_attention_2" and sinks:
        raise ValueError(f"target.attn_implementation flash_attention_2 drops {text.model_type}'s attention sinks "
                         "(flash-attn 2 has no sink argument): use auto or varlen")
    if name == VARLEN:
        register_varlen_attention()
    return name


def generation_attn_implementation(name: str, device: torch.device, config=None) -> str:
    """The attention for batched `generate` (left padding, KV cache): what `resolve_attn_implementation`
    picks, except that our `varlen` (packed rows, no padding mask, one sequence with a cache) becomes
    transformers' sdpa, or eager for a model class that has no sdpa (Gemma-2's soft-caps, gpt-oss's sinks)."""
    resolved = resolve_attn_implementation(name, device, config)
    if resolved != VARLEN:
        return resolved
    return "sdpa" if config is None or _supports_sdpa(config) else "eager"


def _supports_sdpa(config) -> bool:
    """Whether transformers' causal-LM class for `config` runs sdpa (True when the class is not known)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return bool(MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]._supports_sdpa)
    except KeyError:
        return True


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of an HF causal LM (Llama, Qwen, Mistral, Gemma... all expose model.layers)."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"cannot find the decoder layers of {type(model).__name__} (expected .model.layers)")
    return layers


@dataclass
class TargetFeatures:
    """What the target's layers give: the aux features and the final hidden state."""

    aux_hidden: torch.Tensor  # [B, T, 3·H_target] low‖mid‖high, the target's dtype
    last_hidden: torch.Tensor  # [B, T, H_target] final post-norm hidden state


@dataclass
class TargetOutput(TargetFeatures):
    """What one frozen target forward gives the head: its features and the teacher."""

    # [B, T, draft_vocab] target logits restricted to the draft vocab, in the target's dtype: in bf16 the
    # matmul's output is rounded to bf16 anyway, so an fp32 copy would double the bytes (2 GB at 16k
    # tokens × 32k) for no precision; the loss reads them in fp32 a chunk of rows at a time.
    teacher_logits: torch.Tensor
    teacher_in_draft: torch.Tensor  # [B, T] bool: the full-vocabulary argmax lies in the draft vocab


@dataclass
class TargetStep:
    """One KV-cached target forward over new tokens of one sequence (speculative decoding)."""

    aux_hidden: torch.Tensor  # [m, 3·H_target]
    last_hidden: torch.Tensor  # [m, H_target] post-norm
    logits: torch.Tensor  # [m, vocab] fp32, the full vocabulary


class FrozenTarget(nn.Module):
    """A frozen HF causal LM that returns aux features and the teacher distribution over the draft vocab."""

    def __init__(self, model: nn.Module, aux_layer_ids: list[int] | None, draft_ids: torch.Tensor):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        layers = decoder_layers(model)
        n = len(layers)
        self.aux_layer_ids = list(aux_layer_ids) if aux_layer_ids is not None else default_aux_layer_ids(n)
        if len(set(self.aux_layer_ids)) != 3 or max(self.aux_layer_ids) >= n:
            raise ValueError(
                f"aux layer ids {self.aux_layer_ids} must be 3 distinct ids below the target's {n} layers"
                + (" (the defaults repeat for targets with fewer than 7 layers)" if aux_layer_ids is None else "")
            )
        self._captured: dict[int, torch.Tensor] = {}
        # transformers 5.24 renamed the decoder's past_key_values to cache; the GPU image's 5.17 knows only
        # the old name. Looked up once here, not on every verification step.
        decoder_args = inspect.signature(model.get_decoder().forward).parameters
        self._cache_arg = "cache" if "cache" in decoder_args else "past_key_values"
        for i in self.aux_layer_ids:
            layers[i].register_forward_pre_hook(self._capture_hook(i), with_kwargs=True)
        # The draft-vocab rows of lm_head are taken once: the teacher never needs the rest except for
        # the argmax test, which streams over vocabulary chunks. (Gathered whole under ZeRO-3.)
        with full_params(self.lm_head_weight):
            in_draft = torch.zeros(self.lm_head_weight.shape[0], dtype=torch.bool, device=draft_ids.device)
            in_draft[draft_ids] = True
            lm_head_draft = self.lm_head_weight[draft_ids].detach().clone()
        self.register_buffer("in_draft", in_draft, persistent=False)  # t2d: is a target id a draft token
        self.register_buffer("lm_head_draft", lm_head_draft, persistent=False)

    @property
    def config(self):
        return self.model.config

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.get_output_embeddings().weight

    @property
    def embed_weight(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight

    def _capture_hook(self, layer_id: int):
        def hook(module, args, kwargs):
            self._captured[layer_id] = args[0] if args else kwargs["hidden_states"]

        return hook

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, vocab_chunk: int = 16384) -> TargetOutput:
        """Run the target once over a packed row (position_ids restart per conversation)."""
        return self.teacher(self.features(input_ids, position_ids), vocab_chunk)

    @torch.no_grad()
    def features(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> TargetFeatures:
        """The decoder's forward: aux features (captured by the hooks) and the final hidden state."""
        self._captured.clear()
        base = self.model.get_decoder()
        last = base(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                    **self._packing_kwargs(position_ids)).last_hidden_state
        aux = torch.cat([self._captured.pop(i) for i in self.aux_layer_ids], dim=-1)
        return TargetFeatures(aux_hidden=aux, last_hidden=last)

    @torch.no_grad()
    def teacher(self, features: TargetFeatures, vocab_chunk: int = 16384) -> TargetOutput:
        """The teacher over the draft vocab, and whether each full-vocabulary argmax is a draft token."""
        last = features.last_hidden
        return TargetOutput(
            aux_hidden=features.aux_hidden,
            last_hidden=last,
            teacher_logits=self._softcap(last @ self.lm_head_draft.T),
            teacher_in_draft=self._argmax_in_draft(last, vocab_chunk),  # a soft-cap keeps the order
        )

    def _softcap(self, logits: torch.Tensor) -> torch.Tensor:
        """The family's final-logit soft-cap, c·tanh(x/c) (Gemma-2's 30), where it has one."""
        cap = getattr(text_config(self.config), "final_logit_softcapping", None)
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def _packing_kwargs(self, position_ids: torch.Tensor) -> dict:
        """Conversation boundaries computed once per forward for the varlen kernels (flash-attn's read
        cu_seq_lens/max_length, ours the layout), instead of from position_ids in every layer."""
        impl = getattr(self.config, "_attn_implementation", None)
        if impl != VARLEN and not str(impl).startswith("flash_attention"):
            return {}
        layout = DocumentLayout.from_position_ids(position_ids)
        kwargs = dict(cu_seq_lens_q=layout.cu_seqlens, cu_seq_lens_k=layout.cu_seqlens,
                      max_length_q=layout.max_len, max_length_k=layout.max_len)
        if impl == VARLEN:
            kwargs["document_layout"] = layout
        return kwargs

    @torch.no_grad()
    def decode(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache,
               attention_mask: torch.Tensor | None = None, last_logits_only: bool = False) -> TargetStep:
        """Extend one sequence by new tokens ([m] each) through a transformers KV cache (a DynamicCache
        holding the tokens before them): their aux features, final hidden states and full logits.
        `attention_mask` [1, 1, m, cached + m], additive (0 or the dtype's minimum), replaces the causal
        mask (a draft tree's verification). `last_logits_only`: logits of the last token alone, [1, vocab]
        (a prompt's forward: [m × vocab] fp32 logits are 1 GB for 2k tokens of a 128k vocabulary, and were
        a fifth of SmolLM2's evaluation time on CPU)."""
        self._captured.clear()
        base = self.model.get_decoder()
        extra = {} if attention_mask is None else {"attention_mask": attention_mask}
        out = base(input_ids=input_ids[None], position_ids=position_ids[None], use_cache=True,
                   **{self._cache_arg: cache}, **extra)
        last = out.last_hidden_state[0]
        aux = torch.cat([self._captured.pop(i)[0] for i in self.aux_layer_ids], dim=-1)
        with full_params(self.lm_head_weight):  # gathered under ZeRO-3 (every rank decodes the same prompts)
            logits = self._softcap(((last[-1:] if last_logits_only else last) @ self.lm_head_weight.T).float())
        return TargetStep(aux_hidden=aux, last_hidden=last, logits=logits)

    def _argmax_in_draft(self, last: torch.Tensor, chunk: int) -> torch.Tensor:
        """Whether the full-vocabulary argmax is a draft token. Under ZeRO-3 lm_head is gathered for the
        scan: no module call gathers it, since the decoder's forward never touches it."""
        with full_params(self.lm_head_weight):
            return self._argmax_scan(last, chunk)

    def _argmax_scan(self, last: torch.Tensor, chunk: int) -> torch.Tensor:
        """Whether the full-vocabulary argmax is a draft token, streaming lm_head in chunks so that
        [tokens × vocab] logits never exist at once."""
        weight = self.lm_head_weight
        best = torch.full(last.shape[:-1], float("-inf"), device=last.device)
        best_id = torch.zeros(last.shape[:-1], dtype=torch.long, device=last.device)
        for start in range(0, weight.shape[0], chunk):
            logits = (last @ weight[start : start + chunk].T).float()
            value, idx = logits.max(dim=-1)
            better = value > best  # strict: the lowest id wins ties, as torch.argmax does
            best = torch.where(better, value, best)
            best_id = torch.where(better, idx + start, best_id)
        return self.in_draft[best_id]


def load_target_model(cfg: TargetConfig, device: torch.device, move: bool = True,
                      generation: bool = False) -> nn.Module:
    """Load the target's HF model, frozen, with the KV cache off (packing is ignored with it on).
    `device` decides the `auto` dtype and attention; `move=False` leaves the model where loading put it
    (ZeRO-3 partitions are already on this rank's device). `generation`: for batched `generate` instead
    (its attention, `generation_attn_implementation`, and the cache on)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if device.type == "cpu":  # denormal floats halve a trained model's CPU speed (measured: tiny_target.py)
        torch.set_flush_denormal(True)
    path = resolve_target(cfg)
    config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    attention = generation_attn_implementation if generation else resolve_attn_implementation
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=resolve_dtype(cfg.dtype, device),
        attn_implementation=attention(cfg.attn_implementation, device, config),
        trust_remote_code=cfg.trust_remote_code,
        **({} if generation else {"use_cache": False}),
    )
    if move:
        model = model.to(device)
    return model.eval().requires_grad_(False)


def load_tokenizer(cfg: TargetConfig):
    """The target's own tokenizer (its chat template defines the loss mask)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_target(cfg), trust_remote_code=cfg.trust_remote_code)
