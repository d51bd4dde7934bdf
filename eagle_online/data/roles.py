"""Canonical chat roles and the aliases the public conversation formats use."""
from __future__ import annotations

# ShareGPT names speakers with `from`; OpenAI-style data with `role`. Both map onto these.
ROLE_ALIASES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "assistant": "assistant",
    "model": "assistant",
}


# How ShareGPT names the canonical roles, for writing conversations back in that format.
SHAREGPT_NAMES = {"system": "system", "user": "human", "assistant": "gpt"}


class UnknownRoleError(ValueError):
    """A turn names a speaker that is none of ROLE_ALIASES."""


def canonical_role(name: str) -> str:
    """Map a speaker name of ShareGPT or OpenAI-style data to system/user/assistant."""
    try:
        return ROLE_ALIASES[str(name).strip().lower()]
    except KeyError:
        raise UnknownRoleError(f"unknown role {name!r} (known: {sorted(ROLE_ALIASES)})") from None


def content_text(content) -> str | None:
    """A turn's text: a string as it is; OpenAI content parts (`[{"type": "text", "text": ...}]`) joined;
    None when the turn carries no text or other modalities, which we cannot train on."""
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) and content else []
    if parts and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in parts):
        return "".join(p["text"] for p in parts)
    return None


# Reasoning kept beside the content by OpenAI-style data: Qwen3 and DeepSeek templates read
# `reasoning_content`, gpt-oss's reads `thinking`. Passed through so that the template decides.
REASONING_KEYS = ("reasoning_content", "thinking")


def to_messages(record: dict) -> list[dict]:
    """A ShareGPT (`conversations: [{from, value}]`) or OpenAI-style (`messages: [{role, content}]`)
    record as a list of `{"role", "content"}` messages with canonical roles (plus any text
    `reasoning_content`/`thinking`). A content that is not text (see `content_text`) comes back as None."""
    if "messages" in record:
        return [
            {
                "role": canonical_role(m["role"]),
                "content": content_text(m["content"]),
                **{k: m[k] for k in REASONING_KEYS if isinstance(m.get(k), str)},
            }
            for m in record["messages"]
        ]
    if "conversations" in record:
        return [
            {"role": canonical_role(m["from"]), "content": content_text(m["value"])} for m in record["conversations"]
        ]
    raise KeyError(f"a conversation needs `conversations` or `messages`; got keys {sorted(record)}")
