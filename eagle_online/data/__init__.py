"""Data: sources → chat template + loss mask → packing; draft-vocabulary counting.

`prepare_data` reads every source of a recipe and tokenizes it; the trainer shuffles (per epoch,
from its seed) and packs with `pack_conversations`.
"""
from __future__ import annotations

from eagle_online.data.chat import ChatRenderer, TemplateError, TokenizedConversation, tokenize_conversation
from eagle_online.data.packing import PackedBatch, pack_conversations
from eagle_online.data.prepare import PreparedData, format_stats, iter_examples, prepare_data
from eagle_online.data.sources import DataError, iter_conversations
from eagle_online.data.vocab import build_draft_vocab, count_trained_tokens, load_draft_vocab, save_draft_vocab

__all__ = [
    "ChatRenderer",
    "DataError",
    "PackedBatch",
    "PreparedData",
    "TemplateError",
    "TokenizedConversation",
    "build_draft_vocab",
    "count_trained_tokens",
    "format_stats",
    "iter_conversations",
    "iter_examples",
    "load_draft_vocab",
    "pack_conversations",
    "prepare_data",
    "save_draft_vocab",
    "tokenize_conversation",
]
