"""A conversation rendered with the target's own chat template, and the mask of its trained tokens.

The draft learns what the target generates: each assistant turn's text and the end-of-turn token
that closes it. Headers, system and user turns are context only. Where those begin and end is
never read off hard-coded header strings (the classic bug: a wrong mask trains the draft to ~35%
accuracy and raises no error); it is derived from the template itself:

- an assistant turn starts where the rendered prompt before it ends: `messages[:i]` rendered with
  `add_generation_prompt=True` is a prefix of the whole conversation, and what follows it is what
  the target would generate;
- it ends with its content, found in the rendering after that point (the template may insert text
  of its own before the content, e.g. an empty think block; we learn that text by rendering a
  sentinel reply, so that a short reply is not mistaken for part of it), plus one token: the first
  token after the content, which is the template's end-of-turn token.

Characters map to tokens through the fast tokenizer's offsets: a token is trained when it starts
inside an assistant span.
"""
from __future__ import annotations

from dataclasses import dataclass

from eagle_online.data.sources import DataError

# A reply no real data contains and no template rewrites, to see what a template puts around a reply.
_SENTINEL = "\u2063EAGLE-ONLINE-SENTINEL-REPLY\u2063"


class TemplateError(DataError):
    """The chat template cannot render this conversation, or renders it in a way we cannot map."""


@dataclass
class TokenizedConversation:
    """Token ids of a rendered conversation and, per token, 1 where it is trained."""

    input_ids: list[int]
    # 1 where the token is trained: assistant content and the end-of-turn token that closes it;
    # 0 for system/user turns and template scaffolding (role headers, bos, newlines after end-of-turn).
    loss_mask: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_trained(self) -> int:
        return sum(self.loss_mask)


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja raises its own errors (e.g. roles that must alternate); keep the cause
        raise TemplateError(f"the chat template cannot render this conversation: {type(e).__name__}: {e}") from e
    if not isinstance(text, str):
        raise TemplateError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, not text")
    return text


def assistant_char_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The conversation rendered by the tokenizer's chat template, and for each assistant turn the
    character span `[start, end)` from the end of its generation prompt to the end of its content."""
    text = _render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise TemplateError("an assistant turn needs a prompt before it (a system or user turn)")
        prompt = _render(tokenizer, messages[:i], add_generation_prompt=True)
        if not text.startswith(prompt):
            raise TemplateError(
                f"the rendered prompt of turn {i} is not a prefix of the rendered conversation; "
                "the template renders earlier turns differently depending on what follows"
            )
        start = len(prompt)
        # Text the template puts between the generation prompt and a reply (usually none).
        try:
            probe = _render(tokenizer, messages[:i] + [{"role": "assistant", "content": _SENTINEL}])
        except TemplateError:
            probe = ""
        lead = probe[len(prompt) : probe.find(_SENTINEL)] if probe.startswith(prompt) and _SENTINEL in probe else ""
        search_from = start + len(lead) if lead and text.startswith(lead, start) else start
        content = message["content"]
        pos = text.find(content, search_from)
        if pos < 0:  # templates often trim the reply
            content = content.strip()
            pos = text.find(content, search_from)
        if pos < 0 or not content:
            raise TemplateError(f"the content of assistant turn {i} does not appear in the rendered conversation")
        spans.append((start, pos + len(content)))
    return text, spans


def tokenize_conversation(tokenizer, messages: list[dict], max_length: int) -> TokenizedConversation:
    """Render `messages` with the tokenizer's own chat template and mark the assistant tokens (see the
    module docstring); truncated to `max_length` tokens. Needs a fast tokenizer (for offsets)."""
    full = tokenize_full(tokenizer, messages)
    return TokenizedConversation(full.input_ids[:max_length], full.loss_mask[:max_length])


def tokenize_full(tokenizer, messages: list[dict]) -> TokenizedConversation:
    """`tokenize_conversation` without truncation."""
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"{type(tokenizer).__name__} is not a fast tokenizer; the loss mask needs its offsets")
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError("the tokenizer has no chat template")
    text, spans = assistant_char_spans(tokenizer, messages)
    # The template writes bos itself; apply_chat_template(tokenize=True) also adds no special tokens.
    encoding = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    ids, offsets = encoding.ids, encoding.offsets
    mask = [0] * len(ids)
    t = 0
    for start, end in spans:
        while t < len(ids) and offsets[t][0] < start:
            t += 1
        while t < len(ids) and offsets[t][0] < end:
            mask[t] = 1
            t += 1
        if t < len(ids):  # the end-of-turn token
            mask[t] = 1
            t += 1
    return TokenizedConversation(list(ids), mask)
