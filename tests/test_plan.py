"""Scale on paper: plan.py's arithmetic against real module shapes, and launch/SCALING.md against plan.py."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eagle_online.heads.eagle3 import Eagle3Head, eagle3_config
from eagle_online.plan import (
    KNOWN_SHAPES,
    PUBLISHED_CONFIGS,
    Layout,
    TargetShapes,
    eagle3_head_activation_bytes,
    eagle3_head_params,
    format_plan,
    plan,
    target_shapes,
)
from eagle_online.recipe import load_recipe
from launch.benchmarks.throughput import saved_tensor_bytes
from tests.families import FAMILIES, MOE, build_family

ROOT = Path(__file__).resolve().parent.parent


def _hf_config(shapes: TargetShapes, model_type: str = "llama"):
    from transformers import AutoConfig

    return AutoConfig.for_model(
        model_type, hidden_size=shapes.hidden, num_hidden_layers=shapes.layers,
        intermediate_size=shapes.intermediate, num_attention_heads=shapes.heads,
        num_key_value_heads=shapes.kv_heads, head_dim=shapes.head_dim, vocab_size=shapes.vocab,
        tie_word_embeddings=shapes.tied_embeddings,
    )


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name, model_type", [
    ("meta-llama/Llama-3.1-8B-Instruct", "llama"),
    ("meta-llama/Llama-3.3-70B-Instruct", "llama"),
    ("Qwen/Qwen2.5-7B-Instruct", "qwen2"),
])
def test_parameter_counts_match_the_real_modules(name, model_type):
    """TargetShapes counts what transformers builds (on the meta device: no memory), and the EAGLE-3 head
    count matches heads/eagle3.py's trainable parameters."""
    from transformers import AutoModelForCausalLM

    shapes = KNOWN_SHAPES[name]
    config = _hf_config(shapes, model_type)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        head = Eagle3Head(eagle3_config(config, 32000))
    assert shapes.params == _count(model)
    assert eagle3_head_params(shapes, 32000) == sum(p.numel() for p in head.parameters() if p.requires_grad)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_counted_tensor_by_tensor(family):
    """From the config a family's checkpoint carries, TargetShapes lists every decoder layer's tensors and
    the whole model's parameters as transformers builds them (the tiny random instances of tests/families.py:
    MoE routers and experts, biases, sinks, q/k norms, Gemma's four norms, Phi-3's fused projections), and
    the EAGLE-3 head's trainable count."""
    from transformers import AutoConfig

    model = build_family(family)
    shapes = TargetShapes.from_config(model.config.to_dict())
    assert len(model.model.layers) == shapes.layers
    for i, layer in enumerate(model.model.layers):
        assert sorted(p.numel() for p in layer.parameters()) == sorted(shapes.layer_tensors(i)), (family, i)
    assert sorted(p.numel() for p in model.parameters()) == sorted(shapes.tensors())
    assert shapes.params == _count(model)
    assert (shapes.experts > 0) == (family in MOE)
    config = AutoConfig.for_model(**model.config.to_dict())
    with torch.device("meta"):
        head = Eagle3Head(eagle3_config(config, 72))
    assert eagle3_head_params(shapes, 72) == sum(p.numel() for p in head.parameters() if p.requires_grad)


def test_qwen3_moe_dense_layers_are_counted_dense():
    """Qwen3-MoE's decoder_sparse_step and mlp_only_layers give some layers a dense MLP: each layer is
    counted as built, and the model's total with it."""
    from transformers import AutoModelForCausalLM

    config = build_family("qwen3_moe").config
    config.decoder_sparse_step, config.mlp_only_layers = 2, [3]
    model = AutoModelForCausalLM.from_config(config)
    shapes = TargetShapes.from_config(config.to_dict())
    sparse = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]
    assert sparse == [1, 5, 7] and [i for i in range(8) if shapes.is_moe(i)] == sparse
    for i, layer in enumerate(model.model.layers):
        assert sorted(p.numel() for p in layer.parameters()) == sorted(shapes.layer_tensors(i)), i
    assert shapes.params == _count(model)


def test_multimodal_config_and_tied_embeddings():
    """A multimodal config (Gemma-3's) is read through its text_config, and its tied embedding is counted
    once, as in the model; an MoE family with no known layout is refused rather than counted as dense."""
    from transformers import AutoModelForCausalLM, Gemma3Config

    text = build_family("gemma3").config
    text.tie_word_embeddings = True
    shapes = TargetShapes.from_config(Gemma3Config(text_config=text.to_dict()).to_dict())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(text)
    assert shapes.tied_embeddings and shapes.params == _count(model)
    assert shapes == TargetShapes.from_config(text.to_dict())
    with pytest.raises(ValueError, match="no parameter layout for the mixture-of-experts model_type 'qwen2_moe'"):
        TargetShapes.from_config({**PUBLISHED_CONFIGS["Qwen/Qwen3-30B-A3B"], "model_type": "qwen2_moe"})


@pytest.mark.parametrize("name", sorted(PUBLISHED_CONFIGS))
def test_published_configs_count_what_transformers_builds(name):
    """The built-in shapes of the MoE and Gemma-3 targets equal, layer by layer, the model transformers
    builds from the same config.json values (on the meta device: no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = PUBLISHED_CONFIGS[name]
    config = AutoConfig.for_model(**cfg.get("text_config", cfg))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = KNOWN_SHAPES[name]
    for i, layer in enumerate(model.model.layers):
        assert sorted(p.numel() for p in layer.parameters()) == sorted(shapes.layer_tensors(i)), (name, i)
    assert shapes.params == _count(model)


def test_published_sizes_of_the_moe_targets():
    """Totals and active parameters as the model cards give them (Qwen3 and Mixtral count the embeddings
    as active; gpt-oss's card counts the unembedding only)."""
    def billions(name):
        s = KNOWN_SHAPES[name]
        return round(s.params / 1e9, 2), round(s.active_params / 1e9, 2), round(
            (s.active_params - s.vocab * s.hidden) / 1e9, 2)

    assert billions("Qwen/Qwen3-30B-A3B")[:2] == (30.53, 3.35)  # 30.5B, 3.3B activated
    assert billions("Qwen/Qwen3-235B-A22B")[:2] == (235.09, 22.19)  # 235B, 22B activated
    assert billions("mistralai/Mixtral-8x7B-Instruct-v0.1")[:2] == (46.70, 12.88)  # 46.7B, 12.9B active
    assert billions("openai/gpt-oss-20b")[::2] == (20.91, 3.61)
    assert billions("openai/gpt-oss-120b")[::2] == (116.83, 5.13)


def test_zero3_gathers_every_expert():
    """ZeRO-3 gathers whole modules whichever experts the tokens are routed to: the per-step traffic of
    Qwen3-30B-A3B is all its non-persistent parameters (30 B, nine times the 3.3 B a token runs through),
    and the gather peak holds a whole layer, every expert, as transformers builds it, plus the prefetch."""
    from transformers import AutoConfig, AutoModelForCausalLM

    name = "Qwen/Qwen3-30B-A3B"
    recipe = load_recipe("tiny_eagle3", [f"target.model={name}", "target.dtype=bfloat16"])
    shapes, z = KNOWN_SHAPES[name], recipe.target.zero3
    p = plan(recipe, Layout(8, 8, "zero3"), shapes)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**PUBLISHED_CONFIGS[name]))
    decoder = [q.numel() for n, q in model.named_parameters() if not n.startswith("lm_head")]
    gathered = _count(model) - sum(x for x in decoder if x <= z.param_persistence_threshold)
    assert p.allgather_bytes == round(gathered * 2 * 7 / 8) and gathered > 9 * shapes.active_params
    layer = sum(q.numel() for q in model.model.layers[0].parameters() if q.numel() > z.param_persistence_threshold)
    assert layer > 600e6 and p.target_gather_peak == (layer + z.prefetch_bucket_size) * 2


@pytest.mark.parametrize("name, experts", [("qwen3_30b_a3b_eagle3", 128), ("gpt_oss_20b_eagle3", 32)])
def test_plan_of_the_moe_recipes_prints_offline(tmp_path, name, experts):
    """`launch/train.py --plan` for the MoE recipes, with the hub unreachable: built-in shapes, every layout."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--plan", "--recipe", name,
                           f"run.output_dir={tmp_path / 'run'}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "KNOWN_SHAPES" in proc.stdout and f"mixture of {experts} experts" in proc.stdout
    assert proc.stdout.count("| 1 GPU, none") == 1 and "| 2x8 GPUs, zero3, hpZ 8" in proc.stdout
    assert not (tmp_path / "run").exists()


def test_published_sizes():
    """The two models the scaling document is about have their published parameter counts."""
    assert KNOWN_SHAPES["meta-llama/Llama-3.1-8B-Instruct"].params == 8_030_261_248
    assert KNOWN_SHAPES["meta-llama/Llama-3.3-70B-Instruct"].params == 70_553_706_496


def test_shapes_come_from_a_file_the_table_or_nowhere():
    shapes, source = target_shapes("builtin:tiny_chat")
    assert (shapes.hidden, shapes.layers, shapes.vocab) == (128, 8, 4096) and source.endswith("config.json")
    _, source = target_shapes("meta-llama/Llama-3.3-70B-Instruct")
    assert "KNOWN_SHAPES" in source or "local cache" in source
    with pytest.raises(ValueError, match="no shapes for target"):
        target_shapes("someone/not-a-model-we-know")


@pytest.mark.parametrize("shapes, ttt", [
    (TargetShapes(hidden=96, layers=4, intermediate=200, heads=4, kv_heads=2, head_dim=16, vocab=500), 7),
    (TargetShapes(hidden=64, layers=4, intermediate=176, heads=8, kv_heads=8, head_dim=8, vocab=300), 3),
])
def test_head_activations_are_what_autograd_saves(shapes, ttt):
    """The plan's count of the EAGLE-3 head's saved activations equals, byte for byte, what saved-tensor
    hooks see for the real head under bf16 autocast (two conversations of 32 tokens, the first 16
    untrained), given the rows the head reports it scored."""
    draft_vocab, t = 72, 64
    config = _hf_config(shapes)
    head = Eagle3Head(eagle3_config(config, draft_vocab))
    g = torch.Generator().manual_seed(0)
    pos = torch.cat([torch.arange(t // 2)] * 2)[None]
    mask = torch.ones(1, t, dtype=torch.long)
    mask[0, : t // 4] = 0
    outputs = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        saved = saved_tensor_bytes(lambda: outputs.append(head.unroll(
            torch.randn(1, t, 3 * shapes.hidden, generator=g).bfloat16(),
            torch.randint(0, shapes.vocab, (1, t), generator=g), pos, mask,
            torch.randn(1, t, draft_vocab, generator=g).bfloat16(), torch.ones(1, t, dtype=torch.bool),
            ttt_length=ttt)), [*head.parameters(), *head.buffers()])
    scored = sum(outputs[0].metrics.counts)
    assert 0 < scored < t * ttt
    assert saved == eagle3_head_activation_bytes(shapes, draft_vocab, t, ttt, scored_rows=scored)
    assert eagle3_head_activation_bytes(shapes, draft_vocab, t, ttt) > saved  # the default bound


def test_sharding_arithmetic():
    """ZeRO-3 divides the target's weights by the GPUs; hpZ adds a node-local 1/8 and takes every gather off
    the inter-node network; zero1 divides AdamW's moments; no sharding gathers nothing."""
    recipe = load_recipe("llama3_70b_eagle3")
    shapes = KNOWN_SHAPES[recipe.target.model]
    whole = plan(recipe, Layout(8, 8, "none"), shapes)
    one_node = plan(recipe, Layout(8, 8, "zero3"), shapes)
    flat = plan(recipe, Layout(16, 8, "zero3"), shapes)
    hpz = plan(recipe, Layout(16, 8, "zero3", hpz=8), shapes)
    assert whole.target_weights == shapes.params * 2 and whole.allgather_bytes == 0
    assert one_node.target_weights == pytest.approx(whole.target_weights / 8, rel=1e-3)
    assert flat.allgather_internode_bytes == pytest.approx(flat.allgather_bytes * 8 / 15, rel=1e-9)
    assert hpz.allgather_internode_bytes == 0 and hpz.allgather_bytes == one_node.allgather_bytes
    assert hpz.target_weights == pytest.approx(flat.target_weights + whole.target_weights / 8, rel=1e-3)
    unsharded_adam = load_recipe("llama3_70b_eagle3", ["training.optimizer_sharding=none"])
    adam = 8 * eagle3_head_params(shapes, 32000)
    assert plan(unsharded_adam, Layout(8, 8, "zero3"), shapes).head_states - one_node.head_states == round(
        adam * 7 / 8)


@pytest.mark.parametrize("name", ["llama3_eagle3", "llama3_70b_eagle3"])
def test_scaling_document_shows_what_plan_computes(name):
    """launch/SCALING.md holds, verbatim, the table `launch/train.py --plan --recipe NAME` prints."""
    recipe = load_recipe(name)
    table = format_plan(recipe, *target_shapes(recipe.target.model))
    doc = (ROOT / "launch" / "SCALING.md").read_text()
    assert table in doc, f"launch/SCALING.md is stale for {name}: regenerate it with --plan"
