"""The MLP speculator (heads/mlp_speculator.py): its training forward against a loss written by hand,
greedy speculative decoding equal to plain greedy, its export read by a re-implementation of vLLM's
MLPSpeculator written here from vLLM's source (not by calling the head), export refusals, import (with
IBM's `speculator.` prefix and tied weights), the recipe's n_predict rules and a few training steps."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from eagle_online.data.packing import PackedBatch
from eagle_online.errors import RecipeError
from eagle_online.evaluate import greedy_generate, speculative_generate
from eagle_online.export import export_head, load_draft, serve_commands
from eagle_online.heads import architecture_of, build_head, draft_config, drafter_for
from eagle_online.heads.eagle import ARCHITECTURE as EAGLE
from eagle_online.heads.mlp_speculator import ARCHITECTURE as SPEC
from eagle_online.heads.mlp_speculator import MLPSpeculatorHead
from eagle_online.layout import ExportError
from eagle_online.losses import soft_cross_entropy
from eagle_online.recipe import DraftConfig, load_recipe
from eagle_online.target import FrozenTarget, TargetOutput
from tests.conftest import tiny_llama_config

V, H = 97, 32


def _head(n_predict=3, seed=1, **draft) -> MLPSpeculatorHead:
    """A fresh head with random norms (so a norm mixed up with another would show) and scale_input on."""
    torch.manual_seed(seed)
    dc = DraftConfig(architecture=SPEC, draft_vocab_size=V, n_predict=n_predict, **draft)
    head = build_head(draft_config(SPEC, tiny_llama_config(), dc, V), dc)
    with torch.no_grad():
        for p in head.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return head


def _batch_and_target(lengths=(8, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    t = pos.shape[1]
    batch = PackedBatch(input_ids=torch.randint(0, V, (1, t), generator=g), position_ids=pos,
                        loss_mask=torch.ones(1, t, dtype=torch.long), num_conversations=len(lengths))
    target = TargetOutput(aux_hidden=torch.randn(1, t, 3 * H, generator=g),
                          last_hidden=3 * torch.randn(1, t, H, generator=g),
                          teacher_logits=torch.randn(1, t, V, generator=g),
                          teacher_in_draft=torch.ones(1, t, dtype=torch.bool))
    return batch, target


def test_training_forward_by_hand():
    """Stage i at t: the state from h_t (stage 0) or stage i−1's, token x_{t+1+i}, the teacher at t+1+i,
    scored where x_{t+2+i} lies in t's conversation; loss = Σ decay^i · softCE_i, written out here."""
    head = _head(loss_decay=0.5)
    batch, target = _batch_and_target()
    out = head(target, batch)
    x, h, teacher = batch.input_ids[0], target.last_hidden[0], target.teacher_logits[0]
    sw = 0.5 ** (0.5 / 3)
    ew = math.sqrt((1 - sw**2) * H / 2)
    state = h / h.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() / math.sqrt(2)  # scale_input
    expected, counts = 0.0, []
    for i in range(3):
        prev = state
        state = torch.zeros(14, H)
        for t in range(14 - 1 - i):
            u = head.proj[i].weight @ prev[t] + head.emb[i].weight[x[t + 1 + i]] * ew / sw
            u = u / u.pow(2).mean().add(1e-6).sqrt() * head.ln[i].weight + head.ln[i].bias
            state[t] = F.gelu(u)
        rows = torch.tensor([t for t in range(14) if t + 2 + i < 8 or 8 <= t < 12 - i])
        counts.append(len(rows))
        ce = soft_cross_entropy(state[rows] @ head.head[i].weight.T, teacher[rows + 1 + i].softmax(-1))
        expected = expected + 0.5**i * ce
    assert out.metrics.counts == counts == [10, 8, 6]
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


def test_the_draft_vocabulary_must_be_the_whole_vocabulary():
    dc = DraftConfig(architecture=SPEC, draft_vocab_size=40)
    with pytest.raises(RecipeError, match=f"draft.draft_vocab_size={V}"):
        draft_config(SPEC, tiny_llama_config(), dc, V)


def test_recipe_keys():
    """n_predict is this head's; the evaluation drafts no more tokens than it has stages."""
    with pytest.raises(RecipeError, match="n_predict is a setting of the MLPSpeculatorPreTrainedModel head"):
        load_recipe("tiny_eagle1", ["draft.n_predict=4"])
    recipe = load_recipe("tiny_mlp_speculator")
    assert recipe.draft.architecture == SPEC and recipe.eval.num_draft_tokens <= recipe.draft.n_predict
    with pytest.raises(RecipeError, match="drafts at most draft.n_predict"):
        load_recipe("tiny_mlp_speculator", [f"eval.num_draft_tokens={recipe.draft.n_predict + 1}"])
    load_recipe("tiny_mlp_speculator", ["draft.loss_decay=0.5"])  # shared with EAGLE-3


def _target(seed=0):
    torch.manual_seed(seed)
    cfg = tiny_llama_config()
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).to(torch.float64).eval()
    return model, FrozenTarget(model, None, torch.arange(V))


def test_greedy_speculative_decoding_equals_plain_greedy():
    model, target = _target()
    head = _head(n_predict=3).to(torch.float64)
    head.init_from_target(target.embed_weight, target.lm_head_weight)
    prompt = torch.randint(0, V, (11,), generator=torch.Generator().manual_seed(3)).tolist()
    reference = greedy_generate(target, prompt, 40)
    for k in (1, 2, 3):
        assert speculative_generate(target, drafter_for(head), prompt, num_draft_tokens=k,
                                    max_new_tokens=40).tokens == reference, k
    with pytest.raises(ValueError, match="at most 3 tokens per step"):
        speculative_generate(target, drafter_for(head), prompt, num_draft_tokens=4, max_new_tokens=8)


def _vllm_proposals(folder, hidden: torch.Tensor, token: int, k: int) -> tuple[list[int], list[torch.Tensor]]:
    """vLLM's MLPSpeculator.generate_proposals (vllm/model_executor/models/mlp_speculator.py), greedy,
    from the folder's config.json and model.safetensors alone, in float64: the tokens and each stage's logits."""
    cfg = json.loads((folder / "config.json").read_text())
    w = {n.removeprefix("speculator."): t.double() for n, t in load_file(str(folder / "model.safetensors")).items()}
    assert cfg["architectures"] == ["MLPSpeculatorPreTrainedModel"] and cfg["model_type"] == "mlp_speculator"
    assert len(cfg["top_k_tokens_per_head"]) == cfg["n_predict"]  # MLPSpeculatorConfig asserts it
    inner = cfg["inner_dim"] or cfg["emb_dim"]
    state_weight = 0.5 ** (0.5 / cfg["n_predict"])
    emb_weight = math.sqrt((1 - state_weight**2) * (inner / 2))

    def ln(x, i=None):  # MLPSpeculatorLayerNorm, eps 1e-6; ln0 has no weight or bias
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return x if i is None else w[f"ln.{i}.weight"] * x + w[f"ln.{i}.bias"]

    states = hidden.double()[None]
    if cfg["scale_input"]:
        states = ln(states) / 2**0.5
    last, out, logits = token, [], []
    for i in range(k):
        z = w[f"emb.{i}.weight"][last]
        states = states @ w[f"proj.{i}.weight"].T
        states = states + z * (emb_weight / state_weight)
        states = torch.nn.GELU()(ln(states, i))
        logits.append((states @ w[f"head.{i}.weight"].T)[0])
        last = int(logits[-1].argmax(-1))
        out.append(last)
    return out, logits


def _drafter_proposals(head, hidden, token, k) -> tuple[list[int], list[torch.Tensor]]:
    drafter = drafter_for(head)
    drafter.reset()
    logits = [drafter.extend(hidden[None], torch.tensor([token]), torch.tensor([5])).logits]
    out = [int(logits[0].argmax())]
    for j in range(k - 1):
        logits.append(drafter.chain(out[-1], 6 + j).logits)
        out.append(int(logits[-1].argmax()))
    return out, logits


@pytest.mark.parametrize("scale_input", [True, False])
def test_export_is_what_vllm_proposes(tmp_path, scale_input):
    """The export read by vLLM's forward (re-implemented above from its source) proposes what our drafter
    does, on the target's post-norm hidden states (the state vLLM hands the speculator)."""
    model, target = _target()
    head = _head(n_predict=4).double()
    head.scale_input = scale_input
    head.config.scale_input = scale_input
    export_head(head, tmp_path / "out")
    prompt = torch.randint(0, V, (9,), generator=torch.Generator().manual_seed(5))
    hidden = target.features(prompt[None], torch.arange(9)[None]).last_hidden[0]  # what the drafters are fed
    torch.testing.assert_close(hidden @ target.lm_head_weight.T, model(prompt[None]).logits[0])  # post-norm
    for t in (3, 8):
        ours, our_logits = _drafter_proposals(head, hidden[t], int(prompt[t]), 4)
        theirs, their_logits = _vllm_proposals(tmp_path / "out", hidden[t], int(prompt[t]), 4)
        assert ours == theirs
        torch.testing.assert_close(torch.stack(our_logits).double(), torch.stack(their_logits))
    assert len(set(ours)) > 1  # the proposals depend on the stage


def test_export_refuses_a_missing_tensor_and_writes_nothing(tmp_path):
    head = _head()
    del head.ln[2]
    with pytest.raises(ExportError, match="missing tensor ln.2.weight; missing tensor ln.2.bias"):
        export_head(head, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


def test_load_draft_round_trip_prefix_and_tied(tmp_path):
    head = _head(n_predict=3)
    export_head(head, tmp_path / "ours")
    loaded = load_draft(tmp_path / "ours")
    assert architecture_of(loaded.config) == SPEC and loaded.scale_input == head.scale_input
    for name, t in head.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    # IBM's fms checkpoints: `speculator.` prefixed names
    ibm = tmp_path / "ibm"
    ibm.mkdir()
    cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    (ibm / "config.json").write_text(json.dumps(cfg))
    save_file({"speculator." + n: t for n, t in load_file(str(tmp_path / "ours" / "model.safetensors")).items()},
              str(ibm / "model.safetensors"))
    prefixed = load_draft(ibm)
    for name, t in head.state_dict().items():
        assert torch.equal(prefixed.state_dict()[name], t), name
    # tie_weights: the later stages share stage 0's emb, ln, head and stage 1's proj
    tied = tmp_path / "tied"
    tied.mkdir()
    tensors = load_file(str(tmp_path / "ours" / "model.safetensors"))
    shared = {n: t for n, t in tensors.items() if n.endswith(".0.weight") or n.endswith(".0.bias")
              or n == "proj.1.weight"}
    (tied / "config.json").write_text(json.dumps({**cfg, "tie_weights": True}))
    save_file(shared, str(tied / "model.safetensors"))
    untied = load_draft(tied)
    assert torch.equal(untied.head[2].weight, tensors["head.0.weight"])
    assert torch.equal(untied.proj[2].weight, tensors["proj.1.weight"])
    # a missing stage is refused, naming the file and the tensor
    save_file({n: t for n, t in tensors.items() if n != "head.1.weight"}, str(ibm / "model.safetensors"))
    with pytest.raises(ExportError, match="config.json: missing tensor head.1.weight"):
        load_draft(ibm)


def test_serve_command_is_vllms_only():
    commands = serve_commands("m", "/d", SPEC, num_speculative_tokens=4)
    assert set(commands) == {"vllm"}
    spec = json.loads(commands["vllm"].split("--speculative-config ", 1)[1].strip("'"))
    assert spec == {"method": "mlp_speculator", "model": "/d", "num_speculative_tokens": 4}
    assert set(serve_commands("m", "/d", EAGLE)) == {"vllm", "sglang"}


def test_a_few_steps_lower_the_loss():
    """On a fixed batch from a tiny random target, twenty Adam steps lower the loss at every stage."""
    model, target = _target()
    model.float()
    with torch.no_grad():  # a random target's teacher is near uniform (soft-CE ≈ its entropy): sharpen it
        model.lm_head.weight.mul_(30)
    frozen = FrozenTarget(model, None, torch.arange(V))
    head = _head(n_predict=2)
    head.init_from_target(frozen.embed_weight.float(), frozen.lm_head_weight.float())
    ids = torch.randint(0, V, (1, 24), generator=torch.Generator().manual_seed(7))
    pos = torch.arange(24)[None]
    batch = PackedBatch(input_ids=ids, position_ids=pos, loss_mask=torch.ones(1, 24, dtype=torch.long),
                        num_conversations=1)
    with torch.no_grad():
        out = frozen(ids, pos)
    opt = torch.optim.Adam(head.trainable_parameters(), lr=3e-3)
    first = head(out, batch).metrics.losses
    for _ in range(20):
        opt.zero_grad()
        head(out, batch).loss.backward()
        opt.step()
    last = head(out, batch).metrics.losses
    assert all(b < 0.8 * a for a, b in zip(first, last)), (first, last)
