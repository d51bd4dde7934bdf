"""`launch/bench.py throughput`: the benchmark runs the trainer's step and reports a consistent split.

Figures are never asserted (CI machines differ); the structure and its internal consistency are.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eagle_online.timing import PHASES

ROOT = Path(__file__).resolve().parent.parent


def _check(result: dict, steps: int) -> None:
    assert result["benchmark"] == "throughput"
    assert result["tokens_per_step"] > 0 and result["tokens_per_s"] > 0
    assert len(result["whole_steps_s"]) == len(result["split_steps_s"]) == steps
    assert all(t > 0 for t in result["whole_steps_s"] + result["split_steps_s"])
    assert math.isclose(result["tokens_per_s"], result["tokens_per_step"] * steps / sum(result["whole_steps_s"]))
    for key in ("phases_s", "phases_alone_s"):
        assert list(result[key]) == list(PHASES), key
        assert all(v > 0 for v in result[key].values()), (key, result[key])
    # The timed phases make up the synchronised step: what is left is the metrics bookkeeping.
    split = result["split_step_s"]
    assert abs(sum(result["phases_s"].values()) - split) < 0.1 * split, result
    assert math.isclose(result["unaccounted_s"], split - sum(result["phases_s"].values()), abs_tol=1e-9)
    assert math.isclose(result["sum_phases_alone_s"], sum(result["phases_alone_s"].values()), rel_tol=1e-9)
    assert math.isclose(result["pipeline_overhead"], result["step_s"] / result["sum_phases_alone_s"] - 1,
                        rel_tol=1e-9)
    assert result["peak_memory_bytes"] > 10 * 2**20  # at least the model and the interpreter
    # The head keeps at least its input features and one step's attention output per token.
    assert result["head_saved_bytes"] > 0 and result["head_saved_bytes_per_token"] > result["config"]["target_hidden"]


@pytest.mark.slow
def test_throughput_on_the_tiny_recipe(tmp_path):
    """As a user runs it: the tiny recipe's real target and data, JSON written and a table printed."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "launch" / "bench.py"), "throughput", "--recipe", "tiny_eagle3",
           "--steps", "2", "--warmup", "1", "--repeats", "1", "--out", str(out),
           "data.sources.0.max_rows=120", "data.tokens_per_batch=1024", "draft.ttt_length=3"]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    _check(result, steps=2)
    c = result["config"]
    assert (c["target"], c["target_layers"], c["ttt_length"], c["tokens_per_batch"], c["data"]) == (
        "builtin:tiny_chat", 8, 3, 1024, "recipe")
    assert result["tokens_per_step"] <= 1024
    assert "tokens/s" in proc.stdout and "pipeline overhead" in proc.stdout
    for phase in PHASES:
        assert phase in proc.stdout


def _bench_module():
    """launch/bench.py, imported."""
    sys.path.insert(0, str(ROOT / "launch"))
    try:
        import bench
    finally:
        sys.path.pop(0)
    return bench


def _bench(tmp_path: Path, *args: str) -> dict:
    """launch/bench.py run in this process; its JSON report (written in tmp_path)."""
    out = tmp_path / "bench.json"
    assert _bench_module().main([*args[:1], "--out", str(out), *args[1:]]) == 0
    return json.loads(out.read_text())


def test_throughput_on_a_random_preset_with_synthetic_data(tmp_path):
    """A preset architecture built with random weights (no download) trains on synthetic conversations."""
    result = _bench(tmp_path, "throughput", "--target", "random_tiny", "--tokens", "384", "--steps", "1",
                    "--warmup", "1",
                    "--repeats", "1", "draft.draft_vocab_size=256", "draft.ttt_length=2",
                    "training.gradient_accumulation_steps=2")
    _check(result, steps=1)
    c = result["config"]
    assert (c["target"], c["target_vocab"], c["data"], c["gradient_accumulation_steps"]) == (
        "random_tiny", 1024, "synthetic", 2)
    assert result["tokens_per_step"] <= 2 * 384


def test_bad_arguments_fail_clearly():
    assert _bench_module().main(["throughput", "--target", "random_tiny", "--data", "recipe"]) == 2


@pytest.mark.parametrize("preset, name", [("qwen3_30b_a3b", "Qwen/Qwen3-30B-A3B"),
                                          ("gpt_oss_20b", "openai/gpt-oss-20b")])
def test_moe_presets_have_the_published_shapes(preset, name):
    """The MoE presets build (on the meta device: no memory) the published architecture, a slice of it with
    --target-layers: each layer's tensors what plan.py counts for that hub model, every expert included."""
    import torch

    from eagle_online.plan import KNOWN_SHAPES
    from launch.benchmarks.throughput import build_preset

    model = build_preset(preset, 2, torch.bfloat16, torch.device("meta"), "eager")
    shapes = KNOWN_SHAPES[name]
    assert len(model.model.layers) == 2 and model.config.vocab_size == shapes.vocab
    for i, layer in enumerate(model.model.layers):
        assert sorted(p.numel() for p in layer.parameters()) == sorted(shapes.layer_tensors(i))
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape[0] == shapes.experts


def test_throughput_on_a_random_moe_preset(tmp_path):
    """The mixture-of-experts target (Qwen3-MoE's router and experts) goes through the same bench path."""
    result = _bench(tmp_path, "throughput", "--target", "random_tiny_moe", "--tokens", "256", "--steps", "1",
                    "--warmup", "1",
                    "draft.draft_vocab_size=256", "draft.ttt_length=2")
    _check(result, steps=1)
    assert (result["config"]["target"], result["config"]["target_layers"]) == ("random_tiny_moe", 8)
