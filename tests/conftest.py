"""Shared fixtures: tiny random Llama targets that build in milliseconds."""
from __future__ import annotations

import pytest
import torch

torch.set_flush_denormal(True)


def tiny_llama_config(**overrides):
    """A random-weight Llama config small enough for unit tests (8 layers: default aux ids 2, 4, 5)."""
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, use_cache=False,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


@pytest.fixture
def tiny_llama():
    """A random-weight LlamaForCausalLM in eval mode, sdpa attention."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = tiny_llama_config()
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()
