"""The shipped tiny target is an ordinary HF checkpoint and is not degenerate: it predicts held-out
ShareGPT text well above chance, and its sampled replies use many distinct tokens without looping."""
import json

import pytest
import torch

from eagle_online.target import default_aux_layer_ids
from eagle_online.tiny_target import (
    TINY_CHAT_DIR,
    TinyTargetConfig,
    heldout_metrics,
    ngram_repetition,
    sample_replies,
    tiny_conversations,
    token_stream,
)


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(TINY_CHAT_DIR, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(TINY_CHAT_DIR)


@pytest.fixture(scope="module")
def heldout():
    return tiny_conversations(TinyTargetConfig())[1]


def test_loads_as_a_llama_chat_model(tiny):
    model, tokenizer = tiny
    assert model.config.model_type == "llama"
    n = model.config.num_hidden_layers
    assert n >= 7 and len(set(default_aux_layer_ids(n))) == 3
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                         tokenize=False)
    assert text.endswith("<|start|>assistant\n")
    assert tokenizer.eos_token == "<|end|>"
    size = sum(f.stat().st_size for f in TINY_CHAT_DIR.iterdir())
    assert size < 16 * 2**20, "the shipped checkpoint should stay a few MB"


def test_predicts_heldout_conversations(tiny, heldout):
    model, tokenizer = tiny
    stream = token_stream(tokenizer, heldout[:40])
    metrics = heldout_metrics(model, stream, seq_len=256, windows=16)
    # Chance is 1/4096; a unigram model gets ~5%. The shipped model must be far above both.
    assert metrics["top1"] > 0.20, metrics
    assert metrics["loss"] < 4.6, metrics
    report = json.loads((TINY_CHAT_DIR / "report.json").read_text())
    assert report["heldout"]["top1"] > 0.20


def test_sampled_replies_are_not_degenerate(tiny, heldout):
    model, tokenizer = tiny
    prompts = [c[0]["content"][:200] for c in heldout[:6] if c[0]["role"] == "user"]
    replies = sample_replies(model, tokenizer, prompts, max_new_tokens=48, temperature=0.8, seed=1)
    tokens = [t for r in replies for t in r]
    assert len(set(tokens)) > 0.4 * len(tokens), "replies reuse a handful of tokens"
    assert sum(map(ngram_repetition, replies)) / len(replies) < 0.25
    newline = tokenizer.convert_tokens_to_ids("Ċ")
    assert sum(t == newline for t in tokens) < 0.3 * len(tokens), "replies are runs of newlines"


def test_ngram_repetition():
    assert ngram_repetition([1, 2, 3, 4, 5, 6]) == 0.0
    assert ngram_repetition([1, 2, 3, 4] * 5) == pytest.approx(1 - 4 / 17)
