"""The quality benchmark's machinery on the tiny target, small: a trained EAGLE-3 head's τ (sampled at
T=1, where the tiny target's loops do not flatter drafts) is clearly above the same head untrained."""
import argparse
import json

import pytest

from eagle_online.bench import quality


@pytest.mark.slow
def test_trained_tiny_head_beats_untrained(tmp_path):
    parser = argparse.ArgumentParser()
    quality.add_arguments(parser)
    args = parser.parse_args(["--heads", "eagle3", "--steps", "30", "--rows", "300", "--tokens-per-batch", "2048",
                              "--ttt-length", "1", "--prompts", "6", "--max-new-tokens", "32",
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
