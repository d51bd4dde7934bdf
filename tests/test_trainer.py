"""The Trainer in-process: every step of every epoch has its micro-batches, and τ measured during training
decides which checkpoint survives rotation and which one export takes."""
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from eagle_online.checkpoint import best_checkpoint, checkpoint_names
from eagle_online.data import prepare_data
from eagle_online.export import export_run
from eagle_online.metrics import read_metrics
from eagle_online.recipe import load_recipe
from eagle_online.target import load_tokenizer
from eagle_online.trainer import Trainer


# Multi-epoch runs: each epoch's shuffle packs into a slightly different number of rows (the tiny recipe's
# epoch 4 packs 102 rows where epoch 0 packs 103); a step past the shortest epoch's end used to raise
# IndexError mid-run.
def test_every_step_of_every_epoch_has_its_batches():
    recipe = load_recipe("tiny_eagle3", ["data.sources.0.max_rows=1000"])
    trainer = Trainer(recipe)
    trainer.data = prepare_data(recipe.data, load_tokenizer(recipe.target))
    trainer.accelerator, trainer.world = SimpleNamespace(process_index=0), 1
    counts = [len(trainer._epoch_micro_batches(e)) for e in range(6)]
    assert min(counts) < counts[0], counts  # the situation this test is about does occur
    trainer.steps_per_epoch = counts[0]
    for step in range(6 * counts[0]):
        (batch,) = trainer.micro_batches(step)
        assert batch.num_tokens > 0


@pytest.mark.slow
def test_best_checkpoint_by_tau_is_kept_and_exported(tmp_path, monkeypatch):
    run = tmp_path / "run"
    recipe = load_recipe("tiny_eagle3", [f"run.output_dir={run}", "draft.ttt_length=1", "data.sources.0.max_rows=60",
                                         "data.tokens_per_batch=1024", "data.max_length=512", "training.max_steps=4",
                                         "training.checkpoint_every=1", "training.keep_checkpoints=1",
                                         "training.log_every=1", "training.progress_bar=false", "eval.every=2"])
    trainer = Trainer(recipe)
    trainer.setup()
    taus = iter([3.0, 1.5])  # step 2 is the best; step 4 is worse
    monkeypatch.setattr(trainer, "evaluate_tau",
                        lambda: {"eval_tau": next(taus), "eval_accept_0": 0.5, "eval_prompts": 8})
    trainer.train()
    assert checkpoint_names(run) == ["step_00000002", "step_00000004"]  # keep 1 newest + the best
    assert best_checkpoint(run) == {"checkpoint": "step_00000002", "step": 2, "tau": 3.0, "prompts": 8}
    rows = {r["step"]: r for r in read_metrics(run)}
    assert rows[2]["eval_tau"] == 3.0 and rows[4]["eval_tau"] == 1.5 and "eval_tau" not in rows[3]
    exported = load_file(str(export_run(run, "best") / "model.safetensors"))
    best = load_file(str(run / "checkpoints" / "step_00000002" / "model.safetensors"))
    assert torch.equal(exported["fc.weight"], best["fc.weight"])
