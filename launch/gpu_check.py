"""Everything GPU-side of eagle_online checked by one command, on a bare GPU machine, inside a time budget.

    bash launch/gpu_check.sh [OUTDIR]            # a GPU machine (OUTDIR: default $OUT, else runs/gpu_check)
    bash launch/gpu_check.sh --cpu [OUTDIR]      # the dry run: every stage at tiny shapes on the CPU

Stages, each in its own process, time-boxed, reported PASS / FAIL / SKIP with its figures; a failure
never stops the later ones:

  wheels     installs the carried wheel kit (.whl/, built by launch/gpu_wheels.sh) with pip --no-index into
             a folder that every later stage has on PYTHONPATH (dry run: installs it for CPython 3.12 /
             x86-64 into a scratch folder, to prove the kit complete, and uses this machine's packages)
  env        versions of python, torch (CUDA, device), transformers, accelerate, deepspeed, pydantic;
             imports the trainer; torch's CUDA varlen op present
  pytest_gpu `pytest -m gpu`: every test that needs CUDA (all skip in the dry run, which says so)
  bench_*    launch/bench.py throughput at Llama-3.1-8B shapes, 16k and 32k tokens per step, Qwen3-8B at
             16k, a slice of Llama-3.3-70B at 8k, and the mixtures of experts at 8k: a slice of
             Qwen3-30B-A3B and the whole gpt-oss-20b (random weights, synthetic data, TTT 7); the dry
             run runs the same recipes on the random_tiny preset (random_tiny_moe for the MoE ones) at
             256 tokens

At the end a summary table (also OUTDIR/summary.json). OUTDIR holds 4 files, no folders (the GPU tool
brings back at most 8): gpu_check.log (everything printed), summary.json, pytest_gpu.xml and
benchmarks.json (each benchmark's whole JSON by stage name). Exit status 1 when a stage failed.
Only the standard library is imported here: the packages themselves may be what is broken.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SITE = Path(tempfile.gettempdir()) / "eagle_online_gpu_site"  # where the kit is installed on the GPU machine
FIGURES = "gpu_check figures: "  # a stage's output line starting with this carries JSON figures
# The whole run stays under 8 minutes. Time boxes on the GPU (estimates: nothing here has run on one yet):
# wheels + env ~20 s; pytest_gpu ~150 s (inductor compiling the head, two training runs in subprocesses, DeepSpeed
# and NCCL starting) in a box of 270; each benchmark ~40-60 s (imports; 16 GB of random target weights built on
# the GPU in seconds; the head's ~1 B fp32 parameters initialised on the CPU; 2 + 3 steps whole, 3 split, 3
# phase by phase) in a box of 100; the two MoE benchmarks run 1 + 2 steps, ~30-40 s each. A stage gets at most what
# is left of the budget, so a slow one costs the last.
BUDGET_S = 470
# The kit's wheels are for the GPU machine's interpreter (launch/gpu_wheels.sh downloads the same set).
KIT_PLATFORM = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:",
                *[f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64",
                                              "manylinux2014_x86_64")]]

# Goals of the throughput issue (launch/BENCHMARKS.md), judged on the GPU at Llama-3.1-8B shapes, 16k tokens.
GOALS = {"bench_llama3_8b_16k": {"tokens_per_s": 20000.0, "pipeline_overhead": 0.05, "peak_memory_bytes": 60e9}}


@dataclass
class Stage:
    """One step of the check: a command, its time box, and what it reported."""

    name: str
    command: list[str] | None  # None: nothing to run (status and reason already decided)
    timeout_s: float
    status: str = ""  # PASS, FAIL or SKIP
    reason: str = ""
    seconds: float = 0.0
    figures: dict = field(default_factory=dict)


class Runner:
    """Runs stages one after another, each in a new process group that is killed at its time box,
    streaming their output to stdout and to the combined log."""

    def __init__(self, out: Path, env: dict, budget_s: float):
        self.out, self.env = out, env
        self.deadline = time.monotonic() + budget_s
        self.log = open(out / "gpu_check.log", "a", encoding="utf-8")  # open for the whole run

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text + "\n")
        self.log.flush()

    def run(self, stage: Stage) -> list[str]:
        """Run `stage.command` within min(its time box, what is left of the budget); returns its output
        lines and sets the stage's seconds, and its status and reason when it failed or timed out."""
        left = self.deadline - time.monotonic()
        if left < 10:
            stage.status, stage.reason = "SKIP", "no time left in the run's budget"
            return []
        timeout = min(stage.timeout_s, left)
        self.say(f"\n===== {stage.name} (time box {timeout:.0f} s): {' '.join(stage.command)}")
        lines: list[str] = []
        start = time.monotonic()
        proc = subprocess.Popen(stage.command, cwd=ROOT, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)

        def pump():
            for line in proc.stdout:
                line = line.rstrip("\n")
                lines.append(line)
                self.say(line)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc = None
        reader.join(timeout=10)
        stage.seconds = time.monotonic() - start
        if rc is None:
            stage.status, stage.reason = "FAIL", f"timed out after {timeout:.0f} s (killed)"
        elif rc != 0:
            stage.status, stage.reason = "FAIL", f"exit {rc}: {_last_words(lines)}"
        for line in lines:
            if line.startswith(FIGURES):
                stage.figures.update(json.loads(line[len(FIGURES):]))
        return lines


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the stage's whole process group (its subprocesses too), SIGKILL if it lingers."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _last_words(lines: list[str]) -> str:
    """The last meaningful line of a failed stage's output (usually the error), shortened."""
    for line in reversed(lines):
        text = line.strip()
        if text and not set(text) <= set("=-_ "):
            return text[:200]
    return "(no output)"


# ------------------------------------------------------------------------------------------ stages
def wheel_name(path: Path) -> str:
    """A wheel's normalised project name (PEP 427 file name: NAME-VERSION-...whl)."""
    return re.sub(r"[-_.]+", "-", path.name.split("-")[0]).lower()


def wheels_stage(kit: Path, gpu: bool, scratch: Path) -> Stage:
    """Install the kit: on the GPU machine into SITE (put on PYTHONPATH by main), in the dry run for
    CPython 3.12 / x86-64 into `scratch`, which is thrown away."""
    stage = Stage("wheels", None, 120)
    wheels = sorted(kit.glob("*.whl")) if kit.is_dir() else []
    if not wheels:
        stage.status = "SKIP"
        stage.reason = (f"no wheel kit in {kit} (build it with `bash launch/gpu_wheels.sh`; the GPU machine lacks "
                        "deepspeed and pydantic)")
        return stage
    names = [wheel_name(w) for w in wheels]
    twice = sorted({n for n in names if names.count(n) > 1})
    stage.figures = {"wheels": len(wheels), "MiB": round(sum(w.stat().st_size for w in wheels) / 2**20, 1)}
    if twice:
        stage.status, stage.reason = "FAIL", f"more than one version of {twice} in {kit}: pip would refuse the kit"
        return stage
    target = SITE if gpu else scratch
    stage.figures["into"] = str(target) if gpu else "a scratch folder, for CPython 3.12 x86-64 (not used here)"
    stage.command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                     "--no-cache-dir", "--upgrade", "--disable-pip-version-check", "--target", str(target),
                     *([] if gpu else KIT_PLATFORM), *map(str, wheels)]
    return stage


# Printed by the env stage: the versions, and whether what the GPU paths need imports.
_ENV_SCRIPT = r"""
import importlib, json, platform, sys
want_cuda = sys.argv[1] == "gpu"
fig, missing = {"python": platform.python_version()}, []
for name in ("torch", "transformers", "accelerate", "deepspeed", "pydantic"):
    try:
        fig[name] = importlib.import_module(name).__version__
    except Exception as e:
        fig[name] = f"missing ({type(e).__name__}: {e})"[:120]
        missing.append(name)
import torch
fig["cuda"] = torch.version.cuda
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    fig["device"] = f"{props.name}, {props.total_memory / 2**30:.1f} GiB"
elif want_cuda:
    missing.append("a CUDA device")
try:
    import eagle_online.trainer  # everything a training step imports
    from eagle_online.attention import _HAS_TORCH_VARLEN
    fig["torch_varlen_op"] = _HAS_TORCH_VARLEN
except Exception as e:
    missing.append(f"eagle_online.trainer ({type(e).__name__}: {e})"[:160])
print("gpu_check figures: " + json.dumps(fig))
if missing:
    sys.exit("missing: " + ", ".join(missing))
"""


def env_stage(gpu: bool) -> Stage:
    return Stage("env", [sys.executable, "-c", _ENV_SCRIPT, "gpu" if gpu else "cpu"], 90)


def pytest_stage(out: Path) -> Stage:
    return Stage("pytest_gpu", [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
                                f"--junitxml={out / 'pytest_gpu.xml'}", "tests"], 270)


# (stage, recipe, preset, tokens per step, extra arguments): the GPU shapes; the dry run swaps in random_tiny
# (random_tiny_moe for a mixture of experts), drops the step counts and slices 7 of its 8 layers instead.
BENCHES = [
    ("bench_llama3_8b_16k", "llama3_eagle3", "llama3_8b", 16384, []),
    ("bench_llama3_8b_32k", "llama3_eagle3", "llama3_8b", 32768, []),
    ("bench_qwen3_8b_16k", "qwen3_eagle3", "qwen3_8b", 16384, []),
    # 8 of the 80 layers with the whole 70B head, one 8k-token micro-step per step, unsharded on one GPU.
    ("bench_llama3_70b_8k", "llama3_70b_eagle3", "llama3_70b", 8192,
     ["--target-layers", "8", "target.sharding=none", "training.gradient_accumulation_steps=1"]),
    # 8 of the 48 layers (10 of its 61 GB: the whole would not leave the head room), all 128 experts each.
    ("bench_qwen3_30b_a3b_8k", "qwen3_30b_a3b_eagle3", "qwen3_30b_a3b", 8192,
     ["--target-layers", "8", "target.sharding=none", "--steps", "2", "--warmup", "1"]),
    # The whole model: 42 GB in bf16.
    ("bench_gpt_oss_20b_8k", "gpt_oss_20b_eagle3", "gpt_oss_20b", 8192, ["--steps", "2", "--warmup", "1"]),
]
MOE_PRESETS = {"qwen3_30b_a3b", "gpt_oss_20b"}


def _dry_run_options(extra: list[str]) -> list[str]:
    """A benchmark's extra arguments for the dry run: a layer slice becomes 7 of random_tiny's 8 layers, and the
    GPU's step counts give way to the dry run's own."""
    out, rest = [], list(extra)
    while rest:
        arg = rest.pop(0)
        if arg in ("--target-layers", "--steps", "--warmup"):
            value = rest.pop(0)
            out += ["--target-layers", "7"] if arg == "--target-layers" and value else []
        else:
            out.append(arg)
    return out


def bench_stages(results: Path, gpu: bool) -> list[Stage]:
    """The benchmark stages, each writing its JSON into `results` (a scratch folder: main gathers them)."""
    stages = []
    for name, recipe, preset, tokens, extra in BENCHES:
        cmd = [sys.executable, "launch/bench.py", "throughput", "--recipe", recipe, "--out",
               str(results / f"{name}.json")]
        if gpu:
            cmd += ["--target", preset, "--tokens", str(tokens), "--steps", "3", "--warmup", "2", *extra]
        else:  # the same recipe and options at tiny shapes: 8 layers and a 1024-token vocabulary
            tiny = "random_tiny_moe" if preset in MOE_PRESETS else "random_tiny"
            cmd += ["--target", tiny, "--tokens", "256", "--steps", "1", "--warmup", "1", *_dry_run_options(extra),
                    "draft.draft_vocab_size=256", "data.max_length=256"]
        stages.append(Stage(name, cmd, 100 if gpu else 60))
    return stages


# ------------------------------------------------------------------------------------- judgement
def judge_pytest(stage: Stage, out: Path) -> None:
    """Counts from pytest's JUnit XML; a run whose tests all skipped (no CUDA) is a SKIP that says why."""
    path = out / "pytest_gpu.xml"
    if not path.exists():
        stage.status = stage.status or "FAIL"
        stage.reason = stage.reason or "pytest wrote no report"
        return
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    reasons = sorted({s.get("message", "") for s in suite.iter("skipped")})
    stage.figures.update(passed=passed, failed=counts["failures"] + counts["errors"], skipped=counts["skipped"])
    if reasons:
        stage.figures["skip_reasons"] = reasons
    if stage.status:
        return
    if counts["tests"] == 0:
        stage.status, stage.reason = "FAIL", "no test marked gpu was collected"
    elif passed == 0 and counts["skipped"] == counts["tests"]:
        stage.status, stage.reason = "SKIP", f"all {counts['tests']} GPU tests skipped: {'; '.join(reasons)}"
    else:
        stage.status = "PASS"


def judge_bench(stage: Stage, results: Path, gpu: bool) -> None:
    """The benchmark's headline figures from its JSON, and on the GPU the goals they meet or miss."""
    path = results / f"{stage.name}.json"
    if stage.status:
        return
    if not path.exists():
        stage.status, stage.reason = "FAIL", f"no {path.name} written"
        return
    r = json.loads(path.read_text())
    c = r["config"]
    stage.figures.update({
        "tokens_per_s": round(r["tokens_per_s"]), "step_ms": round(r["step_s"] * 1e3, 1),
        "pipeline_overhead": f"{r['pipeline_overhead']:+.1%}",
        "peak_memory_GB": round(r["peak_memory_bytes"] / 1e9, 2), "peak_memory_kind": r["peak_memory_kind"],
        "head_KiB_per_token": round(r["head_saved_bytes_per_token"] / 1024, 1),
        "shape": f"{c['target']} {c['target_layers']} layers, {r['tokens_per_step']:.0f} tokens/step, "
                 f"TTT {c['ttt_length']}, {c['attn_implementation']}, {c['mixed_precision']}",
        "phases_ms": {k: round(v * 1e3, 1) for k, v in r["phases_s"].items()},  # split: synchronised in the step
        "phases_alone_ms": {k: round(v * 1e3, 1) for k, v in r["phases_alone_s"].items()},
    })
    goals = GOALS.get(stage.name) if gpu else None
    if goals:
        stage.figures["goals"] = {
            "tokens_per_s >= 20000": "met" if r["tokens_per_s"] >= goals["tokens_per_s"] else "missed",
            "pipeline_overhead <= 5%": "met" if r["pipeline_overhead"] <= goals["pipeline_overhead"] else "missed",
            "peak_memory <= 60 GB": "met" if r["peak_memory_bytes"] <= goals["peak_memory_bytes"] else "missed",
        }
    stage.status = "PASS"


def summary_table(stages: list[Stage], mode: str, total_s: float) -> str:
    lines = [f"gpu_check summary ({mode}; {total_s:.0f} s of a {BUDGET_S} s budget)",
             f"{'stage':<24}{'status':<8}{'seconds':>8}  figures / reason"]
    for s in stages:
        fig = {k: v for k, v in s.figures.items() if k not in ("phases_ms", "phases_alone_ms", "skip_reasons")}
        text = s.reason if s.status != "PASS" else ""
        text = "; ".join(x for x in (text, ", ".join(f"{k} {v}" for k, v in fig.items())) if x)
        lines.append(f"{s.name:<24}{s.status:<8}{s.seconds:>8.1f}  {text}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- main
def _has_cuda(env: dict) -> bool:
    """Whether torch sees a CUDA device (False when torch itself is broken: the env stage then says how)."""
    try:
        probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"], env=env,
                               capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return False
    return probe.stdout.strip().endswith("True")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", default=os.environ.get("OUT") or str(ROOT / "runs" / "gpu_check"),
                        help="where logs and JSON go (default: $OUT, else runs/gpu_check)")
    parser.add_argument("--cpu", action="store_true", help="the dry run: tiny shapes on the CPU, CUDA-only parts "
                        "skipped (also what happens where torch sees no CUDA device)")
    parser.add_argument("--wheels", default=str(ROOT / ".whl"), help="the wheel kit (default .whl)")
    parser.add_argument("--only", default=None, help="comma-separated stages to run (a rerun); the rest are skipped")
    parser.add_argument("--fail-stage", default=None, metavar="STAGE",
                        help="replace STAGE's command by one that fails (tests that a failure is reported and "
                        "the later stages still run)")
    args = parser.parse_args(argv)

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for old in ("gpu_check.log", "summary.json", "pytest_gpu.xml", "benchmarks.json"):
        (out / old).unlink(missing_ok=True)
    path = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]  # the repo is importable
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    runner = Runner(out, env, BUDGET_S)
    started = time.monotonic()
    gpu = not args.cpu and _has_cuda(env)
    if gpu:  # every stage after `wheels` imports the kit's packages from there (a rerun with --only too)
        env["PYTHONPATH"] = os.pathsep.join([path[0], str(SITE), *path[1:]])
    mode = "GPU" if gpu else ("CPU dry run at tiny shapes, CUDA-only tests skipped"
                              + ("" if args.cpu else " (torch sees no CUDA device)"))
    runner.say(f"gpu_check: {mode}; output in {out}")

    scratch = Path(tempfile.mkdtemp(prefix="gpu_check_kit_"))
    results = Path(tempfile.mkdtemp(prefix="gpu_check_bench_"))
    stages = [wheels_stage(Path(args.wheels), gpu, scratch), env_stage(gpu), pytest_stage(out),
              *bench_stages(results, gpu)]
    only = set(args.only.split(",")) if args.only else None
    known = {s.name for s in stages}
    for name in (only or set()) | {args.fail_stage} - {None}:
        if name not in known:
            parser.error(f"no stage {name!r}; stages: {', '.join(s.name for s in stages)}")
    try:
        for stage in stages:
            if only is not None and stage.name not in only:
                stage.status, stage.reason = "SKIP", "not selected (--only)"
                continue
            if stage.name == args.fail_stage:
                stage.status = stage.reason = ""
                stage.command = [sys.executable, "-c", f"import sys; sys.exit('failure injected by --fail-stage "
                                 f"{stage.name}')"]
            if stage.command is None:
                runner.say(f"\n===== {stage.name}: {stage.status} {stage.reason}")
                continue
            runner.run(stage)
            if stage.name == "pytest_gpu" and stage.seconds:
                judge_pytest(stage, out)
            elif stage.name.startswith("bench_") and stage.seconds:
                judge_bench(stage, results, gpu)
            elif not stage.status:
                stage.status = "PASS"
        benchmarks = {p.stem: json.loads(p.read_text()) for p in sorted(results.glob("bench_*.json"))}
        if benchmarks:  # one file for all: the GPU tool brings back at most 8
            (out / "benchmarks.json").write_text(json.dumps(benchmarks, indent=2) + "\n")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(results, ignore_errors=True)
    total = time.monotonic() - started
    table = summary_table(stages, mode, total)
    runner.say("\n" + table)
    summary = {"mode": "gpu" if gpu else "cpu", "total_s": round(total, 1), "budget_s": BUDGET_S, "out": str(out),
               "stages": [{"name": s.name, "status": s.status, "seconds": round(s.seconds, 1), "reason": s.reason,
                           "figures": s.figures, "command": s.command} for s in stages]}
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(out / "summary.json")
    return 1 if any(s.status == "FAIL" for s in stages) else 0


if __name__ == "__main__":
    sys.exit(main())
