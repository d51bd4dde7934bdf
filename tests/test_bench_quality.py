"""The quality benchmark's machinery on the tiny target, small: a trained EAGLE-3 head's τ (sampled at
T=1, where the tiny target's loops do not flatter drafts) is clearly above the same head untrained."""
import argparse
import json
import subprocess
from pathlib import Path

import pytest

from launch.benchmarks import quality

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_trained_tiny_head_beats_untrained(tmp_path):
    parser = argparse.ArgumentParser()
    quality.add_arguments(parser)
    args = parser.parse_args(["--heads", "eagle3", "--steps", "30", "--rows", "300", "--tokens-per-batch", "2048",
                              "--ttt-length", "1", "--prompts", "6", "--max-new-tokens", "32",
                              "--set", "training.warmup_ratio=0.1",
                              "--work-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "q.json")])
    assert quality.main(args) == 0
    report = json.loads((tmp_path / "q.json").read_text())
    head = report["heads"]["eagle3"]
    trained, untrained = head["trained"]["1.0"], head["untrained"]["1.0"]
    assert trained["verify_forwards"] > 80  # enough rounds for the comparison to mean something
    assert trained["tau"] > untrained["tau"] + 0.1, (trained["tau"], untrained["tau"])
    assert head["trained"]["0.0"]["tau"] >= 1.0 and "bigram" in report
    # EAGLE-3 read the bench's feature layers, not the recipe's engine defaults [2, 4, 5].
    assert json.loads((tmp_path / "runs" / "eagle3" / "run_info.json").read_text())["aux_layer_ids"] == [2, 4, 7]
    # --set reached the recipe the head trained with (tiny_eagle3's own is 0.05).
    assert "warmup_ratio: 0.1\n" in (tmp_path / "runs" / "eagle3" / "recipe.yaml").read_text()
    assert report["settings"]["set"] == ["training.warmup_ratio=0.1"]


def test_a_bad_override_fails_before_any_training(tmp_path, capsys):
    """--set is checked against every head's recipe up front: a key only EAGLE-3 has fails for EAGLE-1
    before EAGLE-3 trains (hours, on SmolLM2), as `error: ...` naming the recipe and the key."""
    from launch import bench

    rc = bench.main(["quality", "--heads", "eagle3", "eagle1", "--steps", "1", "--set",
                     "draft.feature_scale=per_layer", "--work-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: invalid recipe") and "tiny_eagle1.yaml" in err, err
    assert "feature_scale" in err and not (tmp_path / "runs").exists()


def test_smollm2_learning_curves(tmp_path, first_use):
    """On SmolLM2 with --tokens and --curve-every: the same budget for every head, a curve point per
    trainer evaluation with its acceptance per draft position, the floors, and the PNG of the curves.
    `first_use`: the session's one materialisation of the target."""
    parser = argparse.ArgumentParser()
    quality.add_arguments(parser)
    args = parser.parse_args(["--target", "smollm2", "--heads", "eagle3", "eagle1", "--tokens", "1000",
                              "--tokens-per-batch", "512", "--curve-every", "512", "--rows", "40",
                              "--draft-vocab-size", "1024", "--ttt-length", "2", "--prompts", "1",
                              "--prompt-skip", "100", "--max-new-tokens", "8", "--log-every", "1",
                              "--work-dir", str(tmp_path / "runs"),
                              "--out", str(tmp_path / "q.json"), "--plot", str(tmp_path / "q.png")])
    assert quality.main(args) == 0
    report = json.loads((tmp_path / "q.json").read_text())
    s = report["settings"]
    assert (s["target"], s["steps"], s["tokens"], s["num_draft_tokens"]) == ("smollm2", 2, 1024, 5)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    sha = head.stdout.strip()
    assert report["commit"] in ((sha, sha + "+dirty") if head.returncode == 0 else (None,))  # what ran
    assert set(report["heads"]) == set(report["curves"]) == {"eagle3", "eagle1"}
    assert report["bigram"]["0.0"]["tau"] >= 1.0 and len(report["bigram"]["1.0"]["acceptance"]) == 5
    for name, curve in report["curves"].items():
        head = report["heads"][name]
        assert [p["step"] for p in curve] == [0, 1, 2]
        assert [p["tokens"] for p in curve] == [0, 512, 1024]
        seen = [p["tokens_seen"] for p in curve]  # rows packed short of 512, but each step holds some
        assert seen[0] == 0 and all(0 < b - a <= 512 for a, b in zip(seen, seen[1:])), seen
        assert all(len(p["accept"]) == 5 and p["tau_T0"] >= 1.0 for p in curve)
        # The ends are the untrained floor and the trained head, at both temperatures.
        assert curve[0]["tau_T0"] == head["untrained"]["0.0"]["tau"]
        assert curve[0]["tau_T1"] == head["untrained"]["1.0"]["tau"]
        assert curve[-1]["tau_T0"] == pytest.approx(head["trained"]["0.0"]["tau"])
        assert curve[-1]["tau_T1"] == head["trained"]["1.0"]["tau"]
        assert "tau_T1" not in curve[1]
    assert (tmp_path / "q.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bigram_counts_a_real_vocabulary_sparsely():
    """The bigram floor on SmolLM2's 49152-token vocabulary (a dense table would be 9.7 GB): it proposes
    the most frequent trained follower, and the unigram counts after a token never seen."""
    from eagle_online.data.chat import TokenizedConversation
    from eagle_online.evaluate import BigramDrafter

    conv = TokenizedConversation(input_ids=[7, 40000, 7, 40000, 7, 40000, 5, 7], loss_mask=[0, 1, 1, 1, 1, 1, 1, 0])
    bigram = BigramDrafter.from_examples([conv], 49152)
    assert int(bigram.chain(7, 0).logits.argmax()) == 40000  # 7 → 40000 three times
    assert int(bigram.chain(40000, 0).logits.argmax()) == 7  # 40000 → 7 twice, → 5 once
    assert bigram.chain(7, 0).logits[5] == float("-inf")  # never followed 7: never proposed after it
    # 5 → 7 is not counted (7 is not trained there), so 5 and the unseen 123 fall back to the unigram
    assert int(bigram.chain(5, 0).logits.argmax()) == int(bigram.chain(123, 0).logits.argmax()) == 40000
