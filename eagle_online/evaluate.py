"""Acceptance length τ measured by real speculative decoding (chain drafting), as an engine decodes.

docs/measuring.md: what each tool reports and how the floors are made.

Per round, with L tokens so far (the target's KV cache holds the first L-1, the drafter has committed
the pairs (feature_t, token_{t+1}) up to t = L-2, whose last output proposes token L):

    draft      d_1..d_k: d_1 from the last committed pair, d_j from chain step j-1 (the head's own
               output and the token d_{j-1} it just proposed, one RoPE position further)
    verify     one target forward over [x_{L-1}, d_1..d_k] (KV-cached): p_0..p_k, features
    accept     greedy: d_j while d_j = argmax p_{j-1}; then argmax of the first disagreeing p.
               sampling at T: d_j with probability min(1, p(d_j)/q(d_j)); on rejection a token from
               norm(max(0, p - q)); after k acceptances a bonus token from p_k. (Leviathan et al.: the
               output is distributed exactly as the target's own sampling.)
    commit     the target cache keeps x_{L-1}, d_1..d_a; the drafter commits the a+1 new pairs with
               the target's real features of those positions (dropping its chain steps).

τ = mean over verify forwards of (accepted drafts + 1) = tokens produced per target forward. A draft
vocabulary is handled by the drafter: q lives on the draft tokens mapped through d2t (zero elsewhere).
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from eagle_online.data import prepare_data
from eagle_online.data.roles import UnknownRoleError, to_messages
from eagle_online.data.sources import DataError, iter_conversations, iter_jsonl
from eagle_online.export import load_draft
from eagle_online.heads import drafter_for
from eagle_online.heads.base import Drafter, DraftStep
from eagle_online.layout import aux_layer_ids_of, cast_parameters, draft_ids
from eagle_online.recipe import DataSource
from eagle_online.target import FrozenTarget, load_target_model, load_tokenizer

# -------------------------------------------------------------------------------------- prompts


@dataclass
class EvalPrompt:
    """One evaluation item: user turns answered one after the other by the model (MT-bench `turns`),
    or a fixed message history ending with a user turn (`messages`)."""

    id: str
    turns: list[str] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)


def _prompt_from_record(record, where: str) -> EvalPrompt:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    pid = str(record.get("question_id", record.get("id", where)))
    if "turns" in record:
        turns = record["turns"]
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t for t in turns):
            raise DataError(f"{where}: `turns` must be a non-empty list of strings")
        return EvalPrompt(id=pid, turns=turns)
    if "prompt" in record:
        if not isinstance(record["prompt"], str) or not record["prompt"]:
            raise DataError(f"{where}: `prompt` must be a non-empty string")
        return EvalPrompt(id=pid, turns=[record["prompt"]])
    if "messages" in record or "conversations" in record:
        try:
            messages = to_messages(record)
        except (UnknownRoleError, KeyError, TypeError) as e:
            raise DataError(f"{where}: unusable messages: {e}") from None
        while messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]  # generate the reply to the last user turn
        if not messages or messages[-1]["role"] != "user":
            raise DataError(f"{where}: `messages` must contain a user turn")
        return EvalPrompt(id=pid, messages=messages)
    raise DataError(f"{where}: a prompt record needs `turns` (MT-bench), `prompt` or `messages`; got {sorted(record)}")


def load_prompts(path: str, limit: int | None = None, skip: int = 0) -> list[EvalPrompt]:
    """Prompts from a JSONL file of MT-bench `question.jsonl` records (`turns`), `prompt` or `messages`
    records, or `builtin:sharegpt` (each conversation's opening up to its first reply, the first
    `skip` records left out)."""
    if path == "builtin:sharegpt":
        out = []
        source = DataSource(path=path, skip_rows=skip, max_rows=(limit * 4 if limit else None))
        for i, messages in enumerate(iter_conversations(source)):
            first_reply = next(j for j, m in enumerate(messages) if m["role"] == "assistant")
            out.append(EvalPrompt(id=f"sharegpt:{skip + i}", messages=messages[:first_reply]))
            if limit and len(out) >= limit:
                break
        return out
    file = Path(path)
    if not file.is_file():
        raise DataError(f"no prompts file {path}")
    out = [_prompt_from_record(record, where) for where, record in iter_jsonl(file)][skip:]
    if limit:
        out = out[:limit]
    if not out:
        raise DataError(f"{path}: no prompts")
    return out


# ------------------------------------------------------------------------------ decoding core


@dataclass
class Generation:
    """One speculative generation: the new tokens and, per verify forward, how many drafts it accepted."""

    tokens: list[int]
    accepted: list[int]  # per verify forward
    num_draft_tokens: int


class _CachedTarget:
    """The frozen target decoding one sequence with a transformers DynamicCache."""

    def __init__(self, target: FrozenTarget):
        from transformers import DynamicCache

        self.target = target
        self.device = target.lm_head_weight.device
        # Plain layers that keep every position, also for a sliding-window model (a config would give its
        # windowed layers a cache that evicts old keys, which a rejected draft could not be cropped back
        # over): the attention applies the window.
        self.cache = DynamicCache()

    def forward(self, tokens: list[int], start: int, last_logits_only: bool = False):
        ids = torch.tensor(tokens, device=self.device)
        return self.target.decode(ids, torch.arange(start, start + len(tokens), device=self.device), self.cache,
                                  last_logits_only=last_logits_only)

    def prefill(self, prompt_ids: list[int]):
        """The prompt's forward: every token's features, the last token's logits."""
        return self.forward(prompt_ids, 0, last_logits_only=True)

    def keep(self, length: int) -> None:
        """Drop cached positions from `length` on."""
        self.cache.crop(length - self.cache.get_seq_length())  # transformers 5: a negative count to remove

    def forward_tree(self, tokens: list[int], positions: list[int], parents: list[int]):
        """A draft tree's verification in one forward: node i (tokens[i] at RoPE position positions[i],
        parents[i] an earlier node, -1 for the root) sees the cache, its ancestors and itself."""
        n, past = len(tokens), self.cache.get_seq_length()
        sees = torch.zeros(n, n, dtype=torch.bool)
        for i, parent in enumerate(parents):
            sees[i, i] = True
            if parent >= 0:
                sees[i] |= sees[parent]
        allowed = torch.cat([torch.ones(n, past, dtype=torch.bool), sees], 1).to(self.device)
        dtype = self.target.lm_head_weight.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=self.device).masked_fill(~allowed, torch.finfo(dtype).min)
        ids = torch.tensor(tokens, device=self.device)
        return self.target.decode(ids, torch.tensor(positions, device=self.device), self.cache, mask[None, None])

    def keep_nodes(self, length: int, nodes: list[int]) -> None:
        """Keep the first `length` cached positions and, after them, the given nodes of the tree the last
        forward_tree appended there (in order): the cache then holds the accepted path only."""
        idx = torch.cat([torch.arange(length), length + torch.tensor(nodes, dtype=torch.long)]).to(self.device)
        for layer in self.cache.layers:
            if type(layer).__name__ != "DynamicLayer":
                raise ValueError(f"tree verification keeps plain KV cache layers only, not {type(layer).__name__} "
                                 "(a sliding-window target): measure chain τ")
            layer.keys, layer.values = layer.keys.index_select(-2, idx), layer.values.index_select(-2, idx)


def _feature(step, drafter: Drafter):
    return getattr(step, drafter.feature) if drafter.feature else None


def _sample(logits: torch.Tensor, temperature: float, gen: torch.Generator | None) -> int:
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.double() / temperature, -1)
    return int(torch.multinomial(probs, 1, generator=gen))


def accept_drafts(drafts: list[int], draft_logits: list[torch.Tensor], target_logits: torch.Tensor,
                  temperature: float, gen: torch.Generator | None) -> tuple[int, int]:
    """The acceptance rule for one verify forward: (number of drafts accepted, the token that follows).

    `draft_logits[j]` are the logits d_{j+1} was drawn from (over the target vocabulary, −inf outside
    the draft vocabulary); `target_logits` [k+1, V] the target's at the k+1 verified positions."""
    for j, d in enumerate(drafts):
        if temperature == 0:
            best = int(target_logits[j].argmax())
            if d != best:
                return j, best
            continue
        p = torch.softmax(target_logits[j].double() / temperature, -1)
        q = torch.softmax(draft_logits[j].double() / temperature, -1)
        u = float(torch.rand((), generator=gen, dtype=torch.float64, device=p.device))
        if u * q[d] < p[d]:  # u < p/q without dividing by a tiny q
            continue
        residual = (p - q).clamp_min(0)
        total = residual.sum()
        nxt = int(torch.multinomial(residual / total, 1, generator=gen)) if total > 0 else int(p.argmax())
        return j, nxt
    return len(drafts), _sample(target_logits[len(drafts)], temperature, gen)


def _decode(target: FrozenTarget, drafter: Drafter, prompt_ids: list[int], play_round, depth: int, *,
            max_new_tokens: int, temperature: float, eos_ids, gen: torch.Generator | None) -> Generation:
    """What chain and tree speculative decoding share: the prompt's forward, then rounds until
    `max_new_tokens` or an end token. `play_round(cached, proposal, last_token, length)` drafts from
    `proposal`, verifies, trims the target's cache to the accepted tokens and returns (the new tokens:
    accepted drafts then the token that follows, the verify forward's TargetStep, its rows of the last
    token and the accepted drafts); the drafter then commits those rows' features. `depth` is the most
    drafts one round can accept."""
    eos = set(eos_ids)
    cached = _CachedTarget(target)
    drafter.reset()
    n = len(prompt_ids)
    step = cached.prefill(prompt_ids)
    out = [_sample(step.logits[-1], temperature, gen)]
    device = cached.device
    proposal = drafter.extend(_feature(step, drafter), torch.tensor(prompt_ids[1:] + out, device=device),
                              torch.arange(n, device=device))
    accepted_per_step: list[int] = []
    while len(out) < max_new_tokens and out[-1] not in eos:
        length = n + len(out)  # L: the target cache holds L-1 tokens
        new, verify, rows = play_round(cached, proposal, out[-1], length)
        accepted_per_step.append(len(new) - 1)
        feats = _feature(verify, drafter)
        proposal = drafter.extend(None if feats is None else feats[rows], torch.tensor(new, device=device),
                                  torch.arange(length - 1, length - 1 + len(new), device=device))
        for t in new:
            out.append(t)
            if t in eos or len(out) >= max_new_tokens:
                break
    return Generation(tokens=out, accepted=accepted_per_step, num_draft_tokens=depth)


@torch.no_grad()
def speculative_generate(target: FrozenTarget, drafter: Drafter, prompt_ids: list[int], *, num_draft_tokens: int,
                         max_new_tokens: int, temperature: float = 0.0, eos_ids=(),
                         gen: torch.Generator | None = None) -> Generation:
    """Generate up to `max_new_tokens` after `prompt_ids` by chain speculative decoding (module docstring).
    Greedy when `temperature` is 0, else sampling at that temperature."""
    k = num_draft_tokens

    def play_round(cached, proposal, last, length):
        drafts, draft_logits = [], []
        for j in range(k):
            logits = proposal.logits.to(cached.device)  # a CPU-side baseline drafter may propose on the CPU
            drafts.append(_sample(logits, temperature, gen))
            draft_logits.append(logits)
            if j < k - 1:
                proposal = drafter.chain(drafts[-1], length - 1 + j)
        verify = cached.forward([last] + drafts, length - 1)
        a, nxt = accept_drafts(drafts, draft_logits, verify.logits, temperature, gen)
        cached.keep(length + a)
        return drafts[:a] + [nxt], verify, slice(0, a + 1)

    return _decode(target, drafter, prompt_ids, play_round, k, max_new_tokens=max_new_tokens,
                   temperature=temperature, eos_ids=eos_ids, gen=gen)


# ------------------------------------------------------------------------------------ draft trees


@dataclass(frozen=True)
class TreeShape:
    """An EAGLE-2 dynamic draft tree as SGLang builds it: `topk` children per expanded node
    (--speculative-eagle-topk), `num_steps` levels (--speculative-num-steps) and `num_draft_tokens` nodes
    verified, the root (the last accepted token) included (--speculative-num-draft-tokens)."""

    topk: int = 8
    num_steps: int = 5
    num_draft_tokens: int = 32

    def __post_init__(self):
        if min(self.topk, self.num_steps) < 1 or self.num_draft_tokens < 2:
            raise ValueError(f"a draft tree needs topk, num_steps >= 1 and num_draft_tokens >= 2, got {self}")


@dataclass
class DraftTree:
    """Drafted nodes, parents before children, siblings by falling draft probability; `parents[i]` is
    an earlier node or -1 for the root."""

    tokens: list[int]
    parents: list[int]
    depths: list[int]  # 1 for the root's children


def draft_tree(drafter: Drafter, proposal: DraftStep, position: int, shape: TreeShape) -> DraftTree:
    """EAGLE-2's dynamic tree: the root's top-k tokens by the draft's probability; then, level by level,
    the `topk` nodes of the newest level with the highest cumulative log-probability (the product of the
    draft probabilities along the path) each get their top-k children; at the end the
    `num_draft_tokens - 1` best nodes of all levels are kept (a child never scores above its parent,
    ties go to the shallower node, so every kept node's ancestors are kept). A node is expanded by
    replaying its path through the drafter (`Drafter.path`, first chain position `position`)."""
    tokens, parents, depths, scores = [], [], [], []

    def children(step: DraftStep, parent: int, depth: int) -> list[int]:
        logp = torch.log_softmax(step.logits.double(), -1)
        top = logp.topk(min(shape.topk, logp.numel()))
        base = scores[parent] if parent >= 0 else 0.0
        new = []
        for value, token in zip(top.values.tolist(), top.indices.tolist()):
            if value == float("-inf"):  # outside the draft vocabulary
                break
            tokens.append(token), parents.append(parent), depths.append(depth), scores.append(base + value)
            new.append(len(tokens) - 1)
        return new

    def path_to(i: int) -> list[int]:
        out = []
        while i >= 0:
            out.append(tokens[i])
            i = parents[i]
        return out[::-1]

    frontier = children(proposal, -1, 1)
    for depth in range(2, shape.num_steps + 1):
        level = [c for i in frontier for c in children(drafter.path(path_to(i), position), i, depth)]
        frontier = sorted(level, key=lambda i: -scores[i])[: shape.topk]
    kept = sorted(range(len(tokens)), key=lambda i: (-scores[i], depths[i], i))[: shape.num_draft_tokens - 1]
    order = sorted(kept, key=lambda i: (depths[i], parents[i] if parents[i] < 0 else kept.index(parents[i]),
                                        -scores[i], i))
    where = {old: new for new, old in enumerate(order)}
    return DraftTree(tokens=[tokens[i] for i in order], parents=[where[parents[i]] if parents[i] >= 0 else -1
                                                                 for i in order],
                     depths=[depths[i] for i in order])


def accept_tree(tree: DraftTree, target_logits: torch.Tensor, temperature: float,
                gen: torch.Generator | None) -> tuple[list[int], int]:
    """The acceptance rule for one tree verification: (the accepted nodes, root to leaf, and the token that
    follows). `target_logits` [1 + nodes, V]: row 0 the root's, row 1 + i node i's.

    Greedy: follow the child equal to the target's argmax while there is one. At T > 0, at each node the
    children are tried in order (their draft probabilities falling) by recursive rejection sampling with
    the drafts taken as given: child x is accepted with probability p(x) under the target's current
    distribution p, else p loses x and is renormalised; when every child is rejected the next token is
    sampled from what is left of p. Each token produced is distributed exactly as the target samples it."""
    kids: dict[int, list[int]] = {}
    for i, parent in enumerate(tree.parents):
        kids.setdefault(parent, []).append(i)
    path, node = [], -1
    while True:
        logits = target_logits[node + 1]
        options = kids.get(node, [])
        if temperature == 0:
            best = int(logits.argmax())
            match = next((c for c in options if tree.tokens[c] == best), None)
            if match is None:
                return path, best
            path.append(match)
            node = match
            continue
        p = torch.softmax(logits.double() / temperature, -1)
        for c in options:
            x = tree.tokens[c]
            u = float(torch.rand((), generator=gen, dtype=torch.float64, device=p.device))
            if u < p[x]:
                break
            p[x] = 0.0
            total = p.sum()
            if total <= 0:  # the children held all of p's mass
                return path, int(torch.softmax(logits.double() / temperature, -1).argmax())
            p /= total
        else:
            return path, int(torch.multinomial(p, 1, generator=gen))
        path.append(c)
        node = c


@torch.no_grad()
def speculative_generate_tree(target: FrozenTarget, drafter: Drafter, prompt_ids: list[int], *, tree: TreeShape,
                              max_new_tokens: int, temperature: float = 0.0, eos_ids=(),
                              gen: torch.Generator | None = None) -> Generation:
    """speculative_generate with a draft tree per round (draft_tree, verified by one target forward with
    a tree attention mask, accept_tree); the drafter commits the accepted path with the target's
    features at its nodes. `Generation.accepted` counts accepted nodes (at most tree.num_steps)."""

    def play_round(cached, proposal, last, length):
        drafted = draft_tree(drafter, DraftStep(proposal.logits.to(cached.device)), length - 1, tree)
        verify = cached.forward_tree([last] + drafted.tokens, [length - 1] + [length - 1 + d for d in drafted.depths],
                                     [-1] + [p + 1 for p in drafted.parents])
        path, nxt = accept_tree(drafted, verify.logits, temperature, gen)
        rows = [0] + [i + 1 for i in path]
        cached.keep_nodes(length - 1, rows)
        return [drafted.tokens[i] for i in path] + [nxt], verify, rows

    return _decode(target, drafter, prompt_ids, play_round, tree.num_steps, max_new_tokens=max_new_tokens,
                   temperature=temperature, eos_ids=eos_ids, gen=gen)


@torch.no_grad()
def greedy_generate(target: FrozenTarget, prompt_ids: list[int], max_new_tokens: int, eos_ids=()) -> list[int]:
    """Plain greedy decoding, one target forward per token (the reference speculative greedy must equal)."""
    cached = _CachedTarget(target)
    step = cached.prefill(prompt_ids)
    out = [int(step.logits[-1].argmax())]
    while len(out) < max_new_tokens and out[-1] not in set(eos_ids):
        step = cached.forward(out[-1:], len(prompt_ids) + len(out) - 1)
        out.append(int(step.logits[-1].argmax()))
    return out


# ---------------------------------------------------------------------------- over a prompt set


@dataclass
class EvalResult:
    """τ and per-position acceptance over a prompt set, and the generated text."""

    tau: float  # tokens per verify forward
    acceptance: list[float]  # per draft position j: P(d_j accepted | d_1..d_{j-1} accepted)
    verify_forwards: int
    tokens: int
    temperature: float
    num_draft_tokens: int  # chain: k; tree: its num_steps (the deepest node), acceptance being per level
    samples: list[dict]
    tree: dict | None = None  # the TreeShape decoded with, None for chain decoding

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(generations: list[Generation], temperature: float, samples: list[dict],
              tree: TreeShape | None = None) -> EvalResult:
    """τ and per-position acceptance of a set of generations."""
    k = generations[0].num_draft_tokens if generations else 0
    reached, accepted = [0] * k, [0] * k
    steps = [a for g in generations for a in g.accepted]
    for a in steps:
        for j in range(k):
            reached[j] += j <= a
            accepted[j] += j < a
    return EvalResult(
        tau=(sum(a + 1 for a in steps) / len(steps)) if steps else 0.0,
        acceptance=[accepted[j] / reached[j] if reached[j] else 0.0 for j in range(k)],
        verify_forwards=len(steps),
        tokens=sum(len(g.tokens) for g in generations),
        temperature=temperature,
        num_draft_tokens=k,
        samples=samples,
        tree=asdict(tree) if tree is not None else None,
    )


def _eos_ids(tokenizer, target: FrozenTarget) -> list[int]:
    ids = getattr(target.config, "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


def evaluate(target: FrozenTarget, tokenizer, drafter: Drafter, prompts: list[EvalPrompt], *, num_draft_tokens: int = 4,
             max_new_tokens: int = 128, temperature: float = 0.0, seed: int = 0, progress=None,
             tree: TreeShape | None = None) -> EvalResult:
    """Speculative decoding over `prompts` (multi-turn prompts answer each turn in turn, the model's own
    replies kept as history); τ, acceptance per draft position, and the text of each reply. With `tree`,
    each round drafts and verifies an EAGLE-2 tree of that shape instead of a chain of
    `num_draft_tokens`. `progress(done, total)` is called after each prompt."""
    if tree is not None and str(getattr(target.config, "_attn_implementation", "")).startswith("flash"):
        raise ValueError("tree τ verifies a draft tree with an attention mask, which flash attention does not "
                         "take: load the target with target.attn_implementation=sdpa")
    gen = torch.Generator(device=target.lm_head_weight.device).manual_seed(seed)
    eos = _eos_ids(tokenizer, target)
    generations, samples = [], []
    for prompt in prompts:
        history = list(prompt.messages)
        turns = prompt.turns or [None]
        replies = []
        for turn in turns:
            if turn is not None:
                history.append({"role": "user", "content": turn})
            ids = tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=True, return_dict=False)
            if tree is None:
                g = speculative_generate(target, drafter, list(ids), num_draft_tokens=num_draft_tokens,
                                         max_new_tokens=max_new_tokens, temperature=temperature, eos_ids=eos, gen=gen)
            else:
                g = speculative_generate_tree(target, drafter, list(ids), tree=tree, max_new_tokens=max_new_tokens,
                                              temperature=temperature, eos_ids=eos, gen=gen)
            generations.append(g)
            text = tokenizer.decode(g.tokens, skip_special_tokens=True)
            replies.append(text)
            history.append({"role": "assistant", "content": text})
        samples.append({"id": prompt.id, "replies": replies})
        if progress is not None:
            progress(len(samples), len(prompts))
    return summarize(generations, temperature, samples, tree)


# ------------------------------------------------------------------------------------ baselines


class BigramDrafter(Drafter):
    """A context-free baseline: proposes from counts of which token followed which in trained text
    (argmax when greedy, the count distribution when sampling); unigram counts for unseen tokens.

    The counts are kept sparse (the distinct pairs seen, sorted), so a 128k-token vocabulary costs what
    the data holds, not V² entries; a row is filled in when a token is drafted from."""

    feature = None

    def __init__(self, pairs: torch.Tensor, counts: torch.Tensor, vocab_size: int):
        self.vocab_size = vocab_size
        self.pairs, self.counts = pairs, counts.float()  # sorted pair ids a·V + b, and how often b followed a
        self.unigram = torch.bincount(pairs % vocab_size, weights=self.counts, minlength=vocab_size)

    @classmethod
    def from_examples(cls, examples, vocab_size: int, progress=None) -> BigramDrafter:
        """Counts of (token, next token) where the next token is trained (loss_mask 1). `progress(done,
        total)` is called now and then (counting a large data set takes a while)."""
        chunks, total = [], len(examples)
        for i, e in enumerate(examples):
            ids = torch.as_tensor(e.input_ids, dtype=torch.long)
            mask = torch.as_tensor(e.loss_mask[1:], dtype=torch.bool)
            chunks.append((ids[:-1] * vocab_size + ids[1:])[mask])
            if progress is not None and (i + 1) % 2000 == 0:
                progress(i + 1, total)
        pairs, counts = torch.unique(torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.long),
                                     return_counts=True)
        if progress is not None:
            progress(total, total)
        return cls(pairs, counts, vocab_size)

    def reset(self) -> None:
        pass

    def _propose(self, token: int) -> DraftStep:
        v = self.vocab_size
        lo, hi = (int(i) for i in torch.searchsorted(self.pairs, torch.tensor([token * v, (token + 1) * v])))
        if hi > lo:
            row = torch.zeros(v)
            row[self.pairs[lo:hi] - token * v] = self.counts[lo:hi]
        else:
            row = self.unigram
        return DraftStep(logits=row.log())  # −inf where never seen: never proposed

    def extend(self, features, tokens, positions) -> DraftStep:
        return self._propose(int(tokens[-1]))

    def chain(self, token: int, position: int) -> DraftStep:
        return self._propose(token)


# ------------------------------------------------------------------------------ a draft directory


def _say(text: str, end: str = "\n") -> None:
    """Progress on stderr (the results table goes to stdout)."""
    print(text, end=end, file=sys.stderr, flush=True)


def evaluate_draft(recipe, draft_dir, prompts_path: str, *, temperatures=(0.0,), num_prompts: int | None = None,
                   skip_prompts: int = 0, num_draft_tokens: int = 4, max_new_tokens: int = 128, seed: int = 0,
                   bigram: bool = False, verbose: bool = False, tree: TreeShape | None = None) -> dict:
    """Load the recipe's target and the draft in `draft_dir` (any layout export.load_draft reads) and
    measure τ at each temperature; `bigram` adds the bigram baseline counted from the recipe's data.
    With `tree`, each drafter is also measured with draft trees of that shape (`NAME tree` beside `NAME`).
    `verbose` says on stderr what it is doing (reading and counting the data, each prompt decoded).
    Returns {"draft", "prompts", "results": {name: {str(T): EvalResult dict}}}."""
    say = _say if verbose else (lambda text, end="\n": None)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(recipe.target)
    model = load_target_model(recipe.target, device)
    dtype = model.get_output_embeddings().weight.dtype
    head = load_draft(draft_dir, model.get_input_embeddings().weight, model.get_output_embeddings().weight)
    head = cast_parameters(head.to(device), dtype)  # RoPE's inv_freq stays fp32
    aux_ids = recipe.target.aux_layer_ids or aux_layer_ids_of(head.config)
    d2t = getattr(head, "d2t", None)
    ids = draft_ids(d2t.to(device)) if d2t is not None and d2t.numel() else \
        torch.zeros(1, dtype=torch.long, device=device)
    target = FrozenTarget(model, aux_ids, ids)
    prompts = load_prompts(prompts_path, limit=num_prompts, skip=skip_prompts)
    drafters = {"draft": drafter_for(head)}
    if bigram:
        say(f"bigram: reading and tokenizing the recipe's data ({', '.join(s.path for s in recipe.data.sources)})")
        data = prepare_data(recipe.data, tokenizer)
        drafters["bigram"] = BigramDrafter.from_examples(
            data.examples, model.get_output_embeddings().weight.shape[0],
            progress=lambda done, total: say(f"\rbigram: counted {done}/{total} sequences",
                                             "\n" if done == total else ""))
    results: dict = {}
    shapes = {"": None, " tree": tree} if tree is not None else {"": None}
    for name, drafter in drafters.items():
        for suffix, shape in shapes.items():
            for t in temperatures:
                label = f"{name}{suffix} T={t:g}"
                say(f"{label}: decoding {len(prompts)} prompts")
                result = evaluate(target, tokenizer, drafter, prompts, num_draft_tokens=num_draft_tokens,
                                  max_new_tokens=max_new_tokens, temperature=t, seed=seed, tree=shape,
                                  progress=lambda done, total, label=label: say(f"\r{label}: {done}/{total} prompts",
                                                                                "\n" if done == total else ""))
                results.setdefault(name + suffix, {})[str(t)] = result.to_dict()
    return {"draft": str(draft_dir), "prompts": prompts_path, "num_prompts": len(prompts), "results": results}


def format_table(results: dict) -> str:
    """A text table of {name: {temperature: EvalResult dict}}: τ and acceptance per draft position (per
    tree level for a tree, whose shape is named below the table)."""
    lines = [f"{'draft':<12} {'T':>5} {'tau':>6}  acceptance per position"]
    shapes = {json_shape(r["tree"]) for by_t in results.values() for r in by_t.values() if r.get("tree")}
    for name, by_t in results.items():
        for t, r in by_t.items():
            acc = " ".join(f"{a:.2f}" for a in r["acceptance"])
            lines.append(f"{name:<12} {float(t):>5.2f} {r['tau']:>6.3f}  {acc}")
    for shape in sorted(shapes):
        lines.append(f"tree: {shape}; the other rows draft a chain of k tokens")
    return "\n".join(lines)


def json_shape(tree: dict) -> str:
    """A TreeShape's dict in SGLang's words."""
    return (f"--speculative-eagle-topk {tree['topk']} --speculative-num-steps {tree['num_steps']} "
            f"--speculative-num-draft-tokens {tree['num_draft_tokens']}")
