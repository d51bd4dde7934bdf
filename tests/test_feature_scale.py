"""EAGLE-3's per-layer feature scale (draft.feature_scale=per_layer) on the tiny target: each aux layer's
RMS lands in run_info.json, fc's three column blocks start and step at 1/that scale (one Adam step moves
every weight by lr / its layer's scale), and the export is plain EAGLE-3 weights applied to raw features."""
import json

import pytest
import torch

from eagle_online.export import export_run, load_draft
from eagle_online.recipe import load_recipe
from eagle_online.trainer import Trainer

LR = 1e-3


@pytest.mark.slow
def test_per_layer_feature_scale_trains_each_block_at_its_scale_and_exports_plain(tmp_path):
    run = tmp_path / "run"
    recipe = load_recipe("tiny_eagle3", [
        f"run.output_dir={run}", "draft.feature_scale=per_layer", "draft.ttt_length=1",
        "data.sources.0.max_rows=60", "data.tokens_per_batch=1024", "data.max_length=512", "training.max_steps=1",
        f"training.lr={LR}", "training.warmup_ratio=0", "training.schedule=constant", "training.log_every=1",
        "training.progress_bar=false", "training.export_at_end=false", "eval.every=null"])
    trainer = Trainer(recipe)
    trainer.setup()
    head = trainer.unwrapped_head()
    hidden = head.fc.in_features // 3

    # The scales are each layer's median per-token RMS on the first batch, recorded for the run.
    batch = trainer._epoch_micro_batches(0)[0]
    out = trainer.target(batch.input_ids, batch.position_ids)
    expected = [float(x.pow(2).mean(-1).sqrt().median()) for x in out.aux_hidden.float().split(hidden, -1)]
    info = json.loads((run / "run_info.json").read_text())
    assert info["layer_feature_scales"] == pytest.approx(expected, rel=1e-5)
    assert info["feature_scale"] == 1.0  # no global scale on top
    scales = info["layer_feature_scales"]

    # Init: each block is nn.Linear's default (uniform ±1/√fan_in, std 1/√(3·fan_in)) over its scale.
    before = head.fc.weight.detach().clone()
    for block, s in zip(before.split(hidden, 1), scales):
        assert float(block.std()) * s == pytest.approx((3 * head.fc.in_features) ** -0.5, rel=0.05)

    trainer.train()
    # Adam's first step moves a weight by lr · sign(grad): here by lr / its layer's scale.
    step = (head.fc.weight.detach() - before).abs()
    for block, s in zip(step.split(hidden, 1), scales):
        assert float(block.median()) == pytest.approx(LR / s, rel=1e-3)

    # The export is the head's fc as it is, applied to raw features: the same loss on the same batch.
    exported = load_draft(export_run(run, "last"), head.embed_tokens.weight.detach())
    assert torch.equal(exported.fc.weight, head.fc.weight.detach())
    exported.ttt_length = head.ttt_length
    with torch.no_grad():
        assert float(exported(out, batch).loss) == pytest.approx(float(head(out, batch).loss), rel=1e-6)
