"""Importing existing drafts: EAGLE-3 in the official (SafeAILab), SpecForge/SGLang and vLLM speculators
layouts load and export again to the same tensors; the EAGLE-1/2 and MLP exports are the documented
layouts and load back exactly; a recipe's draft.init_from continues training from an import.

The fixtures are written here the way those projects write them: the official EAGLE-3 releases ship
config.json (a transformers-4 LlamaConfig with `draft_vocab_size`) + pytorch_model.bin with `midlayer.*`,
`fc`, `norm`, `lm_head`, `d2t`, `t2d` and no embedding; SpecForge saves its LlamaForCausalLMEagle3 with
save_pretrained (model.safetensors, embed_tokens included); vLLM speculators nests the layer config
under `transformer_layer_config` (speculators_model_type "eagle3", architectures ["Eagle3Speculator"])
and names the layer `layers.0.*`.
"""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from eagle_online.export import ExportError, export_head, load_draft
from eagle_online.heads import build_head, draft_config
from eagle_online.heads.eagle import TENSORS as EAGLE_TENSORS
from eagle_online.heads.eagle import EagleHead
from eagle_online.heads.eagle3 import Eagle3Head
from eagle_online.heads.mlp import ARCHITECTURE as MLP
from eagle_online.heads.mlp import MLPHead
from eagle_online.layout import aux_layer_ids_of, cast_parameters
from eagle_online.recipe import DraftConfig
from tests.test_export import DEFAULT_IDS, DRAFT_VOCAB, LAYERS, VOCAB, _head, _saved, _target_config

LAYER_FIELDS = dict(hidden_act="silu", hidden_size=32, intermediate_size=64, max_position_embeddings=128,
                    model_type="llama", num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                    vocab_size=VOCAB, tie_word_embeddings=False)


def _served(head) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in head.state_dict().items() if k != "embed_tokens.weight"}


def _official(tmp_path, head, extra=None):
    d = tmp_path / "official"
    d.mkdir()
    cfg = {"architectures": ["LlamaForCausalLMEagle3"], "bos_token_id": 1, "eos_token_id": 2, "num_hidden_layers": 1,
           "pad_token_id": 0, "rope_theta": 10000.0, "torch_dtype": "float16", "transformers_version": "4.28.1",
           "use_cache": True, "draft_vocab_size": DRAFT_VOCAB, **LAYER_FIELDS, **(extra or {})}
    (d / "config.json").write_text(json.dumps(cfg))
    torch.save({k: (v.half() if v.is_floating_point() else v) for k, v in _served(head).items()},
               d / "pytorch_model.bin")
    return d


def _specforge(tmp_path, head):
    d = tmp_path / "specforge"
    d.mkdir()
    cfg = {"architectures": ["LlamaForCausalLMEagle3"], "draft_vocab_size": DRAFT_VOCAB, "target_hidden_size": 32,
           "num_hidden_layers": 1, "rope_theta": 10000.0, "rope_scaling": None, "torch_dtype": "bfloat16",
           **LAYER_FIELDS}
    (d / "config.json").write_text(json.dumps(cfg))
    state = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous()
             for k, v in head.state_dict().items()}
    save_file(state, str(d / "model.safetensors"))
    return d


def _speculators(tmp_path, head, ids=None, norm_before_residual=False):
    d = tmp_path / "speculators"
    d.mkdir()
    cfg = {
        "architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3", "speculators_version": "0.2.0",
        "draft_vocab_size": DRAFT_VOCAB, "norm_before_residual": norm_before_residual, "target_hidden_size": None,
        "transformer_layer_config": {**LAYER_FIELDS, "num_hidden_layers": 1, "rope_theta": 10000.0},
        "speculators_config": {"algorithm": "eagle3", "default_proposal_method": "greedy",
                               "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": 5}],
                               "verifier": {"architectures": ["LlamaForCausalLM"], "name_or_path": "some/target"}},
    }
    if ids is not None:
        cfg["eagle_aux_hidden_state_layer_ids"] = ids
    (d / "config.json").write_text(json.dumps(cfg))
    state = {k.replace("midlayer.", "layers.0."): v.contiguous() for k, v in head.state_dict().items()}
    save_file(state, str(d / "model.safetensors"))
    return d


@pytest.mark.parametrize("layout", ["official", "specforge", "speculators"])
def test_eagle3_layouts_load_and_export_the_same_tensors(tmp_path, layout):
    head = _head(seed=3)
    embed = head.embed_tokens.weight.detach().clone()
    src = {"official": _official, "specforge": _specforge, "speculators": _speculators}[layout](tmp_path, head)
    loaded = load_draft(src, embed_weight=embed)
    assert type(loaded) is Eagle3Head and loaded.config.draft_vocab_size == DRAFT_VOCAB
    dtype = {"official": torch.float16, "specforge": torch.bfloat16, "speculators": torch.float32}[layout]
    assert loaded.fc.weight.dtype == dtype
    out = export_head(loaded, tmp_path / "again", DEFAULT_IDS, LAYERS)
    again = _saved(out)
    assert set(again) == set(_served(head))
    for name, t in _served(head).items():
        want = t.to(dtype) if t.is_floating_point() else t
        assert torch.equal(again[name], want), name
    assert aux_layer_ids_of(loaded.config) is None


def test_imported_layer_ids_keep_their_meaning(tmp_path):
    """speculators writes ids as vLLM reads them (as given); an official/SGLang config's eagle_config ids
    are one lower (SGLang adds one). Both come back as the same ids, and export writes both conventions."""
    head = _head()
    via_vllm = load_draft(_speculators(tmp_path, head, ids=[1, 3, 6]), embed_weight=head.embed_tokens.weight)
    sglang_ids = {"eagle_config": {"eagle_aux_hidden_state_layer_ids": [0, 2, 5]}}
    via_sglang = load_draft(_official(tmp_path, head, sglang_ids), embed_weight=head.embed_tokens.weight)
    assert aux_layer_ids_of(via_vllm.config) == aux_layer_ids_of(via_sglang.config) == [1, 3, 6]
    with pytest.warns(UserWarning, match="SGLang"):
        out = export_head(via_vllm, tmp_path / "again", aux_layer_ids_of(via_vllm.config), LAYERS)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [1, 3, 6]
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 2, 5]


def test_unservable_imports_are_refused(tmp_path):
    head = _head()
    with pytest.raises(ExportError, match="norm_before_residual"):
        load_draft(_speculators(tmp_path, head, norm_before_residual=True), embed_weight=head.embed_tokens.weight)
    for flag in ("fc_norm", "norm_output", "norm_before_residual"):  # EAGLE 3.1's norms: the layer computes otherwise
        (tmp_path / flag).mkdir()
        with pytest.raises(ExportError, match=rf"config.json: {flag} is True"):
            load_draft(_official(tmp_path / flag, head, {flag: True}), embed_weight=head.embed_tokens.weight)
    (tmp_path / "nested").mkdir()
    nested = _speculators(tmp_path / "nested", head)
    cfg = json.loads((nested / "config.json").read_text())
    cfg["transformer_layer_config"]["fc_norm"] = True
    (nested / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match=r"transformer_layer_config.fc_norm is True"):
        load_draft(nested, embed_weight=head.embed_tokens.weight)
    (tmp_path / "off").mkdir()
    assert load_draft(_official(tmp_path / "off", head, {"fc_norm": False}), embed_weight=head.embed_tokens.weight)
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ExportError, match="not a draft"):
        load_draft(other)
    with pytest.raises(ExportError, match="embed_tokens"):  # the official layout has none: the target's is needed
        load_draft(_official(tmp_path, head))


def _eagle_head(seed=0, fc_bias=True):
    torch.manual_seed(seed)
    dc = DraftConfig(architecture="LlamaForCausalLMEagle", fc_bias=fc_bias)
    head = build_head(draft_config(dc.architecture, _target_config(), dc, VOCAB), dc)
    g = torch.Generator().manual_seed(seed)
    head.init_from_target(torch.randn(VOCAB, 32, generator=g), torch.randn(VOCAB, 32, generator=g),
                          torch.zeros(DRAFT_VOCAB, dtype=torch.long))
    with torch.no_grad():
        for p in head.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return head


@pytest.mark.parametrize("fc_bias", [True, False])
def test_eagle1_export_is_the_engines_layout_and_loads_back(tmp_path, fc_bias):
    """Golden names/shapes (H 32, 4 heads × 8, 2 kv heads, I 64): layer 0 without input_layernorm, fc
    [H, 2H] (+bias), no embedding, no lm_head, no norm; config names both engines' architectures."""
    head = _eagle_head(fc_bias=fc_bias)
    out = export_head(head, tmp_path / "export")
    saved = _saved(out)
    golden = {
        "fc.weight": (32, 64), "layers.0.self_attn.q_proj.weight": (32, 32),
        "layers.0.self_attn.k_proj.weight": (16, 32),
        "layers.0.self_attn.v_proj.weight": (16, 32), "layers.0.self_attn.o_proj.weight": (32, 32),
        "layers.0.post_attention_layernorm.weight": (32,), "layers.0.mlp.gate_proj.weight": (64, 32),
        "layers.0.mlp.up_proj.weight": (64, 32), "layers.0.mlp.down_proj.weight": (32, 64),
    }
    if fc_bias:
        golden["fc.bias"] = (32,)
    assert {k: tuple(v.shape) for k, v in saved.items()} == golden
    assert set(EAGLE_TENSORS) <= set(golden)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle", "EagleLlamaForCausalLM"]
    assert cfg["num_hidden_layers"] == 1 and cfg["tie_word_embeddings"] is False and cfg["vocab_size"] == VOCAB
    assert "bias" not in cfg  # vLLM's Llama layers would read it as attention_bias
    assert cfg["rope_theta"] == 10000.0
    loaded = load_draft(out, head.embed_tokens.weight, head.lm_head.weight)
    assert type(loaded) is EagleHead and (loaded.fc.bias is not None) == fc_bias
    for name, t in head.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    with pytest.raises(ExportError, match="lm_head"):
        load_draft(out, head.embed_tokens.weight)


def test_mlp_export_loads_back(tmp_path):
    torch.manual_seed(0)
    dc = DraftConfig(architecture=MLP, draft_vocab_size=DRAFT_VOCAB)
    head = build_head(draft_config(MLP, _target_config(), dc, VOCAB), dc)
    ref = _head()
    head.init_from_target(ref.embed_tokens.weight, torch.randn(DRAFT_VOCAB, 32), ref.d2t, ref.t2d)
    out = export_head(head, tmp_path / "mlp")
    assert "embed_tokens.weight" not in _saved(out)
    loaded = load_draft(out, head.embed_tokens.weight)
    assert type(loaded) is MLPHead
    for name, t in head.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name


def test_recipe_init_from_continues_training_an_import(tmp_path):
    """draft.init_from: the trainer starts from the imported weights and vocabulary map (a speculators
    checkpoint shaped for the tiny target), and trains on."""
    from eagle_online.heads.eagle3 import eagle3_config
    from eagle_online.recipe import load_recipe
    from eagle_online.target import load_target_model
    from eagle_online.trainer import Trainer

    recipe = load_recipe("tiny_eagle3")
    target = load_target_model(recipe.target, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    head = Eagle3Head(eagle3_config(target.config, 2048))
    ids = torch.randperm(4096, generator=g)[:2048].sort().values
    t2d = torch.zeros(4096, dtype=torch.bool)
    t2d[ids] = True
    head.init_from_target(target.get_input_embeddings().weight, torch.randn(2048, 128, generator=g),
                          ids - torch.arange(2048), t2d)
    src = tmp_path / "src"
    src.mkdir()
    cfg = {"architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3", "draft_vocab_size": 2048,
           "norm_before_residual": False, "transformer_layer_config": head.config.to_dict()}
    (src / "config.json").write_text(json.dumps(cfg))
    save_file({k.replace("midlayer.", "layers.0."): v.contiguous() for k, v in head.state_dict().items()},
              str(src / "model.safetensors"))

    run = tmp_path / "run"
    recipe = load_recipe("tiny_eagle3", [f"run.output_dir={run}", f"draft.init_from={src}", "draft.ttt_length=2",
                                         "data.sources.0.max_rows=40", "data.tokens_per_batch=2048",
                                         "training.max_steps=2", "training.progress_bar=false"])
    trainer = Trainer(recipe)
    trainer.setup()
    started = trainer.unwrapped_head().state_dict()
    for name, t in head.state_dict().items():
        assert torch.equal(started[name], t), name
    vocab = load_file(str(run / "draft_vocab.safetensors"))
    assert torch.equal(vocab["d2t"], head.d2t) and torch.equal(vocab["t2d"], head.t2d)
    metrics = trainer.train_step(trainer.micro_batches(0))
    assert metrics["loss"] > 0 and not torch.equal(trainer.unwrapped_head().fc.weight, head.fc.weight)
    bad = load_recipe("tiny_eagle3", [f"run.output_dir={tmp_path / 'bad'}", f"draft.init_from={src}",
                                      "draft.draft_vocab_size=1024", "data.sources.0.max_rows=40"])
    with pytest.raises(ExportError, match="draft vocab of 2048"):
        Trainer(bad).setup()


def test_export_run_takes_the_best_checkpoint_by_tau(tmp_path):
    """checkpoints/best.json (written when training evaluates τ) makes export with `best` pick that checkpoint
    over the newest; a best.json naming a deleted checkpoint is ignored."""
    from eagle_online.export import export_run
    from tests.test_export import _fake_run

    best, newest = _head(seed=0), _head(seed=1)
    run = tmp_path / "run"
    _fake_run(run, [("step_00000100", best), ("step_00000200", newest)])
    (run / "checkpoints" / "best.json").write_text(json.dumps({"checkpoint": "step_00000100", "step": 100,
                                                               "tau": 2.5, "prompts": 8}))
    assert torch.equal(_saved(export_run(run, "best"))["lm_head.weight"], best.lm_head.weight.detach())
    assert torch.equal(_saved(export_run(run))["lm_head.weight"], newest.lm_head.weight.detach())  # last
    (run / "checkpoints" / "best.json").write_text(json.dumps({"checkpoint": "step_00000050", "tau": 3.0,
                                                               "prompts": 8}))
    assert torch.equal(_saved(export_run(run, "best"))["lm_head.weight"], newest.lm_head.weight.detach())


def test_a_bf16_head_keeps_fp32_rope_frequencies():
    """Loading or evaluating a draft in bf16 casts its parameters, not RoPE's inv_freq: in bf16 the angle at
    position 2000 would be off by ~2000·2⁻⁹·f radians at frequency f."""
    head = _head()
    inv_freq = head.rotary_emb.inv_freq.clone()
    cast_parameters(head, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in head.parameters())
    assert head.rotary_emb.inv_freq.dtype == torch.float32 and torch.equal(head.rotary_emb.inv_freq, inv_freq)
    assert (2000 * (inv_freq.bfloat16().float() - inv_freq)).abs().max() > 0.1  # radians at position 2000
