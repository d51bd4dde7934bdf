"""Scale on paper: plan.py's arithmetic against real module shapes, and launch/SCALING.md against plan.py."""
from pathlib import Path

import pytest
import torch

from eagle_online.heads.eagle3 import Eagle3Head, eagle3_config
from eagle_online.plan import (
    KNOWN_SHAPES,
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
