"""The data viewer: training sequences as the trainer sees them, trained tokens highlighted.

A wrong loss mask raises no error (it trains a draft to ~35% accuracy), so the mask has to be easy to
look at: `collect_view` reads a recipe's data exactly as `prepare_data` does, and `render_ansi` /
`render_html` show chosen sequences with trained tokens highlighted, the rest dimmed, token
boundaries on demand, and the per-source statistics.
"""
from __future__ import annotations

import html
import os
from dataclasses import dataclass, field
from pathlib import Path

from eagle_online.data.prepare import iter_examples, source_labels
from eagle_online.recipe import DataConfig

_WINDOW = 6  # tokens of left context when decoding one token (SentencePiece drops a lone leading space)


@dataclass
class Piece:
    """One token as text."""

    text: str
    token_id: int
    trained: bool


@dataclass
class ViewedSequence:
    """A training sequence: where it comes from, and its tokens."""

    source: str
    number: int  # the sequence's number within its source
    pieces: list[Piece]

    @property
    def num_trained(self) -> int:
        return sum(p.trained for p in self.pieces)


@dataclass
class DataView:
    """Chosen sequences of a recipe's data and the statistics of all of it."""

    sequences: list[ViewedSequence]
    stats: dict = field(default_factory=dict)


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """The text each token adds, decoded with some left context so that spaces a tokenizer only
    writes between tokens are kept. A token that ends inside a multi-byte character shows nothing;
    the token that completes the character shows all of it."""
    texts = []
    for i in range(len(ids)):
        lo = max(0, i - _WINDOW)
        before = tokenizer.decode(ids[lo:i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        full = tokenizer.decode(ids[lo : i + 1], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        before = before.rstrip("\ufffd")
        piece = full[len(before) :] if full.startswith(before) else full
        texts.append(piece.rstrip("\ufffd"))
    return texts


def trained_runs(tokenizer, example) -> list[str]:
    """The trained tokens of a sequence, decoded run by run (what a golden-span test compares)."""
    runs, run = [], []
    for token, trained in zip(example.input_ids.tolist(), example.loss_mask.tolist()):
        if trained:
            run.append(token)
        elif run:
            runs.append(run)
            run = []
    if run:
        runs.append(run)
    return [tokenizer.decode(r) for r in runs]


def collect_view(data_cfg: DataConfig, tokenizer, index: int = 0, count: int = 1) -> DataView:
    """Sequences `index` .. `index + count - 1` (in reading order, before weighting) and the
    statistics of the whole data."""
    labels = source_labels(data_cfg)
    stats: dict = {}
    chosen, numbers = [], {}
    for n, (k, example) in enumerate(iter_examples(data_cfg, tokenizer, stats)):
        numbers[k] = numbers.get(k, -1) + 1
        if index <= n < index + count:
            ids = example.input_ids.tolist()
            pieces = [
                Piece(text, token, bool(m))
                for text, token, m in zip(token_texts(tokenizer, ids), ids, example.loss_mask.tolist())
            ]
            chosen.append(ViewedSequence(labels[k], numbers[k], pieces))
    return DataView(chosen, stats)


# ----------------------------------------------------------------------------------------- terminal
_TRAINED = ("\x1b[30;48;5;114m", "\x1b[30;48;5;151m")  # black on green, two shades for boundaries
_UNTRAINED = ("\x1b[2m", "\x1b[2;48;5;236m")  # dim, and dim on dark grey
_RESET = "\x1b[0m"


def _visible(text: str) -> str:
    return text.replace("\t", "→").replace("\r", "␍")


def render_ansi(view: DataView, boundaries: bool = False, color: bool = True) -> str:
    """The chosen sequences for a terminal: trained tokens on green, the rest dimmed; with
    `boundaries`, neighbouring tokens alternate shades. Without `color`, trained runs are bracketed
    with ⟦ ⟧ instead."""
    out = []
    for seq in view.sequences:
        out.append(f"── {seq.source} · sequence {seq.number} · {len(seq.pieces)} tokens, "
                   f"{seq.num_trained} trained ──")
        if not color:
            out.append("".join(_bracket(seq)))
            continue
        runs: list[list] = []  # [style, text], neighbouring tokens of one style merged
        for i, piece in enumerate(seq.pieces):
            style = (_TRAINED if piece.trained else _UNTRAINED)[i % 2 if boundaries else 0]
            if runs and runs[-1][0] == style:
                runs[-1][1] += piece.text
            else:
                runs.append([style, piece.text])
        # Colour each line separately: a newline inside a coloured run would paint the margin.
        out.append("".join(
            "↵\n".join(f"{style}{part}{_RESET}" if part else "" for part in _visible(text).split("\n"))
            for style, text in runs
        ))
    return "\n".join(out) + "\n"


def _bracket(seq: ViewedSequence) -> list[str]:
    parts, inside = [], False
    for piece in seq.pieces:
        if piece.trained != inside:
            parts.append("⟦" if piece.trained else "⟧")
            inside = piece.trained
        parts.append(_visible(piece.text))
    return parts + (["⟧"] if inside else [])


# --------------------------------------------------------------------------------------------- html
_CSS = """
body { font-family: system-ui, sans-serif; margin: 24px; background: #f6f6f4; color: #222; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 28px; }
table { border-collapse: collapse; font-size: 13px; background: #fff; }
td, th { border: 1px solid #ddd; padding: 4px 8px; text-align: right; }
td:first-child, th:first-child { text-align: left; }
.seq { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 14px; line-height: 1.7;
       white-space: pre-wrap; word-break: break-word; background: #fff; border: 1px solid #ddd; padding: 12px; }
.t { background: #b7e4a7; color: #000; }
.u { color: #a0a0a0; }
.nl { opacity: 0.5; }
body.bounds .t, body.bounds .u { outline: 1px solid #d9534f; outline-offset: -1px; }
.legend span { padding: 1px 6px; margin-right: 8px; }
"""
_SCRIPT = """
const box = document.getElementById('bounds');
function apply() { document.body.classList.toggle('bounds', box.checked); }
box.addEventListener('change', apply);
if (location.hash === '#boundaries') { box.checked = true; }
apply();
"""


def _stats_table(stats: dict) -> str:
    head = ("<tr><th>source</th><th>weight</th><th>rows read</th><th>rows used</th><th>sequences / epoch</th>"
            "<th>tokens</th><th>trained tokens</th><th>trained</th><th>truncated</th><th>skipped rows</th></tr>")
    rows = []
    for label, s in list(stats["sources"].items()) + [("total", stats["total"])]:
        skipped = ", ".join(f"{k}: {v}" for k, v in {**s["skipped"], **s.get("dropped", {})}.items()) or "–"
        weight = f"{s['weight']:g}" if "weight" in s else ""
        cells = [label, weight, s["rows_read"], s["rows_used"], s["sequences_per_epoch"], f"{s['tokens']:,}",
                 f"{s['trained_tokens']:,}", f"{s['trained_fraction']:.1%}", s["truncated"], skipped]
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def render_html(view: DataView, title: str = "training data", boundaries: bool = False) -> str:
    """A self-contained page (inline CSS and script, nothing fetched): the statistics, then each
    chosen sequence with trained tokens highlighted; a checkbox (or `#boundaries` in the URL)
    outlines every token. Hovering a token shows its id."""
    sections = []
    for seq in view.sequences:
        spans = []
        for i, piece in enumerate(seq.pieces):
            css = "t" if piece.trained else "u"
            text = html.escape(piece.text).replace("\n", '<span class="nl">↵</span>\n')
            spans.append(f'<span class="{css}" title="#{i} id {piece.token_id}">{text or "&#8203;"}</span>')
        sections.append(
            f"<h2>{html.escape(seq.source)} · sequence {seq.number} · {len(seq.pieces)} tokens, "
            f"{seq.num_trained} trained</h2><div class=\"seq\">{''.join(spans)}</div>"
        )
    checked = " checked" if boundaries else ""
    return (
        f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        f"<p class=\"legend\"><span class=\"t\">trained</span><span class=\"u\">not trained</span>"
        f"<label><input type=\"checkbox\" id=\"bounds\"{checked}> token boundaries</label></p>"
        f"<h2>Per-source statistics</h2>{_stats_table(view.stats)}"
        f"{''.join(sections)}<script>{_SCRIPT}</script></body></html>\n"
    )


def write_html(path: str | Path, page: str) -> Path:
    """Write the page under a temporary name, then rename it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path
