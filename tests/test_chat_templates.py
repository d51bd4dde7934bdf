"""Loss masks from real chat templates: golden trained spans per model family.

Each template is the one published with the model (tests/fixtures/chat_templates, sources in
SOURCES.md), paired with a small byte-level BPE built here with the family's control tokens added as
special tokens. The golden lists are the trained tokens decoded run by run, so moving one token in or
out of a span (a header, the newline after the end-of-turn token, the space Llama-2 writes before
eos) changes a string and fails the test.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from eagle_online.data.chat import ChatRenderer, TemplateError, tokenize_conversation
from eagle_online.data.view import trained_runs

TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"

SYSTEM_CHAT = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital of France."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome.\nIt has been since 1871."},
]
# A one-word reply (it also occurs inside template text), and a reply with whitespace around it,
# which templates that `trim` drop and the others keep as part of the reply.
SPACED_CHAT = [
    {"role": "user", "content": "Say hi."},
    {"role": "assistant", "content": "hi"},
    {"role": "user", "content": "Now count to three, please."},
    {"role": "assistant", "content": "  One, two, three!\n"},
]
REASONING_CHAT = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "<think>\nStep A\n</think>\n\nParis."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "<think>\nStep B\n</think>\n\nRome."},
]

LLAMA3 = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>"
]
CHATML = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
GEMMA = ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]
PHI3 = ["<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
R1 = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"]
HARMONY = ["<|startoftext|>", "<|return|>", "<|start|>", "<|message|>", "<|channel|>", "<|end|>", "<|call|>"]

# template: (special tokens, bos, eos, plain added tokens, renders a system turn)
FAMILIES = {
    "llama-3-8b-instruct": (LLAMA3, "<|begin_of_text|>", "<|end_of_text|>", (), True),
    "llama-3.3-70b-instruct": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>", (), True),
    "llama-2-chat": (["<s>", "</s>"], "<s>", "</s>", (), True),
    "qwen2.5-instruct": (CHATML, None, "<|im_end|>", (), True),
    "qwen3-0.6b": (CHATML, None, "<|im_end|>", ("<think>", "</think>"), True),
    "mistral-7b-instruct-v0.1": (["<s>", "</s>"], "<s>", "</s>", (), False),
    "mixtral-8x7b-instruct-v0.1": (["<s>", "</s>"], "<s>", "</s>", (), False),
    "mistral-7b-instruct-v0.3": (["<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>", (), True),
    "mistral-nemo-instruct-2407": (["<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>", (), True),
    "gemma-2-2b-it": (GEMMA, "<bos>", "<eos>", (), False),
    "gemma-3-it": (GEMMA, "<bos>", "<eos>", (), True),
    "phi-3-mini-instruct": (PHI3, "<s>", "<|endoftext|>", (), True),
    "phi-3.5-mini-instruct": (PHI3, "<s>", "<|endoftext|>", (), True),
    "phi-4": (CHATML + ["<|im_sep|>"], "<|endoftext|>", "<|im_end|>", (), True),
    "deepseek-r1-distill-qwen-32b": (R1, R1[0], R1[1], ("<think>", "</think>"), True),
    "gpt-oss": (HARMONY, "<|startoftext|>", "<|return|>", (), True),
    "llama-3-generation-tagged": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>", (), True),
}

PARIS, ROME = "Paris is the capital of France.", "Rome.\nIt has been since 1871."
THREE = "  One, two, three!\n"  # SPACED_CHAT's second reply, untrimmed
GOLDEN = {
    # template: (trained runs of SYSTEM_CHAT, trained runs of SPACED_CHAT)
    "llama-3-8b-instruct": (
        [PARIS + "<|eot_id|>", ROME + "<|eot_id|>"], ["hi<|eot_id|>", "One, two, three!<|eot_id|>"]
    ),
    "llama-3.3-70b-instruct": (
        [PARIS + "<|eot_id|>", ROME + "<|eot_id|>"], ["hi<|eot_id|>", "One, two, three!<|eot_id|>"]
    ),
    # Llama-2 writes `' ' + reply + ' ' + eos`: the reply (with the space the target generates before
    # its first word) and eos are trained, the space before eos is not.
    "llama-2-chat": ([" " + PARIS, "</s>", " " + ROME, "</s>"], [" hi", "</s>", " One, two, three!", "</s>"]),
    "qwen2.5-instruct": ([PARIS + "<|im_end|>", ROME + "<|im_end|>"], ["hi<|im_end|>", THREE + "<|im_end|>"]),
    # Thinking mode (the template's default): the last reply opens with an empty think block, which
    # the target generates after its prompt, so it is trained; earlier replies are shown without it.
    "qwen3-0.6b": (
        [PARIS + "<|im_end|>", "<think>\n\n</think>\n\n" + ROME + "<|im_end|>"],
        ["hi<|im_end|>", "<think>\n\n</think>\n\n" + THREE + "<|im_end|>"],
    ),
    # Mistral v0.1 writes `reply + eos + ' '`: the text after eos is not trained.
    "mistral-7b-instruct-v0.1": ([PARIS + "</s>", ROME + "</s>"], ["hi</s>", THREE + "</s>"]),
    "mixtral-8x7b-instruct-v0.1": ([PARIS + "</s>", ROME + "</s>"], ["hi</s>", THREE + "</s>"]),
    # Mistral writes the system prompt into the user turn that ends a prompt, and nowhere when the
    # conversation ends with a reply: with a system prompt no generation prompt is a prefix of the
    # rendered conversation, so only the replies' text is trained, not the space the template writes
    # before them (a separate token in this BPE; a SentencePiece `▁Paris` overlaps the reply and is).
    "mistral-7b-instruct-v0.3": ([PARIS + "</s>", ROME + "</s>"], [" hi</s>", " One, two, three!</s>"]),
    "mistral-nemo-instruct-2407": ([PARIS + "</s>", ROME + "</s>"], ["hi</s>", THREE + "</s>"]),
    "gemma-2-2b-it": (
        [PARIS + "<end_of_turn>", ROME + "<end_of_turn>"], ["hi<end_of_turn>", "One, two, three!<end_of_turn>"]
    ),
    "gemma-3-it": (
        [PARIS + "<end_of_turn>", ROME + "<end_of_turn>"], ["hi<end_of_turn>", "One, two, three!<end_of_turn>"]
    ),
    # Phi-3 ends a conversation with `<|end|>\n<|endoftext|>`: only `<|end|>` closes the turn.
    "phi-3-mini-instruct": ([PARIS + "<|end|>", ROME + "<|end|>"], ["hi<|end|>", THREE + "<|end|>"]),
    "phi-3.5-mini-instruct": ([PARIS + "<|end|>", ROME + "<|end|>"], ["hi<|end|>", THREE + "<|end|>"]),
    "phi-4": ([PARIS + "<|im_end|>", ROME + "<|im_end|>"], ["hi<|im_end|>", THREE + "<|im_end|>"]),
    # The prompt ends `<｜Assistant｜><think>\n`, the rendered turn has no think block: the reply is trained.
    "deepseek-r1-distill-qwen-32b": (
        [PARIS + "<｜end▁of▁sentence｜>", ROME + "<｜end▁of▁sentence｜>"],
        ["hi<｜end▁of▁sentence｜>", THREE + "<｜end▁of▁sentence｜>"],
    ),
    # Harmony: the target generates the channel header after `<|start|>assistant`; a final reply ends
    # with <|return|>, one in the history with <|end|>.
    "gpt-oss": (
        ["<|channel|>final<|message|>" + PARIS + "<|end|>", "<|channel|>final<|message|>" + ROME + "<|return|>"],
        ["<|channel|>final<|message|>hi<|end|>", "<|channel|>final<|message|>" + THREE + "<|return|>"],
    ),
    "llama-3-generation-tagged": (
        [PARIS + "<|eot_id|>", ROME + "<|eot_id|>"], ["hi<|eot_id|>", "One, two, three!<|eot_id|>"]
    ),
}

_CACHE: dict[str, object] = {}


def family_tokenizer(name: str):
    """A byte-level BPE over the test texts, with `name`'s control tokens and chat template."""
    if name not in _CACHE:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        special, bos, eos, plain, _ = FAMILIES[name]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        )
        texts = [m["content"] for chat in (SYSTEM_CHAT, SPACED_CHAT, REASONING_CHAT) for m in chat]
        tok.train_from_iterator(texts, trainer=trainer)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos)
        fast.add_special_tokens({"additional_special_tokens": [s for s in special if s not in (bos, eos)]})
        fast.add_tokens(list(plain))  # e.g. Qwen3's <think>: added, but not special
        fast.chat_template = (TEMPLATES / f"{name}.jinja").read_text()
        _CACHE[name] = fast
    return _CACHE[name]


def test_every_fixture_has_a_golden_and_a_source():
    files = {p.stem for p in TEMPLATES.glob("*.jinja")}
    assert files == set(GOLDEN) == set(FAMILIES)
    sources = (TEMPLATES / "SOURCES.md").read_text()
    assert all(f"`{name}.jinja`" in sources for name in files)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_spans(name):
    tok = family_tokenizer(name)
    system_golden, spaced_golden = GOLDEN[name]
    chat = SYSTEM_CHAT if FAMILIES[name][4] else SYSTEM_CHAT[1:]
    for conversation, golden in ((chat, system_golden), (SPACED_CHAT, spaced_golden)):
        example = tokenize_conversation(tok, conversation)
        # The ids are exactly what the template tokenizes to.
        assert example.input_ids.tolist() == tok.apply_chat_template(conversation, tokenize=True, return_dict=False)
        assert trained_runs(tok, example) == golden
        assert not example.loss_mask[0]  # bos or the first header is never trained


def test_generic_mask_agrees_with_generation_tags():
    """On a template with {% generation %} markers, transformers' assistant mask is the reference."""
    tok = family_tokenizer("llama-3-generation-tagged")
    padded = [{**m, "content": f"  {m['content']} \n"} for m in SYSTEM_CHAT]  # the template trims
    for conversation in (SYSTEM_CHAT, SPACED_CHAT, padded, SYSTEM_CHAT[:3]):
        reference = tok.apply_chat_template(
            conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        example = tokenize_conversation(tok, conversation)
        assert example.input_ids.tolist() == reference["input_ids"]
        assert example.loss_mask.astype(int).tolist() == reference["assistant_masks"]
        assert example.num_trained > 0


def test_qwen3_thinking_modes():
    tok = family_tokenizer("qwen3-0.6b")
    no_think = ChatRenderer(tok, {"enable_thinking": False})
    # Non-thinking: the prompt already holds the empty think block, so only the reply is trained.
    assert [trained_runs(tok, e) for e in no_think.tokenize(SYSTEM_CHAT)] == [
        [PARIS + "<|im_end|>", ROME + "<|im_end|>"]
    ]
    think = ChatRenderer(tok)
    # Reasoning kept in the content: the template drops it from the earlier turn. `whole` trains that
    # turn as the history shows it; `per_turn` trains every turn as the target generated it.
    assert [trained_runs(tok, e) for e in think.tokenize(REASONING_CHAT, "whole")] == [
        ["Paris.<|im_end|>", "<think>\nStep B\n</think>\n\nRome.<|im_end|>"]
    ]
    per_turn = think.tokenize(REASONING_CHAT, "per_turn")
    assert [trained_runs(tok, e) for e in per_turn] == [
        ["<think>\nStep A\n</think>\n\nParis.<|im_end|>"],
        ["<think>\nStep B\n</think>\n\nRome.<|im_end|>"],
    ]
    # The second sequence's history shows the first reply without its reasoning, as the target saw it.
    history = tok.decode(per_turn[1].input_ids.tolist())
    assert "Step A" not in history and history.startswith("<|im_start|>user\nWhat is")
    # `reasoning_content` beside the content is read by the template the same way.
    split = [
        {**m, "content": m["content"].split("\n\n")[-1], "reasoning_content": m["content"].split("\n")[1]}
        if m["role"] == "assistant" else m
        for m in REASONING_CHAT
    ]
    assert [trained_runs(tok, e) for e in think.tokenize(split, "per_turn")] == [
        trained_runs(tok, e) for e in per_turn
    ]


def test_reasoning_dropped_by_deepseek_r1_template():
    tok = family_tokenizer("deepseek-r1-distill-qwen-32b")
    for mode in ("whole", "per_turn"):
        runs = [r for e in ChatRenderer(tok).tokenize(REASONING_CHAT, mode) for r in trained_runs(tok, e)]
        # The template keeps only what follows </think>; that is all there is to train.
        assert runs == ["\n\nParis.<｜end▁of▁sentence｜>", "\n\nRome.<｜end▁of▁sentence｜>"]


def test_gpt_oss_analysis_channel():
    tok = family_tokenizer("gpt-oss")
    chat = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris.", "thinking": "Easy."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome.", "thinking": "Also easy."},
    ]
    renderer = ChatRenderer(tok, {"reasoning_effort": "low"})
    final = "<|end|><|start|>assistant<|channel|>final<|message|>"
    assert [trained_runs(tok, e) for e in renderer.tokenize(chat, "per_turn")] == [
        ["<|channel|>analysis<|message|>Easy." + final + "Paris.<|return|>"],
        ["<|channel|>analysis<|message|>Also easy." + final + "Rome.<|return|>"],
    ]
    assert renderer.end_of_turn_token() == "<|return|>"


def test_template_errors():
    tok = family_tokenizer("gemma-2-2b-it")
    with pytest.raises(TemplateError, match="System role not supported"):
        tokenize_conversation(tok, SYSTEM_CHAT)
    with pytest.raises(TemplateError, match="needs a prompt"):
        ChatRenderer(family_tokenizer("llama-3-8b-instruct")).spans([{"role": "assistant", "content": "x"}])
