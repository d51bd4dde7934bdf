"""The draft vocabulary: the target tokens the draft predicts, chosen by how often they are trained.

EAGLE-3 drafts predict over a smaller vocabulary than the target's. Draft token i stands for target
token `i + d2t[i]` (the layout SGLang and vLLM read); `t2d[t]` says whether target token t is in it.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from eagle_online.data.chat import TokenizedConversation
from eagle_online.data.prepare import copies, iter_examples
from eagle_online.layout import vocab_maps_problem
from eagle_online.recipe import resolve_target
from eagle_online.target import load_tokenizer

_CHUNK = 1 << 20  # tokens per bincount, to bound memory on large corpora


class TrainedTokenCounter:
    """Counts trained tokens in chunks, so that a corpus of any size is counted in bounded memory."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.counts = np.zeros(vocab_size, dtype=np.int64)
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0

    def add(self, example: TokenizedConversation, times: int = 1) -> None:
        """Count the trained tokens of `example`, `times` times."""
        ids = np.asarray(example.input_ids)[np.asarray(example.loss_mask, dtype=bool)]
        self._pending.extend([ids] * times)
        self._pending_tokens += len(ids) * times
        if self._pending_tokens >= _CHUNK:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        ids = np.concatenate(self._pending).astype(np.int64)
        self._pending, self._pending_tokens = [], 0
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}); got {int(ids.min())}..{int(ids.max())}")
        self.counts += np.bincount(ids, minlength=self.vocab_size)

    def result(self) -> torch.Tensor:
        """The counts so far: int64 [vocab_size]."""
        self._flush()
        return torch.from_numpy(self.counts.copy())


def count_trained_tokens(examples: Iterable[TokenizedConversation], vocab_size: int) -> torch.Tensor:
    """How often each target token occurs at a trained (loss_mask == 1) position: int64 [vocab_size]."""
    counter = TrainedTokenCounter(vocab_size)
    for example in examples:
        counter.add(example)
    return counter.result()


def vocab_coverage(counts: torch.Tensor, t2d: torch.Tensor) -> float:
    """Fraction of the counted trained tokens that the draft vocabulary holds."""
    total = int(counts.sum())
    return float(counts[t2d].sum()) / total if total else 0.0


def build_draft_vocab(counts: torch.Tensor, draft_vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `draft_vocab_size` most frequent tokens (ties to the lower id), sorted by id; when fewer
    tokens occur, the lowest unused ids fill the rest.

    Returns d2t int64 [draft_vocab_size] with `d2t[i] = target_id(i) - i`, and t2d bool [vocab_size],
    true at the chosen ids.
    """
    vocab_size = counts.numel()
    if counts.dim() != 1:
        raise ValueError(f"counts must be 1-D, got shape {tuple(counts.shape)}")
    if not 0 < draft_vocab_size <= vocab_size:
        raise ValueError(f"draft_vocab_size ({draft_vocab_size}) must be in [1, vocab_size = {vocab_size}]")
    # A stable descending sort keeps equal counts in id order: ties go to the lower id, and the
    # never-seen tokens (count 0) come last, lowest id first, which is the padding we want.
    order = torch.sort(counts.to(torch.long), descending=True, stable=True).indices
    chosen = order[:draft_vocab_size].sort().values
    d2t = chosen - torch.arange(draft_vocab_size, dtype=torch.long)
    t2d = torch.zeros(vocab_size, dtype=torch.bool)
    t2d[chosen] = True
    return d2t, t2d


def save_draft_vocab(path, d2t: torch.Tensor, t2d: torch.Tensor, counts: torch.Tensor) -> None:
    """Write d2t, t2d and the counts they came from to one file (.pt, else safetensors), atomically."""
    path = Path(path)
    tensors = {"d2t": d2t.contiguous(), "t2d": t2d.contiguous(), "counts": counts.contiguous()}
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix in (".pt", ".pth"):
        torch.save(tensors, tmp)
    else:
        from safetensors.torch import save_file

        save_file(tensors, str(tmp))
    os.replace(tmp, path)


def load_draft_vocab(path) -> tuple[torch.Tensor, torch.Tensor]:
    """Read (d2t, t2d) written by `save_draft_vocab`, checking they describe the same vocabulary."""
    path = Path(path)
    if path.suffix in (".pt", ".pth"):
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    else:
        from safetensors.torch import load_file

        tensors = load_file(str(path))
    d2t, t2d = tensors["d2t"].long(), tensors["t2d"].bool()
    if vocab_maps_problem(d2t, t2d) is not None:
        raise ValueError(f"{path}: d2t and t2d describe different vocabularies")
    return d2t, t2d


@dataclass
class VocabReport:
    """What `build_recipe_vocab` wrote and how well the draft vocabulary covers the data."""

    path: Path
    draft_vocab_size: int
    vocab_size: int
    trained_tokens: int  # counted per epoch, weights applied
    distinct_tokens: int  # target tokens that occur at trained positions
    coverage: float  # fraction of the trained tokens the draft vocabulary holds
    stats: dict  # the data statistics, as prepare_data reports them


def draft_vocab_path(run_dir) -> Path:
    """Where a run keeps its draft vocabulary (the trainer reuses the file when it exists)."""
    return Path(run_dir) / "draft_vocab.safetensors"


def target_vocab_size(target_cfg) -> int:
    """The target's vocabulary size (its lm_head rows), read from its config without loading weights."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_target(target_cfg), trust_remote_code=target_cfg.trust_remote_code)
    size = getattr(config, "vocab_size", None) or config.get_text_config().vocab_size
    return int(size)


def build_recipe_vocab(recipe, tokenizer=None, vocab_size: int | None = None, path=None) -> VocabReport:
    """Count a recipe's trained tokens in one streaming pass (weights applied, as the trainer counts
    them, but never holding the data), choose the draft vocabulary and write it where the trainer
    looks for it (`draft_vocab_path(run.output_dir)`, or `path`)."""
    if tokenizer is None:
        tokenizer = load_tokenizer(recipe.target)
    vocab_size = vocab_size or target_vocab_size(recipe.target)
    counter = TrainedTokenCounter(vocab_size)
    stats: dict = {}
    seen = [0] * len(recipe.data.sources)
    for k, example in iter_examples(recipe.data, tokenizer, stats):
        counter.add(example, copies(seen[k], recipe.data.sources[k].weight))
        seen[k] += 1
    counts = counter.result()
    size = recipe.draft.draft_vocab_size
    d2t, t2d = build_draft_vocab(counts, size)
    path = Path(path) if path is not None else draft_vocab_path(recipe.run.output_dir)
    save_draft_vocab(path, d2t, t2d, counts)
    return VocabReport(path, size, vocab_size, int(counts.sum()), int((counts > 0).sum()),
                       vocab_coverage(counts, t2d), stats)
