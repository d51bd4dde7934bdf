"""What a run tells its user: the banner, plain log lines without a terminal, the floors and eval lines,
the summary, the export's card, the curves, the trackers' tags; and the pieces each is built from."""
import importlib.util
import io
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from tqdm import tqdm

from eagle_online.metrics import JSONLTracker, installed, log_metrics, read_metrics, tau_figures, trackers
from eagle_online.recipe import ASSETS_DIR, RecipeError
from eagle_online.report import CPU_WARNING_PARAMS, Setup, cpu_warning, format_banner, world_note
from tests.test_errors import _launcher as _cli

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One short tiny-recipe run as a user starts it, stdout a pipe (no terminal), the progress bar left on:
    6 steps, a line every 2, τ at steps 3 and 6 with the floors before step 1, then a resumed extension to 8
    steps. Returns the directory and both runs' output."""
    out = tmp_path_factory.mktemp("output") / "run"
    common = [sys.executable, str(ROOT / "launch" / "train.py"), "--recipe", "tiny_eagle3", f"run.output_dir={out}",
              "training.log_every=2", "eval.every=3", "eval.num_prompts=2", "eval.max_new_tokens=12",
              "data.sources.0.max_rows=60", "data.tokens_per_batch=1024", "draft.ttt_length=2"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "PYTHONPATH": str(ROOT)}
    procs = []
    for extra in (["training.max_steps=6"], ["training.max_steps=8", "training.extend=true"]):
        proc = subprocess.run(common + extra, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        procs.append(proc)
    return out, procs[0].stdout, procs[0].stderr, procs[1].stdout


@pytest.mark.slow  # the module's run fixture trains in a subprocess
def test_banner_names_what_the_run_will_do(run):
    out, stdout, stderr, _ = run
    banner = stdout[stdout.index("eagle_online run 'tiny_eagle3'\n"):]
    for needle in ("device      cpu; 1 process (rank 0)", "target      builtin:tiny_chat: 2.7M parameters, float32, "
                   "sharding none", "precision   fp32 for the head (training.mixed_precision=auto)",
                   "TTT 2", "steps       6 (", "from step 0", "= at most 1,024 tokens per optimizer step",
                   "τ every 3 steps on 2 prompts", "floors (the untrained head, a bigram",
                   f"output      {out.resolve()}", "the last checkpoint exported to"):
        assert needle in banner, (needle, banner[:2000])
    if installed("tensorboard"):
        assert "trackers    jsonl, tensorboard (tensorboard --logdir" in banner
    else:
        assert "trackers    jsonl (TensorBoard is not installed: `pip install tensorboard`" in banner
    assert "WARNING" not in stderr  # a 2.7M target on a CPU is what the tiny recipe is for


@pytest.mark.slow  # the module's run fixture trains in a subprocess
def test_plain_lines_every_log_every_steps_and_after_each_evaluation(run):
    _, stdout, _, _ = run
    lines = stdout.splitlines()
    steps = [line for line in lines if line.startswith("step ")]
    assert [line.split()[1] for line in steps] == ["2/6", "4/6", "6/6"], steps
    assert all(" loss " in s and " acc_0 " in s and " tok/s " in s and " lr " in s and " eta " in s for s in steps)
    floors = tau_figures(read_metrics(run[0]))
    floor_line = next(line for line in lines if line.startswith("floors before training:"))
    assert f"untrained τ {floors['untrained']:.3f}" in floor_line and f"bigram τ {floors['bigram']:.3f}" in floor_line
    evals = [line for line in lines if line.startswith("eval τ")]
    assert len(evals) == 2 and "at step 3" in evals[0] and "at step 6" in evals[1], evals
    assert "floors: untrained" in evals[0]
    assert lines.index(floor_line) < lines.index(steps[0])


@pytest.mark.slow  # the module's run fixture trains in a subprocess
def test_summary_and_export_card(run):
    """The first run's summary, and the card of the export the resumed run (to step 8) replaced it with."""
    out, stdout, _, _ = run
    rows = [r for r in read_metrics(out) if r["step"] <= 6]
    summary = stdout[stdout.index("eagle_online run 'tiny_eagle3' finished: step 6 of 6"):]
    last6 = next(r for r in rows if r["step"] == 6 and "loss" in r)
    assert f"loss {last6['loss']:.4f}" in summary
    assert f"acc per TTT step {last6['acc_0']:.3f} {last6['acc_1']:.3f}" in summary
    tau = tau_figures(rows)
    assert f"last {tau['last']['tau']:.3f} at step 6" in summary
    assert f"floors: untrained {tau['untrained']:.3f}, bigram {tau['bigram']:.3f}" in summary
    export = (out / "export").resolve()
    assert f"export      {export}  ←  step_00000006 (the last step)" in summary
    target = ASSETS_DIR / "tiny_chat"
    assert f"vllm serve {target} --speculative-config" in summary and f'"model": "{export}"' in summary
    assert f"--model-path {target} --speculative-algorithm EAGLE3 --speculative-draft-model-path {export}" in summary
    assert f"curves {out / 'curves.svg'}" in summary
    # The recipe's eval.final_temperatures [0, 1]: both columns, each value from metrics.jsonl, and a verdict.
    at = tau["at_temperatures"]["T0"]
    assert set(at) == {"draft", "untrained", "bigram"}
    table = summary[summary.index("T=1      T=0"):].splitlines()
    assert table[1].split() == ["draft", f"{tau['last']['tau']:.3f}", f"{at['draft']:.3f}"]
    assert table[2].split() == ["bigram", f"{tau['bigram']:.3f}", f"{at['bigram']:.3f}"]
    assert table[3].split() == ["untrained", f"{tau['untrained']:.3f}", f"{at['untrained']:.3f}"]
    assert "the draft beats both floors" in table[4] or "the draft does not beat the" in table[4]

    meta = json.loads((export / "eagle_online.json").read_text())
    assert meta["architecture"] == "LlamaForCausalLMEagle3" and meta["target"]["model"] == "builtin:tiny_chat"
    assert meta["checkpoint"] == {"name": "step_00000008", "step": 8, "total_steps": 8, "why": "the last step"}
    tau = tau_figures(read_metrics(out))
    assert meta["tau"]["at_checkpoint"] == tau["last"]["tau"] and tau["last"]["step"] == 8
    assert meta["tau"]["bigram"] == tau["bigram"]
    assert meta["draft"]["draft_vocab_size"] == 2048 and meta["data"]["tokens"] > 0
    assert meta["recipe"]["name"] == "tiny_eagle3" and meta["serve"]["vllm"] in summary
    card = (export / "README.md").read_text()
    assert card.startswith("# LlamaForCausalLMEagle3 draft for builtin:tiny_chat")
    for needle in ("step 8 of 8; taken because: the last step", f"bigram {tau['bigram']:.3f}", "`builtin:sharegpt`",
                   "draft vocabulary 2,048 of 4,096 tokens", f"TTT {meta['draft']['ttt_length']}", "loss kl",
                   meta["serve"]["sglang"], meta["exported_at"]):
        assert needle in card, needle


@pytest.mark.slow  # the module's run fixture trains in a subprocess
def test_the_export_with_its_card_still_loads_and_eval_shows_progress(run, capsys):
    """The card's files sit beside config.json and model.safetensors without changing what a loader reads;
    launch/eval.py --bigram says what it is doing on stderr."""
    out = run[0]
    assert _cli("eval").main(["--recipe", "tiny_eagle3", "--draft", str(out / "export"), "--prompts",
                              "builtin:sharegpt", "--skip-prompts", "5000", "--num-prompts", "2", "--max-new-tokens",
                              "6", "--temperature", "1", "--bigram", "data.sources.0.max_rows=30"]) == 0
    captured = capsys.readouterr()
    assert "bigram" in captured.out and "draft" in captured.out
    for needle in ("bigram: reading and tokenizing", "bigram: counted", "draft T=1: 2/2 prompts",
                   "bigram T=1: 2/2 prompts"):
        assert needle in captured.err, (needle, captured.err)


@pytest.mark.slow  # the module's run fixture trains in a subprocess
def test_curves_and_plot(run, tmp_path, capsys):
    out = run[0]
    svg = ET.parse(out / "curves.svg").getroot()  # well-formed XML
    texts = [t.text for t in svg.iter("{http://www.w3.org/2000/svg}text")]
    assert "loss" in texts and "τ by speculative decoding (eval)" in texts
    assert any(t and t.startswith("bigram ") for t in texts)  # the floor drawn on the τ panel
    assert len(list(svg.iter("{http://www.w3.org/2000/svg}polyline"))) >= 5
    plot = _cli("plot")
    assert plot.main([str(out), "--out", str(tmp_path / "c.html")]) == 0
    assert "<svg" in (tmp_path / "c.html").read_text()
    assert plot.main([str(tmp_path / "nowhere")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


@pytest.mark.slow  # the module's run fixture trains in a subprocess
def test_an_export_of_a_run_with_few_records_says_what_it_does_not_know(run, tmp_path):
    """A run directory copied without its metrics and recipe (or from an older version) still exports, and
    the card says τ was not measured and the target is not recorded, rather than inventing either."""
    import shutil

    from eagle_online.export import export_run

    copy = tmp_path / "run"
    shutil.copytree(run[0], copy, ignore=shutil.ignore_patterns("export", ".lock"))
    for name in ("metrics.jsonl", "recipe.yaml"):
        (copy / name).unlink()
    out = export_run(copy, "last")
    card = (out / "README.md").read_text()
    assert "| τ | not measured (eval.every unset) |" in card and "records no target" in card
    meta = json.loads((out / "eagle_online.json").read_text())
    assert meta["tau"]["last"] is None and meta["serve"] == {} and meta["checkpoint"]["why"] == "the last step"


@pytest.mark.slow  # the module's run fixture trains in a subprocess
def test_a_resumed_run_says_so_and_keeps_its_floors(run):
    out, first, _, resumed = run
    assert "resuming at step 6 (step_00000006, written by 1 process(es))" in resumed
    assert "floors before training" not in resumed  # measured once, at the start of the run
    floors = tau_figures(read_metrics(out))
    assert f"floors: untrained {floors['untrained']:.3f}, bigram {floors['bigram']:.3f}" in resumed
    assert "finished: step 8 of 8 (this session: from step 6)" in resumed
    assert [r["step"] for r in read_metrics(out) if "eval_tau_bigram" in r] == [0]


# ------------------------------------------------------------------------------------ the pieces
def _setup(**changes) -> Setup:
    fields = dict(name="r", output_dir="/runs/r", device="cpu", cuda=False, world=1, local_world=1,
                  target="meta-llama/Llama-3.1-8B-Instruct", target_params=8_030_000_000, target_dtype="bfloat16",
                  sharding="none", precision="fp32", architecture="LlamaForCausalLMEagle3", head_params=10,
                  draft_vocab=32000, ttt_length=7, loss="kl", total_steps=10, steps_per_epoch=10, start_step=0,
                  tokens_per_step_max=8192, tokens_per_step_mean=8000.0, micro_tokens=8192, accumulation=1, lr=1e-4,
                  schedule="cosine", eval_desc="off", checkpoint_every=5,
                  keep_checkpoints=2, export="export", trackers=["jsonl"], tensorboard_missing=True)
    fields.update(changes)
    return Setup(**fields)


def test_a_large_target_on_a_cpu_is_warned_loudly():
    warning = cpu_warning(_setup())
    assert warning and "WARNING: training a 8.0B-parameter target on the CPU" in warning
    # The estimate scales SmolLM2-135M's CPU rate: 8000 tokens at 180 × 135/8030 tokens/s ≈ 2644 s a step.
    assert "a step of ~8,000 tokens takes ~44m03s and the 10 steps ~7h20m" in warning, warning
    assert "launch/accelerate/1gpu.yaml" in warning
    assert cpu_warning(_setup(cuda=True, device="cuda:0")) is None
    assert cpu_warning(_setup(target_params=CPU_WARNING_PARAMS)) is None  # at the threshold: tiny enough


def test_banner_counts_processes_and_nodes_and_hints_at_a_lone_accelerate_process():
    assert "16 processes (ranks 0-15 on 2 nodes)" in format_banner(_setup(world=16, local_world=8, cuda=True))
    assert world_note(_setup(launched_by_accelerate=True)).startswith("note: 1 process")
    assert world_note(_setup(launched_by_accelerate=False)) is None
    assert world_note(_setup(launched_by_accelerate=True, world=2)) is None


def test_progress_bar_shows_the_step_just_finished():
    from eagle_online.trainer import advance

    stream = io.StringIO()
    bar = tqdm(total=3, file=stream, mininterval=0, miniters=1, ascii=True)
    for loss in (3.0, 2.0):
        advance(bar, {"loss": loss, "acc_0": 0.5, "tokens_per_s": 100.0})
    frame = stream.getvalue().split("\r")[-1]
    assert "2/3" in frame and "loss=2.000" in frame, frame


class _Recorder(JSONLTracker):
    name = "recorder"

    def __init__(self):
        self.logged = []

    def log(self, values, step=None, **kwargs):
        self.logged.append((step, values))


def test_tracker_tags_are_grouped_and_metrics_jsonl_keeps_flat_keys(tmp_path):
    jsonl, other = JSONLTracker(tmp_path), _Recorder()
    accelerator = type("A", (), {"trackers": [jsonl, other]})()
    log_metrics(accelerator, {"loss": 1.5, "acc_0": 0.25, "eval_tau": 1.8, "eval_tau_bigram": 1.3}, step=4)
    assert read_metrics(tmp_path) == [{"step": 4, "loss": 1.5, "acc_0": 0.25, "eval_tau": 1.8,
                                       "eval_tau_bigram": 1.3}]
    assert other.logged == [(4, {"train/loss": 1.5, "train/acc_0": 0.25, "eval/tau": 1.8, "eval/tau_bigram": 1.3})]


def test_trackers_named_in_the_recipe(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("wandb", "tensorboard", "tensorboardX") else real(name, *a))
    assert [t.name for t in trackers(tmp_path, ["jsonl", "tensorboard"])] == ["jsonl"]  # stated by the banner
    with pytest.raises(RecipeError, match="training.trackers: wandb is not installed"):
        trackers(tmp_path, ["jsonl", "wandb"])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "mlflow" else real(name, *a))
    assert trackers(tmp_path, ["mlflow"]) == ["mlflow"]


def test_sparse_bigram_proposes_what_dense_counts_give():
    from types import SimpleNamespace

    from eagle_online.evaluate import BigramDrafter

    rng = np.random.default_rng(0)
    vocab = 50
    examples = [SimpleNamespace(input_ids=rng.integers(0, vocab, 40).astype(np.int32),
                                loss_mask=rng.integers(0, 2, 40).astype(np.int8)) for _ in range(20)]
    dense = torch.zeros(vocab, vocab)
    for e in examples:
        for a, b, m in zip(e.input_ids[:-1], e.input_ids[1:], e.loss_mask[1:]):
            dense[a, b] += float(m)
    calls = []
    drafter = BigramDrafter.from_examples(examples, vocab, progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (20, 20)
    for token in range(vocab):
        want = dense[token] if dense[token].sum() > 0 else dense.sum(0)
        assert torch.equal(drafter.chain(token, 0).logits, want.log()), token


def test_serve_commands_per_architecture():
    from eagle_online.export import serve_commands

    eagle3 = serve_commands("meta-llama/Llama-3.1-8B-Instruct", "/runs/x/export", "LlamaForCausalLMEagle3")
    spec = '{"method": "eagle3", "model": "/runs/x/export", "num_speculative_tokens": 3}'
    assert eagle3["vllm"] == f"vllm serve meta-llama/Llama-3.1-8B-Instruct --speculative-config '{spec}'"
    assert "--speculative-algorithm EAGLE3 --speculative-draft-model-path /runs/x/export" in eagle3["sglang"]
    eagle = serve_commands("m", "/d", "LlamaForCausalLMEagle")
    assert '"method": "eagle"' in eagle["vllm"] and "--speculative-algorithm EAGLE " in eagle["sglang"]
    assert serve_commands("m", "/d", "EagleOnlineMLPDraft") == {}


def test_bench_quality_help_is_user_help():
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "bench.py"), "quality", "--help"], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert "--steps" in proc.stdout and "tokens drafted per target forward" in proc.stdout
    assert "Why EAGLE-3 does not win" not in proc.stdout and "acc_0   loss_0" not in proc.stdout


def test_tau_table_names_the_floors_a_draft_does_not_beat():
    from eagle_online.export import tau_table

    tau = {"temperature": 1.0, "last": {"step": 9, "tau": 1.9, "prompts": 4}, "untrained": 1.1, "bigram": 1.7,
           "at_temperatures": {"T0": {"untrained": 1.0, "bigram": 1.6, "draft": 1.5}}}
    lines = tau_table(tau)
    assert lines[0].split() == ["T=1", "T=0"] and lines[1].split() == ["draft", "1.900", "1.500"]
    assert lines[-1] == "the draft does not beat the bigram at T=0 (1.600 ≥ 1.500)"
    tau["at_temperatures"]["T0"]["draft"] = 1.65
    assert tau_table(tau)[-1] == "the draft beats both floors at every temperature"
    del tau["at_temperatures"]["T0"]["draft"]  # stopped before the last step: T=0 floors only
    assert tau_table(tau)[1].split() == ["draft", "1.900", "-"] and "not measured" in tau_table(tau)[-1]
    assert tau_table({**tau, "at_temperatures": None}) == []


def test_final_temperatures_are_not_negative():
    from eagle_online.recipe import load_recipe

    assert load_recipe("tiny_eagle3", ["eval.final_temperatures=[0, 0.7]"]).eval.final_temperatures == [0.0, 0.7]
    with pytest.raises(RecipeError, match="final_temperatures"):
        load_recipe("tiny_eagle3", ["eval.final_temperatures=[-1]"])
