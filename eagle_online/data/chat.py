"""A conversation rendered with the target's own chat template, and the mask of its trained tokens.

The draft learns what the target generates: each assistant turn's text and the end-of-turn token
that closes it. Headers, system and user turns are context only. Where those begin and end is
never read off hard-coded header strings (the classic bug: a wrong mask trains the draft to ~35%
accuracy and raises no error); it is derived from the template itself, one way for every template:

- **where the reply's text lies**: render the conversation again with this turn's content replaced
  by a sentinel. The two renderings agree up to the reply and after it; what differs is the reply as
  the template writes it (trimmed, with reasoning split off or dropped: whatever the template does).
- **where the generated part starts**: the target generates what follows its generation prompt. When
  `messages[:i]` rendered with `add_generation_prompt=True` is a prefix of the rendering, everything
  after it is trained, including text the template inserts before the reply (Qwen3's `<think>`
  block, gpt-oss's `<|channel|>final<|message|>`). When it is not (the template renders a turn in the
  history differently from what it prompts for: Qwen3 without thinking, DeepSeek-R1's `<think>\\n`
  prompt), only the reply's text is trained.
- **the end-of-turn token**: the first special token the template writes after the reply, with only
  whitespace in between. The whitespace is scaffolding (Llama-2 writes `' ' + eos`), and so is
  anything after that token (a newline, a trailing eos, the next turn).

Characters map to tokens through the fast tokenizer's offsets: a token is trained when it overlaps a
trained span.

Templates that rewrite the history (Qwen3 drops the reasoning of earlier turns; DeepSeek-R1 drops all
reasoning) are handled by `multi_turn`: `whole` renders the conversation once and trains each turn as
the history shows it; `per_turn` makes one sequence per assistant turn, its history followed by the
turn as the template renders a final reply, so every reasoning trace the template keeps is trained.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from eagle_online.data.sources import DataError

# A reply no real data contains and no template rewrites (U+2063 is not whitespace, so `trim` keeps it).
_SENTINEL = "\u2063EAGLE-ONLINE-SENTINEL-REPLY\u2063"
MULTI_TURN_MODES = ("whole", "per_turn")


class TemplateError(DataError):
    """The chat template cannot render this conversation, or renders it in a way we cannot map."""


class TokenizedConversation:
    """Token ids of a rendered conversation and, per token, whether it is trained.

    Stored compactly (int32 ids, one byte per mask entry: ~5 bytes per token), because a real corpus
    is hundreds of millions of tokens held by every rank.
    """

    __slots__ = ("input_ids", "loss_mask")

    def __init__(self, input_ids, loss_mask):
        self.input_ids = np.ascontiguousarray(input_ids, dtype=np.int32)
        # True where the token is trained: assistant text and the end-of-turn token that closes it;
        # False for system/user turns and template scaffolding (role headers, bos, text after the end).
        self.loss_mask = np.ascontiguousarray(loss_mask, dtype=np.bool_)
        if self.input_ids.ndim != 1 or self.input_ids.shape != self.loss_mask.shape:
            raise ValueError(
                f"input_ids {self.input_ids.shape} and loss_mask {self.loss_mask.shape} must be equal 1-D shapes"
            )

    def __len__(self) -> int:
        return len(self.input_ids)

    def __repr__(self) -> str:
        return f"TokenizedConversation({len(self)} tokens, {self.num_trained} trained)"

    @property
    def num_trained(self) -> int:
        return int(self.loss_mask.sum())

    def truncated(self, max_length: int) -> TokenizedConversation:
        """The first `max_length` tokens, copied (a view would keep the whole sequence alive)."""
        return TokenizedConversation(self.input_ids[:max_length].copy(), self.loss_mask[:max_length].copy())


@dataclass
class RenderedConversation:
    """The rendered text and the character spans `[start, end)` that are trained, in order."""

    text: str
    spans: list[tuple[int, int]]


def _common_prefix_len(a: str, b: str) -> int:
    """Length of the longest common prefix, by bisection over slice comparisons (C speed)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _common_suffix_len(a: str, b: str, limit: int) -> int:
    lo, hi = 0, min(len(a), len(b), limit)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[len(a) - mid :] == b[len(b) - mid :]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class ChatRenderer:
    """The target's chat template, and the loss mask derived from it (see the module docstring).

    `template_kwargs` are passed to the template (e.g. `{"enable_thinking": False}` for Qwen3).
    Needs a fast tokenizer (for offsets) that has a chat template.
    """

    def __init__(self, tokenizer, template_kwargs: dict | None = None):
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError(f"{type(tokenizer).__name__} is not a fast tokenizer; the loss mask needs its offsets")
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError("the tokenizer has no chat template")
        self.tokenizer = tokenizer
        self.template_kwargs = dict(template_kwargs or {})
        specials = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
        specials.update(tokenizer.all_special_tokens)
        # Longest first, so that a token that is a prefix of another never wins the match.
        self._special_tokens = sorted((s for s in specials if s), key=len, reverse=True)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The template's text for `messages`."""
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt, **self.template_kwargs
            )
        except Exception as e:  # jinja raises its own errors (e.g. roles that must alternate); keep the cause
            raise TemplateError(f"the chat template cannot render this conversation: {type(e).__name__}: {e}") from e
        if not isinstance(text, str):
            raise TemplateError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, not text")
        return text

    def end_of_turn_token(self) -> str | None:
        """The special token the template writes after a reply (what generation should stop at)."""
        messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _SENTINEL}]
        text = self.render(messages)
        eot = self._end_of_turn(text, text.rfind(_SENTINEL) + len(_SENTINEL))
        return text[eot[0] : eot[1]] if eot else None

    def _end_of_turn(self, text: str, pos: int) -> tuple[int, int] | None:
        """The span of the special token that follows `pos` after whitespace only, if any."""
        while pos < len(text) and text[pos].isspace():
            pos += 1
        for token in self._special_tokens:
            if text.startswith(token, pos):
                return pos, pos + len(token)
        return None

    def spans(self, messages: list[dict], turns: list[int] | None = None) -> RenderedConversation:
        """Render `messages` and find the trained character spans of the assistant turns `turns`
        (indices into `messages`; default every assistant turn)."""
        text = self.render(messages)
        if turns is None:
            turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        spans: list[tuple[int, int]] = []
        for i in turns:
            if i == 0:
                raise TemplateError("an assistant turn needs a prompt before it (a system or user turn)")
            probe_messages = list(messages)
            probe_messages[i] = {**messages[i], "content": _SENTINEL}
            probe = self.render(probe_messages)
            head = _common_prefix_len(text, probe)
            tail = _common_suffix_len(text, probe, min(len(text), len(probe)) - head)
            if _SENTINEL not in probe[head : len(probe) - tail]:
                raise TemplateError(f"assistant turn {i}: the template does not write the reply where it differs")
            reply_start, reply_end = head, len(text) - tail
            if reply_end <= reply_start:
                raise TemplateError(f"assistant turn {i} renders no text")
            prompt = self.render(messages[:i], add_generation_prompt=True)
            start = len(prompt) if text.startswith(prompt) and len(prompt) <= reply_start else reply_start
            if spans and start < spans[-1][1]:
                raise TemplateError(f"assistant turn {i} overlaps the turn before it in the rendered text")
            spans.append((start, reply_end))
            eot = self._end_of_turn(text, reply_end)
            if eot is not None:
                spans.append(eot)
        return RenderedConversation(text, spans)

    def tokenize_rendered(self, rendered: RenderedConversation) -> TokenizedConversation:
        """Token ids of the rendered text and the mask of the tokens that overlap a span."""
        # The template writes bos itself; apply_chat_template(tokenize=True) also adds no special tokens.
        encoding = self.tokenizer.backend_tokenizer.encode(rendered.text, add_special_tokens=False)
        offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
        starts, ends = offsets[:, 0], offsets[:, 1]
        mask = np.zeros(len(starts), dtype=np.bool_)
        for a, b in rendered.spans:
            # Overlap, not "starts inside": a token that begins before the reply and runs into it (the
            # `▁Paris` of a SentencePiece vocabulary after a header that ends in a space) is generated.
            mask |= (starts < b) & (ends > a)
        return TokenizedConversation(np.asarray(encoding.ids, dtype=np.int32), mask)

    def tokenize(self, messages: list[dict], multi_turn: str = "whole") -> list[TokenizedConversation]:
        """The training sequences of one conversation: one (`whole`), or one per assistant turn
        (`per_turn`: the turn's history followed by the turn, only the turn trained)."""
        if multi_turn == "whole":
            return [self.tokenize_rendered(self.spans(messages))]
        if multi_turn != "per_turn":
            raise ValueError(f"multi_turn must be one of {MULTI_TURN_MODES}, got {multi_turn!r}")
        return [
            self.tokenize_rendered(self.spans(messages[: i + 1], turns=[i]))
            for i, m in enumerate(messages)
            if m["role"] == "assistant"
        ]


def tokenize_conversation(
    tokenizer, messages: list[dict], max_length: int | None = None, template_kwargs: dict | None = None
) -> TokenizedConversation:
    """Render `messages` with the tokenizer's own chat template and mark the trained tokens (see the
    module docstring); truncated to `max_length` tokens when given."""
    example = ChatRenderer(tokenizer, template_kwargs).tokenize(messages)[0]
    return example if max_length is None else example.truncated(max_length)
