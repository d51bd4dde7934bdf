"""A recipe's data, read and tokenized: every source, mixed by weight, with the counts of what was kept.

`iter_examples` streams the training sequences without keeping them (the draft-vocabulary step uses
it on corpora of any size); `prepare_data` keeps them, compactly, for the trainer.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from eagle_online.data.chat import ChatRenderer, TemplateError, TokenizedConversation
from eagle_online.data.sources import DataError, iter_conversations
from eagle_online.recipe import DataConfig


@dataclass
class PreparedData:
    """The training sequences of all sources, in source order (a sequence repeated by its source's
    weight appears that many times), and what reading them found.

    stats = {"sources": {label: {...}}, "total": {...}}, each with rows_read, rows_used, skipped
    (rows by reason), dropped (sequences of used rows dropped, by reason: `per_turn` only), truncated,
    sequences, tokens, trained_tokens, trained_fraction, and per source its weight and
    sequences_per_epoch. A label is the source's path, with `#index` added when a path repeats.
    """

    examples: list[TokenizedConversation]
    stats: dict = field(default_factory=dict)


def copies(index: int, weight: float) -> int:
    """How many times a source's sequence number `index` is used per epoch: the whole part of the
    weight, plus one for an evenly spaced `frac(weight)` share of the sequences (no randomness, so
    every rank and every step that counts the data agrees)."""
    whole = math.floor(weight)
    frac = weight - whole
    return whole + (math.floor((index + 1) * frac) - math.floor(index * frac))


def source_labels(data_cfg: DataConfig) -> list[str]:
    """One label per source: its path, with `#index` when the same path appears more than once."""
    paths = [s.path for s in data_cfg.sources]
    return [p if paths.count(p) == 1 else f"{p}#{i}" for i, p in enumerate(paths)]


class _SourceStats:
    def __init__(self, path: str, weight: float):
        self.path, self.weight = path, weight
        self.skipped: Counter = Counter()
        self.dropped: Counter = Counter()
        self.rows_used = self.sequences = self.truncated = self.tokens = self.trained = self.per_epoch = 0

    def add(self, example: TokenizedConversation, truncated: bool) -> None:
        self.per_epoch += copies(self.sequences, self.weight)
        self.sequences += 1
        self.truncated += truncated
        self.tokens += len(example)
        self.trained += example.num_trained

    def as_dict(self) -> dict:
        return {"path": self.path, "weight": self.weight, **_summary(
            self.rows_used, self.skipped, self.dropped, self.sequences, self.truncated, self.tokens, self.trained
        ), "sequences_per_epoch": self.per_epoch}


def _summary(used, skipped: Counter, dropped: Counter, sequences, truncated, tokens, trained) -> dict:
    return {
        "rows_read": used + sum(skipped.values()),
        "rows_used": used,
        "skipped": dict(sorted(skipped.items())),
        "dropped": dict(sorted(dropped.items())),
        "sequences": sequences,
        "truncated": truncated,
        "tokens": tokens,
        "trained_tokens": trained,
        "trained_fraction": round(trained / tokens, 4) if tokens else 0.0,
    }


def iter_examples(
    data_cfg: DataConfig, tokenizer, stats: dict | None = None
) -> Iterator[tuple[int, TokenizedConversation]]:
    """Yield `(source index, sequence)` for every usable training sequence, source by source.

    Unusable rows (unknown role, empty turn, no assistant turn, a conversation the template cannot
    render: `template_error`, nothing trained left: `no_trained_tokens`, longer than `max_length`
    with `overlong: skip`: `too_long`) are skipped and counted by reason. `stats`, when given, is
    filled as `PreparedData.stats` describes, once the iteration ends.
    """
    renderer = ChatRenderer(tokenizer, data_cfg.chat_template_kwargs)
    per_source: dict[str, _SourceStats] = {}
    first_template_error = None
    for k, (label, source) in enumerate(zip(source_labels(data_cfg), data_cfg.sources)):
        counts = per_source[label] = _SourceStats(source.path, source.weight)
        for messages in iter_conversations(source, skipped=counts.skipped):
            try:
                sequences = renderer.tokenize(messages, data_cfg.multi_turn)
            except TemplateError as e:
                first_template_error = first_template_error or str(e)
                counts.skipped["template_error"] += 1
                continue
            kept, reasons = [], []
            for example in sequences:
                cut = len(example) > data_cfg.max_length
                if cut and data_cfg.overlong == "skip":
                    reasons.append("too_long")
                    continue
                if cut:
                    example = example.truncated(data_cfg.max_length)
                if example.num_trained == 0:
                    reasons.append("no_trained_tokens")
                    continue
                kept.append((example, cut))
            if not kept:
                counts.skipped[reasons[0]] += 1
                continue
            counts.rows_used += 1
            counts.dropped.update(reasons)
            for example, cut in kept:
                counts.add(example, cut)
                yield k, example
        if stats is not None:
            stats.update(_collect(per_source, first_template_error))
    if stats is not None:
        stats.update(_collect(per_source, first_template_error))


def _collect(per_source: dict[str, _SourceStats], first_template_error: str | None) -> dict:
    sources = {label: s.as_dict() for label, s in per_source.items()}
    total = _summary(
        sum(s.rows_used for s in per_source.values()),
        sum((s.skipped for s in per_source.values()), Counter()),
        sum((s.dropped for s in per_source.values()), Counter()),
        *(sum(getattr(s, a) for s in per_source.values()) for a in ("sequences", "truncated", "tokens", "trained")),
    )
    total["sequences_per_epoch"] = sum(s.per_epoch for s in per_source.values())
    out = {"sources": sources, "total": total}
    if first_template_error:
        out["first_template_error"] = first_template_error
    return out


def prepare_data(data_cfg: DataConfig, tokenizer) -> PreparedData:
    """Read and tokenize every source with the target's chat template (see `iter_examples`), each
    sequence repeated as its source's weight says. No usable sequence at all is a DataError."""
    stats: dict = {}
    examples: list[TokenizedConversation] = []
    index = [0] * len(data_cfg.sources)
    for k, example in iter_examples(data_cfg, tokenizer, stats):
        examples.extend([example] * copies(index[k], data_cfg.sources[k].weight))
        index[k] += 1
    if not examples:
        hint = f"; first template error: {stats['first_template_error']}" if "first_template_error" in stats else ""
        raise DataError(f"no usable conversation in {[s.path for s in data_cfg.sources]}: {stats['total']}{hint}")
    return PreparedData(examples=examples, stats=stats)


def format_stats(stats: dict) -> str:
    """The data statistics as a small text table, one line per source and a total."""
    rows = list(stats["sources"].items()) + [("total", stats["total"])]
    width = min(max(len(label) for label, _ in rows), 72)
    lines = [f"{'source':<{width}} {'weight':>6} {'rows':>8} {'used':>8} {'seqs/ep':>8} {'tokens':>12} {'trained':>8}  "
             "skipped"]
    for label, s in rows:
        skipped = ", ".join(f"{k} {v}" for k, v in {**s["skipped"], **s.get("dropped", {})}.items()) or "-"
        name = label if len(label) <= width else "…" + label[-(width - 1):]
        weight = f"{s['weight']:g}" if "weight" in s else ""
        lines.append(
            f"{name:<{width}} {weight:>6} {s['rows_read']:>8} {s['rows_used']:>8} {s['sequences_per_epoch']:>8} "
            f"{s['tokens']:>12,} {s['trained_fraction']:>8.1%}  {skipped}"
        )
    return "\n".join(lines)
