"""Multi-epoch runs: every step of every epoch has its micro-batches, although each epoch's shuffle
packs into a slightly different number of rows (a step past the shortest epoch's end used to raise
IndexError mid-run: the tiny recipe's epoch 4 packs 102 rows where epoch 0 packs 103)."""
from types import SimpleNamespace

from eagle_online.data import prepare_data
from eagle_online.recipe import load_recipe
from eagle_online.target import load_tokenizer
from eagle_online.trainer import Trainer


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
