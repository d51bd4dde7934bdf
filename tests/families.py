"""Tiny random instances of the target families people train drafts for, built from their transformers
config classes (no download): a few layers, small width, the family's own attention features switched on
and made to bite.

Each instance has 8 layers (the default aux ids [2, 4, 5] are distinct), 4 query heads over 2 key heads
of 16 dims, and the tiny chat target's 4096-token vocabulary, so that `save_family` can give it that
target's tokenizer and chat template and the whole trainer runs on it. Weights are drawn with a larger
spread than the families' defaults (`initializer_range` 0.2) so that attention is far from uniform: a
window, a sink or a soft-cap then changes the outputs visibly, and a path that ignores one fails the
packed-versus-alone comparison. Sliding windows are 8 tokens, shorter than the test conversations.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from eagle_online.tiny_target import TINY_CHAT_DIR

WINDOW = 8

_COMMON = dict(
    vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, initializer_range=0.2,
    tie_word_embeddings=False, use_cache=False, bos_token_id=1, eos_token_id=3, pad_token_id=0,
)
_ALTERNATING = ["sliding_attention", "full_attention"] * 4


def _config(family: str):
    """The transformers config of the tiny `family` instance."""
    import transformers as tf

    if family == "llama":
        return tf.LlamaConfig(**_COMMON)
    if family == "qwen2":  # Qwen2.5: q/k/v biases
        return tf.Qwen2Config(**_COMMON)
    if family == "qwen3":  # q/k RMS norms
        return tf.Qwen3Config(**_COMMON)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(**_COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                 decoder_sparse_step=1, norm_topk_prob=True)
    if family == "mixtral":
        return tf.MixtralConfig(**_COMMON, num_local_experts=4, num_experts_per_tok=2)
    if family == "gpt_oss":  # attention sinks, alternating 128-token windows in the real model
        common = {k: v for k, v in _COMMON.items() if k != "intermediate_size"}
        return tf.GptOssConfig(**common, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                               sliding_window=WINDOW, layer_types=_ALTERNATING)
    if family == "gemma2":  # soft-capped attention scores and final logits (50 and 30 in the real model)
        return tf.Gemma2Config(**_COMMON, sliding_window=WINDOW, layer_types=_ALTERNATING,
                               query_pre_attn_scalar=16, attn_logit_softcapping=2.0, final_logit_softcapping=3.0)
    if family == "gemma3":  # text only: 5 local layers to 1 global
        return tf.Gemma3TextConfig(**_COMMON, sliding_window=WINDOW, query_pre_attn_scalar=16)
    if family == "phi3":  # Phi-3/4: fused qkv and gate/up projections
        return tf.Phi3Config(**_COMMON)
    if family == "mistral":  # Mistral 7B v0.1 attends over a 4096-token window
        return tf.MistralConfig(**_COMMON, sliding_window=WINDOW)
    raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")


FAMILIES = ["llama", "qwen2", "qwen3", "qwen3_moe", "mixtral", "gpt_oss", "gemma2", "gemma3", "phi3", "mistral"]
MOE = ["qwen3_moe", "mixtral", "gpt_oss"]
# The families whose attention a path without their window, sinks or soft-cap computes wrongly.
WINDOWED = ["gpt_oss", "gemma2", "gemma3", "mistral"]


def build_family(family: str, attn_implementation: str = "eager", seed: int = 0):
    """The tiny `family` instance, random weights drawn from `seed`, in eval mode."""
    from transformers import AutoModelForCausalLM

    config = _config(family)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    return model.eval()


def save_family(family: str, directory: Path, seed: int = 0) -> Path:
    """The tiny `family` instance saved as an ordinary HF checkpoint with the tiny chat target's tokenizer
    and chat template: a `target.model` directory for any recipe."""
    directory = Path(directory)
    build_family(family, seed=seed).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(TINY_CHAT_DIR / name, directory / name)
    return directory
