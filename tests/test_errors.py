"""A user's mistake gets `error: ...` naming the file, key or path and the fix, and exit 2, from every
launcher; never a traceback, and (where it can be known) before any model loads or data is prepared.

The launchers' `main` runs in this process: an exception escaping it fails the test as a traceback
would, and each case finishes in well under a second because nothing is loaded.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from eagle_online.data.sources import DataError, iter_records
from eagle_online.recipe import DataSource

ROOT = Path(__file__).resolve().parent.parent


def _launcher(name: str):
    spec = importlib.util.spec_from_file_location(f"launch_{name}", ROOT / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_dir(root: Path, damaged: bool = False) -> Path:
    """A run directory as training leaves it, its one checkpoint truncated when `damaged`."""
    run = root / "run"
    (run / "checkpoints" / "step_00000004").mkdir(parents=True)
    (run / "draft_config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLMEagle3"]}))
    (run / "run_info.json").write_text(json.dumps({"aux_layer_ids": [2, 4, 5], "target_num_layers": 8}))
    weights = run / "checkpoints" / "step_00000004" / "model.safetensors"
    save_file({"fc.weight": torch.zeros(4, 4)}, str(weights))
    if damaged:
        weights.write_bytes(weights.read_bytes()[:20])
    return run


def _cases(tmp: Path):
    (tmp / "empty_model").mkdir()
    run = _run_dir(tmp / "a")
    out = f"run.output_dir={tmp / 'out'}"
    train = ["--recipe", "tiny_eagle3", out]
    return {
        "missing target": ("train", [*train, "target.model=/no/such/model"], ["target.model", "no such directory"]),
        "target without config.json": ("train", [*train, f"target.model={tmp / 'empty_model'}"],
                                       ["no config.json", str(tmp / "empty_model")]),
        "aux layer id out of range": ("train", [*train, "target.aux_layer_ids=[2,4,99]"],
                                      ["target.aux_layer_ids", "num_hidden_layers=8"]),
        "malformed override": ("train", [*train, "training.lr=[1,2"], ["training.lr=[1,2", "not valid YAML"]),
        "draft vocab above the vocabulary": ("train", [*train, "draft.draft_vocab_size=100000"],
                                             ["draft.draft_vocab_size=100000", "larger than the target's vocabulary"]),
        "list index out of range": ("train", [*train, "data.sources.5.path=x.jsonl"],
                                    ["data.sources has 1 item(s)", "no item 5"]),
        "bool for a number": ("train", [*train, "draft.ttt_length=true"], ["draft.ttt_length", "got True"]),
        "eval given a run folder": ("eval", ["--recipe", "tiny_eagle3", "--draft", str(run), "--prompts",
                                             "builtin:sharegpt"], ["no config.json", str(run / "export")]),
        "eval draft without config.json": ("eval", ["--recipe", "tiny_eagle3", "--draft", str(tmp / "empty_model"),
                                                    "--prompts", "builtin:sharegpt"], ["no config.json"]),
        "eval prompts file missing": ("eval_prompts", [], ["--prompts /no/prompts.jsonl", "no such file"]),
        "corrupt checkpoint on export": ("export", ["--run", str(_run_dir(tmp / "b", damaged=True))],
                                         ["step_00000004/model.safetensors", "cannot be read", "--checkpoint"]),
        "export of no run": ("export", ["--run", str(tmp / "nowhere")], ["is not a run directory: no such directory"]),
    }


CASES = ["missing target", "target without config.json", "aux layer id out of range", "malformed override",
         "draft vocab above the vocabulary", "list index out of range", "bool for a number", "eval given a run folder",
         "eval draft without config.json", "eval prompts file missing", "corrupt checkpoint on export",
         "export of no run"]


@pytest.mark.parametrize("case", CASES)
def test_user_errors_are_messages_not_tracebacks(case, tmp_path, capsys):
    cases = _cases(tmp_path)
    assert sorted(cases) == sorted(CASES)
    launcher, argv, needles = cases[case]
    if launcher == "eval_prompts":  # a real draft folder, prompts that do not exist
        draft = tmp_path / "draft"
        draft.mkdir()
        (draft / "config.json").write_text("{}")
        launcher, argv = "eval", ["--recipe", "tiny_eagle3", "--draft", str(draft), "--prompts", "/no/prompts.jsonl"]
    code = _launcher(launcher).main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_bench_help_is_not_an_error(capsys):
    assert _launcher("bench").main(["--help"]) == 0
    assert "python launch/bench.py throughput" in capsys.readouterr().out


def test_a_byte_that_is_not_utf8_is_reported_by_line(tmp_path):
    path = tmp_path / "data.jsonl"
    second = b'{"conversations": [{"from": "human", "value": "caf\xe9"}]}\n'
    path.write_bytes(b'{"conversations": []}\n' + second)
    column = second.index(b"\xe9") + 1
    with pytest.raises(DataError, match=rf"data.jsonl:2: not UTF-8 text \(byte 0xe9 at column {column}\)"):
        list(iter_records(DataSource(path=str(path))))


def test_a_hub_target_that_cannot_be_had_is_a_message(tmp_path):
    """A hub name that is not downloaded and cannot be fetched (offline here) names target.model."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--recipe", "tiny_eagle3",
                           f"run.output_dir={tmp_path / 'out'}", "target.model=no-such-org/no-such-model"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "error: target.model 'no-such-org/no-such-model' cannot be loaded" in proc.stderr, proc.stderr[-3000:]


def test_an_export_that_cannot_be_written_is_a_message(tmp_path, capsys):
    """--out under a file (as a full disk or a read-only folder would): named, and nothing left behind."""
    from tests.test_export import _fake_run, _head

    run = tmp_path / "run"
    _fake_run(run, [("step_00000100", _head(seed=0))])
    (tmp_path / "afile").write_text("")
    assert _launcher("export").main(["--run", str(run), "--out", str(tmp_path / "afile" / "export")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: could not write {tmp_path / 'afile' / 'export'}"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "run"]
