"""τ during training and what it decides: the best checkpoint by τ survives rotation and is what
export takes; launch/eval.py measures an exported draft as a user runs it."""
import importlib.util
import json
from pathlib import Path

import torch

from eagle_online.checkpoint import best_checkpoint, checkpoint_names
from eagle_online.export import export_run
from eagle_online.metrics import read_metrics
from eagle_online.recipe import load_recipe
from eagle_online.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent


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
    from safetensors.torch import load_file

    exported = load_file(str(export_run(run, "best") / "model.safetensors"))
    best = load_file(str(run / "checkpoints" / "step_00000002" / "model.safetensors"))
    assert torch.equal(exported["fc.weight"], best["fc.weight"])


def test_launch_eval_measures_an_exported_draft(tmp_path, capsys):
    """An untrained tiny EAGLE-3 head, exported, measured by the entry point at T=0 and T=1 with the
    bigram beside it; the JSON carries τ, per-position acceptance and the text."""
    from eagle_online.export import export_head
    from eagle_online.heads import build_head, draft_config
    from eagle_online.target import FrozenTarget, load_target_model

    recipe = load_recipe("tiny_eagle3", ["data.sources.0.max_rows=50"])
    model = load_target_model(recipe.target, torch.device("cpu"))
    ids = torch.arange(0, 4096, 2)
    target = FrozenTarget(model, None, ids)
    head = build_head(draft_config(recipe.draft.architecture, model.config, recipe.draft, 4096))
    t2d = torch.zeros(4096, dtype=torch.bool)
    t2d[ids] = True
    head.init_from_target(target.embed_weight, target.lm_head_draft, ids - torch.arange(2048), t2d)
    export_head(head, tmp_path / "draft", [2, 4, 5], 8)

    spec = importlib.util.spec_from_file_location("launch_eval", ROOT / "launch" / "eval.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "tau.json"
    assert cli.main(["--recipe", "tiny_eagle3", "--draft", str(tmp_path / "draft"), "--prompts", "builtin:sharegpt",
                     "--skip-prompts", "5000", "--num-prompts", "2", "--max-new-tokens", "12", "--temperature", "0",
                     "1", "--bigram", "--tree", "3", "2", "6", "--out", str(out), "data.sources.0.max_rows=50"]) == 0
    report = json.loads(out.read_text())
    for name in ("draft", "bigram", "draft tree", "bigram tree"):
        for t in ("0.0", "1.0"):
            r = report["results"][name][t]
            assert r["tau"] >= 1.0 and len(r["acceptance"]) == (2 if "tree" in name else 4) and r["verify_forwards"] > 0
            assert len(r["samples"]) == 2 and all(s["replies"][0] for s in r["samples"])
            assert r["tree"] == ({"topk": 3, "num_steps": 2, "num_draft_tokens": 6} if "tree" in name else None)
    # greedy: chain and tree decode the target's own reply
    assert report["results"]["draft"]["0.0"]["samples"] == report["results"]["draft tree"]["0.0"]["samples"]
    table = capsys.readouterr().out
    assert "bigram tree" in table and "tree: --speculative-eagle-topk 3 --speculative-num-steps 2" in table
    assert cli.main(["--recipe", "tiny_eagle3", "--draft", str(tmp_path / "nowhere"), "--prompts",
                     "builtin:sharegpt"]) == 2
    assert "no config.json" in capsys.readouterr().err
