"""Self-distillation: the recipe's conversations with every assistant turn replaced by the target's own.

A draft trained on the target's own replies accepts more than one trained on another model's. For each
conversation, turn by turn, the target answers the same user turns given the history *it* produced
(its earlier replies, not the dataset's), with the recipe's chat template (and its template kwargs,
e.g. Qwen3's thinking switch) and the `regenerate` section's sampling settings.

Output: JSONL with the input's schema (ShareGPT `conversations` or OpenAI `messages`, other fields
kept), one folder per source and one file per shard:
`<output_dir>/<kk>-<source>/part-<shard>-of-<num_shards>.jsonl`. Point a recipe's source at
`<output_dir>` (every source) or at one source's folder. Only text is written.

Resumable: each finished row is appended as one line, flushed, carrying its record number
(`eagle_online_row`); a rerun skips the rows its file already holds and cuts a line torn by a kill.
Shardable: row r belongs to shard `r % num_shards`, so processes never share a file.

Backends: vLLM when installed (fast; not exercised by the test suite, which has no GPU), else HF
`generate`, batched with left padding and the KV cache on — the trainer loads targets with
`use_cache=False` for packing, but generation needs the cache, so this loads its own copy.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from eagle_online.data.chat import ChatRenderer
from eagle_online.data.prepare import source_labels
from eagle_online.data.roles import SHAREGPT_NAMES
from eagle_online.data.sources import DataError, iter_conversation_records
from eagle_online.recipe import Recipe, RegenerateConfig, resolve_target
from eagle_online.target import load_target_model, load_tokenizer

ROW_KEY = "eagle_online_row"


@dataclass
class Generated:
    """One reply: its token ids (stop token excluded) and whether it ended on a stop token."""

    token_ids: list[int]
    finished: bool


@dataclass
class RegenerateResult:
    """What one `regenerate` call did on its shard."""

    files: list[Path]
    written: int = 0  # rows written by this call
    already_done: int = 0  # rows found finished by an earlier call
    skipped: dict[str, int] = field(default_factory=dict)  # rows not written, by reason
    replies: int = 0
    truncated_replies: int = 0  # cut at max_new_tokens


def shard_from_env() -> tuple[int, int]:
    """(shard, num_shards) from the launcher's RANK / WORLD_SIZE, (0, 1) without one."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def output_dir(recipe: Recipe) -> Path:
    """Where the regenerated data goes."""
    return Path(recipe.regenerate.output_dir or Path(recipe.run.output_dir) / "regenerated")


def shard_file(recipe: Recipe, source_index: int, shard: int, num_shards: int) -> Path:
    """The file that holds shard `shard` of source `source_index`."""
    label = source_labels(recipe.data)[source_index]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_")[-60:] or "source"
    return output_dir(recipe) / f"{source_index:02d}-{slug}" / f"part-{shard:05d}-of-{num_shards:05d}.jsonl"


def finished_rows(path: Path) -> set[int]:
    """Record numbers already written to `path`. A last line without its newline (a write cut by a
    kill) is removed; any other line that is not a row of ours is an error naming the file and line."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with path.open("r+b") as f:
            f.truncate(end)
        data = data[:end]
    done = set()
    for lineno, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        try:
            done.add(int(json.loads(line)[ROW_KEY]))
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path}:{lineno}: not a regenerated row ({type(e).__name__}: {e})") from None
    return done


def with_messages(record: dict, messages: list[dict], row: int) -> dict:
    """`record` with its conversation replaced by `messages`, in the record's own schema."""
    out = {k: v for k, v in record.items() if k not in ("conversations", "messages")}
    if "messages" in record:
        out["messages"] = [{"role": m["role"], "content": m["content"]} for m in messages]
    else:
        out["conversations"] = [{"from": SHAREGPT_NAMES[m["role"]], "value": m["content"]} for m in messages]
    out[ROW_KEY] = row
    return out


class HFGenerator:
    """Batched HF `generate`: left padding, KV cache on, stopping at any of `stop_ids`."""

    def __init__(self, model, tokenizer, stop_ids: list[int], cfg: RegenerateConfig):
        from transformers import GenerationConfig

        self.model, self.stop_ids = model.eval(), set(stop_ids)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
        sampled = cfg.temperature > 0
        self.config = GenerationConfig(
            max_new_tokens=cfg.max_new_tokens,
            do_sample=sampled,
            temperature=cfg.temperature if sampled else None,
            top_p=cfg.top_p if sampled else None,
            top_k=None,
            eos_token_id=list(stop_ids),
            pad_token_id=self.pad_id,
            use_cache=True,
        )

    @torch.no_grad()
    def generate(self, prompts: list[list[int]]) -> list[Generated]:
        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
            ids[i, width - len(p) :] = torch.tensor(p)
            attention[i, width - len(p) :] = 1
        out = self.model.generate(
            input_ids=ids.to(device), attention_mask=attention.to(device), generation_config=self.config
        )
        return [self._cut(row) for row in out[:, width:].tolist()]

    def _cut(self, tokens: list[int]) -> Generated:
        for i, t in enumerate(tokens):
            if t in self.stop_ids:
                return Generated(tokens[:i], True)
        return Generated(tokens, False)


class VLLMGenerator:
    """vLLM's offline engine on token-id prompts (the fast path; needs a GPU and `pip install vllm`)."""

    def __init__(self, recipe: Recipe, stop_ids: list[int]):
        from vllm import LLM, SamplingParams

        cfg, target = recipe.regenerate, recipe.target
        path = resolve_target(target)
        dtype = "auto" if target.dtype == "auto" else target.dtype
        self.llm = LLM(model=path, tokenizer=path, dtype=dtype, trust_remote_code=target.trust_remote_code,
                       seed=cfg.seed)
        self.stop_ids = set(stop_ids)
        self.params = SamplingParams(
            temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens, stop_token_ids=stop_ids
        )

    def generate(self, prompts: list[list[int]]) -> list[Generated]:
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], self.params, use_tqdm=False)
        result = []
        for out in outputs:
            tokens = list(out.outputs[0].token_ids)
            cut = next((i for i, t in enumerate(tokens) if t in self.stop_ids), None)
            result.append(Generated(tokens if cut is None else tokens[:cut], out.outputs[0].finish_reason == "stop"))
        return result


def stop_token_ids(tokenizer, renderer: ChatRenderer, model_config=None) -> list[int]:
    """Where a reply ends: the template's end-of-turn token, the tokenizer's eos, the model's eos ids."""
    ids = []
    eot = renderer.end_of_turn_token()
    if eot is not None:
        ids.append(tokenizer.convert_tokens_to_ids(eot))
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    config_eos = getattr(getattr(model_config, "generation_config", None), "eos_token_id", None)
    ids.extend(config_eos if isinstance(config_eos, list) else [config_eos] if config_eos is not None else [])
    if not ids:
        raise DataError("cannot tell where a reply ends: the template writes no end-of-turn token and there is no eos")
    return list(dict.fromkeys(ids))


def load_generator(recipe: Recipe, tokenizer, renderer: ChatRenderer):
    """vLLM when installed (and asked for or `auto`), else HF generate on this process's device."""
    backend = recipe.regenerate.backend
    if backend in ("auto", "vllm"):
        try:
            import vllm  # noqa: F401
        except ImportError:
            if backend == "vllm":
                raise
        else:
            return VLLMGenerator(recipe, stop_token_ids(tokenizer, renderer))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    model = load_target_model(recipe.target, device, generation=True)
    return HFGenerator(model, tokenizer, stop_token_ids(tokenizer, renderer, model), recipe.regenerate)


def regenerate(
    recipe: Recipe,
    shard: int = 0,
    num_shards: int = 1,
    *,
    tokenizer=None,
    generator=None,
    on_row: Callable[[int], None] | None = None,
    log: Callable[[str], None] = print,
) -> RegenerateResult:
    """Regenerate this shard of every source of `recipe.data` (see the module docstring).

    `on_row(row)` is called after each row is written (progress, or a test's interruption).
    """
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} is not in [0, {num_shards})")
    if tokenizer is None:
        tokenizer = load_tokenizer(recipe.target)
    cfg = recipe.regenerate
    renderer = ChatRenderer(tokenizer, recipe.data.chat_template_kwargs)
    max_prompt = cfg.max_prompt_tokens or recipe.data.max_length
    files = [shard_file(recipe, k, shard, num_shards) for k in range(len(recipe.data.sources))]
    result = RegenerateResult(files=files)
    skipped: Counter = Counter()
    for source, path in zip(recipe.data.sources, files):
        done = finished_rows(path)
        result.already_done += len(done)
        pending = (
            (row, record, messages)
            for row, record, messages in iter_conversation_records(source, skipped)
            if row % num_shards == shard and row not in done
        )
        out = None  # opened at the first finished row: a run that fails before one leaves no empty file
        try:
            while batch := [x for _, x in zip(range(cfg.batch_size), pending)]:
                if generator is None:
                    generator = load_generator(recipe, tokenizer, renderer)
                torch.manual_seed(cfg.seed * 1_000_003 + shard * 1009 + result.written + len(done))
                conversations = _answer(
                    batch, renderer, tokenizer, generator, max_prompt, cfg.max_turns, result, skipped
                )
                for (row, record, _), messages in zip(batch, conversations):
                    if messages is None:
                        continue
                    if out is None:
                        path.parent.mkdir(parents=True, exist_ok=True)
                        out = path.open("a", encoding="utf-8")
                    out.write(json.dumps(with_messages(record, messages, row), ensure_ascii=False) + "\n")
                    out.flush()
                    result.written += 1
                    if on_row is not None:
                        on_row(row)
                if out is not None:
                    os.fsync(out.fileno())
                log(f"shard {shard}/{num_shards} {path.parent.name}: {result.written} written, "
                    f"{result.already_done} done before")
        finally:
            if out is not None:
                out.close()
    result.skipped = dict(sorted(skipped.items()))
    return result


def _answer(batch, renderer, tokenizer, generator, max_prompt: int, max_turns: int | None,
            result: RegenerateResult, skipped: Counter):
    """The batch's conversations with every assistant turn (the first `max_turns` when set, the
    conversation cut after them) replaced by the target's reply, turn by turn in lockstep; None for a
    conversation whose first prompt is already too long."""
    conversations = [[{"role": m["role"], "content": m["content"]} for m in messages] for _, _, messages in batch]
    turns = [[i for i, m in enumerate(c) if m["role"] == "assistant"][:max_turns] for c in conversations]
    if max_turns is not None:
        conversations = [c[: t[-1] + 1] for c, t in zip(conversations, turns)]
    ended = [False] * len(batch)
    for step in range(max(len(t) for t in turns)):
        active, prompts = [], []
        for b, conversation in enumerate(conversations):
            if ended[b] or step >= len(turns[b]):
                continue
            turn = turns[b][step]
            ids = tokenizer.backend_tokenizer.encode(
                renderer.render(conversation[:turn], add_generation_prompt=True), add_special_tokens=False
            ).ids
            if len(ids) > max_prompt:  # keep the replies made so far, drop the rest
                ended[b] = True
                conversations[b] = conversation[: turns[b][step - 1] + 1] if step else None
                if not step:
                    skipped["prompt_too_long"] += 1
                continue
            active.append((b, turn))
            prompts.append(ids)
        if not prompts:
            break
        for (b, turn), reply in zip(active, generator.generate(prompts)):
            conversations[b][turn]["content"] = tokenizer.decode(reply.token_ids, skip_special_tokens=True)
            result.replies += 1
            result.truncated_replies += not reply.finished
    return conversations
