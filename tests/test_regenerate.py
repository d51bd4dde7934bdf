"""Self-distillation regeneration on the tiny target: HF generate end to end, interrupted and resumed."""
from __future__ import annotations

import json

import pytest
import torch

from eagle_online.data import prepare_data
from eagle_online.data.chat import ChatRenderer
from eagle_online.data.regenerate import (
    ROW_KEY,
    HFGenerator,
    finished_rows,
    regenerate,
    shard_file,
    stop_token_ids,
)
from eagle_online.data.sources import DataError
from eagle_online.recipe import load_recipe, resolve_asset

RECORDS = [
    {"id": "a", "conversations": [
        {"from": "human", "value": "What is Python?"}, {"from": "gpt", "value": "A language."},
        {"from": "human", "value": "Who made it?"}, {"from": "gpt", "value": "Guido."},
    ]},
    {"id": "b", "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Write a haiku about the sea."}, {"from": "gpt", "value": "Waves."},
    ]},
    {"id": "c", "messages": [{"role": "user", "content": "no reply to replace"}]},
    {"id": "d", "messages": [
        {"role": "user", "content": "Explain recursion briefly."}, {"role": "assistant", "content": "It calls itself."},
    ]},
    {"id": "e", "conversations": [
        {"from": "human", "value": "How do I sort a list in Python?"}, {"from": "gpt", "value": "sorted(x)."},
    ]},
]
USABLE = {0, 1, 3, 4}


@pytest.fixture(scope="module")
def tiny():
    """The tiny target's tokenizer and an HF generator on it (loaded once: the model is the slow part)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_asset("builtin:tiny_chat")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    recipe = _recipe("/unused", "/unused")
    renderer = ChatRenderer(tokenizer)
    return tokenizer, HFGenerator(model, tokenizer, stop_token_ids(tokenizer, renderer, model), recipe.regenerate)


def _recipe(data, out, *overrides):
    return load_recipe("tiny_eagle3", [
        f"run.output_dir={out}", f"data.sources=[{{path: {data}}}]",
        "regenerate.max_new_tokens=6", "regenerate.batch_size=2", *overrides,
    ])


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_batched_generation_equals_one_at_a_time(tiny):
    tokenizer, generator = tiny
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      tokenize=True, return_dict=False)
        for text in ("hi", "Tell me about the history of the printing press in Europe.", "What is 2+2?")
    ]
    assert len({len(p) for p in prompts}) == 3  # left padding is exercised
    batched = generator.generate(prompts)
    alone = [generator.generate([p])[0] for p in prompts]
    assert [g.token_ids for g in batched] == [g.token_ids for g in alone]
    # Greedy, no cache and no padding: the reference continuation.
    model = generator.model
    ids = torch.tensor([prompts[1]])
    for _ in range(len(alone[1].token_ids)):
        nxt = model(input_ids=ids, use_cache=False).logits[0, -1].argmax()
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    assert ids[0, len(prompts[1]):].tolist() == alone[1].token_ids


@pytest.mark.slow
def test_regenerate_resumes_without_duplicates(tmp_path, tiny):
    tokenizer, generator = tiny
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    recipe = _recipe(data, tmp_path / "run")

    # A full, uninterrupted run is the reference.
    reference = regenerate(_recipe(data, tmp_path / "ref"), tokenizer=tokenizer, generator=generator, log=lambda _: 0)
    assert reference.written == len(USABLE) and reference.skipped == {"no_assistant_turn": 1}
    assert reference.replies == 5
    expected = _rows(reference.files[0])

    # Interrupted after the first row, then killed in the middle of writing a line.
    def stop(row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        regenerate(recipe, tokenizer=tokenizer, generator=generator, on_row=stop, log=lambda _: 0)
    path = shard_file(recipe, 0, 0, 1)
    assert [r[ROW_KEY] for r in _rows(path)] == [0]
    with path.open("a") as f:
        f.write('{"id": "b", "conversations": [{"fr')
    resumed = regenerate(recipe, tokenizer=tokenizer, generator=generator, log=lambda _: 0)
    assert resumed.already_done == 1 and resumed.written == len(USABLE) - 1
    rows = _rows(path)
    assert sorted(r[ROW_KEY] for r in rows) == sorted(USABLE)  # every row once, no duplicate, no torn line
    assert sorted(rows, key=lambda r: r[ROW_KEY]) == expected  # greedy: the same text as the reference

    # The same schema as the input, the prompts kept, every reply the target's own.
    for row in rows:
        original = RECORDS[row[ROW_KEY]]
        assert set(row) == set(original) | {ROW_KEY}
        key = "conversations" if "conversations" in original else "messages"
        role, text = ("from", "value") if key == "conversations" else ("role", "content")
        assert [t[role] for t in row[key]] == [t[role] for t in original[key]]
        for new, old in zip(row[key], original[key]):
            if new[role] in ("gpt", "assistant"):
                assert new[text] != old[text] and isinstance(new[text], str)
            else:
                assert new == old
    # The first reply is the tiny target's greedy continuation of its prompt.
    first = next(r for r in rows if r[ROW_KEY] == 3)
    prompt = tokenizer.apply_chat_template(RECORDS[3]["messages"][:1], add_generation_prompt=True,
                                           tokenize=True, return_dict=False)
    reply = generator.generate([prompt])[0]
    assert first["messages"][1]["content"] == tokenizer.decode(reply.token_ids, skip_special_tokens=True)

    # Nothing is left to do: a third run writes nothing and loads nothing.
    again = regenerate(recipe, tokenizer=tokenizer, generator=None, log=lambda _: 0)
    assert again.written == 0 and again.already_done == len(USABLE)

    # A recipe trains on the output folder.
    trained = load_recipe("tiny_eagle3", [f"data.sources=[{{path: {tmp_path / 'run' / 'regenerated'}}}]"])
    assert len(prepare_data(trained.data, tokenizer).examples) == len(USABLE)


def test_shards_split_the_rows(tmp_path, tiny):
    tokenizer, generator = tiny
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    recipe = _recipe(data, tmp_path / "run", "regenerate.max_new_tokens=2")
    results = [regenerate(recipe, s, 2, tokenizer=tokenizer, generator=generator, log=lambda _: 0) for s in (0, 1)]
    rows = [{r[ROW_KEY] for r in _rows(res.files[0])} for res in results]
    assert rows == [{0, 4}, {1, 3}]  # row r goes to shard r % 2; the unusable row 2 nowhere
    with pytest.raises(ValueError, match="shard 2"):
        regenerate(recipe, 2, 2, tokenizer=tokenizer, generator=generator)


def test_foreign_line_is_an_error(tmp_path):
    path = tmp_path / "part.jsonl"
    path.write_text(json.dumps({ROW_KEY: 0, "messages": []}) + "\n" + json.dumps({"messages": []}) + "\n")
    with pytest.raises(DataError, match=rf"{path}:2: not a regenerated row"):
        finished_rows(path)


def test_launcher_shards_from_launcher_env(tmp_path, monkeypatch, capsys):
    import runpy

    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps(RECORDS[2]) + "\n")  # nothing to answer: no model is loaded
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    main = runpy.run_path("launch/regenerate.py")["main"]
    assert main(["--recipe", "tiny_eagle3", f"run.output_dir={tmp_path}", f"data.sources=[{{path: {data}}}]"]) == 0
    out = capsys.readouterr().out
    assert "shard 1/3: 0 rows written" in out and "part-00001-of-00003.jsonl" in out
    assert main(["--recipe", "tiny_eagle3", "regenerate.temperature=-1"]) == 2


def test_generation_attention_is_an_hf_implementation():
    """generate needs padding masks and batched KV caches: our packed `varlen` (what `auto` picks on CPU
    without flash-attn) becomes sdpa; an explicit HF implementation is kept."""
    from eagle_online.target import generation_attn_implementation, resolve_attn_implementation

    cpu = torch.device("cpu")
    assert resolve_attn_implementation("auto", cpu) == "varlen"
    assert generation_attn_implementation("auto", cpu) == "sdpa"
    assert generation_attn_implementation("varlen", cpu) == "sdpa"
    assert generation_attn_implementation("eager", cpu) == "eager"
    from tests.families import build_family

    for family, expected in (("gemma2", "eager"), ("gpt_oss", "eager"), ("mistral", "sdpa")):
        assert generation_attn_implementation("auto", cpu, build_family(family).config) == expected, family


@pytest.mark.slow
def test_readme_command_runs_the_hf_path(tmp_path):
    """README's command, as a user runs it (the recipe's `attn_implementation: auto`, HF generate)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "launch/regenerate.py", "--recipe", "tiny_eagle3", "regenerate.max_new_tokens=8",
         "data.sources.0.max_rows=3", f"run.output_dir={tmp_path}", "regenerate.backend=hf"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = (tmp_path / "regenerated").glob("*/part-00000-of-00001.jsonl")
    rows = _rows(path)
    assert [r[ROW_KEY] for r in rows] == [0, 1, 2]
    assert all(t["value"] for r in rows for t in r["conversations"] if t["from"] == "gpt")
    assert "3 rows written" in proc.stdout


def test_failed_run_leaves_no_empty_part_file(tmp_path, tiny, monkeypatch):
    """A run that fails before its first row (the model does not load; generation fails) leaves no file."""
    import eagle_online.data.regenerate as regen

    tokenizer, _ = tiny
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    recipe = _recipe(data, tmp_path / "run")

    def no_model(*args, **kwargs):
        raise ValueError("the model does not load")

    monkeypatch.setattr(regen, "load_generator", no_model)
    with pytest.raises(ValueError, match="does not load"):
        regenerate(recipe, tokenizer=tokenizer, log=lambda _: 0)

    class Broken:
        def generate(self, prompts):
            raise RuntimeError("generation failed")

    with pytest.raises(RuntimeError, match="generation failed"):
        regenerate(recipe, tokenizer=tokenizer, generator=Broken(), log=lambda _: 0)
    assert not (tmp_path / "run").exists()


def test_max_turns_answers_the_first_turns_and_cuts_the_rest(tmp_path, tiny):
    tokenizer, generator = tiny
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    everything = regenerate(_recipe(data, tmp_path / "all"), tokenizer=tokenizer, generator=generator,
                            log=lambda _: 0)
    first = regenerate(_recipe(data, tmp_path / "one", "regenerate.max_turns=1"), tokenizer=tokenizer,
                       generator=generator, log=lambda _: 0)
    assert first.written == everything.written == len(USABLE)
    assert (everything.replies, first.replies) == (5, 4)  # row "a" has two assistant turns
    full, cut = _rows(everything.files[0]), _rows(first.files[0])
    two_turns = next(r for r in cut if r["id"] == "a")["conversations"]
    assert [m["from"] for m in two_turns] == ["human", "gpt"]  # cut after the first reply
    # Greedy: the first reply is the same one whether or not later turns are answered.
    assert two_turns == next(r for r in full if r["id"] == "a")["conversations"][:2]
    assert [r for r in cut if r["id"] != "a"] == [r for r in full if r["id"] != "a"]
