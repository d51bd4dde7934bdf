"""Data: sources, chat-template loss masks (golden spans per template), packing, draft vocabulary."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from eagle_online.data import (
    DataError,
    PreparedData,
    TokenizedConversation,
    build_draft_vocab,
    count_trained_tokens,
    format_stats,
    iter_conversations,
    load_draft_vocab,
    pack_conversations,
    prepare_data,
    save_draft_vocab,
    tokenize_conversation,
)
from eagle_online.data.prepare import copies
from eagle_online.data.view import trained_runs
from eagle_online.recipe import DataConfig, DataSource
from eagle_online.tiny_target import build_tokenizer

CONVERSATIONS = [
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris is the capital of France."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome.\nIt has been since 1871."},
    ],
    [
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "Now count to three, please."},
        {"role": "assistant", "content": "One, two, three!"},
    ],
    [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Thank you very much"},
        {"role": "assistant", "content": "Merci beaucoup, café crème."},
    ],
]

# A ChatML layout that, like Qwen3's, opens the *last* reply with an empty think block.
THINK_SPECIAL = ["<|im_start|>", "<|im_end|>"]
THINK_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' and loop.last %}<think>\n\n</think>\n\n{% endif %}"
    "{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tokenizer(template: str | None = None, special: list[str] | None = None):
    tok = build_tokenizer(CONVERSATIONS, vocab_size=300)
    if template is not None:
        tok.add_special_tokens({"additional_special_tokens": special})
        tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def tiny_tok():
    return _tokenizer()


@pytest.fixture(scope="module")
def think_tok():
    return _tokenizer(THINK_TEMPLATE, THINK_SPECIAL)


@pytest.mark.parametrize("conv", CONVERSATIONS, ids=["system_two_turns", "short_reply", "unicode"])
def test_loss_mask_tiny_template(tiny_tok, conv):
    example = tokenize_conversation(tiny_tok, conv, max_length=4096)
    assert example.input_ids.tolist() == tiny_tok.apply_chat_template(conv, tokenize=True, return_dict=False)
    expected = [m["content"] + "<|end|>" for m in conv if m["role"] == "assistant"]
    assert trained_runs(tiny_tok, example) == expected
    # The bos, and the newline after each end-of-turn, are scaffolding.
    assert not example.loss_mask[0] and not example.loss_mask[-1]


def test_examples_are_compact(tiny_tok):
    example = tokenize_conversation(tiny_tok, CONVERSATIONS[0])
    assert example.input_ids.dtype == np.int32 and example.loss_mask.dtype == np.bool_
    assert example.input_ids.nbytes + example.loss_mask.nbytes == 5 * len(example)
    with pytest.raises(ValueError, match="equal 1-D shapes"):
        TokenizedConversation([1, 2, 3], [1, 0])


def test_loss_mask_template_text_before_reply(think_tok):
    # "in" also occurs in the template's own "<think>": the short reply must not be found there.
    conv = [
        {"role": "user", "content": "Where?"},
        {"role": "assistant", "content": "out"},
        {"role": "user", "content": "And now?"},
        {"role": "assistant", "content": "in"},
    ]
    example = tokenize_conversation(think_tok, conv)
    # The think block is what the target generates after its generation prompt, so it is trained.
    assert trained_runs(think_tok, example) == ["out<|im_end|>", "<think>\n\n</think>\n\nin<|im_end|>"]


def test_truncation_keeps_mask_aligned(tiny_tok):
    conv = CONVERSATIONS[0]
    full = tokenize_conversation(tiny_tok, conv, max_length=4096)
    second_reply_start = max(i for i, m in enumerate(full.loss_mask.tolist()) if m and not full.loss_mask[i - 1])
    cut = second_reply_start + 3
    short = tokenize_conversation(tiny_tok, conv, max_length=cut)
    assert len(short.input_ids) == len(short.loss_mask) == cut
    assert (short.input_ids == full.input_ids[:cut]).all() and (short.loss_mask == full.loss_mask[:cut]).all()
    spans = trained_runs(tiny_tok, short)
    assert spans[0] == conv[2]["content"] + "<|end|>"
    assert conv[4]["content"].startswith(spans[1]) and len(spans[1]) > 0


def _sharegpt(conv):
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    return {"id": "x", "conversations": [{"from": names[m["role"]], "value": m["content"]} for m in conv]}


def _write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_sharegpt_and_messages_formats_agree(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    sharegpt = [_sharegpt(c) for c in CONVERSATIONS]
    messages = [{"messages": c} for c in CONVERSATIONS]
    files = [
        _write_jsonl(tmp_path / "sharegpt.jsonl", sharegpt),
        _write_jsonl(tmp_path / "messages.jsonl", messages),
        _write_jsonl(tmp_path / "lines.json", messages),  # JSON Lines under a .json name, as `datasets` writes
    ]
    (tmp_path / "sharegpt.json").write_text(json.dumps(sharegpt, indent=1))
    files.append(tmp_path / "sharegpt.json")
    pq.write_table(pa.Table.from_pylist(messages), tmp_path / "messages.parquet")
    files.append(tmp_path / "messages.parquet")
    for f in files:
        assert list(iter_conversations(DataSource(path=str(f)))) == CONVERSATIONS, f.name


def test_gzipped_jsonl_reads_like_jsonl_and_names_the_line(tmp_path):
    import gzip

    records = [{"messages": c} for c in CONVERSATIONS]
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode()))
    assert list(iter_conversations(DataSource(path=str(path)))) == CONVERSATIONS
    folder = tmp_path / "folder"  # a directory source picks .jsonl.gz files too
    folder.mkdir()
    path.rename(folder / "d.jsonl.gz")
    assert list(iter_conversations(DataSource(path=str(folder)))) == CONVERSATIONS
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(gzip.compress((json.dumps(records[0]) + "\n{oops\n").encode()))
    with pytest.raises(DataError, match=rf"{broken}:2: not valid JSON"):
        list(iter_conversations(DataSource(path=str(broken))))
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(((json.dumps(records[0]) + "\n") * 50).encode())[:-30])
    with pytest.raises(DataError, match=rf"{cut}: cannot be read"):
        list(iter_conversations(DataSource(path=str(cut))))


def test_builtin_smollm2_replies_are_first_turns_of_rows_before_the_eval_prompts():
    from eagle_online.data.sources import iter_conversation_records

    rows = list(iter_conversation_records(DataSource(path="builtin:smollm2-replies")))
    assert len(rows) > 1500
    for _, record, messages in rows:
        assert [m["role"] for m in messages if m["role"] != "system"] == ["user", "assistant"]
        assert messages[-1]["content"].strip()
        assert record["eagle_online_row"] < 2000  # eval prompts start at ShareGPT row 5000


def test_skip_and_max_rows(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"messages": c} for c in CONVERSATIONS])
    got = list(iter_conversations(DataSource(path=str(path), skip_rows=1, max_rows=1)))
    assert got == CONVERSATIONS[1:2]
    assert list(iter_conversations(DataSource(path=str(path), skip_rows=2))) == CONVERSATIONS[2:]


def test_broken_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps({"messages": CONVERSATIONS[0]}) + "\n\n" + '{"messages": [\n')
    with pytest.raises(DataError, match=rf"{path}:3: not valid JSON"):
        list(iter_conversations(DataSource(path=str(path))))


def test_bad_json_names_file_and_record(tmp_path):
    path = tmp_path / "records.json"
    path.write_text(json.dumps([{"messages": CONVERSATIONS[0]}, {"prompt": "no conversation"}]))
    with pytest.raises(DataError, match=rf"{path} record 1: not a conversation"):
        list(iter_conversations(DataSource(path=str(path))))
    path.write_text('[{"messages": []}, {')
    with pytest.raises(DataError, match=str(path)):
        list(iter_conversations(DataSource(path=str(path))))
    with pytest.raises(DataError, match="no built-in data source"):
        list(iter_conversations(DataSource(path="builtin:nonesuch")))
    with pytest.raises(DataError, match="no such file"):
        list(iter_conversations(DataSource(path=str(tmp_path / "missing.jsonl"))))


def _cfg(*sources, **kwargs) -> DataConfig:
    kwargs.setdefault("max_length", 4096)
    kwargs.setdefault("tokens_per_batch", 4096)
    return DataConfig(sources=[s if isinstance(s, DataSource) else DataSource(path=str(s)) for s in sources], **kwargs)


def test_malformed_rows_are_skipped_and_counted(tmp_path, tiny_tok):
    good = {"messages": CONVERSATIONS[1]}
    records = [
        good,
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "narrator", "value": "x"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"content": "no role"}]},
        # A leading reply (ShareGPT splits long chats) and a trailing prompt are dropped, the rest used.
        {"messages": [{"role": "assistant", "content": "orphan"}, *CONVERSATIONS[2], {"role": "user", "content": "?"}]},
        {"messages": [{"role": "user", "content": "a " * 200}, {"role": "assistant", "content": "ok"}]},
    ]
    path = _write_jsonl(tmp_path / "mixed.jsonl", records)
    # Cut the third conversation inside its reply.
    full = [tokenize_conversation(tiny_tok, c) for c in CONVERSATIONS]
    max_length = int(np.argmax(full[2].loss_mask)) + 2
    prepared = prepare_data(_cfg(path, max_length=max_length), tiny_tok)
    assert isinstance(prepared, PreparedData)
    stats = prepared.stats["sources"][str(path)]
    assert stats["skipped"] == {
        "empty_turn": 2, "malformed_turn": 1, "no_assistant_turn": 1, "no_trained_tokens": 1, "unknown_role": 1
    }
    assert stats["rows_read"] == 8 and stats["rows_used"] == 2 == len(prepared.examples)
    for got, want in zip(prepared.examples, (full[1], full[2])):
        assert got.input_ids.tolist() == want.input_ids[:max_length].tolist()
        assert got.loss_mask.tolist() == want.loss_mask[:max_length].tolist()
    assert stats["truncated"] == 1 + (len(full[1]) > max_length)
    assert stats["tokens"] == sum(len(e) for e in prepared.examples)
    assert stats["trained_tokens"] == sum(e.num_trained for e in prepared.examples)
    assert 0 < stats["trained_fraction"] < 1
    assert prepared.stats["total"]["rows_used"] == 2 and prepared.stats["total"]["rows_read"] == 8


def test_overlong_skip_or_truncate(tmp_path, tiny_tok):
    full = [tokenize_conversation(tiny_tok, c) for c in CONVERSATIONS]
    path = _write_jsonl(tmp_path / "d.jsonl", [{"messages": c} for c in CONVERSATIONS])
    max_length = sorted(len(e) for e in full)[1]  # two fit, one is longer
    skipped = prepare_data(_cfg(path, max_length=max_length, overlong="skip"), tiny_tok)
    assert skipped.stats["sources"][str(path)]["skipped"] == {"too_long": 1}
    assert sorted(len(e) for e in skipped.examples) == sorted(len(e) for e in full)[:2]
    assert "too_long 1" in format_stats(skipped.stats)
    cut = prepare_data(_cfg(path, max_length=max_length), tiny_tok)
    assert cut.stats["sources"][str(path)]["truncated"] == 1 and len(cut.examples) == 3
    assert max(len(e) for e in cut.examples) == max_length


def test_template_errors_are_counted(tmp_path, think_tok):
    # A template that cannot render a conversation (here: roles that do not alternate) skips that row.
    template = "{% for m in messages %}{% if loop.index0 % 2 == 0 and m['role'] != 'user' %}" \
        "{{ raise_exception('roles must alternate') }}{% endif %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    tok = build_tokenizer(CONVERSATIONS, vocab_size=300)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = template
    path = _write_jsonl(tmp_path / "d.jsonl", [{"messages": CONVERSATIONS[0]}, {"messages": CONVERSATIONS[1]}])
    prepared = prepare_data(_cfg(path), tok)
    assert prepared.stats["sources"][str(path)]["skipped"] == {"template_error": 1}
    assert "roles must alternate" in prepared.stats["first_template_error"]


def test_sources_mix_by_weight(tmp_path, tiny_tok):
    a = _write_jsonl(tmp_path / "a.jsonl", [{"messages": CONVERSATIONS[0]}] * 4)
    b = _write_jsonl(tmp_path / "b.jsonl", [{"messages": CONVERSATIONS[1]}] * 4)
    cfg = _cfg(DataSource(path=str(a), weight=2.0), DataSource(path=str(b), weight=0.5), DataSource(path=str(b)))
    prepared = prepare_data(cfg, tiny_tok)
    one_a, one_b = (tokenize_conversation(tiny_tok, c) for c in CONVERSATIONS[:2])
    kinds = Counter("a" if len(e) == len(one_a) else "b" for e in prepared.examples)
    assert kinds == {"a": 8, "b": 2 + 4}
    sources = prepared.stats["sources"]
    assert [s["sequences_per_epoch"] for s in sources.values()] == [8, 2, 4]
    assert list(sources) == [str(a), f"{b}#1", f"{b}#2"]  # a path used twice is told apart
    assert prepared.stats["total"]["sequences_per_epoch"] == len(prepared.examples) == 14
    # Every weight is a whole part plus an evenly spaced share of the rest, with no randomness.
    assert [copies(i, 0.5) for i in range(6)] == [0, 1, 0, 1, 0, 1]
    assert [copies(i, 1.25) for i in range(8)] == [1, 1, 1, 2, 1, 1, 1, 2]
    text = format_stats(prepared.stats)
    assert str(a) in text and "total" in text and "0.5" in text


def test_per_turn_sequences(tmp_path, tiny_tok):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"messages": c} for c in CONVERSATIONS])
    prepared = prepare_data(_cfg(path, multi_turn="per_turn"), tiny_tok)
    assert len(prepared.examples) == 5  # one sequence per assistant turn
    assert [trained_runs(tiny_tok, e) for e in prepared.examples[:2]] == [
        [CONVERSATIONS[0][2]["content"] + "<|end|>"], [CONVERSATIONS[0][4]["content"] + "<|end|>"]
    ]
    assert prepared.stats["sources"][str(path)]["sequences"] == 5


def test_directory_source_reads_every_file(tmp_path):
    folder = tmp_path / "regenerated"
    _write_jsonl(folder / "01-b" / "part-00000-of-00001.jsonl", [{"messages": CONVERSATIONS[2]}])
    _write_jsonl(folder / "00-a" / "part-00000-of-00001.jsonl", [{"messages": c} for c in CONVERSATIONS[:2]])
    assert list(iter_conversations(DataSource(path=str(folder)))) == CONVERSATIONS
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no"):
        list(iter_conversations(DataSource(path=str(tmp_path / "empty"))))


def test_hub_source_streams(monkeypatch):
    import datasets

    calls = []

    def load_dataset(name, split, streaming):
        calls.append((name, split, streaming))
        records = [{"messages": c} for c in CONVERSATIONS]
        return datasets.IterableDataset.from_generator(lambda: iter(records)) if streaming else records

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    got = list(iter_conversations(DataSource(path="org/chats", split="train_sft", streaming=True, max_rows=2)))
    assert got == CONVERSATIONS[:2] and calls == [("org/chats", "train_sft", True)]

    def broken(name, split, streaming):
        raise FileNotFoundError("no such dataset")

    monkeypatch.setattr(datasets, "load_dataset", broken)
    with pytest.raises(DataError, match=r"dataset 'org/missing' \(split 'train'\) cannot be loaded"):
        list(iter_conversations(DataSource(path="org/missing")))


def test_no_usable_conversation_is_an_error(tmp_path, tiny_tok):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match="no usable conversation"):
        prepare_data(_cfg(path, max_length=40, tokens_per_batch=64), tiny_tok)


def test_builtin_sharegpt():
    convs = list(iter_conversations(DataSource(path="builtin:sharegpt", max_rows=5)))
    assert len(convs) == 5
    for conv in convs:
        assert conv[-1]["role"] == "assistant" and all(m["content"].strip() for m in conv)
        assert {m["role"] for m in conv} <= {"system", "user", "assistant"}


def _examples(lengths):
    out = []
    for k, n in enumerate(lengths):
        ids = [100 * k + j for j in range(n)]
        out.append(TokenizedConversation(ids, [(j + k) % 2 for j in range(n)]))
    return out


def test_packing_invariants():
    budget = 16
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, budget + 1, (40,), generator=gen).tolist()
    examples = _examples(lengths)
    batches = pack_conversations(examples, budget)
    again = pack_conversations(examples, budget)
    assert [b.input_ids.tolist() for b in again] == [b.input_ids.tolist() for b in batches]
    ids, mask, k = [], [], 0
    for b in batches:
        assert b.input_ids.shape == b.position_ids.shape == b.loss_mask.shape == (1, b.num_tokens)
        assert b.input_ids.dtype == b.position_ids.dtype == b.loss_mask.dtype == torch.int64
        assert b.num_tokens <= budget
        pos = b.position_ids[0].tolist()
        starts = [i for i, p in enumerate(pos) if p == 0]
        assert starts[0] == 0 and len(starts) == b.num_conversations
        for s, e in zip(starts, starts[1:] + [len(pos)]):
            assert pos[s:e] == list(range(e - s)) and e - s == lengths[k]
            k += 1
        ids += b.input_ids[0].tolist()
        mask += b.loss_mask[0].tolist()
    assert k == len(examples)
    assert ids == [t for e in examples for t in e.input_ids] and mask == [m for e in examples for m in e.loss_mask]
    # Greedy: a new row starts only when the next conversation does not fit.
    firsts = [sum(b.num_conversations for b in batches[:i]) for i in range(1, len(batches))]
    for prev, first in zip(batches, firsts):
        assert prev.num_tokens + lengths[first] > budget
    with pytest.raises(ValueError, match="tokens"):
        pack_conversations(_examples([3, budget + 1]), budget)


def test_count_trained_tokens():
    examples = [TokenizedConversation([1, 2, 2, 3], [0, 1, 1, 1]), TokenizedConversation([3, 4], [1, 0])]
    assert count_trained_tokens(examples, 6).tolist() == [0, 0, 2, 2, 0, 0]
    with pytest.raises(ValueError):
        count_trained_tokens([TokenizedConversation([9], [1])], 6)


def _check_vocab(d2t, t2d, size):
    ids = d2t + torch.arange(size)
    assert d2t.dtype == torch.int64 and d2t.shape == (size,) and t2d.dtype == torch.bool
    assert int(t2d.sum()) == size
    assert bool((ids[1:] > ids[:-1]).all())
    assert bool(t2d[ids].all())
    return ids


def test_draft_vocab_invariants(tmp_path):
    vocab = 50
    counts = torch.zeros(vocab, dtype=torch.long)
    counts[[40, 7, 33, 12, 5]] = torch.tensor([100, 90, 90, 3, 1])
    counts[[20, 21]] = 3  # ties with id 12: the lower ids win
    d2t, t2d = build_draft_vocab(counts, 5)
    assert _check_vocab(d2t, t2d, 5).tolist() == [7, 12, 20, 33, 40]
    # Fewer tokens occur than the draft holds: every seen token, then the lowest unseen ids.
    d2t, t2d = build_draft_vocab(counts, 10)
    assert _check_vocab(d2t, t2d, 10).tolist() == [0, 1, 2, 5, 7, 12, 20, 21, 33, 40]
    d2t, t2d = build_draft_vocab(counts, vocab)
    assert _check_vocab(d2t, t2d, vocab).tolist() == list(range(vocab)) and not d2t.any()
    with pytest.raises(ValueError, match="draft_vocab_size"):
        build_draft_vocab(counts, vocab + 1)
    for name in ("vocab.safetensors", "vocab.pt"):
        save_draft_vocab(tmp_path / name, d2t, t2d, counts)
        d2t2, t2d2 = load_draft_vocab(tmp_path / name)
        assert torch.equal(d2t2, d2t) and torch.equal(t2d2, t2d)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vocab.pt", "vocab.safetensors"]


def test_draft_vocab_from_real_masks(tiny_tok):
    examples = [tokenize_conversation(tiny_tok, c, 4096) for c in CONVERSATIONS]
    counts = count_trained_tokens(examples, len(tiny_tok))
    assert int(counts.sum()) == sum(sum(e.loss_mask) for e in examples)
    d2t, t2d = build_draft_vocab(counts, 32)
    _check_vocab(d2t, t2d, 32)
    top = Counter(t for e in examples for t, m in zip(e.input_ids, e.loss_mask) if m).most_common(5)
    assert all(t2d[t] for t, _ in top)
    assert t2d[tiny_tok.convert_tokens_to_ids("<|end|>")]  # the end-of-turn token is trained, so drafted


def test_build_vocab_streams_and_matches_the_trainer(tmp_path, monkeypatch, capsys):
    import runpy

    import eagle_online.data.vocab as vocab
    from eagle_online.recipe import load_recipe

    monkeypatch.setattr(vocab, "_CHUNK", 16)  # count in many small chunks
    a = _write_jsonl(tmp_path / "a.jsonl", [{"messages": c} for c in CONVERSATIONS])
    b = _write_jsonl(tmp_path / "b.jsonl", [{"messages": c} for c in CONVERSATIONS[1:]])
    overrides = [f"run.output_dir={tmp_path / 'run'}", "draft.draft_vocab_size=64",
                 f"data.sources=[{{path: {a}, weight: 2}}, {{path: {b}, weight: 0.5}}]"]
    main = runpy.run_path("launch/build_vocab.py")["main"]
    assert main(["--recipe", "tiny_eagle3", *overrides]) == 0
    out = capsys.readouterr().out
    recipe = load_recipe("tiny_eagle3", overrides)
    path = vocab.draft_vocab_path(recipe.run.output_dir)
    assert f"wrote {path}" in out and "covers" in out

    # The same vocabulary the trainer would count from the prepared (weighted) examples.
    from eagle_online.target import load_tokenizer

    tokenizer = load_tokenizer(recipe.target)
    counts = count_trained_tokens(prepare_data(recipe.data, tokenizer).examples, vocab.target_vocab_size(recipe.target))
    d2t, t2d = load_draft_vocab(path)
    want_d2t, want_t2d = build_draft_vocab(counts, 64)
    assert torch.equal(d2t, want_d2t) and torch.equal(t2d, want_t2d)
    report = vocab.build_recipe_vocab(recipe, tokenizer=tokenizer, path=tmp_path / "again.safetensors")
    assert report.trained_tokens == int(counts.sum()) and report.distinct_tokens == int((counts > 0).sum())
    assert report.coverage == pytest.approx(float(counts[t2d].sum()) / float(counts.sum()))
    assert 0.5 < report.coverage <= 1 and f"{report.coverage:.2%}" in out
