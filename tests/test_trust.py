"""Runs a person can trust: what a run directory holds is never mixed with another run, never executed,
never silently continued with another recipe or data, and never taken from a damaged checkpoint.

One short finished run (module fixture) is copied for each case; every case runs `launch/train.py` as a
user does, except the few that check one function.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from eagle_online.checkpoint import CheckpointError, choose_checkpoint, differing_keys, lock_run_dir, recipe_fingerprint
from eagle_online.metrics import read_metrics
from eagle_online.recipe import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "launch" / "train.py"
STEPS = 4
COMMON = ["data.sources.0.max_rows=60", "data.tokens_per_batch=1024", "draft.ttt_length=2", "eval.every=null",
          "training.checkpoint_every=2", "training.log_every=1", "training.progress_bar=false"]


def _train(out: Path, *overrides: str, steps: int = STEPS) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(TRAIN), "--recipe", "tiny_eagle3", f"run.output_dir={out}", *COMMON,
           f"training.max_steps={steps}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


def _refused(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2 with `error: ...` naming each needle, and no traceback."""
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert "Traceback" not in proc.stderr and "error: " in proc.stderr, proc.stderr[-4000:]
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr[-3000:])
    return proc.stderr


def _steps(run: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run)]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A finished run of STEPS steps: checkpoints at steps 2 and 4, metrics, the export."""
    out = tmp_path_factory.mktemp("trust") / "base"
    log = _ok(_train(out))
    assert "exported step_00000004 (the last step)" in log  # which checkpoint, and why
    return out


@pytest.fixture
def run(base, tmp_path) -> Path:
    """A copy of the finished run to damage or extend."""
    return Path(shutil.copytree(base, tmp_path / "run"))


# ---------------------------------------------------------------------- 1. starting over never mixes
@pytest.mark.slow
def test_starting_over_in_a_finished_run_is_refused_or_replaces_it_whole(run):
    old_export = load_file(run / "export" / "model.safetensors")
    _refused(_train(run, "training.resume=false"), str(run), "training.overwrite=true", "another run.output_dir")
    assert _steps(run) == list(range(1, STEPS + 1))
    assert all(torch.equal(t, load_file(run / "export" / "model.safetensors")[k]) for k, t in old_export.items())

    (run / "regenerated").mkdir()  # data written into the run folder is not the run's to delete
    _ok(_train(run, "training.overwrite=true", "training.lr=1e-3", steps=2))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002"]
    assert _steps(run) == [1, 2]  # no row of the old run
    new_export = load_file(run / "export" / "model.safetensors")
    newest = load_file(run / "checkpoints" / "step_00000002" / "model.safetensors")
    assert torch.equal(new_export["fc.weight"], newest["fc.weight"])
    assert not torch.equal(new_export["fc.weight"], old_export["fc.weight"])
    assert (run / "regenerated").is_dir()


# ------------------------------------------------------------ 2. nothing in a run directory runs
class _Payload:
    """Unpickling this touches `marker`: what a planted pickle could do, harmlessly."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def _plant(checkpoint: Path, marker: Path) -> list[str]:
    names = ["custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin", "pytorch_model.bin"]
    for name in names:
        torch.save({"state": _Payload(marker)}, checkpoint / name)
    return names


@pytest.mark.slow
def test_resume_never_unpickles_what_the_run_directory_holds(run, tmp_path):
    marker = tmp_path / "payload_ran"
    probe = tmp_path / "probe.pkl"
    probe.write_bytes(pickle.dumps(_Payload(marker)))
    pickle.loads(probe.read_bytes())  # the payload is real: loading it the unsafe way does run it
    assert marker.exists()
    marker.unlink()

    newest = run / "checkpoints" / "step_00000004"
    planted = _plant(newest, marker)
    assert sorted(p.name for p in newest.iterdir() if p.suffix not in (".safetensors", ".json")) == sorted(planted)
    # Extending the run (an explicit option) resumes from the planted checkpoint; log_every may differ.
    log = _ok(_train(run, "training.extend=true", "training.log_every=2", steps=6))
    assert "resumed from" in log and "at step 4" in log
    assert not marker.exists(), "resume executed a pickle from the run directory"
    assert _steps(run) == [1, 2, 3, 4, 6]


# --------------------------------------------------- 3. resume refuses another recipe or other data
@pytest.mark.slow
def test_resume_refuses_a_changed_recipe_and_keeps_the_record(run):
    recipe_before = (run / "recipe.yaml").read_text()
    stderr = _refused(_train(run, "data.sources.0.max_rows=50", "training.lr=1e-3"),
                      "data.sources.0.max_rows: 60 -> 50", "training.lr: 0.003 -> 0.001", "training.overwrite=true")
    assert "training.extend" not in stderr  # extending would not help here
    assert (run / "recipe.yaml").read_text() == recipe_before
    _refused(_train(run, steps=6), "training.max_steps: 4 -> 6", "training.extend=true")
    assert (run / "recipe.yaml").read_text() == recipe_before
    assert _steps(run) == list(range(1, STEPS + 1))


def test_fingerprint_ignores_only_what_cannot_change_the_weights():
    base = recipe_fingerprint(load_recipe("tiny_eagle3"))
    same = ["training.log_every=1", "training.checkpoint_every=7", "training.keep_checkpoints=5", "eval.every=3",
            "training.progress_bar=false", "training.export_at_end=false", "run.output_dir=/elsewhere"]
    assert differing_keys(base, recipe_fingerprint(load_recipe("tiny_eagle3", same))) == []
    for change, key in [("run.seed=1", "run.seed"), ("draft.ttt_length=3", "draft.ttt_length"),
                        ("data.max_length=256", "data.max_length"), ("target.dtype=bfloat16", "target.dtype"),
                        ("training.gradient_accumulation_steps=2", "training.gradient_accumulation_steps")]:
        diff = differing_keys(base, recipe_fingerprint(load_recipe("tiny_eagle3", [change])))
        assert [d.split(":")[0] for d in diff] == [key], (change, diff)


# ------------------------------------------------------------- 4. a damaged checkpoint is not used
@pytest.mark.slow
def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one(run):
    weights = run / "checkpoints" / "step_00000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    log = _ok(_train(run))
    assert "warning: damaged checkpoint" in log and "step_00000004" in log and "model.safetensors" in log
    assert "resumed from" in log and "at step 2" in log
    assert _steps(run) == list(range(1, STEPS + 1))  # steps 3 and 4 again, once each
    assert load_file(run / "checkpoints" / "step_00000004" / "model.safetensors")  # rewritten whole


@pytest.mark.slow
def test_no_intact_checkpoint_is_an_error_not_a_silent_restart(run):
    for checkpoint in (run / "checkpoints").iterdir():
        (checkpoint / "model.safetensors").unlink()
    _refused(_train(run), "no intact checkpoint", "step_00000002", "step_00000004", "training.overwrite=true")
    assert _steps(run) == list(range(1, STEPS + 1))


def test_other_data_under_the_same_recipe_is_refused(tmp_path):
    """A source file edited between runs: the recipe is the same, the token stream is not."""
    from types import SimpleNamespace

    import numpy as np

    from eagle_online.checkpoint import data_fingerprint
    from eagle_online.trainer import Trainer

    def example(ids):
        return SimpleNamespace(input_ids=np.array(ids, dtype=np.int32), loss_mask=np.ones(len(ids), dtype=np.bool_))

    trainer = Trainer.__new__(Trainer)
    saved = data_fingerprint([example([1, 2, 3]), example([4, 5])])
    trainer._start = (tmp_path / "step_00000002", {"data": saved})
    trainer.data_fingerprint = data_fingerprint([example([1, 2, 3]), example([4, 5])])
    trainer._check_data()
    trainer.data_fingerprint = data_fingerprint([example([1, 2, 3]), example([4, 6])])
    with pytest.raises(CheckpointError, match="other data .2 sequences, 5 tokens"):
        trainer._check_data()


def test_a_full_disk_keeps_the_last_complete_checkpoint(tmp_path, monkeypatch):
    """A write that fails as torch reports a full disk stops the run with a message that says so; the
    partial checkpoint is removed and the one before stays whole."""
    import eagle_online.trainer as trainer_module
    from eagle_online.checkpoint import damage
    from eagle_online.trainer import Trainer

    out = tmp_path / "run"
    recipe = load_recipe("tiny_eagle3", [f"run.output_dir={out}", *COMMON, "training.max_steps=3",
                                         "training.checkpoint_every=1", "data.sources.0.max_rows=30"])
    trainer = Trainer(recipe)
    trainer.setup()
    calls = []
    real = trainer_module.save_optimizer

    def fill_up(state, directory):
        calls.append(directory)
        if len(calls) == 2:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4478400 vs 4478292")
        real(state, directory)

    monkeypatch.setattr(trainer_module, "save_optimizer", fill_up)
    with pytest.raises(CheckpointError, match="is full") as info:
        trainer.train()
    assert "step_00000001, is kept" in str(info.value)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000001"]
    assert damage(out / "checkpoints" / "step_00000001") is None


# ------------------------------------------------------------------- 5. one run per directory
def test_a_second_run_on_a_locked_directory_fails_at_once_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    lock = lock_run_dir(out)
    try:
        assert (out / ".lock").read_text().startswith(f"pid {os.getpid()} on host ")
        _refused(_train(out), "in use by", f"pid {os.getpid()}", "another run.output_dir")
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written, nothing read
        with pytest.raises(CheckpointError, match=f"pid {os.getpid()}"):
            lock_run_dir(out)  # another open of the lock, as another process would
    finally:
        lock.close()
    lock_run_dir(out).close()  # a released (or dead holder's) lock does not block


# ----------------------------------------------------------------- 6. numbers are numbers
@pytest.mark.parametrize("override, key", [("draft.ttt_length=true", "draft.ttt_length"),
                                           ("training.max_steps=2.5", "training.max_steps"),
                                           ("training.lr=yes", "training.lr"),
                                           ("data.sources.0.max_rows='100'", "data.sources.0.max_rows")])
def test_numeric_fields_take_numbers_only(override, key):
    with pytest.raises(RecipeError, match=key):
        load_recipe("tiny_eagle3", [override])


def test_an_int_is_still_a_float_and_a_list_a_pair():
    recipe = load_recipe("tiny_eagle3", ["training.lr=1", "training.betas=[0.8, 0.9]"])
    assert recipe.training.lr == 1.0 and recipe.training.betas == (0.8, 0.9)


# ------------------------------------------------------- 7. which checkpoint is exported, and why
def _fake_checkpoints(run: Path, best: dict | None) -> None:
    for step in (5, 10):
        (run / "checkpoints" / f"step_{step:08d}").mkdir(parents=True)
        save_file({"x": torch.zeros(1)}, str(run / "checkpoints" / f"step_{step:08d}" / "model.safetensors"))
    if best is not None:
        (run / "checkpoints" / "best.json").write_text(json.dumps(best))


def test_export_takes_the_last_step_unless_best_is_asked_and_measured_on_enough_prompts(tmp_path):
    run = tmp_path / "run"
    _fake_checkpoints(run, {"checkpoint": "step_00000005", "step": 5, "tau": 2.5, "prompts": 2})
    assert choose_checkpoint(run) == ("step_00000010", "the last step")
    name, why = choose_checkpoint(run, "best", min_prompts=8)
    assert name == "step_00000010" and "2 prompts" in why and "fewer than the 8" in why
    (run / "checkpoints" / "best.json").write_text(json.dumps({"checkpoint": "step_00000005", "step": 5, "tau": 2.5,
                                                               "prompts": 16}))
    assert choose_checkpoint(run, "best", min_prompts=8) == ("step_00000005", "the best τ, 2.500 over 16 prompts")
    with pytest.raises(RecipeError, match="eval.min_prompts_for_best"):
        load_recipe("tiny_eagle3", ["training.export_checkpoint=best", "eval.num_prompts=2"])
    with pytest.raises(RecipeError, match="set eval.every"):
        load_recipe("tiny_eagle3", ["training.export_checkpoint=best", "eval.every=null"])
    assert load_recipe("tiny_eagle3", ["training.export_checkpoint=best", "eval.num_prompts=8"])
