"""EAGLE-3 export: the exact serving names and shapes, config.json (including the layer-id trap), exact
round trips through load_draft, refusals that leave the disk untouched, and exporting a run directory."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig

import eagle_online.export as export_mod
from eagle_online.export import ExportError, export_head, export_run, load_draft
from eagle_online.heads.eagle3 import TENSORS as REQUIRED_TENSORS
from eagle_online.heads.eagle3 import DocumentLayout, Eagle3Head, eagle3_config

VOCAB, DRAFT_VOCAB, LAYERS = 100, 40, 8
DEFAULT_IDS = [2, 4, 5]  # [2, N//2, N-3] for N = 8, written out by hand


def _target_config():
    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )


def _head(seed=0, target_hidden=None):
    """A random head with every tensor (norms included) away from its init and a valid vocabulary map."""
    g = torch.Generator().manual_seed(seed)
    cfg = eagle3_config(_target_config(), DRAFT_VOCAB)
    if target_hidden is not None:
        cfg.target_hidden_size = target_hidden
    head = Eagle3Head(cfg)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if p.dim() == 1 else 0.0))
    draft_ids = torch.randperm(VOCAB, generator=g)[:DRAFT_VOCAB].sort().values
    t2d = torch.zeros(VOCAB, dtype=torch.bool)
    t2d[draft_ids] = True
    head.init_from_target(torch.randn(VOCAB, 32, generator=g), None, draft_ids - torch.arange(DRAFT_VOCAB), t2d)
    return head


def _export(head, out, ids=DEFAULT_IDS):
    return export_head(head, out, ids, LAYERS)


def _saved(path):
    return load_file(str(Path(path) / "model.safetensors"))


def _files(path):
    return {p.name: p.read_bytes() for p in Path(path).iterdir()}


def _keys(tree):
    """Every key anywhere in a JSON tree."""
    if isinstance(tree, dict):
        return set(tree) | {k for v in tree.values() for k in _keys(v)}
    if isinstance(tree, list):
        return {k for v in tree for k in _keys(v)}
    return set()


@pytest.mark.parametrize("target_hidden", [None, 48])
def test_exported_names_shapes_dtypes_are_the_serving_layout(tmp_path, target_hidden):
    """Golden layout (H 32, Ht 32 or 48, 4 heads × 8, 2 kv heads, I 64, V 100, Vd 40); no embed_tokens."""
    ht = target_hidden or 32
    f32 = torch.float32
    golden = {
        "fc.weight": ((32, 3 * ht), f32),
        "midlayer.input_layernorm.weight": ((32,), f32),
        "midlayer.hidden_norm.weight": ((32,), f32),
        "midlayer.self_attn.q_proj.weight": ((32, 64), f32),
        "midlayer.self_attn.k_proj.weight": ((16, 64), f32),
        "midlayer.self_attn.v_proj.weight": ((16, 64), f32),
        "midlayer.self_attn.o_proj.weight": ((32, 32), f32),
        "midlayer.post_attention_layernorm.weight": ((32,), f32),
        "midlayer.mlp.gate_proj.weight": ((64, 32), f32),
        "midlayer.mlp.up_proj.weight": ((64, 32), f32),
        "midlayer.mlp.down_proj.weight": ((32, 64), f32),
        "norm.weight": ((32,), f32),
        "lm_head.weight": ((40, 32), f32),
        "d2t": ((40,), torch.int64),
        "t2d": ((100,), torch.bool),
    }
    head = _head(target_hidden=target_hidden)
    out = _export(head, tmp_path / "export")
    saved = _saved(out)
    assert {k: (tuple(v.shape), v.dtype) for k, v in saved.items()} == golden
    assert set(REQUIRED_TENSORS) == set(golden)
    state = head.state_dict()
    for name, t in saved.items():
        assert torch.equal(t, state[name]), name
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def test_config_json_fields(tmp_path):
    out = _export(_head(), tmp_path / "export")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"]
    assert cfg["num_hidden_layers"] == 1
    assert cfg["vocab_size"] == VOCAB
    assert cfg["draft_vocab_size"] == DRAFT_VOCAB
    assert cfg["target_hidden_size"] == 32
    assert cfg["hidden_size"] == 32 and cfg["num_key_value_heads"] == 2 and cfg["head_dim"] == 8
    assert cfg["tie_word_embeddings"] is False
    assert cfg["norm_before_residual"] is False
    assert cfg["dtype"] == "float32"
    # RoPE for engines on transformers 4.x as well as 5.x.
    assert cfg["rope_parameters"]["rope_theta"] == cfg["rope_theta"] == 10000.0
    assert "rope_scaling" in cfg and cfg["rope_scaling"] is None


def test_default_ids_write_no_ids_anywhere(tmp_path, recwarn):
    """Both engines' defaults agree; any explicit id field would put SGLang one layer off. Ids the head's
    config happens to carry (e.g. loaded from elsewhere) must not leak through either."""
    head = _head()
    head.config.eagle_aux_hidden_state_layer_ids = DEFAULT_IDS
    head.config.eagle_config = {"eagle_aux_hidden_state_layer_ids": DEFAULT_IDS}
    out = _export(head, tmp_path / "export")
    text = (out / "config.json").read_text()
    keys = _keys(json.loads(text))
    assert not [k for k in keys if "layer_id" in k or "aux" in k], keys
    assert "eagle_config" not in keys
    assert "layer_ids" not in text
    assert not [w for w in recwarn if "SGLang" in str(w.message)]


def test_explicit_ids_write_each_engine_convention_and_warn(tmp_path):
    with pytest.warns(UserWarning, match="SGLang.*version"):
        out = _export(_head(), tmp_path / "export", ids=[1, 3, 6])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [1, 3, 6]  # vLLM: captured as given
    assert cfg["eagle_config"] == {"eagle_aux_hidden_state_layer_ids": [0, 2, 5]}  # SGLang adds 1


@pytest.mark.parametrize("ids, layers", [([0, 3, 6], 8), ([2, 4, 8], 8), ([2, 4, 4], 8), ([2, 3, 3], 6)])
def test_unservable_ids_are_refused(tmp_path, ids, layers):
    """Id 0 has no SGLang spelling; ids past the last layer or repeated (the defaults for N = 6) no engine serves."""
    with pytest.raises(ExportError, match="aux layer id"):
        export_head(_head(), tmp_path / "export", ids, layers)
    assert list(tmp_path.iterdir()) == []


def _step_twice(head, aux, tokens, pos):
    """Two chained draft steps from the fused feature: (pre-norm output, logits) of each."""
    layout = DocumentLayout.from_position_ids(pos)
    cache, outs = [], []
    hidden = head.fc(aux)
    for k in range(2):
        hidden = head.step(hidden, tokens, pos + k, cache, layout)
        outs += [hidden, head.logits(hidden)]
    return outs


def test_load_of_export_reproduces_logits_exactly(tmp_path):
    head = _head()
    out = _export(head, tmp_path / "export")
    with pytest.raises(ExportError, match="embed_tokens"):
        load_draft(out)
    embed = head.embed_tokens.weight.detach().clone()
    loaded = load_draft(out, embed_weight=embed)
    assert type(loaded) is Eagle3Head
    for name, t in head.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    g = torch.Generator().manual_seed(1)
    aux = torch.randn(1, 9, 96, generator=g)
    tokens = torch.randint(0, VOCAB, (1, 9), generator=g)
    pos = torch.cat([torch.arange(5), torch.arange(4)])[None]
    with torch.no_grad():
        for a, b in zip(_step_twice(head, aux, tokens, pos), _step_twice(loaded, aux, tokens, pos)):
            assert torch.equal(a, b)


def _drop_hidden_norm(head):
    head.midlayer.hidden_norm = torch.nn.Identity()


def _narrow_lm_head(head):
    head.lm_head = torch.nn.Linear(32, DRAFT_VOCAB - 1, bias=False)


def _int32_d2t(head):
    head.d2t = head.d2t.int()


def _unfilled_vocab_map(head):
    head.d2t.zero_()


@pytest.mark.parametrize(
    "break_head, named",
    [
        (_drop_hidden_norm, "missing tensor midlayer.hidden_norm.weight"),
        (_narrow_lm_head, "lm_head.weight has shape"),
        (_int32_d2t, "d2t has dtype torch.int32"),
        (_unfilled_vocab_map, "d2t and t2d disagree"),
    ],
)
def test_bad_head_is_refused_and_existing_export_untouched(tmp_path, break_head, named):
    out = _export(_head(seed=0), tmp_path / "export")
    before = _files(out)
    bad = _head(seed=1)
    break_head(bad)
    with pytest.raises(ExportError, match=named):
        _export(bad, out)
    assert _files(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temporary directory left


def test_failure_while_writing_leaves_nothing_half_written(tmp_path, monkeypatch):
    out = _export(_head(seed=0), tmp_path / "export")
    before = _files(out)

    def failing_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(export_mod, "save_file", failing_save)
    with pytest.raises(ExportError, match="could not write .*disk full.*nothing there was replaced"):
        _export(_head(seed=1), out)
    with pytest.raises(ExportError, match="disk full"):
        _export(_head(seed=1), tmp_path / "fresh")
    assert _files(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_export_replaces_an_existing_export(tmp_path):
    out = _export(_head(seed=0), tmp_path / "export")
    (out / "stale.txt").write_text("from an earlier export")
    new = _head(seed=1)
    assert _export(new, out) == out
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert torch.equal(_saved(out)["fc.weight"], new.fc.weight.detach())
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_refuses_to_replace_a_directory_that_is_not_an_export(tmp_path):
    """--out pointed at, say, the target's model directory must not delete it."""
    model_dir = tmp_path / "target"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ExportError, match="refusing to replace"):
        _export(_head(), model_dir)
    assert [p.name for p in model_dir.iterdir()] == ["config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]


def _fake_run(run, heads):
    """A run directory as the trainer writes it: one checkpoint per (name, head), plus an interrupted one."""
    run.mkdir()
    heads[0][1].config.to_json_file(run / "draft_config.json")
    (run / "run_info.json").write_text(json.dumps({"aux_layer_ids": DEFAULT_IDS, "target_num_layers": LAYERS}))
    for name, head in heads:
        (run / "checkpoints" / name).mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in head.state_dict().items()},
                  str(run / "checkpoints" / name / "model.safetensors"))
    (run / "checkpoints" / "step_00000900.tmp").mkdir()
    (run / "checkpoints" / "step_00000900.tmp" / "model.safetensors").write_bytes(b"interrupted")


def test_export_run_takes_the_newest_checkpoint_or_a_named_one(tmp_path):
    old, new = _head(seed=0), _head(seed=1)
    run = tmp_path / "run"
    _fake_run(run, [("step_00000100", old), ("step_00000200", new)])

    out = export_run(run)
    assert out == (run / "export").resolve()
    assert torch.equal(_saved(out)["lm_head.weight"], new.lm_head.weight.detach())
    assert "embed_tokens.weight" not in _saved(out)
    assert json.loads((out / "config.json").read_text())["draft_vocab_size"] == DRAFT_VOCAB

    out = export_run(run, checkpoint="step_00000100", out=tmp_path / "old")
    assert torch.equal(_saved(out)["lm_head.weight"], old.lm_head.weight.detach())
    with pytest.raises(ExportError, match="step_00000300"):
        export_run(run, checkpoint="step_00000300")


def test_launch_export_entry_point(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "launch_export", Path(__file__).resolve().parents[1] / "launch" / "export.py"
    )
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    head = _head(seed=2)
    run = tmp_path / "run"
    _fake_run(run, [("step_00000100", head)])
    assert cli.main(["--run", str(run), "--out", str(tmp_path / "served")]) == 0
    assert str(tmp_path / "served") in capsys.readouterr().out
    loaded = load_draft(tmp_path / "served", embed_weight=head.embed_tokens.weight)
    assert torch.equal(loaded.fc.weight, head.fc.weight)
    assert cli.main(["--run", str(tmp_path / "nowhere")]) == 2
    assert "not a run directory" in capsys.readouterr().err


@pytest.mark.parametrize("layout", ["bin_vllm_names", "sharded"])
def test_load_other_checkpoint_layouts(tmp_path, layout):
    """The original EAGLE-3 releases ship pytorch_model.bin; vLLM-side tools write `layers.0.`; big ones shard."""
    head = _head()
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    state = {k: v.contiguous() for k, v in head.state_dict().items() if k != "embed_tokens.weight"}
    if layout == "bin_vllm_names":
        torch.save({k.replace("midlayer.", "layers.0."): v for k, v in state.items()}, ckpt / "pytorch_model.bin")
    else:
        names = sorted(state)
        shards = {"a.safetensors": names[:7], "b.safetensors": names[7:]}
        for shard, keys in shards.items():
            save_file({k: state[k] for k in keys}, str(ckpt / shard))
        weight_map = {k: shard for shard, keys in shards.items() for k in keys}
        (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    head.config.to_json_file(ckpt / "config.json")
    loaded = load_draft(ckpt, embed_weight=head.embed_tokens.weight)
    for name, t in head.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name


def test_bf16_head_exports_and_loads_in_bf16(tmp_path):
    head = _head().to(torch.bfloat16)
    out = _export(head, tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert _saved(out)["fc.weight"].dtype == torch.bfloat16
    loaded = load_draft(out, embed_weight=head.embed_tokens.weight.float())
    assert loaded.fc.weight.dtype == loaded.embed_tokens.weight.dtype == torch.bfloat16
    assert loaded.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(loaded.lm_head.weight, head.lm_head.weight)


# ------------------------------------------------------------------ vLLM's speculators format
def test_speculators_export_names_its_target_and_reads_back_to_the_same_tensors(tmp_path):
    """export.format=speculators: the fields vLLM's speculators config reads (norm_before_residual written
    false, since that format defaults it to true), the layer under `layers.0.`, and load_draft gives back
    the tensors exactly: its eagle3 export equals the head's own."""
    from eagle_online.layout import Verifier

    head = _head(seed=4, target_hidden=48)
    out = export_head(head, tmp_path / "spec", DEFAULT_IDS, LAYERS,
                      speculators=Verifier("org/target-model", ("LlamaForCausalLM",), 5))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Eagle3Speculator"] and cfg["speculators_model_type"] == "eagle3"
    spec = cfg["speculators_config"]
    assert spec["proposal_methods"][0]["speculative_tokens"] == 5
    assert spec["proposal_methods"][0]["proposal_type"] == spec["default_proposal_method"] == "greedy"
    assert spec["verifier"] == {"name_or_path": "org/target-model", "architectures": ["LlamaForCausalLM"]}
    assert cfg["norm_before_residual"] is False and cfg["draft_vocab_size"] == DRAFT_VOCAB
    assert cfg["target_hidden_size"] == head.config.target_hidden_size
    layer = cfg["transformer_layer_config"]
    assert layer["hidden_size"] == 32 and layer["num_hidden_layers"] == 1 and layer["vocab_size"] == VOCAB
    assert "draft_vocab_size" not in layer and "architectures" not in layer
    assert "eagle_aux_hidden_state_layer_ids" not in cfg  # the defaults: vLLM's own
    names = set(_saved(out))
    assert names == {n.replace("midlayer.", "layers.0.") for n in REQUIRED_TENSORS}
    loaded = load_draft(out, embed_weight=head.embed_tokens.weight)
    for name, t in loaded.state_dict().items():
        assert torch.equal(t, head.state_dict()[name]), name
    assert _files(_export(loaded, tmp_path / "a")) == _files(_export(head, tmp_path / "b"))


def test_speculators_export_writes_other_layer_ids_as_given(tmp_path, recwarn):
    """Only vLLM reads this format, and it captures the ids as given: no SGLang minus-one copy, no warning."""
    from eagle_online.export import load_draft
    from eagle_online.layout import Verifier, aux_layer_ids_of

    head = _head(seed=5)
    out = export_head(head, tmp_path / "spec", [1, 3, 6], LAYERS, speculators=Verifier("t"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [1, 3, 6] and "eagle_config" not in cfg
    assert not [w for w in recwarn if "SGLang" in str(w.message)]
    assert aux_layer_ids_of(load_draft(out, embed_weight=head.embed_tokens.weight).config) == [1, 3, 6]


def test_speculators_format_is_refused_for_other_heads(tmp_path):
    from eagle_online.heads import EAGLE3
    from eagle_online.heads.eagle import ARCHITECTURE as EAGLE
    from eagle_online.layout import Verifier
    from eagle_online.recipe import RecipeError, load_recipe
    from tests.test_heads import _head as small_head

    eagle1, _ = small_head(EAGLE)
    with pytest.raises(ExportError, match="speculators format holds EAGLE-3 drafts, not LlamaForCausalLMEagle"):
        export_head(eagle1, tmp_path / "spec", speculators=Verifier("t"))
    assert not (tmp_path / "spec").exists()
    with pytest.raises(RecipeError, match="export.format=both: the speculators format holds EAGLE-3"):
        load_recipe("tiny_eagle1", ["export.format=both"])
    with pytest.raises(RecipeError, match="export.speculative_tokens is written in the speculators format only"):
        load_recipe("tiny_eagle3", ["export.speculative_tokens=5"])
    assert load_recipe("tiny_eagle3", ["export.format=both"]).draft.architecture == EAGLE3


def test_export_run_in_both_formats(tmp_path):
    """export.format=both (the recipe's, or --format): DIR in the eagle3 layout, DIR_speculators naming the
    recipe's target; each card says how it is served."""
    head = _head(seed=6)
    run = tmp_path / "run"
    _fake_run(run, [("step_00000100", head)])
    (run / "recipe.yaml").write_text("target:\n  model: org/target-model\nexport:\n  format: both\n"
                                     "  speculative_tokens: 4\n")
    info = json.loads((run / "run_info.json").read_text())
    (run / "run_info.json").write_text(json.dumps({**info, "target_architectures": ["LlamaForCausalLM"]}))
    out = export_run(run)
    copy = out.with_name("export_speculators")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLMEagle3"]
    spec = json.loads((copy / "config.json").read_text())
    assert spec["speculators_config"]["verifier"] == {"name_or_path": "org/target-model",
                                                      "architectures": ["LlamaForCausalLM"]}
    assert spec["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 4
    assert f"vllm serve {copy}" in (copy / "README.md").read_text()
    meta = json.loads((out / "eagle_online.json").read_text())
    assert meta["format"] == "both" and meta["serve"]["vllm_speculators"] == f"vllm serve {copy}"
    assert "--speculative-config" in meta["serve"]["vllm"]
    for d in (out, copy):
        loaded = load_draft(d, embed_weight=head.embed_tokens.weight)
        assert torch.equal(loaded.fc.weight, head.fc.weight) and torch.equal(loaded.d2t, head.d2t)
    only = export_run(run, out=tmp_path / "eagle3_only", fmt="eagle3")
    assert not only.with_name("eagle3_only_speculators").exists()
