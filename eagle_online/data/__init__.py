"""Data: sources → chat template + loss mask → packing; draft-vocabulary counting.

`prepare_data` reads every source of a recipe and tokenizes it; the trainer shuffles (per epoch,
from its seed) and packs with `pack_conversations`.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from eagle_online.data.chat import TemplateError, TokenizedConversation, tokenize_conversation, tokenize_full
from eagle_online.data.packing import PackedBatch, pack_conversations
from eagle_online.data.sources import DataError, iter_conversations
from eagle_online.data.vocab import build_draft_vocab, count_trained_tokens, load_draft_vocab, save_draft_vocab
from eagle_online.recipe import DataConfig

__all__ = [
    "DataError",
    "PackedBatch",
    "PreparedData",
    "TemplateError",
    "TokenizedConversation",
    "build_draft_vocab",
    "count_trained_tokens",
    "iter_conversations",
    "load_draft_vocab",
    "pack_conversations",
    "prepare_data",
    "save_draft_vocab",
    "tokenize_conversation",
]


@dataclass
class PreparedData:
    """The tokenized conversations of all sources, in source order, and what reading them found.

    stats = {"sources": {label: {...}}, "total": {...}}, each with rows_read, rows_used,
    skipped (rows by reason), truncated (used, but cut to max_length), tokens, trained_tokens,
    trained_fraction. A label is the source's path, with `#index` added when a path repeats.
    """

    examples: list[TokenizedConversation]
    stats: dict = field(default_factory=dict)


def prepare_data(data_cfg: DataConfig, tokenizer) -> PreparedData:
    """Read every source and tokenize each conversation with the target's chat template.

    Unusable rows (unknown role, empty turn, no assistant turn, a conversation the template cannot
    render) are skipped and counted by reason, and so are conversations left with no trained token
    after truncation to `max_length`. No usable conversation at all is a DataError.
    """
    examples: list[TokenizedConversation] = []
    per_source: dict[str, dict] = {}
    first_template_error = None
    paths = [s.path for s in data_cfg.sources]
    for index, source in enumerate(data_cfg.sources):
        label = source.path if paths.count(source.path) == 1 else f"{source.path}#{index}"
        skipped: Counter = Counter()
        used = truncated = tokens = trained = 0
        for messages in iter_conversations(source, skipped=skipped):
            try:
                full = tokenize_full(tokenizer, messages)
            except TemplateError as e:
                first_template_error = first_template_error or str(e)
                skipped["template_error"] += 1
                continue
            example = full
            if len(full.input_ids) > data_cfg.max_length:
                example = TokenizedConversation(
                    full.input_ids[: data_cfg.max_length], full.loss_mask[: data_cfg.max_length]
                )
            n_trained = sum(example.loss_mask)
            if n_trained == 0:
                skipped["no_trained_tokens"] += 1
                continue
            truncated += example is not full
            used += 1
            tokens += len(example.input_ids)
            trained += n_trained
            examples.append(example)
        per_source[label] = _summary(source.path, used, skipped, truncated, tokens, trained)

    total_skipped = sum((Counter(s["skipped"]) for s in per_source.values()), Counter())
    total = _summary(
        None,
        sum(s["rows_used"] for s in per_source.values()),
        total_skipped,
        sum(s["truncated"] for s in per_source.values()),
        sum(s["tokens"] for s in per_source.values()),
        sum(s["trained_tokens"] for s in per_source.values()),
    )
    stats = {"sources": per_source, "total": total}
    if not examples:
        hint = f"; first template error: {first_template_error}" if first_template_error else ""
        raise DataError(f"no usable conversation in {paths}: {total}{hint}")
    return PreparedData(examples=examples, stats=stats)


def _summary(path, used: int, skipped: Counter, truncated: int, tokens: int, trained: int) -> dict:
    summary = {"path": path} if path is not None else {}
    summary.update(
        rows_read=used + sum(skipped.values()),
        rows_used=used,
        skipped=dict(sorted(skipped.items())),
        truncated=truncated,
        tokens=tokens,
        trained_tokens=trained,
        trained_fraction=round(trained / tokens, 4) if tokens else 0.0,
    )
    return summary
