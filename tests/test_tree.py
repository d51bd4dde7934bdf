"""Tree-shaped speculative decoding (EAGLE-2's dynamic tree, as SGLang runs it): the tree built, its
verification in one masked target forward, greedy output equal to plain greedy for every head, and the
T > 0 rule producing the target's own distribution."""
import pytest
import torch

from eagle_online.evaluate import (
    DraftTree,
    TreeShape,
    _CachedTarget,
    accept_tree,
    draft_tree,
    greedy_generate,
    speculative_generate,
    speculative_generate_tree,
)
from eagle_online.heads import EAGLE3, drafter_for
from eagle_online.heads.base import Drafter, DraftStep
from eagle_online.heads.eagle import ARCHITECTURE as EAGLE
from eagle_online.heads.mlp import ARCHITECTURE as MLP
from tests.test_evaluate import VOCAB, _head, _target


class _Fixed(Drafter):
    """Proposes a fixed distribution that depends on the path: log-probabilities from a seeded table
    indexed by the last token, so expansions differ by branch and are reproducible."""

    def __init__(self, vocab=12, seed=0):
        self.table = torch.log_softmax(2 * torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed),
                                                       dtype=torch.float64), -1)
        self.calls = 0

    def reset(self):
        pass

    def chain(self, token, position):
        self.calls += 1
        return DraftStep(self.table[token])


def _paths(tree: DraftTree):
    out = []
    for i in range(len(tree.tokens)):
        path, j = [], i
        while j >= 0:
            path.append(tree.tokens[j])
            j = tree.parents[j]
        out.append(tuple(path[::-1]))
    return out


def test_draft_tree_keeps_the_best_nodes_by_cumulative_probability():
    """Against a brute force over the same expansion rule: the kept nodes are the num_draft_tokens - 1
    best of every node generated, ancestors kept, parents before children, depths right."""
    drafter = _Fixed()
    root = DraftStep(drafter.table[3])
    shape = TreeShape(topk=3, num_steps=4, num_draft_tokens=10)
    tree = draft_tree(drafter, root, position=0, shape=shape)
    assert len(tree.tokens) == 9
    for i, (p, d) in enumerate(zip(tree.parents, tree.depths)):
        assert p < i and d == (1 if p < 0 else tree.depths[p] + 1)
    # brute force: the same rule written as levels of (path, score)
    table = drafter.table

    def kids(path, score, last):
        top = table[last].topk(3)
        return [(path + (t,), score + v) for v, t in zip(top.values.tolist(), top.indices.tolist())]

    level = kids((), 0.0, 3)
    everything = list(level)
    for _ in range(3):
        frontier = sorted(level, key=lambda x: -x[1])[:3]
        level = [k for path, score in frontier for k in kids(path, score, path[-1])]
        everything += level
    best = sorted(everything, key=lambda x: (-x[1], len(x[0])))[:9]
    assert set(_paths(tree)) == {p for p, _ in best}
    assert max(tree.depths) <= 4 and drafter.calls > 0


def test_accept_tree_greedy_follows_the_targets_argmax():
    # root -> A(5), B(7); A -> C(2); B -> D(9)
    tree = DraftTree(tokens=[5, 7, 2, 9], parents=[-1, -1, 0, 1], depths=[1, 1, 2, 2])
    logits = torch.zeros(5, 12)
    logits[0, 7] = 5  # root: B
    logits[2, 9] = 5  # B (row 1 + 1): D
    logits[4, 4] = 5  # D (row 1 + 3): 4, not a draft
    assert accept_tree(tree, logits, 0.0, None) == ([1, 3], 4)
    logits[0] = 0
    logits[0, 1] = 5  # no child matches
    assert accept_tree(tree, logits, 0.0, None) == ([], 1)


def test_accept_tree_sampling_is_the_targets_distribution():
    """At T = 1 the first token produced is distributed as softmax(target logits), whatever the drafts,
    and a child is accepted exactly as often as the target would have sampled it."""
    tree = DraftTree(tokens=[0, 1, 3], parents=[-1, -1, -1], depths=[1, 1, 1])
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.2, 0.1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]]))
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    n = 20000
    for _ in range(n):
        path, nxt = accept_tree(tree, logits, 1.0, gen)
        counts[tree.tokens[path[0]] if path else nxt] += 1
    freq = counts / n
    assert torch.allclose(freq, torch.tensor([0.5, 0.2, 0.2, 0.1]), atol=0.015), freq


def test_tree_verification_equals_each_path_run_alone():
    """One forward over a tree with its mask gives, at every node, the logits of the plain forward over
    the node's path; keep_nodes leaves the cache as if the accepted path had been decoded."""
    _, target, _, _ = _target()
    prompt = list(range(5, 14))
    tree = DraftTree(tokens=[20, 30, 40, 50], parents=[-1, -1, 0, 2], depths=[1, 1, 2, 3])
    n = len(prompt)
    cached = _CachedTarget(target)
    cached.forward(prompt[:-1], 0)
    out = cached.forward_tree([prompt[-1]] + tree.tokens, [n - 1] + [n - 1 + d for d in tree.depths],
                              [-1] + [p + 1 for p in tree.parents])
    for node, path in ((0, [20]), (1, [30]), (2, [20, 40]), (3, [20, 40, 50])):
        alone = _CachedTarget(target).forward(prompt + path, 0)
        torch.testing.assert_close(out.logits[node + 1], alone.logits[-1])
    cached.keep_nodes(n - 1, [0, 1, 3, 4])  # the root, 20, 40, 50
    again = cached.forward([7], n + 3)
    torch.testing.assert_close(again.logits[-1], _CachedTarget(target).forward(prompt + [20, 40, 50, 7], 0).logits[-1])


@pytest.mark.parametrize("arch", [EAGLE3, EAGLE, MLP])
def test_greedy_tree_decoding_equals_plain_greedy(arch):
    model, target, d2t, t2d = _target()
    head = _head(arch, target, d2t, t2d)
    prompt = torch.randint(0, VOCAB, (11,), generator=torch.Generator().manual_seed(3)).tolist()
    reference = greedy_generate(target, prompt, 40)
    for shape in (TreeShape(topk=1, num_steps=3, num_draft_tokens=4), TreeShape(topk=4, num_steps=3,
                                                                                num_draft_tokens=10)):
        g = speculative_generate_tree(target, drafter_for(head), prompt, tree=shape, max_new_tokens=40)
        assert g.tokens == reference, (arch, shape)
        assert max(g.accepted) <= shape.num_steps


def test_a_chain_shaped_tree_accepts_what_the_chain_accepts():
    """topk 1 with num_steps + 1 nodes is the chain: the same acceptances, round by round."""
    _, target, d2t, t2d = _target()
    head = _head(EAGLE3, target, d2t, t2d)
    prompt = torch.randint(0, VOCAB, (11,), generator=torch.Generator().manual_seed(4)).tolist()
    chain = speculative_generate(target, drafter_for(head), prompt, num_draft_tokens=3, max_new_tokens=40)
    tree = speculative_generate_tree(target, drafter_for(head), prompt, tree=TreeShape(1, 3, 4), max_new_tokens=40)
    assert tree.accepted == chain.accepted and tree.tokens == chain.tokens


@pytest.mark.slow
def test_on_a_trained_draft_the_tree_accepts_at_least_the_chain(tmp_path):
    """A tiny EAGLE-1 draft trained for a few steps, measured greedily on held-out ShareGPT prompts: the
    tree (top-4, 3 levels, 12 nodes) accepts at least what the 3-token chain does, averaged over the
    prompts, and the tree's output is the chain's (both are the target's greedy reply)."""
    from eagle_online.evaluate import evaluate, load_prompts
    from eagle_online.recipe import load_recipe
    from eagle_online.trainer import Trainer

    recipe = load_recipe("tiny_eagle1", [f"run.output_dir={tmp_path / 'run'}", "data.sources.0.max_rows=300",
                                         "data.tokens_per_batch=2048", "data.max_length=512", "training.max_steps=30",
                                         "training.progress_bar=false", "training.export_at_end=false",
                                         "eval.every=null", "training.log_every=10"])
    trainer = Trainer(recipe)
    trainer.setup()
    trainer.train()
    drafter = drafter_for(trainer.unwrapped_head().eval())
    prompts = load_prompts("builtin:sharegpt", limit=6, skip=5000)
    common = dict(max_new_tokens=32, temperature=0.0)
    chain = evaluate(trainer.target, trainer.tokenizer, drafter, prompts, num_draft_tokens=3, **common)
    tree = evaluate(trainer.target, trainer.tokenizer, drafter, prompts, tree=TreeShape(4, 3, 12), **common)
    assert chain.tau > 1.05, chain.tau  # trained: the comparison is not between two drafts that never hit
    assert tree.tau >= chain.tau, (tree.tau, chain.tau)
    assert [s["replies"] for s in tree.samples] == [s["replies"] for s in chain.samples]
    assert tree.tree == {"topk": 4, "num_steps": 3, "num_draft_tokens": 12} and chain.tree is None
