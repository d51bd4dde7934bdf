"""The target sharded with ZeRO-3 across real processes on CPU (gloo), started by the real launchers.

The expensive runs are shared (module-scoped fixtures): one 2-rank zero3 training run through
`accelerate launch` with a shipped config, a 1-process reference with the same global batch, a 2-rank
run interrupted with SIGTERM under torchrun and resumed under the deepspeed launcher, and probes that
look inside the ranks. Two epochs over data that packs into an odd number of micro-batches, so every
epoch ends with a tail that one rank would otherwise read alone.
"""
from __future__ import annotations

import filecmp
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from eagle_online.metrics import read_metrics
from eagle_online.plan import Layout, plan, target_shapes
from eagle_online.recipe import load_recipe
from eagle_online.trainer import Trainer, rank_batch_indices
from tests.families import save_family

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "launch" / "train.py"
PROBE = Path(__file__).resolve().parent / "zero3_probe.py"
BIN = Path(sys.executable).parent
TIMEOUT = 300  # a hang (ranks calling the target a different number of times) fails here, not in CI's limit

# 40 conversations pack into 15 micro-batches of 1024 tokens in both epochs: 2 ranks read 7 pairs, and
# the 15th is the tail no rank reads. One process accumulating 2 reads the same 7 pairs.
DATA = ["data.sources.0.max_rows=40", "data.tokens_per_batch=1024"]
RUN = [*DATA, "training.epochs=2", "training.log_every=1", "training.checkpoint_every=100",
       "training.warmup_ratio=0.2", "training.progress_bar=false", "draft.ttt_length=2",
       "target.zero3.param_persistence_threshold=0", "eval.floors=false"]  # floors: tests/test_run_output.py
STEPS = 14


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"  # two ranks on two cores
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def _train_args(out: Path, *overrides: str) -> list[str]:
    return [str(TRAIN), "--recipe", "tiny_eagle3", f"run.output_dir={out}", *RUN, *overrides]


def _accelerate(nproc: int) -> list[str]:
    return [str(BIN / "accelerate"), "launch", "--config_file", str(ROOT / "launch/accelerate/8gpu.yaml"),
            "--num_processes", str(nproc), "--main_process_port", str(_port())]


def _torchrun(nproc: int) -> list[str]:
    return [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(_port())]


def _deepspeed(hostfile: Path) -> list[str]:
    # --no_ssh: each node is launched by hand (here the only one), as without passwordless ssh.
    return [str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", "0",
            "--master_addr", "127.0.0.1", "--master_port", str(_port())]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _final(run: Path, name: str = "model.safetensors"):
    return load_file(run / "checkpoints" / f"step_{STEPS:08d}" / name)


# ------------------------------------------------------------------------------------ unit tests
@pytest.mark.parametrize("world, accumulation", [(1, 1), (2, 1), (1, 2), (2, 2), (3, 2)])
def test_ranks_split_the_epoch_without_overlap(world, accumulation):
    """Every rank reads `accumulation` micro-batches per step, no two reads coincide, only the tail that
    does not divide evenly is left out, and a step's global batch depends only on world × accumulation."""
    batches = 17
    steps = batches // world // accumulation
    seen = []
    for index in range(steps):
        step_reads = [rank_batch_indices(index, rank=r, world=world, accumulation=accumulation) for r in range(world)]
        assert all(len(reads) == accumulation for reads in step_reads)
        global_batch = sorted(i for reads in step_reads for i in reads)
        one_process = rank_batch_indices(index, rank=0, world=1, accumulation=world * accumulation)
        assert global_batch == one_process
        seen += global_batch
    assert sorted(seen) == list(range(steps * world * accumulation))
    assert batches - len(seen) < world * accumulation


def test_a_shorter_epoch_wraps_instead_of_failing_one_rank():
    """Epoch 1 can pack into fewer rows than epoch 0 (whose count fixes steps_per_epoch): the last reads
    wrap to the epoch's start on every rank, instead of an IndexError on one rank only (the others would
    then wait forever in a ZeRO-3 gather)."""
    trainer = Trainer.__new__(Trainer)
    trainer.recipe = load_recipe("tiny_eagle3", ["training.gradient_accumulation_steps=1"])
    trainer.world, trainer.steps_per_epoch = 2, 5  # epoch 0 had 10 or 11 rows
    trainer._epoch, trainer._batches = 1, [f"row{i}" for i in range(9)]  # epoch 1 packed into 9
    reads = []
    for rank in range(2):
        trainer.accelerator = SimpleNamespace(process_index=rank)
        reads.append([b for step in range(5, 10) for b in trainer.micro_batches(step)])
    assert [len(r) for r in reads] == [5, 5]
    assert reads[0][-1] == "row8" and reads[1][-1] == "row0"  # index 9 wrapped


# -------------------------------------------------------------------------- multi-process runs
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The shared runs: zero3 on 2 ranks (accelerate launch), its 1-process reference, and a 2-rank run
    with the head's optimizer state sharded (zero1) killed by SIGTERM (torchrun) then resumed (deepspeed
    launcher)."""
    root = tmp_path_factory.mktemp("zero3")
    out = SimpleNamespace(root=root, zero3=root / "zero3", single=root / "single", resumed=root / "resumed")
    _run(_accelerate(2) + _train_args(out.zero3, "target.sharding=zero3"))
    _run([sys.executable] + _train_args(out.single, "training.gradient_accumulation_steps=2",
                                        "training.export_at_end=false", "eval.every=null"))  # weights compared

    sharded = ["target.sharding=zero3", "training.optimizer_sharding=zero1"]
    killed = subprocess.Popen(_torchrun(2) + _train_args(out.resumed, *sharded, "training.export_at_end=false"),
                              cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        deadline = time.time() + TIMEOUT
        while not (read_metrics(out.resumed) and read_metrics(out.resumed)[-1]["step"] >= 3):
            assert killed.poll() is None, f"exited early: {killed.stdout.read()[-4000:]}"
            assert time.time() < deadline, "no step 3"
            time.sleep(0.1)
        os.killpg(killed.pid, signal.SIGTERM)  # launcher and ranks, as Ctrl-C, scancel or a preemption do
        out.killed_log, _ = killed.communicate(timeout=120)
    finally:
        if killed.poll() is None:
            os.killpg(killed.pid, signal.SIGKILL)
    out.interrupted_at = [p.name for p in (out.resumed / "checkpoints").iterdir()]
    hostfile = root / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    out.resume_log = _run(_deepspeed(hostfile) + _train_args(out.resumed, *sharded)).stdout
    return out


@pytest.mark.slow
def test_zero3_matches_one_process_with_the_same_global_batch(runs):
    """2 ranks × 1 micro-batch under ZeRO-3 train the head to the weights of 1 process accumulating 2,
    over two epochs whose odd tail is dropped (uneven data finishes, no hang)."""
    assert [r["step"] for r in read_metrics(runs.zero3)] == list(range(1, STEPS + 1))
    a, b = _final(runs.zero3), _final(runs.single)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
    # The same data in the same steps: the token counts per step agree.
    assert [r["tokens"] for r in read_metrics(runs.zero3)] == [r["tokens"] for r in read_metrics(runs.single)]


@pytest.mark.slow
def test_rank0_export_equals_single_process_export(runs, tmp_path):
    """The export written by rank 0 at the end of the 2-rank run is byte-identical to exporting its final
    checkpoint from one process."""
    from eagle_online.export import export_run

    again = export_run(runs.zero3, out=tmp_path / "export")
    for name in ("model.safetensors", "config.json"):
        assert filecmp.cmp(runs.zero3 / "export" / name, again / name, shallow=False), name


@pytest.mark.slow
def test_sigterm_then_resume_matches_uninterrupted_run(runs):
    """SIGTERM to the launcher and both ranks: each finishes its step, a checkpoint is saved, and a run
    resumed under another launcher ends with the weights, optimizer state and metrics of the run that was
    never interrupted. That run kept the whole AdamW state on each rank, this one a half (zero1), saved as
    one consolidated state and split again on resume: AdamW's arithmetic is the same either way."""
    assert len(runs.interrupted_at) == 1 and not runs.interrupted_at[0].endswith(".tmp"), runs.interrupted_at
    step = int(runs.interrupted_at[0].split("_")[1])
    assert 3 <= step < STEPS, f"the interrupt must land mid-run to mean anything: {runs.killed_log[-2000:]}"
    assert "resumed from" in runs.resume_log and f"at step {step}" in runs.resume_log
    a, b = _final(runs.zero3), _final(runs.resumed)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    opt_a, opt_b = _final(runs.zero3, "optimizer.safetensors"), _final(runs.resumed, "optimizer.safetensors")
    assert opt_a.keys() == opt_b.keys() and any(k.endswith(".exp_avg_sq") for k in opt_a)
    for name in opt_a:
        assert torch.equal(opt_a[name], opt_b[name]), name
    for rank in range(2):  # each rank's RNG state is saved and restored
        assert (runs.resumed / "checkpoints" / f"step_{STEPS:08d}" / f"rng_state_{rank}.safetensors").exists()
    drop = ("tokens_per_s", "time_target", "time_head")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in drop} for r in rows]
    assert strip(read_metrics(runs.zero3)) == strip(read_metrics(runs.resumed))


# ------------------------------------------------------------------------------------- probes
def _probe(tmp_path, launcher: list[str], *overrides: str) -> list[dict]:
    _run(launcher + [str(PROBE), str(tmp_path), *overrides])
    return [torch.load(p, weights_only=False, map_location="cpu") for p in sorted(tmp_path.glob("rank*.pt"))]


def _reference(device: str = "cpu", *overrides: str):
    """The same probe in this process, unsharded, on `device` (results on the CPU)."""
    sys.path.insert(0, str(PROBE.parent))
    from zero3_probe import draft_ids, probe_inputs

    from eagle_online.target import FrozenTarget, load_target_model

    cfg = load_recipe("tiny_eagle3", list(overrides)).target
    target = FrozenTarget(load_target_model(cfg, torch.device(device)), None, draft_ids().to(device))
    out = target(*(x.to(device) for x in probe_inputs()))
    return target.cpu(), type(out)(**{k: v.cpu() for k, v in vars(out).items()})


@pytest.mark.slow
def test_two_ranks_each_hold_half_and_capture_what_one_process_does(tmp_path):
    """Under ZeRO-3 on 2 ranks each holds half of the target's elements; the aux features, the teacher
    logits over the draft rows and the argmax test equal an unsharded process's; and the bytes each
    forward all-gathers are what plan.py puts on paper."""
    ranks = _probe(tmp_path, _torchrun(2), "target.zero3.param_persistence_threshold=0")
    target, ref = _reference()
    total = sum(p.numel() for p in target.parameters())
    recipe = load_recipe("tiny_eagle3", ["target.sharding=zero3", "target.zero3.param_persistence_threshold=0"])
    paper = plan(recipe, Layout(2, 2, "zero3"), target_shapes(recipe.target.model)[0])
    assert len(ranks) == 2
    for r in ranks:
        assert r["world"] == 2 and r["counts"].total == total
        assert r["counts"].local == total // 2
        assert r["counts"].local * 4 == paper.target_weights
        assert r["group_sizes"] == [2] and r["repeatable"]
        assert r["received_per_forward"][1:] == [paper.allgather_bytes] * 2  # after the first, every forward
        torch.testing.assert_close(r["aux_hidden"], ref.aux_hidden, rtol=0, atol=1e-6)
        torch.testing.assert_close(r["teacher_logits"], ref.teacher_logits, rtol=0, atol=1e-5)
        assert torch.equal(r["teacher_in_draft"], ref.teacher_in_draft)
        assert torch.equal(r["lm_head_draft"], target.lm_head_draft)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])  # Mixtral counts: tests/test_plan.py
def test_two_ranks_capture_what_one_process_does_on_a_mixture_of_experts(tmp_path, family):
    """The same on the tiny instances of the MoE families (Qwen3-MoE, Mixtral, gpt-oss with its sinks and
    windows): every expert's weights are partitioned and gathered whether or not a token is routed to it,
    as plan.py counts them, and the features and teacher equal one unsharded process's."""
    model = f"target.model={save_family(family, tmp_path / 'target')}"
    (tmp_path / "probe").mkdir()
    ranks = _probe(tmp_path / "probe", _torchrun(2), model, "target.zero3.param_persistence_threshold=0")
    target, ref = _reference("cpu", model)
    total = sum(p.numel() for p in target.parameters())
    recipe = load_recipe("tiny_eagle3", [model, "target.sharding=zero3", "target.zero3.param_persistence_threshold=0"])
    paper = plan(recipe, Layout(2, 2, "zero3"), target_shapes(recipe.target.model)[0])
    assert len(ranks) == 2
    for r in ranks:
        assert r["counts"].total == total and r["counts"].local * 4 == paper.target_weights
        assert r["received_per_forward"][1:] == [paper.allgather_bytes] * 2
        scale = float(ref.aux_hidden.abs().max())
        torch.testing.assert_close(r["aux_hidden"], ref.aux_hidden, rtol=1e-5, atol=1e-5 * scale)
        torch.testing.assert_close(r["teacher_logits"], ref.teacher_logits, rtol=1e-5, atol=1e-4)
        assert torch.equal(r["teacher_in_draft"], ref.teacher_in_draft)


@pytest.mark.slow
def test_node_local_hpz_keeps_gathers_inside_the_node(tmp_path):
    """4 ranks as 2 nodes × 2 with hpz_partition_size=2: every all-gather runs within a group of 2 (a node),
    each rank stores a quarter plus a node-local half, as plan.py says, and the features are unchanged."""
    ranks = _probe(tmp_path, _torchrun(4), "target.zero3.param_persistence_threshold=0",
                   "target.zero3.hpz_partition_size=2")
    target, ref = _reference()
    total = sum(p.numel() for p in target.parameters())
    recipe = load_recipe("tiny_eagle3", ["target.sharding=zero3", "target.zero3.param_persistence_threshold=0",
                                         "target.zero3.hpz_partition_size=2"])
    paper = plan(recipe, Layout(4, 2, "zero3", hpz=2), target_shapes(recipe.target.model)[0])
    assert len(ranks) == 4 and paper.allgather_internode_bytes == 0
    for r in ranks:
        assert r["group_sizes"] == [2]
        assert (r["counts"].local, r["counts"].secondary) == (total // 4, total // 2)
        assert (r["counts"].local + r["counts"].secondary) * 4 == paper.target_weights
        assert r["received_per_forward"][1:] == [paper.allgather_bytes] * 2
        torch.testing.assert_close(r["aux_hidden"], ref.aux_hidden, rtol=0, atol=1e-6)
        assert torch.equal(r["teacher_in_draft"], ref.teacher_in_draft)


@pytest.mark.gpu
def test_zero3_on_one_cuda_process(tmp_path):
    """DeepSpeed ZeRO-3 on CUDA (NCCL) with one process started without a launcher, as `python launch/train.py`
    on one GPU: the probe's rank holds the whole fp32 target through DeepSpeed's partitions and gather hooks and
    captures what the unsharded target captures on the same GPU (the same kernels: 1e-5); then three training
    steps of the recipe with target.sharding=zero3 run and export."""
    from tests.conftest import SHAREGPT_SAMPLE

    [rank] = _probe(tmp_path, [sys.executable], "target.zero3.param_persistence_threshold=0")
    target, ref = _reference("cuda")
    assert rank["world"] == 1 and rank["repeatable"]
    assert rank["counts"].local == rank["counts"].total == sum(p.numel() for p in target.parameters())
    torch.testing.assert_close(rank["aux_hidden"], ref.aux_hidden, rtol=0, atol=1e-5)
    torch.testing.assert_close(rank["teacher_logits"], ref.teacher_logits, rtol=0, atol=1e-5)
    assert torch.equal(rank["teacher_in_draft"], ref.teacher_in_draft)
    out = tmp_path / "run"
    _run([sys.executable, *_train_args(out, "target.sharding=zero3", f"data.sources.0.path={SHAREGPT_SAMPLE}",
                                       "training.max_steps=3", "eval.every=null")])
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    assert (out / "export" / "model.safetensors").exists()


def test_deepspeed_launch_config_is_refused_with_a_reason(tmp_path):
    """An accelerate DeepSpeed config would wrap the head in a DeepSpeed engine too: refused, naming the fix."""
    env = _env()
    env.update(ACCELERATE_USE_DEEPSPEED="true")
    proc = subprocess.run([sys.executable, *_train_args(tmp_path / "run")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 2 and "launch/accelerate/" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_plan_flag_prints_without_training(tmp_path):
    """`--plan` prints the table and trains nothing (no download: the shapes come from a table or a file)."""
    proc = _run([sys.executable, str(TRAIN), "--plan", "--recipe", "llama3_70b_eagle3",
                 f"run.output_dir={tmp_path / 'run'}"])
    assert "| 2x8 GPUs, zero3, hpZ 8 * |" in proc.stdout
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_slurm_script_launches_torchrun_on_each_node(tmp_path):
    """launch/slurm_train.sh under stand-in `srun`/`scontrol` (one node of 2 CPU processes): its c10d
    rendezvous and arguments start a real 2-rank run of the recipe."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/bin/sh\necho localhost\n")
    (fake / "srun").write_text('#!/bin/sh\nwhile [ "${1#--}" != "$1" ]; do shift; done\nexec "$@"\n')  # drop options
    for f in fake.iterdir():
        f.chmod(0o755)
    env = _env()
    env.update(PATH=f"{fake}{os.pathsep}{env['PATH']}", SLURM_JOB_NODELIST="localhost", SLURM_NNODES="1",
               SLURM_JOB_ID="test", GPUS_PER_NODE="2", MASTER_PORT=str(_port()))
    out = tmp_path / "run"
    proc = subprocess.run(["bash", str(ROOT / "launch" / "slurm_train.sh"), "tiny_eagle3", f"run.output_dir={out}",
                           *RUN, "training.max_steps=2", "training.export_at_end=false", "target.sharding=zero3",
                           "eval.every=null"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    assert sorted(p.name for p in (out / "checkpoints" / "step_00000002").glob("rng_state_*")) == [
        "rng_state_0.safetensors", "rng_state_1.safetensors"]
