"""End to end: `launch/train.py` run as a user runs it, on the tiny recipe.

These start real training processes on the built-in tiny target (a real, trained chat model),
so what they measure — the loss falling and acc_0 rising — means the head learns the target.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from eagle_online.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "launch" / "train.py"


def _train_cmd(out_dir, *overrides):
    return [sys.executable, str(TRAIN), "--recipe", "tiny_eagle3", f"run.output_dir={out_dir}",
            "training.progress_bar=false", *overrides]


def _env():
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def _run(cmd, timeout=600):
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_tiny_recipe_learns_and_exports(tmp_path):
    """Loss falls and acc_0 rises well above its start; the export is written."""
    out = tmp_path / "run"
    _run(_train_cmd(out, "training.max_steps=60", "training.log_every=1", "training.warmup_ratio=0.1",
                    "data.sources.0.max_rows=600", "data.tokens_per_batch=2048"))
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 61))
    first, last = rows[:3], rows[-10:]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)
    assert mean(last, "loss") < 0.85 * mean(first, "loss"), (mean(first, "loss"), mean(last, "loss"))
    assert mean(last, "acc_0") > max(2 * mean(first, "acc_0"), mean(first, "acc_0") + 0.05), (
        mean(first, "acc_0"), mean(last, "acc_0"))
    assert mean(last, "tau_hat") > mean(first, "tau_hat")
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] > 0 for r in rows)
    # The run's own records: the resolved recipe, data statistics, the vocab cache and the export.
    assert "output_dir: " + str(out) in (out / "recipe.yaml").read_text()
    assert json.loads((out / "data_stats.json").read_text())
    assert (out / "draft_vocab.safetensors").exists()
    config = json.loads((out / "export" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["draft_vocab_size"] == 2048
    tensors = load_file(out / "export" / "model.safetensors")
    assert "midlayer.self_attn.q_proj.weight" in tensors and "embed_tokens.weight" not in tensors


def _wait_for_step(out_dir, step, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"training exited early with {proc.returncode}: {proc.stderr.read()[-3000:]}")
        rows = read_metrics(out_dir) if (Path(out_dir) / "metrics.jsonl").exists() else []
        if rows and rows[-1]["step"] >= step:
            return
        time.sleep(0.2)
    raise AssertionError(f"no step {step} within {timeout}s")


def test_interrupt_and_resume_matches_uninterrupted_run(tmp_path):
    """SIGTERM mid-run saves a checkpoint; running again finishes with exactly the weights,
    optimizer state and metrics of a run that was never interrupted."""
    common = ["training.max_steps=12", "training.log_every=1", "training.checkpoint_every=100",
              "training.export_at_end=false", "data.sources.0.max_rows=200", "data.tokens_per_batch=1024",
              "draft.ttt_length=3", "training.gradient_accumulation_steps=2"]
    straight = tmp_path / "straight"
    _run(_train_cmd(straight, *common))

    resumed = tmp_path / "resumed"
    proc = subprocess.Popen(_train_cmd(resumed, *common), cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_step(resumed, 3, proc)
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stdout
    saved = [p.name for p in (resumed / "checkpoints").iterdir()]
    assert len(saved) == 1 and not saved[0].endswith(".tmp"), saved
    interrupted_at = int(saved[0].split("_")[1])
    assert 3 <= interrupted_at < 12, "the interrupt must land mid-run for this test to mean anything"

    proc = _run(_train_cmd(resumed, *common))
    assert "resumed from" in proc.stdout and f"at step {interrupted_at}" in proc.stdout

    def final(run):
        return load_file(run / "checkpoints" / "step_00000012" / "model.safetensors")

    a, b = final(straight), final(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] == b[name]).all(), name
    opt_a = load_file(straight / "checkpoints" / "step_00000012" / "optimizer.safetensors")
    opt_b = load_file(resumed / "checkpoints" / "step_00000012" / "optimizer.safetensors")
    assert opt_a.keys() == opt_b.keys() and any(k.endswith(".exp_avg_sq") for k in opt_a)
    for name in opt_a:
        assert (opt_a[name] == opt_b[name]).all(), name
    drop = ("tokens_per_s", "time_target", "time_head")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in drop} for r in rows]
    assert strip(read_metrics(straight)) == strip(read_metrics(resumed))


@pytest.mark.parametrize("override, message", [
    ("training.lerning_rate=1", "training.lerning_rate: unknown key"),
    ("data.sources.0.path=/no/such/file.jsonl", "/no/such/file.jsonl"),
])
def test_bad_input_fails_clearly(tmp_path, override, message):
    proc = subprocess.run(_train_cmd(tmp_path / "run", override), cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
