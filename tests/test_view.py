"""The data viewer: what it shows is the trainer's mask; the HTML renders in a real headless browser."""
from __future__ import annotations

import json
import shutil
import struct
import subprocess
import zlib
from html.parser import HTMLParser

import numpy as np
import pytest

from eagle_online.data.view import collect_view, render_ansi, render_html, token_texts, write_html
from eagle_online.recipe import DataConfig, DataSource, resolve_asset

CHATS = [
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris is the capital of France."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome.\nIt has been since 1871."},
    ],
    [{"role": "user", "content": "Say café."}, {"role": "assistant", "content": "Café crème, s'il vous plaît."}],
    [{"role": "user", "content": "no reply"}],
]
HIGHLIGHT = (0xB7, 0xE4, 0xA7)  # .t background
OUTLINE = (0xD9, 0x53, 0x4F)  # token boundaries


@pytest.fixture(scope="module")
def view(tmp_path_factory):
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("data") / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS))
    tokenizer = AutoTokenizer.from_pretrained(resolve_asset("builtin:tiny_chat"))
    cfg = DataConfig(sources=[DataSource(path=str(path))], max_length=512, tokens_per_batch=512)
    return tokenizer, collect_view(cfg, tokenizer, index=0, count=2)


def _trained_text(seq) -> list[str]:
    runs, run = [], ""
    for piece in seq.pieces:
        if piece.trained:
            run += piece.text
        elif run:
            runs.append(run)
            run = ""
    return runs + ([run] if run else [])


def test_view_shows_the_trainers_mask(view):
    tokenizer, data_view = view
    assert len(data_view.sequences) == 2
    first, second = data_view.sequences
    assert _trained_text(first) == ["Paris is the capital of France.<|end|>", "Rome.\nIt has been since 1871.<|end|>"]
    assert _trained_text(second) == ["Café crème, s'il vous plaît.<|end|>"]
    # The pieces are the tokens: their texts rebuild the rendered conversation exactly.
    rendered = tokenizer.apply_chat_template(CHATS[1], tokenize=False)
    assert "".join(p.text for p in second.pieces) == rendered
    assert [p.token_id for p in second.pieces] == tokenizer.apply_chat_template(CHATS[1], tokenize=True,
                                                                               return_dict=False)
    stats = data_view.stats["total"]
    assert stats["rows_read"] == 3 and stats["rows_used"] == 2 and stats["skipped"] == {"no_assistant_turn": 1}


def test_token_texts_keep_sentencepiece_spaces():
    class SentencePieceLike:  # drops the leading space of a text that starts with a word piece
        vocab = {0: "▁Hello", 1: "▁world", 2: "!"}

        def decode(self, ids, **_):
            return "".join(self.vocab[i] for i in ids).replace("▁", " ").lstrip(" ")

    assert token_texts(SentencePieceLike(), [0, 1, 2]) == ["Hello", " world", "!"]


def test_terminal_rendering(view):
    _, data_view = view
    text = render_ansi(data_view, color=True)
    assert "\x1b[30;48;5;114mParis is the capital of France.<|end|>\x1b[0m" in text
    assert "\x1b[2m<|bos|><|start|>system\x1b[0m" in text
    plain = render_ansi(data_view, color=False)
    assert "⟦Paris is the capital of France.<|end|>⟧" in plain and "\x1b" not in plain
    # With boundaries, neighbouring trained tokens alternate shades.
    bounded = render_ansi(data_view, boundaries=True)
    assert "\x1b[30;48;5;114m" in bounded and "\x1b[30;48;5;151m" in bounded


class _Spans(HTMLParser):
    def __init__(self):
        super().__init__()
        self.stack, self.trained, self.tables = [], [], 0

    def handle_starttag(self, tag, attrs):
        self.stack.append(dict(attrs).get("class"))
        self.tables += tag == "table"

    def handle_endtag(self, tag):
        self.stack.pop()

    def handle_data(self, data):
        # Trained token text inside a sequence (a token that ends inside a character shows a zero-width space).
        if "seq" in self.stack and self.stack[-1] == "t" and data != "↵":
            self.trained.append(data.replace("\u200b", ""))


def _chromium() -> str | None:
    return next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


def _browser(binary, tmp_path, *args) -> bytes:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]
    return subprocess.run([binary, *flags, *args], capture_output=True, timeout=120, check=True).stdout


def _read_png(path) -> np.ndarray:
    """A PNG (8-bit RGB or RGBA, not interlaced, as Chromium writes them) as an [H, W, 3] array."""
    data = path.read_bytes()
    pos, idat = 8, b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, chunk = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", chunk)
            assert depth == 8 and color in (2, 6) and interlace == 0
        elif kind == b"IDAT":
            idat += chunk
    raw, bpp = zlib.decompress(idat), 3 if color == 2 else 4
    stride = width * bpp
    rows, prev = [], np.zeros(stride, dtype=np.int64)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        line = np.frombuffer(raw, np.uint8, stride, y * (stride + 1) + 1).astype(np.int64)
        if kind == 0:
            cur = line
        elif kind == 1:  # Sub: a running sum along the row, per channel
            cur = np.cumsum(line.reshape(width, bpp), axis=0).reshape(-1) % 256
        elif kind == 2:
            cur = (line + prev) % 256
        else:  # Average or Paeth: sequential along the row
            cur, p = line.tolist(), prev.tolist()
            for x in range(stride):
                a = cur[x - bpp] if x >= bpp else 0
                c = p[x - bpp] if x >= bpp else 0
                if kind == 3:
                    cur[x] = (cur[x] + (a + p[x]) // 2) % 256
                else:
                    pa, pb, pc = abs(p[x] - c), abs(a - c), abs(a + p[x] - 2 * c)
                    cur[x] = (cur[x] + (a if pa <= pb and pa <= pc else p[x] if pb <= pc else c)) % 256
            cur = np.array(cur, dtype=np.int64)
        rows.append(cur)
        prev = cur
    return np.stack(rows).reshape(height, width, bpp)[..., :3].astype(np.uint8)


def _pixels(image, rgb) -> int:
    return int((np.abs(image.astype(int) - np.array(rgb)).sum(-1) <= 6).sum())


def test_html_renders_highlighted_spans_in_chromium(view, tmp_path):
    _, data_view = view
    page = write_html(tmp_path / "view.html", render_html(data_view, title="test data"))
    parsed = _Spans()
    parsed.feed(page.read_text())
    assert "".join(parsed.trained).startswith("Paris is the capital of France.<|end|>Rome.") and parsed.tables == 1

    binary = _chromium()
    if binary is None:
        pytest.skip("no chromium binary (Debian: apt-get install chromium); the page itself was checked above")
    # The browser's DOM after parsing and running the page's script: the same trained spans.
    dom = _browser(binary, tmp_path, "--dump-dom", page.as_uri()).decode()
    in_browser = _Spans()
    in_browser.feed(dom[dom.index("<body") :])
    assert in_browser.trained == parsed.trained
    # What a person sees: the highlight is painted, and the token outlines appear only on demand.
    plain, bounded = tmp_path / "plain.png", tmp_path / "bounded.png"
    _browser(binary, tmp_path, "--window-size=800,600", f"--screenshot={plain}", page.as_uri())
    _browser(binary, tmp_path, "--window-size=800,600", f"--screenshot={bounded}", page.as_uri() + "#boundaries")
    plain_image, bounded_image = _read_png(plain), _read_png(bounded)
    assert _pixels(plain_image, HIGHLIGHT) > 2000  # the trained replies' background
    assert _pixels(plain_image, OUTLINE) == 0
    assert _pixels(bounded_image, OUTLINE) > 500


def test_view_data_launcher(tmp_path, capsys):
    import runpy

    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS))
    main = runpy.run_path("launch/view_data.py")["main"]
    page = tmp_path / "page.html"
    args = ["--recipe", "tiny_eagle3", "--index", "1", "--color", "never", "--html", str(page),
            f"data.sources=[{{path: {data}}}]"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "no_assistant_turn 1" in out and "⟦Café crème, s'il vous plaît.<|end|>⟧" in out
    assert page.read_text().startswith("<!doctype html>") and f"wrote {page}" in out
