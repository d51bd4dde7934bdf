"""launch/gpu_check.sh, the one command a GPU machine runs first: its CPU dry run end to end, as CI runs it.

The dry run is the same command at tiny shapes: every stage runs (the wheel kit installed for the GPU
machine's Python 3.12 into a scratch folder, the GPU tests collected and skipped, the benchmarks on the
random_tiny preset), so the script is known to work before a GPU is ever there.
"""
import json
import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STAGES = ["wheels", "env", "pytest_gpu", "bench_llama3_8b_16k", "bench_llama3_8b_32k", "bench_qwen3_8b_16k",
          "bench_llama3_70b_8k", "bench_qwen3_30b_a3b_8k", "bench_gpt_oss_20b_8k"]


def _gpu_check():
    sys.path.insert(0, str(ROOT / "launch"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    return gpu_check


def _fake_kit(folder: Path) -> Path:
    """A kit of one pure-Python wheel (CI has no real kit: it is built on demand and never committed)."""
    folder.mkdir()
    name, info = "gpu_check_fake", "gpu_check_fake-0.1.dist-info"
    files = {f"{name}/__init__.py": "",
             f"{info}/METADATA": "Metadata-Version: 2.1\nName: gpu-check-fake\nVersion: 0.1\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{path},,\n" for path in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(folder / "gpu_check_fake-0.1-py3-none-any.whl", "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
    return folder


@pytest.mark.slow
def test_dry_run_reports_every_stage_and_a_failure_stops_nothing(tmp_path):
    """`bash launch/gpu_check.sh --cpu OUT` with a failure injected into a middle stage: every other stage
    passes, or skips saying why (the GPU tests: no CUDA); the failed one is FAIL and the stages after it still
    run; the exit status is 1; the summary is printed last and written; OUT holds only files the GPU tool
    brings back (at most 8, plain names, no folders): every benchmark's JSON in one file."""
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run(["bash", str(ROOT / "launch" / "gpu_check.sh"), "--cpu", "--wheels",
                           str(_fake_kit(tmp_path / "kit")), "--fail-stage", "bench_llama3_8b_32k", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    stages = {s["name"]: s for s in summary["stages"]}
    assert summary["mode"] == "cpu" and list(stages) == STAGES
    status = {name: s["status"] for name, s in stages.items()}
    assert status == {**dict.fromkeys(STAGES, "PASS"), "pytest_gpu": "SKIP", "bench_llama3_8b_32k": "FAIL"}, stages

    assert stages["wheels"]["figures"]["wheels"] == 1
    assert stages["env"]["figures"]["torch"] and stages["env"]["figures"]["deepspeed"][0].isdigit()
    tests = stages["pytest_gpu"]
    assert "needs CUDA" in tests["reason"] and tests["figures"]["failed"] == 0 and tests["figures"]["skipped"] >= 9
    assert "failure injected" in stages["bench_llama3_8b_32k"]["reason"]
    for name in STAGES[5:]:  # they ran after it
        fig = stages[name]["figures"]
        assert stages[name]["seconds"] > 0 and fig["tokens_per_s"] > 0 and fig["peak_memory_GB"] > 0, name
    assert "random_tiny 7 layers" in stages["bench_llama3_70b_8k"]["figures"]["shape"]  # --target-layers applied
    assert "random_tiny_moe 7 layers" in stages["bench_qwen3_30b_a3b_8k"]["figures"]["shape"]
    assert "random_tiny_moe 8 layers" in stages["bench_gpt_oss_20b_8k"]["figures"]["shape"]

    table = proc.stdout[proc.stdout.rindex("gpu_check summary"):]
    for name in STAGES:
        assert re.search(rf"^{name}\s+{status[name]}\s", table, re.M), (name, table)
    assert table in (out / "gpu_check.log").read_text()
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["gpu_check.log", "summary.json", "pytest_gpu.xml", "benchmarks.json"])
    benchmarks = json.loads((out / "benchmarks.json").read_text())
    assert sorted(benchmarks) == sorted(set(STAGES[3:]) - {"bench_llama3_8b_32k"})
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) and (out / f).is_file() for f in files)


def test_benchmark_commands_on_the_gpu_and_in_the_dry_run(tmp_path):
    """On the GPU the MoE stages build their presets (Qwen3-30B-A3B sliced to 8 layers, one GPU) with short runs;
    the dry run builds the tiny MoE preset with the same recipe and its own step counts."""
    gc = _gpu_check()
    gpu = {s.name: s.command for s in gc.bench_stages(tmp_path, gpu=True)}
    dry = {s.name: s.command for s in gc.bench_stages(tmp_path, gpu=False)}
    assert list(gpu) == list(dry) == STAGES[3:]

    def option(cmd, flag):
        return cmd[len(cmd) - 1 - cmd[::-1].index(flag) + 1]  # the last occurrence wins in argparse

    qwen, oss = gpu["bench_qwen3_30b_a3b_8k"], gpu["bench_gpt_oss_20b_8k"]
    assert [option(qwen, f) for f in ("--recipe", "--target", "--target-layers", "--tokens", "--steps")] == [
        "qwen3_30b_a3b_eagle3", "qwen3_30b_a3b", "8", "8192", "2"]
    assert "target.sharding=none" in qwen and str(tmp_path / "bench_qwen3_30b_a3b_8k.json") in qwen
    assert [option(oss, f) for f in ("--recipe", "--target", "--steps")] == ["gpt_oss_20b_eagle3", "gpt_oss_20b", "2"]
    assert "--target-layers" not in oss
    tiny = dry["bench_qwen3_30b_a3b_8k"]
    assert [option(tiny, f) for f in ("--target", "--target-layers", "--steps", "--warmup")] == [
        "random_tiny_moe", "7", "1", "1"]
    assert option(dry["bench_llama3_8b_16k"], "--target") == "random_tiny"


def test_wheel_kit_decisions(tmp_path):
    """No kit: SKIP naming the script that builds it. Two versions of one package: FAIL before pip runs."""
    gc = _gpu_check()
    absent = gc.wheels_stage(tmp_path / "none", gpu=True, scratch=tmp_path)
    assert absent.status == "SKIP" and "launch/gpu_wheels.sh" in absent.reason and absent.command is None
    kit = tmp_path / "kit"
    kit.mkdir()
    for wheel in ("pydantic_core-2.50.5-cp312-cp312-manylinux2014_x86_64.whl", "pydantic_core-2.41.0-py3-none-any.whl",
                  "hjson-3.1.0-py3-none-any.whl"):
        (kit / wheel).write_bytes(b"x")
    twice = gc.wheels_stage(kit, gpu=True, scratch=tmp_path)
    assert twice.status == "FAIL" and "['pydantic-core']" in twice.reason and twice.command is None
    (kit / "pydantic_core-2.41.0-py3-none-any.whl").unlink()
    gpu = gc.wheels_stage(kit, gpu=True, scratch=tmp_path)
    assert "--target" in gpu.command and str(gc.SITE) in gpu.command and "--platform" not in " ".join(gpu.command)


def test_a_stage_past_its_time_box_is_killed_and_reported(tmp_path):
    """The time box kills the stage's whole process group (a child it started too) and the stage is FAIL."""
    gc = _gpu_check()
    runner = gc.Runner(tmp_path, dict(os.environ), budget_s=100)
    pid_file = tmp_path / "child.pid"
    stage = gc.Stage("slow", ["bash", "-c", f"sleep 60 & echo $! > {pid_file}; echo started; wait"], timeout_s=1)
    start = time.monotonic()
    lines = runner.run(stage)
    assert time.monotonic() - start < 30
    assert stage.status == "FAIL" and "timed out after 1 s" in stage.reason and lines == ["started"]
    assert "started" in (tmp_path / "gpu_check.log").read_text()
    stat = Path(f"/proc/{pid_file.read_text().strip()}/stat")
    deadline = time.monotonic() + 10
    while stat.exists() and stat.read_text().split(") ")[1][0] != "Z" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not stat.exists() or stat.read_text().split(") ")[1][0] == "Z", "the stage's child outlived its time box"
